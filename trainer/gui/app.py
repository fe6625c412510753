"""The browser page: `python -m trainer gui` (what gui.ps1 / gui.sh run).

The page only writes TOML files and starts `python -m trainer train --config_file FILE` as a subprocess
(trainer.gui.runner), so a run started here is exactly the run `train.ps1 -Config FILE` would do. The
form logic lives in trainer.gui.form; this module only lays it out with gradio and wires the buttons.

The callbacks are small module-level functions on plain values (lists of shown values, paths, strings),
so tests call them directly; `build_app` wraps them into gradio events. gradio is imported only inside
functions: `python -m trainer` must work without it, and a missing gradio is one clear message.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from trainer.console import restore_ctrl_c
from trainer.errors import UserError
from trainer.files import atomic_write_text
from trainer.gui import form
from trainer.gui.runner import RunStatus, TrainingRun, status_markdown
from trainer.gui.tools import DATASET_TAB, LORA_TAB, tools_tab
from trainer.tools.doctor import check_vram
from trainer.tools.preflight import CheckReport, check_config

DEFAULT_PORT = 7860
PORTS_TRIED = 100
POLL_SECONDS = 1.0
SAMPLES_SHOWN = 24  # newest first; a long run writes many more
STOP_WAIT_S = 300  # on Ctrl-C in the console: how long to wait for a run to save its LoRA
GRADIO_MISSING = (
    "The GUI needs the gradio package, which is not installed in this environment. Fix: run .\\setup.ps1 again "
    "(Linux: ./setup.sh), or install it directly: .venv\\Scripts\\python -m pip install \"gradio>=6,<7\" "
    "(Linux: .venv/bin/python -m pip install \"gradio>=6,<7\"). Training itself works without it: "
    ".\\train.ps1 -Config my.toml")


def require_gradio() -> Any:
    """The gradio module, or a UserError that says how to install it."""
    try:
        import gradio
    except ImportError:
        raise UserError(GRADIO_MISSING) from None
    return gradio


# ---------------------------------------------------------------------------------------------------
# The form: every field by name, in the order the page shows them


PROMPTS_FIELD = "sample_prompts"  # also on the main page, as the text of the file (with_prompts)
SAMPLE_CADENCES = ("sample_every_n_epochs", "sample_every_n_steps")
TRIGGER_FIELD = "metadata_trigger_phrase"  # shown as the "Trigger word" box, not among the advanced fields
# The main fields in words a first-time user knows, with the sd-scripts name kept in the label: tutorials and
# error messages use that name. Advanced fields show the bare name and the argument table's help.
MAIN_LABELS: dict[str, tuple[str, str]] = {
    "pretrained_model_name_or_path": (
        "Base model", "the checkpoint you train on: a .safetensors/.ckpt file (e.g. v1-5-pruned-emaonly.safetensors), "
                      "a diffusers folder, a Hugging Face id, or builtin:tiny-sd1 for the demo"),
    "train_data_dir": (
        "Pictures folder", "the folder that HOLDS your '10_mychar woman' folder (10 = repeats per epoch, then the "
                           "caption used when a picture has no .txt), not that folder itself"),
    "reg_data_dir": (
        "Regularisation pictures (optional)", "same layout (e.g. '1_woman'): other pictures of the class, so the "
                                              "class does not drift towards your subject; leave empty if unsure"),
    "output_name": ("LoRA name", "the file name: output\\NAME.safetensors, used as <lora:NAME:0.8>"),
    "max_train_epochs": ("Epochs", "passes over all pictures (each repeated as its folder says)"),
    "train_batch_size": ("Batch size", "pictures per step: higher is faster but needs more VRAM"),
    "learning_rate": ("Learning rate", "how far each step moves the LoRA; 1e-4 (0.0001) is usual"),
    "unet_lr": ("UNet learning rate", "empty: the learning rate; when set, it wins over it for the UNet"),
    "text_encoder_lr": ("Text encoder learning rate", "empty: the learning rate; often half the UNet's"),
    "network_dim": ("LoRA rank", "the LoRA's size: 8-32 for one character or style; higher = bigger file"),
    "network_alpha": ("LoRA alpha", "scales the LoRA's strength (alpha / rank); half the rank is common"),
    "resolution": ("Resolution", "training picture size: 512 for SD 1.5, 768 for SD 2.x, 1024 for SDXL; or W,H"),
}


def field_label(spec: form.FieldSpec) -> tuple[str, str]:
    """(label, info line) of a field: a main field's words with its sd-scripts name, else name and help."""
    if spec.name in MAIN_LABELS:
        label, info = MAIN_LABELS[spec.name]
        return f"{label} ({spec.name})", info
    return spec.name, spec.help + (" (accepted, has no effect here)" if spec.status == "warn" else "")


def form_fields() -> list[form.FieldSpec]:
    """The main page's fields, then every advanced one (the order of the values lists below)."""
    advanced = [spec for spec in form.advanced_fields() if spec.name != TRIGGER_FIELD]
    return [form.field_spec(name) for name in form.SIMPLE_FIELDS] + advanced


def source_choices(presets_dir: Path, configs_dir: Path) -> list[tuple[str, str]]:
    """(label, path) for the "Start from" list: the card presets, then the configs saved from this page."""
    choices = [(f"preset: {p.stem}", str(p)) for p in form.list_presets(presets_dir)]
    if configs_dir.is_dir():
        choices += [(f"saved: {p.stem}", str(p)) for p in sorted(configs_dir.glob("*.toml"))]
    return choices


def default_source(choices: Sequence[tuple[str, str]]) -> str | None:
    """The demo preset when there is one (Start then works at once), else the first choice."""
    for _, path in choices:
        if Path(path).stem == "demo":
            return path
    return choices[0][1] if choices else None


def shown_values(values: dict[str, Any], fields: Sequence[form.FieldSpec]) -> list[Any]:
    """Form values for every field: the file's value, else the argument's default."""
    return [shown_value(spec, values.get(spec.name, spec.default)) for spec in fields]


def shown_value(spec: form.FieldSpec, value: Any) -> Any:
    """What the field's control holds. Numbers are text boxes: a browser number box cannot be empty (it
    sends 0), and an unset unet_lr must stay unset, not become a learning rate of 0."""
    shown = form.to_text(spec, value)
    if spec.kind in ("int", "float"):
        return "" if shown is None else str(shown)
    return shown


def load_source(path: str, fields: Sequence[form.FieldSpec]) -> tuple[list[Any], str, bool]:
    """A preset or saved config -> (shown values, trigger word, whether the trigger starts every caption).
    A broken file raises ConfigError naming it."""
    values = form.load_values(Path(path))
    trigger = str(values.get(TRIGGER_FIELD) or "")
    prefix = str(values.get("caption_prefix") or "")
    return shown_values(values, fields), trigger, bool(trigger) and prefix == f"{trigger}, "


def collect_values(fields: Sequence[form.FieldSpec], shown: Sequence[Any], trigger: str,
                   add_to_captions: bool) -> dict[str, Any]:
    """What the form says, as argument values (the trigger word applied)."""
    values = {spec.name: form.from_text(spec, value) for spec, value in zip(fields, shown, strict=True)}
    return form.apply_trigger(values, (trigger or "").strip(), bool(add_to_captions))


def prompts_of(fields: Sequence[form.FieldSpec], shown: Sequence[Any], cwd: Path) -> str:
    """The text of the prompt file the form's sample_prompts names (relative paths from the training folder),
    or "" when it names none or it cannot be read."""
    path = form_path(dict(zip((spec.name for spec in fields), shown)).get(PROMPTS_FIELD), cwd)
    if path is None:
        return ""
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def form_path(value: Any, cwd: Path) -> Path | None:
    """A path field's value as the training run will read it: pasted quotes gone, relative to the training
    folder; None when the field is empty."""
    text = form.strip_path(str(value or ""))
    if not text:
        return None
    path = Path(text)
    return path if path.is_absolute() else cwd / path


def with_prompts(fields: Sequence[form.FieldSpec], shown: Sequence[Any], prompts: str | None, *,
                 configs_dir: Path, cwd: Path, write: bool) -> list[Any]:
    """The form's values with the main page's sample prompts in them. An emptied box stops the samples it
    started (sample_prompts no longer names configs/<output_name>.prompts.txt). Unchanged when the box is
    empty otherwise, or holds what the named prompt file holds. Otherwise, with `write` (Save, Start), the
    text goes to configs/<output_name>.prompts.txt, sample_prompts names that file, and a picture comes every
    epoch unless a cadence is set; without `write` (Check, Fits my card?) nothing is written."""
    text = (prompts or "").strip()
    shown = list(shown)
    index = {spec.name: i for i, spec in enumerate(fields)}
    name = str(shown[index["output_name"]] or "").strip() or None
    path = form.config_path_for(name, configs_dir).with_suffix(".prompts.txt")
    named = form_path(shown[index[PROMPTS_FIELD]], cwd)
    if not text and named is not None and named.resolve() == path.resolve():  # the box emptied: no samples
        shown[index[PROMPTS_FIELD]] = ""
        if str(shown[index["sample_every_n_epochs"]]).strip() == "1":  # the cadence this function set
            shown[index["sample_every_n_epochs"]] = ""
        return shown
    if not text or not write or text == prompts_of(fields, shown, cwd):
        return shown
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text + "\n")
    shown[index[PROMPTS_FIELD]] = str(path)
    if not any(str(shown[index[cadence]] or "").strip() for cadence in SAMPLE_CADENCES):
        shown[index["sample_every_n_epochs"]] = "1"
    return shown


def console_command(config: Path, cwd: Path, *, windows: bool = os.name == "nt") -> str:
    """The console command that runs the same file, from the folder the GUI was started in."""
    try:
        shown = config.resolve().relative_to(cwd.resolve()).as_posix()
    except ValueError:
        shown = str(config)
    if windows:
        shown = shown.replace("/", "\\")
        return f'.\\train.ps1 -Config "{shown}"' if " " in shown else f".\\train.ps1 -Config {shown}"
    return f"./train.sh --config_file '{shown}'" if " " in shown else f"./train.sh --config_file {shown}"


def save_form(configs_dir: Path, cwd: Path, source: str | None, fields: Sequence[form.FieldSpec],
              shown: Sequence[Any], trigger: str, add_to_captions: bool) -> tuple[Path, str]:
    """Write configs/NAME.toml from the form; returns it and a message with the console command."""
    values = collect_values(fields, shown, trigger, add_to_captions)
    with working_directory(cwd):  # the file's header shows paths relative to where training starts
        path = form.write_config(form.config_path_for(values.get("output_name"), configs_dir), values,
                                 source=source or None)
    return path, (f"Saved `{path}`.\n\nThe same training from a console: `{console_command(path, cwd)}`")


@contextmanager
def scratch_config(values: dict[str, Any]) -> Iterator[Path]:
    """The form's values as a TOML in a temporary folder, for the buttons that save nothing."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="trainer-gui-") as scratch:
        yield form.write_config(Path(scratch) / "form.toml", values)


def check_form(cwd: Path, fields: Sequence[form.FieldSpec], shown: Sequence[Any], trigger: str,
               add_to_captions: bool) -> str:
    """Check the form as `train` would read it (from a scratch file; nothing is saved) -> markdown."""
    with scratch_config(collect_values(fields, shown, trigger, add_to_captions)) as config:
        return check_file(cwd, config, trigger, fields).to_markdown()


def fit_form(cwd: Path, fields: Sequence[form.FieldSpec], shown: Sequence[Any], trigger: str,
             add_to_captions: bool) -> str:
    """Whether these settings fit this PC's NVIDIA card, as `python -m trainer doctor --config` says: the
    memory estimate (the full-size model traced without memory, a few seconds) against the detected card,
    and what to step down to when it does not fit. Nothing is saved."""
    with scratch_config(collect_values(fields, shown, trigger, add_to_captions)) as config:
        with working_directory(cwd):
            checks = check_vram(str(config))
    # doctor names the file it was given; here that is a scratch copy of the form
    return vram_markdown([dataclasses.replace(c, detail=c.detail.replace(str(config), "this form"))
                          for c in checks])


def vram_markdown(checks: Sequence[Any]) -> str:
    """doctor's VRAM checks as the page's message."""
    lead = {"OK": "**Fits.**", "WARN": "**Warning:**", "FAIL": "**Problem:**"}
    lines = []
    for check in checks:
        detail = check.detail[0].upper() + check.detail[1:] if check.detail else ""
        line = f"{lead.get(check.level, '')} {detail}".strip()
        lines.append(line + (f"\n\n  Fix: {check.fix}" if check.fix else ""))
    return "\n\n".join(f"- {line}" for line in lines)


def check_file(cwd: Path, config: Path, trigger: str, fields: Sequence[form.FieldSpec]) -> CheckReport:
    """check_config from the training folder, its problems worded for this page."""
    with working_directory(cwd):  # relative paths mean what they will mean to the training run
        report = check_config(config, (trigger or "").strip() or None, trigger_fix=(
            f"add it to the caption files, or tick '{form.TRIGGER_TICK}' next to the trigger word (caption_prefix)"))
    report.problems = [page_problem(problem, fields) for problem in report.problems]
    return report


_FROM_ARGUMENTS = re.compile(r"^command line: (datasets\[0\]: )?")


def page_problem(problem: str, fields: Sequence[form.FieldSpec]) -> str:
    """The trainer's message, without the console's "command line:" and quoting advice (the page's fields
    are its arguments),
    and with where to find each advanced setting it names: a user cannot fix min_bucket_reso unseen."""
    problem = _FROM_ARGUMENTS.sub("", problem).replace(" (quote it if it has spaces)", "")  # no quoting in a form
    first, newline, rest = problem.partition("\n")
    named = [spec for spec in fields if "_" in spec.name and spec.name not in form.SIMPLE_FIELDS
             and spec.name != TRIGGER_FIELD and re.search(rf"(?<![\w]){re.escape(spec.name)}(?!\w)", first)]
    if named:
        first += " (" + "; ".join(f"{spec.name} is under '{section_title(spec.section)}' below" for spec in named) + ")"
    return first + newline + rest


_CWD_LOCK = threading.Lock()  # the current directory belongs to the whole process


@contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run a block in another current directory (the GUI's own is the same in normal use). The lock is
    released whatever happens, so one failure never hangs every later button."""
    with _CWD_LOCK:
        try:
            previous = Path.cwd()
            os.chdir(path)
        except OSError as e:
            raise UserError(f"The training folder {path} cannot be used ({e.strerror or e}). Start the GUI again "
                            "from a folder that exists.") from None
        try:
            yield
        finally:
            os.chdir(previous)


# ---------------------------------------------------------------------------------------------------
# The one training run


class RunSlot:
    """The run this page started: one at a time, shared by every browser tab, and independent of them
    (closing the page leaves it running; opening it again shows it)."""

    def __init__(self, cwd: Path, factory: Callable[..., TrainingRun] = TrainingRun):
        self.cwd, self.factory = Path(cwd), factory
        self.run: TrainingRun | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self.run is not None and self.run.running

    def start(self, config: Path) -> None:
        with self._lock:
            if self.running:
                raise UserError("A training run is still going: wait for it, or Stop it first.")
            run = self.factory(config, cwd=self.cwd)
            run.start()
            self.run = run

    def poll(self) -> RunStatus | None:
        return self.run.poll() if self.run is not None else None

    def stop(self) -> bool:
        """Ask the run to stop and save; False when none is going."""
        if not self.running:
            return False
        self.run.stop()
        return True


def start_training(slot: RunSlot, configs_dir: Path, source: str | None, fields: Sequence[form.FieldSpec],
                   shown: Sequence[Any], trigger: str, add_to_captions: bool) -> str:
    """Save the form (the run reads that file) and start it -> a message for the page."""
    if slot.running:
        return "A training run is still going: wait for it, or Stop it first."
    path, _ = save_form(configs_dir, slot.cwd, source, fields, shown, trigger, add_to_captions)
    report = check_file(slot.cwd, path, trigger, fields)  # a run that would fail at once is not started
    if not report.ok:
        return (f"**Not started:** the settings are saved in `{path}`, but training would stop at once.\n\n"
                + report.to_markdown())
    slot.start(path)
    return f"Started training with `{path}`. The same run from a console: `{console_command(path, slot.cwd)}`"


def stop_training(slot: RunSlot) -> str:
    if slot.stop():
        return "Stopping: the trainer saves the LoRA so far, then ends (this can take a little while)."
    return "No training run is going."


def guarded(action: Callable[[], str], outcome: str = "") -> str:
    """A button's message, or the user error that stopped it (and what did not happen)."""
    try:
        return action()
    except UserError as error:
        return f"**Error:** {error} {outcome}".rstrip()


IDLE_TEXT = "No training run yet. Fill in **Settings**, then press **Start training**."


def page_opened(slot: RunSlot, presets_dir: Path, configs_dir: Path,
                current: str | None) -> tuple[list[tuple[str, str]], str | None, str]:
    """What a page (re)loaded in the browser starts with: the "Start from" list as the folders are now
    (configs saved since the server started included), the settings of a run that is going (and its tab),
    else the form as built. Returns (choices, chosen source, tab id)."""
    choices = source_choices(presets_dir, configs_dir)
    run = slot.run
    if run is None or not slot.running:
        return choices, current, "settings"
    config = str(run.config_path)
    if config not in [path for _, path in choices]:
        choices.append((f"running: {Path(config).stem}", config))
    return choices, config, "training"


def finished_lora(slot: RunSlot, prefilled: str | None) -> str | None:
    """The LoRA file the page's run finished with (absolute: the run's paths are from its folder), when it
    is not the one already put in the LoRA tools' file boxes; else None (the boxes keep what was typed)."""
    status = slot.poll()
    if status is None or status.state != "finished" or not status.output:
        return None
    path = Path(status.output)
    path = str(path if path.is_absolute() else slot.cwd / path)
    return None if path == prefilled else path


def poll_training(slot: RunSlot, shown_samples: Sequence[str]) -> tuple[str, str, list[tuple[str, str]] | None,
                                                                         list[str], bool]:
    """The progress area: (status markdown, log tail, samples to show or None when unchanged, the sample
    paths now shown, whether a run is going)."""
    status = slot.poll()
    if status is None:
        return IDLE_TEXT, "", None, list(shown_samples), False
    samples = list(reversed(status.samples))[:SAMPLES_SHOWN]
    paths = [path for path, _ in samples]
    changed = paths != list(shown_samples)
    return (status_markdown(status), status.log_tail, samples if changed else None, paths,
            status.state == "running")


# ---------------------------------------------------------------------------------------------------
# The page


def field_component(gr: Any, spec: form.FieldSpec, value: Any) -> Any:
    """One argument as a form control, its help text as the info line."""
    label, info = field_label(spec)
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(value), label=label, info=info)
    if spec.kind == "choice":
        return gr.Dropdown(choices=[c for c in spec.choices or ()], value=value, label=label, info=info,
                           allow_custom_value=True)
    lines = 3 if spec.kind == "list" and spec.table_kind != "float_list" else 1  # numbers: "5e-5, 1e-4"
    return gr.Textbox(value=value, label=label, info=info, lines=lines, max_lines=12 if lines > 1 else 1)


def section_title(section: str) -> str:
    return f"Advanced: {section.replace('_', ' ')}"


def build_app(presets_dir: Path | None = None, configs_dir: Path | None = None, cwd: Path | None = None,
              slot: RunSlot | None = None) -> Any:
    """The page as a gradio.Blocks; `slot` holds the run (main() passes its own to stop it on exit)."""
    gr = require_gradio()
    presets_dir = Path(presets_dir or form.PRESETS_DIR)
    cwd = Path(cwd or Path.cwd())
    configs_dir = Path(configs_dir or cwd / "configs")
    slot = slot or RunSlot(cwd)
    fields = form_fields()
    choices = source_choices(presets_dir, configs_dir)
    source = default_source(choices)
    shown, trigger, add = load_source(source, fields) if source else (shown_values({}, fields), "", False)

    with gr.Blocks(title="trainer: LoRA training", analytics_enabled=False) as app:
        gr.Markdown("# LoRA trainer\nPick the preset for your card, set the model, folders, name and trigger "
                    "word, then **Check**, **Save** or **Start training**. Saved settings are TOML files that "
                    "`train.ps1 -Config` runs the same way.")
        with gr.Tabs() as tabs:
            with gr.Tab("Settings", id="settings"):
                ui = settings_tab(gr, fields, shown, choices, source, trigger, add, prompts_of(fields, shown, cwd))
            with gr.Tab("Training", id="training"):
                progress = training_tab(gr)
            with gr.Tab("Dataset tools", id="tools"):  # the id of the page's first Tools tab, kept for links
                tools_tab(gr, cwd, DATASET_TAB)
            with gr.Tab("LoRA tools", id="lora_tools"):
                gr.Markdown("What to do with a LoRA file after training: check it, read its metadata, resize, "
                            "merge, extract, bake it into a model, compare epochs. When a run of this page "
                            "finishes, its LoRA file is filled in below.")
                progress["lora_files"] = tools_tab(gr, cwd, LORA_TAB)
        wire_events(gr, app, tabs, ui, progress, fields=fields, slot=slot, presets_dir=presets_dir,
                    configs_dir=configs_dir, cwd=cwd)
    return app


def settings_tab(gr: Any, fields: Sequence[form.FieldSpec], shown: Sequence[Any], choices, source, trigger,
                 add, prompts: str = "") -> dict[str, Any]:
    ui: dict[str, Any] = {}
    with gr.Row():
        ui["source"] = gr.Dropdown(choices=list(choices), value=source, label="Start from", scale=4,
                                   info="a preset for your card (sd15-8gb: SD 1.5 on an 8 GB card), or settings "
                                        "you saved here; choosing one fills the form")
        ui["refresh"] = gr.Button("Refresh list", scale=1)
    values = dict(zip((spec.name for spec in fields), shown))
    components = simple_fields(gr, [spec for spec in fields if spec.name in form.SIMPLE_FIELDS], values)
    with gr.Row():
        ui["trigger"] = gr.Textbox(value=trigger, label="Trigger word", scale=3,
                                   info="the word that calls up your subject in prompts (e.g. mychar); saved "
                                        "in the LoRA's metadata")
        ui["add_trigger"] = gr.Checkbox(value=add, label=form.TRIGGER_TICK, scale=2,
                                        info="sets caption_prefix and keeps it in front when captions shuffle")
    ui["prompts"] = gr.Textbox(value=prompts, label="Sample prompts (optional)", lines=2, max_lines=8,
                               info="one prompt a line: a picture of each every epoch, shown in the Training tab "
                                    "(sd-scripts' options work: --w 512 --h 512 --s 20 --d 42)")
    # The buttons and their message right under the main fields: most runs need nothing else, and the
    # answer to Check must not land below sixteen folded sections.
    with gr.Row():
        ui["check"] = gr.Button("Check")
        ui["fit"] = gr.Button("Fits my card?")
        ui["save"] = gr.Button("Save")
        ui["start"] = gr.Button("Start training", variant="primary")
    ui["message"] = gr.Markdown()
    gr.Markdown("**Advanced settings** (optional): every other sd-scripts argument, by topic. The preset's "
                "values are a good start; Check, Save and Start use these too.")
    for section in dict.fromkeys(spec.section for spec in fields if spec.name not in components):
        with gr.Accordion(section_title(section), open=False):
            for spec in fields:
                if spec.section == section and spec.name not in components:
                    components[spec.name] = field_component(gr, spec, values[spec.name])
    ui["fields"] = [components[spec.name] for spec in fields]
    return ui


def simple_fields(gr: Any, specs: Sequence[form.FieldSpec], values: dict[str, Any]) -> dict[str, Any]:
    """Paths one a line (they are long), the other main settings three to a row."""
    components, row = {}, []
    for spec in [*specs, None]:
        if spec is not None and not spec.is_path:
            row.append(spec)
            if len(row) < 3:
                continue
        if row:
            with gr.Row():
                components.update({r.name: field_component(gr, r, values[r.name]) for r in row})
            row = []
        if spec is not None and spec.is_path:
            components[spec.name] = field_component(gr, spec, values[spec.name])
    return components


def training_tab(gr: Any) -> dict[str, Any]:
    progress: dict[str, Any] = {}
    progress["status"] = gr.Markdown(IDLE_TEXT)
    with gr.Row():
        progress["stop"] = gr.Button("Stop (saves the LoRA so far)", variant="stop", interactive=False)
    progress["message"] = gr.Markdown()
    progress["gallery"] = gr.Gallery(label="Sample images (newest first; they need sample prompts, in Settings)",
                                     columns=4, height="auto")
    with gr.Accordion("Log", open=False):
        progress["log"] = gr.Textbox(label="trainer output (last lines)", lines=14, max_lines=30,
                                     autoscroll=True, interactive=False)
    progress["shown_samples"] = gr.State([])
    progress["prefilled"] = gr.State(None)  # the finished run's LoRA file last put in the LoRA tools' boxes
    progress["timer"] = gr.Timer(POLL_SECONDS)
    return progress


def wire_events(gr: Any, app: Any, tabs: Any, ui: dict, progress: dict, *, fields, slot: RunSlot,
                presets_dir: Path, configs_dir: Path, cwd: Path) -> None:
    """gradio events -> the plain callbacks above."""
    form_inputs = [ui["source"], ui["trigger"], ui["add_trigger"], ui["prompts"], *ui["fields"]]
    n = len(fields)

    def on_source(path):
        if not path:
            return [gr.skip()] * (n + 4)
        try:
            shown, trigger, add = load_source(path, fields)
        except UserError as error:
            return [gr.skip()] * (n + 3) + [f"**Could not read it:** {error}"]
        return [*shown, trigger, add, prompts_of(fields, shown, cwd), f"Loaded `{path}`."]

    def prompted(shown, prompts, write):  # the main page's sample prompts, in the form's values
        return with_prompts(fields, shown, prompts, configs_dir=configs_dir, cwd=cwd, write=write)

    def on_refresh(current):
        return gr.Dropdown(choices=source_choices(presets_dir, configs_dir), value=current)

    def on_open(current):
        choices, source, tab = page_opened(slot, presets_dir, configs_dir, current)
        return gr.Dropdown(choices=choices, value=source), gr.Tabs(selected=tab)

    def listed():  # a file just saved joins the "Start from" list (its value, hence the form, stays)
        return gr.Dropdown(choices=source_choices(presets_dir, configs_dir))

    def on_check(source, trigger, add, prompts, *shown):
        return guarded(lambda: check_form(cwd, fields, prompted(shown, prompts, False), trigger, add))

    def on_fit(source, trigger, add, prompts, *shown):
        return guarded(lambda: fit_form(cwd, fields, prompted(shown, prompts, False), trigger, add))

    def on_save(source, trigger, add, prompts, *shown):
        return guarded(lambda: save_form(configs_dir, cwd, source, fields, prompted(shown, prompts, True),
                                         trigger, add)[1],
                       "Nothing was saved."), listed()

    def on_start(source, trigger, add, prompts, *shown):
        message = guarded(lambda: start_training(slot, configs_dir, source, fields, prompted(shown, prompts, True),
                                                 trigger, add),
                          "Nothing was saved or started.")
        if not slot.running:
            return message, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return message, gr.Tabs(selected="training"), message, status_markdown(slot.poll()), listed()

    lora_boxes = progress["lora_files"]

    def on_poll(shown_samples, prefilled):
        text, log, samples, paths, running = poll_training(slot, shown_samples or [])
        gallery = gr.skip() if samples is None else gallery_items(samples, slot.cwd)
        message = gr.skip() if running else ""  # "Started ..." / "Stopping ..." are over once the run ends
        lora = finished_lora(slot, prefilled)
        filled = [gr.skip()] * (len(lora_boxes) + 1) if lora is None else [lora] * (len(lora_boxes) + 1)
        return (text, log, gallery, paths, gr.Button(interactive=running), gr.Button(interactive=not running),
                message, *filled)

    ui["source"].change(on_source, ui["source"], [*ui["fields"], ui["trigger"], ui["add_trigger"], ui["prompts"],
                                                  ui["message"]])
    ui["refresh"].click(on_refresh, ui["source"], ui["source"])
    ui["check"].click(on_check, form_inputs, ui["message"])
    ui["fit"].click(on_fit, form_inputs, ui["message"])
    ui["save"].click(on_save, form_inputs, [ui["message"], ui["source"]])
    ui["start"].click(on_start, form_inputs, [ui["message"], tabs, progress["message"], progress["status"],
                                              ui["source"]])
    progress["stop"].click(lambda: stop_training(slot), None, progress["message"])
    poll_outputs = [progress["status"], progress["log"], progress["gallery"], progress["shown_samples"],
                    progress["stop"], ui["start"], progress["message"], progress["prefilled"], *lora_boxes]
    poll_inputs = [progress["shown_samples"], progress["prefilled"]]
    progress["timer"].tick(on_poll, poll_inputs, poll_outputs, show_progress="hidden")
    app.load(on_poll, poll_inputs, poll_outputs, show_progress="hidden")
    app.load(on_open, ui["source"], [ui["source"], tabs], show_progress="hidden")


def gallery_items(samples: Sequence[tuple[str, str]], cwd: Path) -> list[tuple[Any, str]]:
    """Sample images as pixels with their prompts: gradio serves only files under the current or temp
    folder, and the output folder may be anywhere (D:\\lora\\out). One that cannot be read is left out."""
    from PIL import Image

    items = []
    for path, prompt in samples:
        try:
            with Image.open(Path(cwd) / path) as image:  # a relative path is the run's, from its folder
                items.append((image.copy(), prompt))
        except OSError:
            continue
    return items


# ---------------------------------------------------------------------------------------------------
# python -m trainer gui


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer gui",
                                description="Open the trainer's page in the browser (only this PC can reach it).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; this PC only (127.0.0.1, ::1, "
                                                        "localhost)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default 7860; the next free one if taken)")
    p.add_argument("--no_browser", action="store_true", help="do not open the browser; just print the address")
    return p.parse_args(list(argv))


def check_local_host(host: str) -> None:
    """The page can start programs and read files: it is never offered to the network."""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise UserError(f"--host {host}: the GUI listens on this PC only (it can start programs and read files), "
                    "so use 127.0.0.1 (the default), ::1 or localhost.")


def free_port(host: str, start: int, tries: int = PORTS_TRIED) -> int:
    """`start`, or the next port after it that nothing listens on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in range(start, start + tries):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            if os.name != "nt":  # as the server binds: a port the last run just left (TIME_WAIT) is free
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise UserError(f"No free port between {start} and {start + tries - 1} on {host}: close other programs "
                    "that use them, or pick another with --port 8000.")


def launch(app: Any, host: str, port: int, *, browser: bool) -> str:
    """Serve the page without blocking; returns its address."""
    app.launch(server_name=host, server_port=port, inbrowser=browser, share=False, prevent_thread_lock=True,
               quiet=True, show_error=True, footer_links=[], run_history=False, ssr_mode=False,
               enable_monitoring=False, mcp_server=False)
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    check_local_host(args.host)
    require_gradio()

    restore_ctrl_c()  # started in the background (`./gui.sh &`), Ctrl-C / SIGINT must still close it cleanly
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
    slot = RunSlot(Path.cwd())
    app = build_app(slot=slot)
    url = launch(app, args.host, free_port(args.host, args.port), browser=not args.no_browser)
    print(f"The trainer's page: {url}\nPress Ctrl-C here to close it.", flush=True)
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        stop_before_exit(slot)
    finally:
        app.close()
    return 0


def stop_before_exit(slot: RunSlot, wait_s: float = STOP_WAIT_S) -> None:
    """Closing the page's server stops its run the Ctrl-C way, so the LoRA so far is saved."""
    if not slot.stop():
        return
    print("Stopping the training run: it saves the LoRA so far (Ctrl-C again to leave without waiting)...",
          flush=True)
    deadline = time.monotonic() + wait_s
    try:
        while slot.running and time.monotonic() < deadline:
            time.sleep(0.5)
    except KeyboardInterrupt:
        return
    status = slot.poll()
    if status is not None and status.message:
        print(status.message, flush=True)
