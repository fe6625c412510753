"""The dataset config (`--dataset_config` TOML or JSON) and the values each dataset and subset train with.

sd-scripts' schema (library/config_util.py) is kept key for key, but every problem in a file
is reported at once, each with its full key path and the fix. Values resolve as in config_util.py:
subset > dataset > [general] > command-line argument > default.

With --masked_loss, sd-scripts' ControlNet-style subsets (`image_dir` + `conditioning_data_dir`)
are legal: every subset of such a dataset has a folder of mask images (same file stems as the images).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.data.captions import CaptionRules
from trainer.data.folders import find_dreambooth_subsets, list_images, parse_repeats_folder
from trainer.errors import ConfigError, did_you_mean

logger = logging.getLogger(__name__)

# --- the schema: key -> kind (kinds are checked by _check_value) ------------------------------------

DATASET_KEYS = {
    "batch_size": "int", "bucket_no_upscale": "bool", "bucket_reso_steps": "int", "enable_bucket": "bool",
    "max_bucket_reso": "int", "min_bucket_reso": "int", "validation_seed": "int", "validation_split": "float",
    "resolution": "resolution", "network_multiplier": "float", "resize_interpolation": "str",
}
SUBSET_COMMON_KEYS = {
    "color_aug": "bool", "face_crop_aug_range": "float_pair", "flip_aug": "bool", "num_repeats": "int",
    "random_crop": "bool", "shuffle_caption": "bool", "keep_tokens": "int", "keep_tokens_separator": "str",
    "secondary_separator": "str", "caption_separator": "str", "enable_wildcard": "bool",
    "token_warmup_min": "int", "token_warmup_step": "number", "caption_prefix": "str", "caption_suffix": "str",
    "custom_attributes": "dict", "resize_interpolation": "str",
    # caption dropout keys: enabled for train_network (sd-scripts' support_dropout=True)
    "caption_dropout_every_n_epochs": "int", "caption_dropout_rate": "number", "caption_tag_dropout_rate": "number",
}
DREAMBOOTH_ASCENDABLE_KEYS = {"caption_extension": "str", "class_tokens": "str", "cache_info": "bool"}
DREAMBOOTH_SUBSET_ONLY_KEYS = {"image_dir": "str", "is_reg": "bool", "alpha_mask": "bool"}
FINETUNE_SUBSET_ONLY_KEYS = {"metadata_file": "str", "image_dir": "str", "alpha_mask": "bool"}
# ControlNet-style (mask) subsets, legal only with --masked_loss (sd-scripts' CN_SUBSET_* schemas)
MASK_ASCENDABLE_KEYS = {"caption_extension": "str", "cache_info": "bool"}
MASK_SUBSET_ONLY_KEYS = {"image_dir": "str", "conditioning_data_dir": "str"}
# Keys sd-scripts takes only from the command line; its schema rejects them in the dataset file.
COMMAND_LINE_ONLY_KEYS = ("prior_loss_weight", "max_token_length", "debug_dataset")
SUBSET_ONLY_KEYS = ("image_dir", "is_reg", "metadata_file", "alpha_mask", "conditioning_data_dir")
RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")

GENERAL_KEYS = {**DATASET_KEYS, **SUBSET_COMMON_KEYS, **DREAMBOOTH_ASCENDABLE_KEYS}
DREAMBOOTH_DATASET_KEYS = {**DATASET_KEYS, **SUBSET_COMMON_KEYS, **DREAMBOOTH_ASCENDABLE_KEYS, "subsets": "list"}
FINETUNE_DATASET_KEYS = {**DATASET_KEYS, **SUBSET_COMMON_KEYS, "subsets": "list"}
DREAMBOOTH_SUBSET_KEYS = {**SUBSET_COMMON_KEYS, **DREAMBOOTH_ASCENDABLE_KEYS, **DREAMBOOTH_SUBSET_ONLY_KEYS}
FINETUNE_SUBSET_KEYS = {**SUBSET_COMMON_KEYS, **FINETUNE_SUBSET_ONLY_KEYS}
MASK_DATASET_KEYS = {**DATASET_KEYS, **SUBSET_COMMON_KEYS, **MASK_ASCENDABLE_KEYS, "subsets": "list"}
MASK_SUBSET_KEYS = {**SUBSET_COMMON_KEYS, **MASK_ASCENDABLE_KEYS, **MASK_SUBSET_ONLY_KEYS}
DATASET_KEYS_BY_KIND = {"dreambooth": DREAMBOOTH_DATASET_KEYS, "finetune": FINETUNE_DATASET_KEYS,
                        "mask": MASK_DATASET_KEYS}
SUBSET_KEYS_BY_KIND = {"dreambooth": DREAMBOOTH_SUBSET_KEYS, "finetune": FINETUNE_SUBSET_KEYS,
                       "mask": MASK_SUBSET_KEYS}
REQUIRED_SUBSET_KEYS = {"dreambooth": ("image_dir",), "finetune": ("metadata_file",),
                        "mask": ("image_dir", "conditioning_data_dir")}

# Command-line names that differ from the dataset-config names (config_util.ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME).
ARGUMENT_NAME_FOR_KEY = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}

_KIND_DESCRIPTIONS = {
    "int": "a whole number", "bool": "true or false", "str": "a string in quotes",
    "float": "a decimal number (write 1.0, not 1)", "number": "a number", "dict": "a table",
    "list": "an array of tables ([[datasets.subsets]])",
    "resolution": "a whole number or [width, height]", "float_pair": "two decimal numbers such as [2.0, 4.0]",
}


# --- resolved values ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SubsetSpec(CaptionRules):
    """One folder (DreamBooth) or metadata file (fine-tuning) with every setting resolved.

    The caption settings (shuffle_caption, keep_tokens, ...) are the fields inherited from CaptionRules."""

    image_dir: str | None = None
    is_reg: bool = False
    num_repeats: int = 1
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    metadata_file: str | None = None
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    alpha_mask: bool = False
    conditioning_data_dir: str | None = None  # mask images (--masked_loss), matched to images by file stem
    cache_info: bool = False
    resize_interpolation: str | None = None
    custom_attributes: dict | None = field(default=None, hash=False, compare=False)


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: images of several subsets that share batch size, resolution and buckets."""

    batch_size: int = 1
    resolution: tuple[int, int] = (512, 512)  # (W, H)
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    resize_interpolation: str | None = None
    validation_seed: int | None = None
    validation_split: float = 0.0
    subsets: tuple[SubsetSpec, ...] = ()
    is_dreambooth: bool = True


# --- reading and checking the file --------------------------------------------------------------------

def load_dataset_config(path: str | Path, *, masked_loss: bool = False) -> dict:
    """Read a dataset config (.toml or .json, UTF-8) and check it against sd-scripts' schema.

    Raises ConfigError listing every problem (file, key path, fix). The returned dict has
    `resolution` and `face_crop_aug_range` converted to tuples. `masked_loss` (--masked_loss) makes
    mask subsets (`conditioning_data_dir`) legal.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--dataset_config: file not found: {path}. Check the path (quote it if it has spaces).")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ConfigError(f"--dataset_config: {path}: use a .toml or .json file (got '{path.suffix}').")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}). Save the file as UTF-8.") from None
    config = _parse_json(path, text) if suffix == ".json" else _parse_toml(path, text)
    return validate_dataset_config(config, source=str(path), masked_loss=masked_loss)


def _parse_toml(path: Path, text: str) -> dict:
    import toml  # sd-scripts parses with toml 0.10.2, so we accept exactly what it accepts

    try:
        return toml.loads(text)
    except toml.TomlDecodeError as error:
        raise ConfigError(f"{path}: TOML syntax error at line {error.lineno}, column {error.colno}: {error.msg}. "
                          "Strings need quotes; Windows paths need '\\\\' or '/' (or single quotes).") from None


def _parse_json(path: Path, text: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: JSON syntax error at line {error.lineno}, column {error.colno}: {error.msg}.") \
            from None


def validate_dataset_config(config: Any, source: str = "dataset config", *, masked_loss: bool = False) -> dict:
    """Check a parsed dataset config; return it with tuples converted, or raise one ConfigError."""
    problems: list[str] = []
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: the top level must be a table with [general] and [[datasets]].")
    checked: dict[str, Any] = {}
    for key, value in config.items():
        if key == "general":
            checked["general"] = _check_table(value, "general", GENERAL_KEYS, "general", source, problems,
                                              masked_loss)
        elif key == "datasets":
            checked["datasets"] = _check_datasets(value, source, problems, masked_loss)
        else:
            problems.append(_unknown_key_message(source, key, key, {"general": "", "datasets": ""}, "top"))
    if problems:
        raise ConfigError(problems)
    return checked


def _check_datasets(value: Any, source: str, problems: list[str], masked_loss: bool) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        problems.append(f"{source}: datasets: expected an array of tables ([[datasets]]), given {_given(value)}")
        return []
    result = []
    for i, dataset in enumerate(value):
        path = f"datasets[{i}]"
        kind = _dataset_kind(dataset, path, source, problems, masked_loss)
        checked = _check_table(dataset, path, DATASET_KEYS_BY_KIND[kind], f"{kind}-dataset", source, problems,
                               masked_loss)
        subsets = dataset.get("subsets", [])
        if isinstance(subsets, list) and all(isinstance(s, dict) for s in subsets):
            checked["subsets"] = [_check_subset(subset, f"{path}.subsets[{j}]", kind, source, problems, masked_loss)
                                  for j, subset in enumerate(subsets)]
        result.append(checked)
    return result


def _dataset_kind(dataset: dict, path: str, source: str, problems: list[str], masked_loss: bool) -> str:
    """config_util's flex validator: "mask" when --masked_loss and every subset has conditioning_data_dir,
    else "finetune" when every subset has metadata_file, else "dreambooth"."""
    subsets = dataset.get("subsets", [])
    if not isinstance(subsets, list) or not subsets or not all(isinstance(s, dict) for s in subsets):
        return "dreambooth"
    if masked_loss and all("conditioning_data_dir" in subset for subset in subsets):
        return "mask"
    with_metadata = ["metadata_file" in subset for subset in subsets]
    if all(with_metadata):
        return "finetune"
    if any(with_metadata):
        problems.append(f"{source}: {path}: DreamBooth subsets (image_dir only) and fine-tuning subsets "
                        "(metadata_file) cannot be mixed in one dataset; split them into separate [[datasets]].")
    return "dreambooth"


def _check_subset(subset: dict, path: str, kind: str, source: str, problems: list[str], masked_loss: bool) -> dict:
    checked = _check_table(subset, path, SUBSET_KEYS_BY_KIND[kind], f"{kind}-subset", source, problems, masked_loss)
    what = {"image_dir": "the folder of images", "metadata_file": "the metadata JSON of this subset"}
    for required in REQUIRED_SUBSET_KEYS[kind]:
        if required not in subset:
            problems.append(f"{source}: {path}.{required}: required key is missing ({what[required]}).")
    return checked


def _check_table(table: Any, path: str, keys: dict, level: str, source: str, problems: list[str],
                 masked_loss: bool = False) -> dict:
    if not isinstance(table, dict):
        problems.append(f"{source}: {path}: expected a table, given {_given(table)}")
        return {}
    checked = {}
    for key, value in table.items():
        key_path = f"{path}.{key}"
        if key not in keys:
            problems.append(_unknown_key_message(source, key_path, key, keys, level, masked_loss))
            continue
        if key == "subsets":
            if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
                problems.append(f"{source}: {key_path}: expected {_KIND_DESCRIPTIONS['list']}, given {_given(value)}")
            continue  # subsets are checked by the caller
        ok, converted = _check_value(keys[key], value)
        if ok:
            checked[key] = converted
        else:
            problems.append(f"{source}: {key_path}: expected {_KIND_DESCRIPTIONS[keys[key]]}, given {_given(value)}")
    return checked


def _unknown_key_message(source: str, key_path: str, key: str, allowed: dict, level: str,
                         masked_loss: bool = False) -> str:
    """Say why a key is not allowed here: command-line only, wrong level, another dataset kind, or a typo."""
    where = f"{source}: {key_path}:"
    if key in COMMAND_LINE_ONLY_KEYS:
        return f"{where} '{key}' is a command-line setting, not a dataset-config key; pass --{key} instead."
    if level == "top" and key in GENERAL_KEYS:
        return f"{where} '{key}' must be inside a table: write it under [general] (or in a [[datasets]] table)."
    if key == "conditioning_data_dir" and not masked_loss:
        return (f"{where} mask subsets (image_dir + conditioning_data_dir) need --masked_loss on the command line "
                "(or masked_loss = true in the --config_file), as in sd-scripts.")
    if key in SUBSET_ONLY_KEYS and not level.endswith("subset"):
        return f"{where} '{key}' is only allowed inside a [[datasets.subsets]] table; move it there."
    if key == "subsets" and level == "general":
        return f"{where} 'subsets' belong inside [[datasets]] (write [[datasets.subsets]])."
    if key in DATASET_KEYS and level.endswith("subset"):
        return f"{where} '{key}' is a dataset setting; move it to its [[datasets]] table or to [general]."
    if key in DREAMBOOTH_ASCENDABLE_KEYS and level.startswith("finetune"):
        return (f"{where} '{key}' applies to DreamBooth (image folder) subsets only; this dataset is fine-tuning "
                "because its subsets have metadata_file.")
    if key == "metadata_file" and level.startswith("dreambooth"):
        return f"{where} 'metadata_file' is a fine-tuning key; every subset of this dataset would need one."
    if key == "conditioning_data_dir":  # with --masked_loss, in a subset of a dataset that is not all masks
        return (f"{where} every subset of a dataset must have conditioning_data_dir (mask images) or none may; "
                "put the subsets without masks in a separate [[datasets]].")
    if level.startswith("mask") and key in {**DREAMBOOTH_SUBSET_KEYS, **FINETUNE_SUBSET_KEYS}:
        return (f"{where} '{key}' is not available for mask subsets (those with conditioning_data_dir), as in "
                "sd-scripts; remove it, or train these images in a separate [[datasets]] without masks.")
    return f"{where} unknown key{did_you_mean(key, allowed)}."


def _check_value(kind: str, value: Any) -> tuple[bool, Any]:
    """Type rules of sd-scripts' voluptuous schema (a float key rejects 1, as it does), except that a
    boolean is never accepted as a number."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "int":
        return is_int, value
    if kind == "bool":
        return isinstance(value, bool), value
    if kind == "str":
        return isinstance(value, str), value
    if kind == "float":
        return isinstance(value, float), value
    if kind == "number":
        return is_int or isinstance(value, float), value
    if kind == "dict":
        return isinstance(value, dict), value
    if kind == "resolution":
        if is_int:
            return True, (value, value)
        pair = isinstance(value, (list, tuple)) and len(value) == 2
        ok = pair and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        return ok, tuple(value) if ok else value
    if kind == "float_pair":
        ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, float) for v in value)
        return ok, tuple(value) if ok else value
    raise AssertionError(f"unknown schema kind {kind}")


def _given(value: Any) -> str:
    names = {bool: "boolean", int: "whole number", float: "decimal number", str: "string", list: "array",
             tuple: "array", dict: "table"}
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return f"{names.get(type(value), type(value).__name__)} {shown}"


# --- resolution: subset > dataset > general > argument > default ----------------------------------------

def resolve_datasets(args: Any, user_config: dict | None) -> list[DatasetSpec]:
    """Resolve every dataset and subset value, as sd-scripts' config_util.py does.

    `args` is any object with sd-scripts argument names as attributes (missing ones count as unset).
    Without `user_config`, the dataset comes from --train_data_dir/--reg_data_dir folders or --in_json
    (plus --conditioning_data_dir masks with --masked_loss).
    """
    masked_loss = bool(getattr(args, "masked_loss", False))
    source = str(getattr(args, "dataset_config", None) or "dataset config")
    from_arguments = user_config is None
    if from_arguments:
        user_config = _config_from_arguments(args)
        source = "command line"
    else:
        _warn_ignored_folder_arguments(args)
    config = validate_dataset_config(user_config, source, masked_loss=masked_loss)
    general = config.get("general", {})
    arguments = _argument_values(args)
    problems: list[str] = []
    specs = []
    for i, dataset in enumerate(config.get("datasets", [])):
        spec = _resolve_dataset(dataset, general, arguments, f"{source}: datasets[{i}]", problems)
        if spec is not None:
            specs.append(spec)
    if problems:
        raise ConfigError(problems)
    if not specs:
        raise ConfigError(f"{source}: no [[datasets]] with [[datasets.subsets]] found; add at least one subset "
                          "with image_dir = \"path/to/images\".")
    if from_arguments:
        specs = _with_command_line_masks(specs, args)
    if masked_loss and not any(s.conditioning_data_dir or s.alpha_mask for spec in specs for s in spec.subsets):
        logger.warning("--masked_loss has no effect: no subset has conditioning_data_dir (mask images) or "
                       "alpha_mask, so every pixel counts (as in sd-scripts)")
    return specs


def _resolve_dataset(dataset: dict, general: dict, arguments: dict, where: str, problems: list[str]):
    subsets = dataset.get("subsets", [])
    is_dreambooth = not subsets or not all("metadata_file" in s for s in subsets)
    if not subsets:
        problems.append(f"{where}: has no [[datasets.subsets]]; add one with image_dir = \"path/to/images\".")
        return None
    chain = (dataset, general, arguments)
    values = {f.name: _first_set(f.name, chain, f.default) for f in dataclasses.fields(DatasetSpec)
              if f.name not in ("subsets", "is_dreambooth")}
    if not _any_set("resolution", chain):  # sd-scripts asserts; DatasetSpec's default is not used here
        problems.append(f"{where}: no resolution. Pass --resolution 512 (or \"width,height\"), or set "
                        "resolution = 512 in [general] or [[datasets]].")
        return None
    values["resolution"] = tuple(values["resolution"])
    _check_dataset_values(values, where, problems)
    subset_specs = []
    seen: set[str] = set()
    for j, subset in enumerate(subsets):
        spec = _resolve_subset(subset, (subset, dataset, general, arguments), f"{where}.subsets[{j}]", problems)
        identity = spec.image_dir if is_dreambooth else spec.metadata_file
        identity = os.path.normcase(os.path.abspath(identity)) if identity else str(j)
        if spec.conditioning_data_dir:  # sd-scripts' ControlNetSubset compares both folders
            identity += "|" + os.path.normcase(os.path.abspath(spec.conditioning_data_dir))
        if identity in seen:  # config_util: a subset repeated in one dataset is ignored (first one wins)
            logger.warning("%s.subsets[%d]: ignoring duplicate subset %s (the first one is used)",
                           where, j, spec.image_dir if is_dreambooth else spec.metadata_file)
            continue
        seen.add(identity)
        subset_specs.append(spec)
    return DatasetSpec(**values, subsets=tuple(subset_specs), is_dreambooth=is_dreambooth)


def _resolve_subset(subset: dict, chain: tuple, where: str, problems: list[str]) -> SubsetSpec:
    subset_level, arguments = chain[0], chain[-1]
    values = {}
    for f in dataclasses.fields(SubsetSpec):
        # subset-only keys skip [[datasets]] and [general]; the command line (--alpha_mask) still applies
        levels = (subset_level, arguments) if f.name in SUBSET_ONLY_KEYS else chain
        values[f.name] = _first_set(f.name, levels, f.default)
    if subset_level.get("conditioning_data_dir") is None:
        values["conditioning_data_dir"] = None  # only a mask subset's own key names its masks
    else:
        values["alpha_mask"] = False  # sd-scripts' mask subsets have no alpha_mask: the mask images are the mask
        if values["random_crop"]:
            problems.append(f"{where}.random_crop: not supported for mask subsets (conditioning_data_dir), as in "
                            "sd-scripts; set random_crop = false for this subset (or drop --random_crop).")
    if values["num_repeats"] < 1:  # sd-scripts would train on no picture of this subset, and say nothing useful
        problems.append(f"{where}.num_repeats: must be at least 1 (given {values['num_repeats']}): how many times "
                        "each picture of the subset is seen per epoch.")
    extension = values["caption_extension"]
    if extension and not extension.startswith("."):  # sd-scripts adds the dot: "txt" -> ".txt"
        values["caption_extension"] = "." + extension
    face_range = values["face_crop_aug_range"]
    if face_range is not None:
        values["face_crop_aug_range"] = tuple(float(v) for v in face_range)
        if values["face_crop_aug_range"][0] > values["face_crop_aug_range"][1]:
            problems.append(f"{where}.face_crop_aug_range: the first value must not exceed the second "
                            f"(given {list(face_range)}).")
    interpolation = subset_level.get("resize_interpolation")  # inherited values are checked with the dataset
    if interpolation is not None and interpolation not in RESIZE_INTERPOLATIONS:
        problems.append(f"{where}.resize_interpolation: unknown '{interpolation}'"
                        f"{did_you_mean(interpolation, RESIZE_INTERPOLATIONS)}; use one of "
                        f"{', '.join(RESIZE_INTERPOLATIONS)}.")
    return SubsetSpec(**values)


def _check_dataset_values(values: dict, where: str, problems: list[str]) -> None:
    """Range checks sd-scripts makes with assert (or not at all); here they are messages. Snaps the
    bucket limits to multiples of bucket_reso_steps as sd-scripts does (min down, max up)."""
    width, height = values["resolution"]
    if width < 1 or height < 1:
        problems.append(f"{where}.resolution: must be positive (given {width}x{height}).")
    if values["batch_size"] < 1:
        problems.append(f"{where}.batch_size: must be at least 1 (given {values['batch_size']}); "
                        "set --train_batch_size or batch_size.")
    interpolation = values["resize_interpolation"]
    if interpolation is not None and interpolation not in RESIZE_INTERPOLATIONS:
        problems.append(f"{where}.resize_interpolation: unknown '{interpolation}'"
                        f"{did_you_mean(interpolation, RESIZE_INTERPOLATIONS)}; use one of "
                        f"{', '.join(RESIZE_INTERPOLATIONS)}.")
    if not 0.0 <= values["validation_split"] <= 1.0:
        logger.warning("%s: validation_split %s is not between 0 and 1; no validation split is made.",
                       where, values["validation_split"])
        values["validation_split"] = 0.0
    if values["enable_bucket"]:
        _snap_bucket_limits(values, where, problems)


def _snap_bucket_limits(values: dict, where: str, problems: list[str]) -> None:
    steps = values["bucket_reso_steps"]
    if steps < 1:
        problems.append(f"{where}.bucket_reso_steps: must be positive (given {steps}); 64 is usual.")
        return
    low, high = values["min_bucket_reso"], values["max_bucket_reso"]
    width, height = values["resolution"]
    # snapped down, such a minimum would be 0: sd-scripts then divides by a zero bucket width. Buckets
    # are unused with bucket_no_upscale, where sd-scripts accepts it, so there it is only snapped.
    min_is_usable = low >= steps or values["bucket_no_upscale"]
    if not min_is_usable:
        problems.append(_min_below_steps_message(where, low, steps, min(width, height)))
    elif low % steps:
        values["min_bucket_reso"] = low - low % steps
        logger.warning("%s: min_bucket_reso %d adjusted to %d, a multiple of bucket_reso_steps %d",
                       where, low, values["min_bucket_reso"], steps)
    if high % steps:
        values["max_bucket_reso"] = high + steps - high % steps
        logger.warning("%s: max_bucket_reso %d adjusted to %d, a multiple of bucket_reso_steps %d",
                       where, high, values["max_bucket_reso"], steps)
    if min_is_usable and min(width, height) < values["min_bucket_reso"]:
        problems.append(f"{where}: min_bucket_reso ({values['min_bucket_reso']}) is larger than the short side of "
                        f"resolution {width}x{height}; lower min_bucket_reso or raise the resolution.")
    if max(width, height) > values["max_bucket_reso"]:
        problems.append(f"{where}: max_bucket_reso ({values['max_bucket_reso']}) is smaller than the long side of "
                        f"resolution {width}x{height}; raise max_bucket_reso or lower the resolution.")


def _min_below_steps_message(where: str, low: int, steps: int, short_side: int) -> str:
    """The fix for a min_bucket_reso below one bucket step (snapped down it would be 0 or less)."""
    dash = "--" if where.startswith("command line") else ""  # name flags as flags, file keys as keys
    fixes = [f"set {dash}min_bucket_reso to at least {steps}"]
    if 0 < low and low % 64 == 0:
        fixes.append(f"{dash}bucket_reso_steps to 64")
    elif 0 < low and low % 32 == 0:
        fixes.append(f"{dash}bucket_reso_steps to 32 (SDXL only; SD 1.x/2.x need a multiple of 64)")
    message = (f"{where}: {dash}min_bucket_reso {low} is below {dash}bucket_reso_steps {steps} and would be rounded "
               f"down to {low - low % steps}, so no bucket could be made: {', or '.join(fixes)}")
    if short_side < steps:
        message += f"; the short side of the resolution ({short_side}) must then be at least {steps} too"
    return message + "."


def verify_bucket_reso_steps(specs: list[DatasetSpec], multiple: int) -> None:
    """sd-scripts requires bucket_reso_steps divisible by 64 (SD1/2) or 32 (SDXL) when bucketing."""
    bad = [f"datasets[{i}].bucket_reso_steps = {spec.bucket_reso_steps}" for i, spec in enumerate(specs)
           if spec.enable_bucket and spec.bucket_reso_steps % multiple]
    if bad:
        raise ConfigError([f"{item}: must be divisible by {multiple} for this model; use 64." for item in bad])


def _first_set(name: str, chain: tuple, default: Any) -> Any:
    for level in chain:
        value = level.get(name)
        if value is not None:
            return value
    return default


def _any_set(name: str, chain: tuple) -> bool:
    return any(level.get(name) is not None for level in chain)


def _argument_values(args: Any) -> dict[str, Any]:
    """The command-line values that act as defaults for dataset keys, under dataset-config names."""
    names = set(GENERAL_KEYS) | {"alpha_mask"}  # --alpha_mask reaches subsets through the fallback chain
    values = {}
    for key in names:
        value = getattr(args, ARGUMENT_NAME_FOR_KEY.get(key, key), None)
        if value is not None:
            values[key] = value
    legacy_extension = getattr(args, "caption_extention", None)  # sd-scripts' misspelled alias wins
    if legacy_extension is not None:
        values["caption_extension"] = legacy_extension
    if isinstance(values.get("resolution"), (str, int)):
        values["resolution"] = _parse_resolution(values["resolution"])
    if isinstance(values.get("face_crop_aug_range"), str):
        values["face_crop_aug_range"] = _parse_float_pair(values["face_crop_aug_range"], "--face_crop_aug_range")
    return values


def _parse_resolution(value: str | int) -> tuple[int, int]:
    try:
        parts = [int(part) for part in str(value).split(",")]
    except ValueError:
        raise ConfigError(f"--resolution: '{value}' is not '512' or 'width,height'.") from None
    if len(parts) not in (1, 2):
        raise ConfigError(f"--resolution: '{value}' is not '512' or 'width,height'.")
    return (parts[0], parts[-1])


def _parse_float_pair(text: str, name: str) -> tuple[float, float]:
    try:
        parts = tuple(float(part) for part in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 2:
        raise ConfigError(f"{name}: '{text}' must be two numbers such as '2.0,4.0'.")
    return parts


def _warn_ignored_folder_arguments(args: Any) -> None:
    for name in ("train_data_dir", "reg_data_dir", "in_json"):
        if getattr(args, name, None) is not None:
            logger.warning("--%s is ignored because --dataset_config is given (as in sd-scripts)", name)
    if getattr(args, "conditioning_data_dir", None) is not None:
        logger.warning("--conditioning_data_dir is ignored because --dataset_config is given: each subset names "
                       "its masks with conditioning_data_dir (as in sd-scripts)")


def _config_from_arguments(args: Any) -> dict:
    """No --dataset_config: one dataset from the DreamBooth folders, or one fine-tuning subset from --in_json."""
    train_data_dir = getattr(args, "train_data_dir", None)
    in_json = getattr(args, "in_json", None)
    with_masks = getattr(args, "conditioning_data_dir", None) is not None and getattr(args, "masked_loss", False)
    if with_masks and in_json is not None:
        raise ConfigError("--conditioning_data_dir cannot be combined with --in_json: mask images are matched to "
                          "image folders. Use --train_data_dir, or a --dataset_config with image_dir and "
                          "conditioning_data_dir per subset.")
    if in_json is not None:
        subset = {"metadata_file": str(in_json)}
        if train_data_dir is not None:
            subset["image_dir"] = str(train_data_dir)
        return {"datasets": [{"subsets": [subset]}]}
    if train_data_dir is None:
        raise ConfigError("No training images given: pass --train_data_dir (the parent of folders such as "
                          "'10_sks dog') or --dataset_config.")
    if with_masks and _is_flat_image_folder(Path(train_data_dir)):
        # sd-scripts' ControlNet layout: the images themselves, each used once per epoch
        subsets = [{"image_dir": str(train_data_dir), "num_repeats": 1}]
    else:
        subsets = find_dreambooth_subsets(Path(train_data_dir), is_reg=False)
    reg_data_dir = getattr(args, "reg_data_dir", None)
    if reg_data_dir is not None:
        subsets += find_dreambooth_subsets(Path(reg_data_dir), is_reg=True)
    return {"datasets": [{"subsets": subsets}]}


def _is_flat_image_folder(folder: Path) -> bool:
    """Images directly inside and no `N_tokens` subfolders (sd-scripts' ControlNet train_data_dir)."""
    if not folder.is_dir() or not list_images(folder):
        return False
    return not any(p.is_dir() and parse_repeats_folder(p.name) for p in folder.iterdir())


def _with_command_line_masks(specs: list[DatasetSpec], args: Any) -> list[DatasetSpec]:
    """--conditioning_data_dir without a dataset config: each training subset gets its masks from
    `<conditioning_data_dir>/<image folder name>` when that folder exists, else from the folder itself.
    Regularisation subsets stay unmasked. sd-scripts' train_network.py ignores the option here; without
    --masked_loss we ignore it too."""
    mask_dir = getattr(args, "conditioning_data_dir", None)
    if mask_dir is None:
        return specs
    if not getattr(args, "masked_loss", False):
        logger.warning("--conditioning_data_dir is ignored without --masked_loss (as in sd-scripts); add "
                       "--masked_loss to train with the mask images")
        return specs
    if getattr(args, "random_crop", False):
        raise ConfigError("--random_crop cannot be used with --conditioning_data_dir masks (as in sd-scripts); "
                          "drop --random_crop.")
    result = []
    for spec in specs:
        subsets = []
        for subset in spec.subsets:
            if not subset.is_reg:
                per_folder = Path(mask_dir) / Path(subset.image_dir).name
                masks = per_folder if per_folder.is_dir() else Path(mask_dir)
                subset = dataclasses.replace(subset, conditioning_data_dir=str(masks), alpha_mask=False)
            subsets.append(subset)
        result.append(dataclasses.replace(spec, subsets=tuple(subsets)))
    return result
