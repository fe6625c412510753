"""The page's "Dataset tools" and "LoRA tools" tabs: each command-line tool as a small form whose button runs
`python -m trainer <command> ARGS` in a subprocess, exactly as typed in a console, and shows its output.

A tool is a row of `TOOLS`: its command, what it is for, its fields (the command's own option names, so the
page teaches the console spelling) and its tab: before training (set-up, pictures, captions) or after it (the
LoRA files). Adding a tool to the page is adding a row; the command itself is tested on its own
(tests/test_tools_*.py), and this module only turns fields into arguments and runs them."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from trainer.files import strip_path
from trainer.gui.runner import child_env

OUTPUT_LINES = 200  # the page shows the newest lines of a tool's output
DATASET_TAB, LORA_TAB = "dataset", "lora"
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class ToolField:
    option: str              # the command's option, without "--"; "" for the positional argument
    label: str
    kind: str = "text"       # "text" | "path" | "number" | "check" (the box is text for all but "check")
    default: Any = None
    info: str = ""
    repeated: bool = False   # several values, separated by spaces in the box (nargs="+", e.g. --models)
    run_output: bool = False  # a LoRA file box: filled with the file a training run of this page finished


@dataclass(frozen=True)
class Tool:
    command: str
    title: str
    what: str
    fields: tuple[ToolField, ...] = field(default_factory=tuple)
    tab: str = DATASET_TAB   # DATASET_TAB (before training) or LORA_TAB (the LoRA files after it)
    picture: bool = False    # the command ends with "wrote FILE.png": the page shows that picture


TOOLS: tuple[Tool, ...] = (
    # Before training: the set-up, the pictures and their captions
    Tool("doctor", "Check the set-up and a config", "Python, torch, the GPU and packages; with a config, also its "
         "model, folders, captions and whether it fits the card.", (
             ToolField("config", "Training config (TOML)", "path", info="e.g. configs/my.toml; empty: only the "
                       "installation"),)),
    Tool("caption", "Caption the pictures", "A caption file beside each picture: WD14 tags for anime and "
         "illustrations, a BLIP sentence for photos. Captions already there are kept unless you tick Replace.", (
             ToolField("", "Picture folder", "path", info="the N_name folder (or its parent: tick subfolders)"),
             ToolField("model", "Model", default="wd14", info="wd14: tags (anime, illustration); blip or "
                       "florence2: a sentence (photos); downloaded once"),
             ToolField("trigger", "Trigger word (optional)", info="put first in every caption"),
             ToolField("caption_extension", "Caption extension", default=".txt",
                       info="train with the same --caption_extension"),
             ToolField("thresh", "Tag threshold (wd14)", "number", 0.35, info="lower: more tags"),
             ToolField("recursive", "Also the subfolders", "check", False),
             ToolField("overwrite", "Replace existing captions", "check", False))),
    Tool("regimages", "Regularisation pictures", "Class pictures drawn by your base model into an N_class folder "
         "for --reg_data_dir (run again to resume or add more).", (
             ToolField("model", "Base model", "path", info="the model you train on"),
             ToolField("class", "Class", info='e.g. "woman", "dog"'),
             ToolField("count", "Pictures", "number", 200),
             ToolField("out", "Reg folder (the parent)", "path", info="N_class is made inside"),
             ToolField("prompt", "Prompt (optional)", info='default "a photo of a CLASS"; sd-scripts options '
                       "--n --s --l --w --h"),
             ToolField("config", "or: training config", "path", info="takes model, resolution, reg_data_dir"))),
    # After training: the LoRA files
    Tool("check_lora", "Check a LoRA file", "Will ComfyUI, A1111/Forge and diffusers apply every key? Which "
         "keys they ignore and why; NaN, all-zero and shape checks; rank/alpha summary.", (
             ToolField("", "LoRA file", "path", info="e.g. output/mychar.safetensors", run_output=True),
             ToolField("base", "Base model (optional)", "path", info="also check shapes against its layers"),
             ToolField("json", "As JSON", "check", False)), tab=LORA_TAB),
    Tool("show_metadata", "Show a LoRA's metadata", "What the file says about its training (ss_* keys, as "
         "A1111's and ComfyUI's LoRA info shows them) and its modelspec.* keys; long values summarised.", (
             ToolField("", "LoRA file", "path", info="a .safetensors file", run_output=True),
             ToolField("full", "Long values in full", "check", False, info="ss_tag_frequency, ss_dataset_dirs, ..."),
             ToolField("json", "As JSON", "check", False)), tab=LORA_TAB),
    Tool("resize_lora", "Resize a LoRA", "The same LoRA at a lower rank (a smaller file) by SVD; --dynamic_method "
         "picks each layer's rank from how much it keeps.", (
             ToolField("model", "LoRA file", "path", run_output=True),
             ToolField("save_to", "Save to", "path", info="e.g. output/mychar-r8.safetensors"),
             ToolField("new_rank", "New rank", "number", 8),
             ToolField("dynamic_method", "Dynamic method (optional)", info="sv_ratio, sv_fro or sv_cumulative"),
             ToolField("dynamic_param", "Dynamic parameter", "number", info="e.g. 0.9 for sv_fro"),
             ToolField("save_precision", "Save precision", default="fp16", info="float, fp16 or bf16"),
             ToolField("verbose", "Show what each layer keeps", "check", False),
             ToolField("overwrite", "Replace an existing file", "check", False)), tab=LORA_TAB),
    Tool("merge_lora", "Merge LoRAs into one LoRA", "Two LoRAs (each with its strength) into one LoRA file: exact "
         "by concatenated ranks, or cut to a rank by SVD.", (
             ToolField("lora", "First LoRA file[:strength]", "path", info="e.g. output/style.safetensors:0.7",
                       run_output=True),
             ToolField("lora", "Second LoRA file[:strength]", "path"),
             ToolField("save_to", "Save to", "path"),
             ToolField("new_rank", "New rank (optional)", "number", info="empty: concatenate (exact)"),
             ToolField("overwrite", "Replace an existing file", "check", False)), tab=LORA_TAB),
    Tool("extract_lora", "Extract a LoRA from a fine-tuned model", "The difference between a fine-tuned checkpoint "
         "and the model it was trained from, as a LoRA.", (
             ToolField("model_org", "Original model", "path"),
             ToolField("model_tuned", "Fine-tuned model", "path"),
             ToolField("save_to", "Save to", "path"),
             ToolField("dim", "Rank", "number", 32),
             ToolField("conv_dim", "Conv rank (optional)", "number", info="also the ResNet convs (LoCon)"),
             ToolField("overwrite", "Replace an existing file", "check", False)), tab=LORA_TAB),
    Tool("merge", "Merge LoRAs into a model", "Bake LoRA files into a base model: one checkpoint A1111 loads.", (
        ToolField("model", "Base model", "path"),
        ToolField("lora", "LoRA file[:strength]", "path", info="e.g. output/mychar.safetensors:0.8", run_output=True),
        ToolField("output", "Save to", "path", info="merged.safetensors"),
        ToolField("overwrite", "Replace an existing file", "check", False)), tab=LORA_TAB),
    Tool("compare", "Compare epochs and strengths", "A run's epoch files (or any LoRAs) in one labelled grid: a "
         "row per file and strength, a column per prompt, the same seeds in every row: pick the best by eye.", (
             ToolField("model", "Base model", "path", info="the model the LoRAs were trained on"),
             ToolField("loras", "LoRA file or folder", "path", info="a run's output folder: every epoch file",
                       run_output=True),
             ToolField("prompts", "Prompt file", "path", info="sd-scripts' format, e.g. your sample prompts"),
             ToolField("prompt", "or: one prompt", info="sd-scripts options --n --s --l --w --h --d"),
             ToolField("strengths", "Strengths", default="1.0", info='e.g. "0.4,0.6,0.8,1.0" as <lora:name:w>'),
             ToolField("out", "Save the grid to (optional)", "path", info="default: compare_grid.png beside the "
                       "LoRAs")), tab=LORA_TAB, picture=True),
)


def tools_of(tab: str) -> tuple[Tool, ...]:
    return tuple(tool for tool in TOOLS if tool.tab == tab)


def tool_argv(tool: Tool, values: Sequence[Any]) -> list[str]:
    """The command line a form's values make: empty boxes are left out (the command's default applies),
    a ticked box is its flag, a path pasted with quotes ("Copy as path") loses them."""
    argv: list[str] = []
    for spec, value in zip(tool.fields, values):
        if spec.kind == "check":
            argv += [f"--{spec.option}"] if value else []
            continue
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if spec.kind == "number" and not isinstance(value, str):
            text = [f"{float(value):g}"]
        elif spec.repeated:
            text = str(value).split()
        else:
            text = [strip_path(str(value)) if spec.kind == "path" else str(value).strip()]
        argv += ([f"--{spec.option}"] if spec.option else []) + text
    return argv


def run_tool(tool: Tool, values: Sequence[Any], cwd: Path, python: str = sys.executable) -> Iterator[str]:
    """Run the tool, yielding its output so far (the newest OUTPUT_LINES lines) as it comes, then the exit."""
    command = [python, "-m", "trainer", tool.command, *tool_argv(tool, values)]
    shown = [f"> python -m trainer {tool.command} " + " ".join(_quoted(a) for a in command[4:])]
    with subprocess.Popen(command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=child_env(), text=True, encoding="utf-8",
                          errors="replace") as process:
        for line in process.stdout:
            shown = (shown + [line.rstrip("\n")])[-OUTPUT_LINES:]
            yield "\n".join(shown)
    verdict = "done" if process.returncode == 0 else f"stopped with exit code {process.returncode}"
    yield "\n".join(shown + [f"[{verdict}]"])


def _quoted(arg: str) -> str:
    return f'"{arg}"' if not arg or any(c in arg for c in " '\t") else arg


def written_picture(output: str, cwd: Path) -> Path | None:
    """The picture a tool's output says it wrote (its last "wrote FILE.png" line; a relative path is from
    the folder the tool ran in), or None when it wrote none or the file is not there."""
    for line in reversed(output.splitlines()):
        if line.startswith("wrote "):
            path = Path(line[len("wrote "):].strip())
            path = path if path.is_absolute() else Path(cwd) / path
            if path.suffix.lower() in PICTURE_SUFFIXES and path.is_file():
                return path
    return None


def run_tool_with_picture(tool: Tool, values: Sequence[Any], cwd: Path,
                          python: str = sys.executable) -> Iterator[tuple[str, Any]]:
    """run_tool's output with the picture box: empty while it runs, then the picture it wrote (as pixels:
    gradio serves only files under the current or temp folder, and the grid may be anywhere)."""
    text = ""
    for text in run_tool(tool, values, cwd, python):
        yield text, None
    path = written_picture(text, cwd)
    yield text, _pixels(path) if path is not None else None


def _pixels(path: Path) -> Any:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.copy()
    except OSError:
        return None


def tools_tab(gr: Any, cwd: Path, tab: str = DATASET_TAB) -> list[Any]:
    """One accordion per tool of the tab: its fields, a Run button and the output (and the picture, for a
    tool that draws one). Returns the LoRA file boxes that take a finished run's file (run_output)."""
    run_output_boxes = []
    for tool in tools_of(tab):
        with gr.Accordion(tool.title, open=False):
            gr.Markdown(f"{tool.what} (`python -m trainer {tool.command}`)")
            inputs = [_component(gr, spec) for spec in tool.fields]
            run_output_boxes += [box for box, spec in zip(inputs, tool.fields) if spec.run_output]
            run = gr.Button(f"Run {tool.command}")
            outputs = [gr.Textbox(label="output", lines=8, max_lines=30, autoscroll=True, interactive=False)]
            if tool.picture:
                outputs.append(gr.Image(label=f"{tool.command} picture", type="pil", interactive=False))
            run.click(_runner(tool, cwd), inputs=inputs, outputs=outputs)
    return run_output_boxes


def _runner(tool: Tool, cwd: Path):
    def run(*values):  # a generator: gradio streams each yielded text into the output box
        yield from (run_tool_with_picture if tool.picture else run_tool)(tool, values, cwd)
    return run


def _component(gr: Any, spec: ToolField) -> Any:
    label = f"{spec.label} (--{spec.option})" if spec.option else spec.label
    if spec.kind == "check":
        return gr.Checkbox(label=label, value=bool(spec.default), info=spec.info or None)
    # numbers too are text boxes (as on the Settings tab): an emptied box means "the command's default";
    # a typo is answered by the command's own message
    return gr.Textbox(label=label, value="" if spec.default is None else str(spec.default), info=spec.info or None,
                      lines=1)
