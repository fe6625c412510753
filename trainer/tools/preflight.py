"""The pre-flight check of a training config: everything that can be told without loading a model, shown
by the GUI's Check button and by `python -m trainer doctor --config`. The settings are parsed exactly as `train` parses them (the same messages), then the base
model's path (and family, where that is cheap) and the picture folders are looked at: repeats, images,
caption files, and how many captions hold the trigger word."""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

from trainer.config import args as A
from trainer.data.config import load_dataset_config, resolve_datasets
from trainer.data.folders import (
    caption_candidates,
    list_images,
    read_caption,
    read_finetune_metadata,
    read_folder_captions,
)
from trainer.data.pictures import Progress
from trainer.demo import demo_pictures_pending
from trainer.errors import ConfigError, UserError
from trainer.files import strip_path
from trainer.models.load import detect_model_family, looks_like_hub_id, missing_path_error
from trainer.models.tokenizer import openai_clip_tokenizer
from trainer.tools import dataset_doctor
from trainer.tools.dataset_doctor import DatasetFindings, SubsetScan
from trainer.train.events import events_file

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}

@dataclass
class CheckReport:
    """What `check_config` found: problems stop training; notes are what a user should know."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dataset: DatasetFindings | None = None  # the dataset doctor's findings and tables, when the folders were read

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_markdown(self) -> str:
        parts = ["**Ready to train.**" if self.ok else f"**{len(self.problems)} problem(s) to fix before training:**"]
        parts += [_bullet(p) for p in self.problems]
        if self.notes:
            parts += ["", "**Found:**"] + [_bullet(n) for n in self.notes]
        tables = self.dataset.tables_markdown() if self.dataset else ""
        if tables:
            parts += ["", tables]
        return "\n".join(parts)

    def to_json(self) -> dict[str, Any]:
        """For the GUI and other programs (`doctor --config --json`)."""
        warnings = [n.removeprefix("Warning: ") for n in self.notes if n.startswith("Warning: ")]
        return {"ok": self.ok, "problems": self.problems, "warnings": warnings,
                "notes": [n for n in self.notes if not n.startswith("Warning: ")],
                "dataset": self.dataset.to_json() if self.dataset else None}


def _bullet(text: str) -> str:
    first, _, rest = text.partition("\n")
    return f"- {first}" + (f"\n\n  ```\n{rest}\n  ```" if rest else "")


TRIGGER_FIX = "add it to the caption files, or set caption_prefix = \"TRIGGER, \""


def check_config(path: str | Path, trigger: str | None = None, *, trigger_fix: str = TRIGGER_FIX,
                 progress: Progress | None = None) -> CheckReport:
    """Everything that can be told without loading a model: the config parsed exactly as `train` parses it,
    the base model's path (and family when that is cheap), and the dataset folders: repeats, images, caption
    files, and how many captions hold the trigger word (default: the config's metadata_trigger_phrase);
    `trigger_fix` says how to add a missing trigger (the GUI names its tick box); `progress(done, total)`
    follows the pictures as they are decoded."""
    report = CheckReport()
    with _collected_warnings() as warnings:
        args = _parse(path, report)
        if args is not None:
            _check_model(args, report)
            _check_files(args, report)
            _check_dataset(args, (trigger or args.metadata_trigger_phrase or "").strip(), trigger_fix, report,
                           progress)
            _check_output(args, report)
    report.notes += [f"Warning: {w}" for w in dict.fromkeys(warnings)]
    report.problems = list(dict.fromkeys(report.problems))
    return report


@contextmanager
def _collected_warnings() -> Iterator[list[str]]:
    """The trainer's own warnings (ignored arguments, folders without a repeat count, missing caption files)
    are what a user needs to read here, so they are collected as notes."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("trainer")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def _parse(path: str | Path, report: CheckReport) -> Any:
    """The TrainConfig `train` would build; when it has problems, they are reported and the file's values
    that are valid are still used, so the dataset is checked in the same pass."""
    try:
        return A.parse_train_args(["--config_file", str(path)])
    except ConfigError as e:
        report.problems += e.problems
    except SystemExit as e:  # argparse; cannot happen with --config_file alone, but never let it end the GUI
        report.problems.append(f"{path}: rejected (exit {e.code}).")
        return None
    try:
        file, raw = A.read_config_file(str(path))
    except ConfigError:
        return None  # already reported by parse_train_args
    converted, _ = A.check_toml_values(file, raw)
    return SimpleNamespace(**{**A.default_values(), **converted})


def _check_model(args: Any, report: CheckReport) -> None:
    spec = strip_path(str(args.pretrained_model_name_or_path or ""))
    if not spec:
        return  # parse_train_args said it is required
    path = Path(spec).expanduser()
    if spec.startswith("builtin:") or path.is_dir() or (path.is_file() and path.suffix.lower() == ".safetensors"):
        try:
            family = detect_model_family(spec)
        except UserError as e:
            report.problems.append(str(e))
            return
        report.notes.append(f"Model: {FAMILY_NAMES.get(family, family)}, {spec}")
        _check_family(args, spec, family, report)
    elif path.is_file():
        report.notes.append(f"Model: {spec} (its type is checked when training starts)")
    elif looks_like_hub_id(spec):
        report.notes.append(f"Model: {spec} is not a local file or folder; it will be downloaded from the "
                            "Hugging Face hub when training starts.")
    else:
        report.problems.append(str(missing_path_error(path)))


def _check_family(args: Any, spec: str, family: str, report: CheckReport) -> None:
    """The weights decide SD vs SDXL (as the trainer does); a preset for the other family is a warning."""
    if family == "sdxl" and not args.sdxl:
        report.notes.append(f"Warning: {spec} is an SDXL model but these settings are for SD 1.x/2.x; it trains "
                            "as SDXL anyway. Start from an sdxl-* preset for settings that fit SDXL.")
    elif family != "sdxl" and args.sdxl:
        report.notes.append(f"Warning: {spec} is an {FAMILY_NAMES.get(family, family)} model but these settings "
                            "are for SDXL (sdxl = true); it trains as SD anyway. Start from an sd15-* preset.")
        if args.cache_text_encoder_outputs:
            report.problems.append(f"cache_text_encoder_outputs works for SDXL models only, and {spec} is "
                                   f"{FAMILY_NAMES.get(family, family)}. Remove it (or start from an sd15-* preset).")


def _check_files(args: Any, report: CheckReport) -> None:
    names = ["vae", "network_weights", "sample_prompts", "log_tracker_config"]
    if not args.resume_from_huggingface:
        names.append("resume")
    for name in names:
        value = getattr(args, name)
        if value and not Path(strip_path(str(value))).exists():
            report.problems.append(f"{name} = {value}: not found. Check the path (relative paths are taken from "
                                   f"{Path.cwd()}), or clear the field.")


def _check_output(args: Any, report: CheckReport) -> None:
    folder = Path(args.output_dir or "output")
    if not args.output_name:
        report.notes.append(f"output_name is not set: the LoRA will be saved as {folder / 'last'}."
                            f"{args.save_model_as}. Set output_name to name it.")
    final = folder / f"{args.output_name or 'last'}.{args.save_model_as}"
    if final.exists():
        report.notes.append(f"{final} already exists; a finished run replaces it (change output_name to keep it).")


# ---- the dataset ---------------------------------------------------------------------------------------


def _check_dataset(args: Any, trigger: str, trigger_fix: str, report: CheckReport,
                   progress: Progress | None = None) -> None:
    if args.dataset_class:
        report.notes.append(f"The dataset comes from the class {args.dataset_class}; it is not scanned here.")
        return
    if not (args.train_data_dir or args.dataset_config or args.in_json):
        return  # parse_train_args reported it
    if not args.dataset_config and demo_pictures_pending(args):  # (a dataset TOML replaces the folder)
        report.notes.append(f"The demo's pictures are generated in {args.train_data_dir} when training starts.")
        return
    try:
        user_config = None
        if args.dataset_config:
            user_config = load_dataset_config(strip_path(args.dataset_config), masked_loss=args.masked_loss)
        specs = resolve_datasets(args, user_config)
    except UserError as e:
        report.problems += getattr(e, "problems", None) or [str(e)]
        return
    train_images = steps_per_epoch = 0
    scans: list[SubsetScan] = []
    for index, spec in enumerate(specs):
        found = [_scan_subset(spec, index, subset, trigger, trigger_fix, report) for subset in spec.subsets]
        scans += [scan for scan in found if scan is not None]
        counted = [len(scan.images) if scan else 0 for scan in found]
        train = sum(n * s.num_repeats for n, s in zip(counted, spec.subsets) if not s.is_reg)
        has_reg = any(n for n, s in zip(counted, spec.subsets) if s.is_reg)
        train_images += train
        steps_per_epoch += math.ceil(train * (2 if has_reg else 1) / spec.batch_size)  # reg images match train
    _examine(args, scans, report, progress)
    if not train_images:
        report.problems.append("No training images found in any dataset folder. Images (png, jpg, webp, bmp) must "
                               "be directly inside the '<repeats>_<class tokens>' folders (or image_dir).")
        return
    report.notes.append(_steps_note(args, steps_per_epoch))


def _examine(args: Any, scans: list[SubsetScan], report: CheckReport, progress: Progress | None) -> None:
    """The dataset doctor's findings on the pictures and captions, as problems and notes of this report."""
    found = dataset_doctor.examine(scans, max_token_length=args.max_token_length, tokenizer=_tokenizer(),
                                   progress=progress)
    for finding in found.findings:
        if finding.level == dataset_doctor.PROBLEM:
            report.problems.append(finding.text())
        else:
            report.notes.append(("Warning: " if finding.level == dataset_doctor.WARNING else "") + finding.text())
    report.dataset = found


def _tokenizer() -> Any:
    try:
        return openai_clip_tokenizer()
    except (UserError, ImportError):
        return None


def _steps_note(args: Any, batches: int) -> str:
    per_epoch = max(1, math.ceil(batches / max(1, args.gradient_accumulation_steps)))
    if args.max_train_epochs:
        epochs, total = args.max_train_epochs, args.max_train_epochs * per_epoch
    else:
        total, epochs = args.max_train_steps, math.ceil(args.max_train_steps / per_epoch)
    return (f"Training: about {per_epoch} steps per epoch, {total} steps ({epochs} epoch(s)) in all "
            f"(aspect-ratio buckets can add a few). {_eta(args, total)}")


def _eta(args: Any, total_steps: int) -> str:
    """From the speed the last run with this output name measured (its events file): there is no honest
    speed for a card before one run of these settings on it."""
    speed = measured_speed(events_file(args.output_dir, args.output_name))
    if not speed:
        return ("ETA: known once a run has measured the speed (the progress bar shows it; "
                "`python -m trainer bench --config` measures it without training).")
    return (f"ETA: about {_duration(total_steps / speed)} at {speed:.2f} it/s, the speed the last run with this "
            "output_name measured (other settings change it).")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds // 3600:.0f} h {seconds % 3600 / 60:.0f} min"


def measured_speed(events: Path, tail_bytes: int = 200_000) -> float | None:
    """The last it/s a training run wrote to its events file, reading only the file's end (runs append)."""
    try:
        with open(events, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - tail_bytes))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            event = json.loads(line)
        except ValueError:
            continue  # the cut first line, or a line being written
        if isinstance(event, dict) and event.get("kind") == "step" and event.get("it_per_s"):
            return float(event["it_per_s"])
    return None


def _scan_subset(spec: Any, index: int, subset: Any, trigger: str, trigger_fix: str,
                 report: CheckReport) -> SubsetScan | None:
    """One line per folder: images, repeats, caption files, captions with the trigger. Returns what the
    dataset doctor examines (None when there is nothing to examine)."""
    if subset.metadata_file:
        try:
            entries, _ = read_finetune_metadata(subset.metadata_file, subset.image_dir, subset.caption_separator,
                                                subset.enable_wildcard)
        except UserError as e:
            report.problems.append(str(e))
            return None
        captions = [c for _, c, _ in entries]
        report.notes.append(f"train {subset.metadata_file}: {len(entries)} image(s) x {subset.num_repeats} "
                            f"repeat(s){_trigger_part(subset, captions, trigger, trigger_fix)}")
        return SubsetScan(spec, subset, [Path(p) for p, _, _ in entries], captions, index)
    folder = Path(subset.image_dir)
    role = "reg" if subset.is_reg else "train"
    if not folder.is_dir():
        report.problems.append(f"Image folder not found: {folder}. Check image_dir (or --train_data_dir); relative "
                               f"paths are taken from the current folder {Path.cwd()}.")
        return None
    images = list_images(folder)
    if not images:
        subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir())
        hint = (f"; it has subfolders ({', '.join(subfolders[:5])}), but images must be directly inside it"
                if subfolders else "")
        report.notes.append(f"Warning: {role} folder {folder} has no images and is skipped{hint}.")
        return None
    captions, files = _captions(subset, images)
    report.notes.append(f"{role} {folder.name}: {len(images)} image(s) x {subset.num_repeats} repeat(s) = "
                        f"{len(images) * subset.num_repeats}, {files} caption file(s) ({subset.caption_extension})"
                        + ("" if subset.is_reg else _trigger_part(subset, captions, trigger, trigger_fix)))
    return SubsetScan(spec, subset, images, captions, index)


def _captions(subset: Any, images: list[Path]) -> tuple[list[str], int]:
    """Each image's caption as training reads it (caption file, else the folder's class tokens) and how many
    caption files there are; the trainer's own warning names the images without one. A caption file training
    would stop on reads as empty here: the dataset doctor names every such file, not only the first."""
    files = sum(1 for image in images
                if any(c.is_file() for c in caption_candidates(image, subset.caption_extension)))
    try:
        return read_folder_captions(images, subset.caption_extension, subset.class_tokens, subset.enable_wildcard,
                                    Path(subset.image_dir)), files
    except UserError:
        return [_readable_caption(image, subset) for image in images], files


def _readable_caption(image: Path, subset: Any) -> str:
    try:
        caption = read_caption(image, subset.caption_extension, enable_wildcard=subset.enable_wildcard)
    except UserError:
        return ""
    return (subset.class_tokens or "") if caption is None else caption


def _trigger_part(subset: Any, captions: list[str], trigger: str, fix: str) -> str:
    if not trigger:
        return ""
    wanted = trigger.lower()
    added = f"{subset.caption_prefix or ''}{subset.caption_suffix or ''}".lower()
    if wanted in added:
        return f"; the trigger '{trigger}' is added to every caption (caption_prefix/suffix)"
    having = sum(1 for caption in captions if wanted in caption.lower())
    text = f"; {having} of {len(captions)} caption(s) contain the trigger '{trigger}'"
    if having == 0:
        text += f". Warning: the trigger word will not be learned: {fix.replace('TRIGGER', trigger)}"
    return text
