"""The GUI's form, without gradio: presets in, form values <-> argument values, a sectioned TOML out that
`train.ps1 -Config` runs unchanged (the check before Start is trainer.tools.preflight).

Values are kept as a flat dict of sd-scripts argument names -> TOML-ready values (what the TOML file holds:
`resolution = "512"`, lists as lists). None means "not set": the argument's default applies. Every field of
the form comes from the argument table in trainer.config.args, so the form cannot drift from the trainer.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import args as A
from trainer.errors import ConfigError, did_you_mean
from trainer.files import (
    atomic_write_text,
    strip_path,  # noqa: F401  (the form's fields are cleaned with it)
)
from trainer.paths import PRESETS_DIR

CONFIGS_DIR = Path.cwd() / "configs"

# The main page, in order; everything else is in the advanced form. unet_lr / text_encoder_lr are here
# because the presets set them, and they win over learning_rate: a user must see them next to it.
SIMPLE_FIELDS: tuple[str, ...] = (
    "pretrained_model_name_or_path", "train_data_dir", "reg_data_dir", "output_name", "max_train_epochs",
    "train_batch_size", "learning_rate", "unet_lr", "text_encoder_lr", "network_dim", "network_alpha",
    "resolution")
# Arguments the form never shows: the config file itself, and sd-scripts' misspelled legacy alias.
HIDDEN_FIELDS = frozenset({"config_file", "output_config", "caption_extention"})
# Sections of the written TOML, in the order a user reads them (the table's other sections follow).
SECTION_ORDER = (A.MODEL, A.SDXL, A.DATASET, A.SAVING, A.NETWORK, A.OPTIMIZER, A.TRAINING, A.MEMORY, A.LOSS,
                 A.NOISE, A.SAMPLING, A.VALIDATION, A.LOGGING, A.METADATA, A.DISTRIBUTED)
_PATH_NAMES = frozenset({"vae", "network_weights", "resume", "sample_prompts", "dataset_config", "in_json",
                         "metadata_thumbnail", "base_weights", "console_log_file", "log_tracker_config"})
_FIELDS = {f.name: f for f in A.ARGUMENTS}
TRIGGER_TICK = "Put it first in every caption"  # the page's tick box for apply_trigger; Check's advice names it


# ---------------------------------------------------------------------------------------------------
# Fields


@dataclass(frozen=True)
class FieldSpec:
    """One argument as the form shows it. `kind` is the widget: bool | int | float | str | choice | list.
    Choice values are strings ("" stands for "not set"); `table_kind` is the argument table's kind."""

    name: str
    kind: str
    default: Any
    help: str
    section: str
    choices: tuple | None
    status: str
    note: str = ""
    table_kind: str = ""
    is_path: bool = False


def field_spec(name: str) -> FieldSpec:
    """The form field of one argument; ConfigError for a name that is not an argument."""
    f = _FIELDS.get(name)
    if f is None:
        raise ConfigError(f"'{name}' is not a training argument{did_you_mean(name, A.ARGUMENT_NAMES)}.")
    meta, table_kind = f.metadata, A.kind_of(f)
    choices = None
    if meta["choices"]:
        choices = tuple("" if c is None else str(c) for c in meta["choices"])
        if f.default is None and "" not in choices:
            choices = ("",) + choices
        kind = "choice"
    else:
        kind = {"flag": "bool", "int": "int", "float": "float", "str_list": "list",
                "float_list": "list"}.get(table_kind, "str")  # str, int_or_float, resolution: a text box
    return FieldSpec(name=name, kind=kind, default=f.default, help=meta["help"], section=meta["section"],
                     choices=choices, status=meta["status"], note=meta["note"], table_kind=table_kind,
                     is_path=_is_path(name))


def _is_path(name: str) -> bool:
    return name in _PATH_NAMES or name.endswith(("_dir", "_path"))


def advanced_fields() -> list[FieldSpec]:
    """Every argument a user may set (done or warn) that is not on the main page, grouped by section."""
    fields = [field_spec(f.name) for f in A.ARGUMENTS
              if f.metadata["status"] != A.REFUSE and f.name not in SIMPLE_FIELDS and f.name not in HIDDEN_FIELDS]
    return sorted(fields, key=lambda spec: _section_rank(spec.section))  # stable: table order within a section


def _section_rank(section: str) -> int:
    return SECTION_ORDER.index(section) if section in SECTION_ORDER else len(SECTION_ORDER)


# ---------------------------------------------------------------------------------------------------
# Form value <-> argument value


def to_text(spec: FieldSpec, value: Any) -> str | bool | float | None:
    """What a widget shows for a value: bool for checkboxes, a number (None when unset) for number boxes,
    text otherwise (lists one item per line, "" when unset)."""
    if spec.kind == "bool":
        return bool(value)
    if spec.kind in ("int", "float"):
        return value
    if value is None:
        return ""
    if spec.kind == "list":
        joiner = ", " if spec.table_kind == "float_list" else "\n"  # numbers fit one line; paths do not
        return joiner.join(str(item) for item in value) if isinstance(value, (list, tuple)) else str(value)
    if spec.table_kind == "resolution":
        return _resolution_text(value)
    return str(value)


def from_text(spec: FieldSpec, shown: Any) -> Any:
    """A widget's content -> the argument value (None when empty: the default applies). A value that does
    not fit the argument is a ConfigError naming it."""
    try:
        return _from_text(spec, shown)
    except ValueError as e:
        raise ConfigError(f"{spec.name}: {e}.") from None


def _from_text(spec: FieldSpec, shown: Any) -> Any:
    if spec.kind == "bool":
        return shown.strip().lower() in ("true", "1", "yes", "on") if isinstance(shown, str) else bool(shown)
    if isinstance(shown, str):
        shown = strip_path(shown) if spec.is_path else shown
        if spec.kind not in ("str", "choice") or spec.table_kind in ("resolution", "int_or_float"):
            shown = shown.strip()
    if shown is None or shown == "":
        return None
    if spec.kind == "list":
        items = shown if isinstance(shown, (list, tuple)) else _list_items(spec, str(shown))
        items = [str(item).strip() for item in items if str(item).strip()]
        if spec.is_path:
            items = [strip_path(item) for item in items]
        return A.convert_value(_FIELDS[spec.name], items) if items else None
    if spec.table_kind == "resolution":
        return _resolution_text(A.parse_resolution(shown))
    if spec.table_kind == "int_or_float":
        return A.parse_int_or_float(shown) if isinstance(shown, str) else shown
    if spec.table_kind == "float":
        return _number(spec, shown)
    if spec.kind == "choice" and str(shown) not in spec.choices:
        raise ValueError(f"expected one of {', '.join(c for c in spec.choices if c)}, got {shown!r}")
    return A.convert_value(_FIELDS[spec.name], int(shown) if spec.table_kind == "int" and isinstance(shown, str)
                           and shown.lstrip("-").isdigit() else shown)


def _list_items(spec: FieldSpec, shown: str) -> list[str]:
    """One item a line; numbers may also be separated by commas or spaces ("5e-5, 1e-4")."""
    if spec.table_kind == "float_list":
        return re.split(r"[\s,;]+", shown)
    return shown.splitlines()


def _number(spec: FieldSpec, shown: Any) -> int | float:
    """Float arguments keep a whole number as int when the default is an int (network_alpha = 16 is saved
    as "16" in the metadata, as sd-scripts does), however the widget handed it over."""
    if isinstance(shown, bool):
        raise ValueError(f"expected a number, got {shown!r}")
    if isinstance(shown, int):
        return shown
    try:
        value = float(shown)
    except ValueError:
        raise ValueError(_not_a_number(spec, shown)) from None
    whole_default = isinstance(spec.default, int) and not isinstance(spec.default, bool)
    return int(value) if whole_default and value.is_integer() else value


def _not_a_number(spec: FieldSpec, shown: Any) -> str:
    """What a user typing into a number box needs to hear (not Python's "could not convert string to float")."""
    text = str(shown).strip()
    if re.fullmatch(r"[+-]?\d*,\d+", text):  # a decimal comma, as typed in much of Europe
        return f"expected a number with a dot as the decimal point ({text.replace(',', '.')}), got {text!r}"
    if spec.name.endswith(("_lr", "learning_rate")):
        example = "0.0001 (or 1e-4)"
    elif isinstance(spec.default, (int, float)) and not isinstance(spec.default, bool) and spec.default:
        example = spec.default
    else:
        example = 0.5
    return f"expected a number such as {example}, got {text!r}"


def _resolution_text(value: Any) -> str:
    width, height = A.parse_resolution(value)
    return str(width) if width == height else f"{width},{height}"


def apply_trigger(values: dict[str, Any], trigger: str, add_to_captions: bool) -> dict[str, Any]:
    """The trigger word in the LoRA's metadata (modelspec trigger phrase) and, when asked, in front of every
    caption ("trigger, ...") and kept first while captions are shuffled (keep_tokens >= 1). Unticking removes
    a prefix this function added for the same trigger. Returns a new dict."""
    out = dict(values)
    trigger = (trigger or "").strip()
    out["metadata_trigger_phrase"] = trigger or None
    prefix = f"{trigger}, "
    if add_to_captions and trigger:
        out["caption_prefix"] = prefix
        out["keep_tokens"] = max(int(out.get("keep_tokens") or 0), 1)
    elif trigger and out.get("caption_prefix") == prefix:
        out["caption_prefix"] = None
    return out


# ---------------------------------------------------------------------------------------------------
# Presets and config files


def list_presets(folder: str | Path = PRESETS_DIR) -> list[Path]:
    """The training presets (demo, sd15-*, sdxl-*), not the dataset TOML example."""
    return sorted(p for p in Path(folder).glob("*.toml") if not p.name.startswith("dataset"))


def load_values(path: str | Path) -> dict[str, Any]:
    """A preset or saved config -> flat argument names -> TOML-ready values. Unknown keys and wrong types are
    one ConfigError naming the file and key, the same messages `train` gives."""
    file, raw = A.read_config_file(str(path))
    converted, problems = A.check_toml_values(file, raw)  # one source for the messages `train` prints
    if problems:
        raise ConfigError(problems)
    legacy = converted.pop("caption_extention", None)  # sd-scripts' misspelling: the form shows the real name
    if legacy and not converted.get("caption_extension"):
        converted["caption_extension"] = legacy
    return {name: _toml_ready(_FIELDS[name], value) for name, value in converted.items()
            if name not in ("config_file", "output_config")}


def _toml_ready(f: dataclasses.Field, value: Any) -> Any:
    return _resolution_text(value) if A.kind_of(f) == "resolution" and value is not None else value


def config_path_for(output_name: str | None, folder: str | Path | None = None) -> Path:
    """Where the GUI saves the config of a LoRA: configs/<output_name>.toml, with characters Windows does
    not allow in file names replaced."""
    name = re.sub(r'[<>:"/\\|?*\x00-\x1f]', "_", (output_name or "").strip()).strip(". ") or "my-lora"
    return Path(folder or CONFIGS_DIR) / f"{name}.toml"


def write_config(path: str | Path, values: dict[str, Any], *, source: str | None = None) -> Path:
    """Write `values` as a sectioned TOML that `--config_file` reads back to the same TrainConfig; only values
    that differ from the defaults. A header says where it came from and how to run it. Atomic."""
    entries, problems = _checked_entries(values)
    if problems:
        raise ConfigError(problems)
    path = Path(path)
    if path.suffix.lower() != ".toml":
        path = path.with_name(path.name + ".toml")
    lines = _header(path, source)
    by_section: dict[str, list[tuple[str, Any]]] = {}
    for f, value in entries:
        by_section.setdefault(f.metadata["section"], []).append((f.name, value))
    for section in sorted(by_section, key=_section_rank):
        lines += ["", f"[{section}]"]
        rendered = [(f"{name} = {toml_value(value)}", _FIELDS[name].metadata["help"])
                    for name, value in by_section[section]]
        width = min(max(len(text) for text, _ in rendered), 60)
        lines += [f"{text.ljust(width)}   # {_one_line(help_text)}" for text, help_text in rendered]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _checked_entries(values: dict[str, Any]) -> tuple[list[tuple[dataclasses.Field, Any]], list[str]]:
    entries, problems = [], []
    for name, value in values.items():
        f = _FIELDS.get(name)
        if f is None:
            problems.append(f"'{name}' is not a training argument{did_you_mean(name, A.ARGUMENT_NAMES)}.")
            continue
        if value is None or name in ("config_file", "output_config"):
            continue
        try:
            converted = A.convert_value(f, value)
        except ValueError as e:
            problems.append(f"{name}: {e}.")
            continue
        if converted != f.default and converted != []:
            entries.append((f, _toml_ready(f, converted)))
    order = {f.name: i for i, f in enumerate(A.ARGUMENTS)}
    return sorted(entries, key=lambda entry: order[entry[0].name]), problems


def _header(path: Path, source: str | None) -> list[str]:
    shown = _shown_path(path)
    windows = shown.replace("/", "\\")
    windows = f'"{windows}"' if " " in windows else windows
    posix = f"'{shown}'" if " " in shown else shown
    origin = f" from the preset {_shown_path(Path(source))}" if source else ""
    return [f"# Written by the trainer GUI{origin} on {datetime.date.today().isoformat()}.",
            "# Run it from a console in the trainer folder (any sd-scripts argument may follow and wins):",
            f"#   Windows: .\\train.ps1 -Config {windows}",
            f"#   Linux:   ./train.sh --config_file {posix}",
            "# Only settings that differ from the defaults are written; relative paths are taken from the folder",
            "# training is started in. Saving from the GUI again replaces this file."]


def _shown_path(path: Path) -> str:
    try:
        return Path(os.path.relpath(path.resolve(), Path.cwd().resolve())).as_posix() \
            if path.resolve().is_relative_to(Path.cwd().resolve()) else str(path)
    except (OSError, ValueError):  # another drive on Windows
        return str(path)


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 100 else text[:97] + "..."


def toml_value(value: Any) -> str:
    """One TOML value. Strings with backslashes (Windows paths) become 'literal strings', as in the presets,
    so they read as typed; everything else is a "basic string" with JSON-compatible escapes."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    text = str(value)
    if "\\" in text and "'" not in text and not any(ord(c) < 32 or ord(c) == 127 for c in text):
        return f"'{text}'"
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
