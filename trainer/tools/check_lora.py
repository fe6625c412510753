"""`python -m trainer check_lora FILE [--base MODEL] [--json]`: will ComfyUI, A1111/Forge and diffusers apply every
key of this LoRA? And `python -m trainer show_metadata FILE [--full] [--json]`: the file's ss_* / modelspec.* header.

    python -m trainer check_lora output/mychar.safetensors
    python -m trainer check_lora output/mychar.safetensors --base D:/models/sd15.safetensors --json
    python -m trainer show_metadata output/mychar.safetensors

The answer to "lora key not loaded" and "my LoRA does nothing": for each consumer, the keys it would leave out
and why, from the naming rules of its own key-mapping code (trainer/network/consumers.py says which rule comes
from which file: ComfyUI's comfy/lora.py, A1111's extensions-builtin/Lora/networks.py, diffusers'
loaders/lora_conversion_utils.py). Also the checks no consumer makes: NaN/Inf tensors, an all-zero lora_up (an
untrained file), down/up/alpha shapes that disagree with each other or with the layer, a missing alpha, mixed
weight dtypes; and a rank/alpha/dtype summary per part (TE, TE1, TE2, UNet).

The family (SD1, SD2, SDXL) comes from --base, else from the key shapes (cross-attention and text-encoder
widths), else from ss_base_model_version / modelspec.architecture, else from the key names. The layers it is
checked against are our own full-size architecture built on the meta device (no weights), or with --base the
loaded model's own layers.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from trainer.errors import ConfigError
from trainer.network.consumers import (
    CONSUMERS,
    ModelLayers,
    Verdict,
    a1111_lookup,
    architecture_layers,
    consumer_verdicts,
    layers_of_models,
    merged_ignored,
    split_key,
)

PARTS = (("lora_te1_", "TE1"), ("lora_te2_", "TE2"), ("lora_te_", "TE"), ("lora_unet_", "UNet"))
CONSUMER_LABELS = {"ComfyUI": "ComfyUI / Forge", "A1111": "A1111 (and Forge before 2024)", "diffusers": "diffusers"}
SHOWN_NAMES = 8  # keys listed per reason in the text summary
HEADER_LIMIT = 100 * 1024 * 1024  # a safetensors header larger than this is not a LoRA's


@dataclass
class Report:
    """The verdict on one LoRA file."""

    path: Path
    family: str
    family_source: str
    architecture: str
    verdicts: dict[str, Verdict]
    ignored: dict[str, str] = field(default_factory=dict)   # key -> why (which consumers, and the reason)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.ignored and all(v.fails is None for v in self.verdicts.values())

    @property
    def ok_for_webuis(self) -> bool:
        """Everything applied by the programs the LoRA is made for (ComfyUI, A1111/Forge); diffusers' pipelines
        load only plain LoRA, so a LoHa/LoKr file is fine without them."""
        webuis = [v for c, v in self.verdicts.items() if c != "diffusers"]
        return not self.problems and all(v.all_applied for v in webuis)

    def summary_lines(self) -> list[str]:
        title = (f"{self.path}: {self.family.upper()} LoRA (from {self.family_source}), checked against "
                 f"{self.architecture}")
        lines = [title, *[f"  {n}" for n in self.notes]]
        for consumer in CONSUMERS:
            lines += _verdict_lines(self.verdicts[consumer])
        lines += [f"PROBLEM: {p}" for p in self.problems]
        if self.ok:
            lines.append("OK: every key is applied by ComfyUI, A1111 and diffusers.")
        elif self.ok_for_webuis:
            lines.append("OK for ComfyUI / Forge and A1111: every key is applied there; diffusers cannot load this "
                         "file (see above).")
        else:
            lines.append("NOT OK: see above.")
        return lines

    def as_json(self) -> dict[str, Any]:
        return {"file": str(self.path), "ok": self.ok, "family": self.family, "family_source": self.family_source,
                "architecture": self.architecture, "problems": self.problems, "notes": self.notes,
                "ignored": self.ignored,
                "consumers": {c: {"all_applied": v.all_applied, "applied_modules": v.applied_modules,
                                  "fails": v.fails, "ignored": v.ignored} for c, v in self.verdicts.items()}}


def _verdict_lines(verdict: Verdict) -> list[str]:
    label = CONSUMER_LABELS[verdict.consumer]
    if verdict.fails:
        return [f"{label}: FAILS to load the file: {verdict.fails}"]
    if not verdict.ignored:
        return [f"{label}: every key applied ({verdict.applied_modules} modules)"]
    lines = [f"{label}: {len(verdict.ignored)} keys IGNORED ({verdict.applied_modules} modules applied)"]
    by_reason: dict[str, list[str]] = {}
    for key, reason in verdict.ignored.items():
        by_reason.setdefault(reason, []).append(key)
    for reason, keys in by_reason.items():
        names = list(dict.fromkeys(split_key(k)[0] for k in keys))  # one entry per module, in file order
        lines.append(f"  - {reason} ({len(keys)} keys of {len(names)} modules): {_short(names)}")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Reading the file


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """({tensor key: {"dtype", "shape"}}, metadata) from a .safetensors header, without torch."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > HEADER_LIMIT:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as error:
        raise ConfigError(f"cannot read {path} as a .safetensors file ({error}). Is it complete (not still being "
                          "downloaded or written)?") from None
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata


def _read_tensors(path: Path) -> tuple[dict, dict[str, str]]:
    from trainer.network.lora import NetworkWeightsError, read_weights_file  # lazy: torch only for the check

    if not path.is_file():
        raise ConfigError(f"LoRA file not found: {path}. Check the path.")
    metadata = read_header(path)[1] if path.suffix.lower() == ".safetensors" else {}
    try:
        return read_weights_file(path), metadata
    except NetworkWeightsError as error:
        raise ConfigError(str(error)) from None


# ---------------------------------------------------------------------------------------------------------------
# Which model the file is for

_CROSS_ATTENTION = {32: ("sd1", "tiny-sd1"), 768: ("sd1", "sd15"), 1024: ("sd2", "sd2-512"), 2048: ("sdxl", "sdxl")}
_TEXT_WIDTH = {32: ("sd1", "tiny-sd1"), 768: ("sd1", "sd15"), 1024: ("sd2", "sd2-512"), 1280: ("sdxl", "sdxl")}
ARCHITECTURE_OF = {"sd1": "sd15", "sd2": "sd2-512", "sdxl": "sdxl"}


def _from_shapes(shapes: Mapping[str, tuple]) -> tuple[str, str] | None:
    for key, shape in shapes.items():
        if key.endswith("attn2_to_k.lora_down.weight") and len(shape) >= 2 and shape[1] in _CROSS_ATTENTION:
            return _CROSS_ATTENTION[shape[1]]
    for key, shape in shapes.items():
        if key.startswith("lora_te2_"):
            return "sdxl", "sdxl"
        if key.endswith("mlp_fc1.lora_down.weight") and len(shape) >= 2 and shape[1] in _TEXT_WIDTH:
            family, arch = _TEXT_WIDTH[shape[1]]
            return ("sdxl", "sdxl") if key.startswith("lora_te1_") and family == "sd1" else (family, arch)
    return None


def _from_metadata(metadata: Mapping[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    architecture = metadata.get("modelspec.architecture", "")
    if version.startswith("sdxl") or architecture.startswith("stable-diffusion-xl"):
        return "sdxl"
    if version.startswith("sd_v2") or architecture.startswith("stable-diffusion-v2"):
        return "sd2"
    if version.startswith("sd_v1") or architecture.startswith("stable-diffusion-v1"):
        return "sd1"
    return None


def detect_family(shapes: Mapping[str, tuple], metadata: Mapping[str, str]) -> tuple[str, str, str, list[str]]:
    """(family, architecture, where it came from, problems) of a LoRA file without a base model."""
    by_shape = _from_shapes(shapes)
    by_metadata = _from_metadata(metadata)
    problems = []
    if by_shape and by_metadata and by_shape[0] != by_metadata:
        problems.append(f"the metadata says {by_metadata.upper()} (ss_base_model_version / modelspec.architecture) "
                        f"but the tensor shapes are {by_shape[0].upper()}'s; the shapes are used")
    if by_shape:
        return by_shape[0], by_shape[1], "key shapes", problems
    if by_metadata:
        return by_metadata, ARCHITECTURE_OF[by_metadata], "metadata", problems
    if any(k.startswith(("lora_te1_", "lora_unet_input_blocks", "lora_unet_output_blocks")) for k in shapes):
        return "sdxl", "sdxl", "key names", problems
    return "sd1", "sd15", "nothing (assumed; give --base)", problems


def _base_layers(base: str) -> ModelLayers:
    import torch

    from trainer.models.load import detect_model_family, load_models  # lazy: torch and the model code

    family = detect_model_family(base)
    # fp16: only the layers' shapes are looked at, so half the memory (SDXL: about 5 GB instead of 10)
    models = load_models(base, v2=family == "sd2", sdxl=family == "sdxl", dtype=torch.float16)
    return layers_of_models(models.text_encoders, models.unet, models.family, name=f"--base {models.name}")


# ---------------------------------------------------------------------------------------------------------------
# The checks


def check_lora_file(path: str | Path, base: str | None = None) -> Report:
    """Read a LoRA file and say what each consumer does with it, and what is wrong with its tensors."""
    path = Path(path).expanduser()
    tensors, metadata = _read_tensors(path)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    family, architecture, source, problems = detect_family(shapes, metadata)
    if base:
        model = _base_layers(base)
        if model.family != family and source != "nothing (assumed; give --base)":
            problems.append(f"the file looks like a {family.upper()} LoRA ({source}) but --base is "
                            f"{model.family.upper()}")
        family, architecture, source = model.family, model.name, "--base"
    else:
        model = architecture_layers(architecture)
    verdicts = consumer_verdicts(tensors.keys(), model)
    report = Report(path, family, source, architecture, verdicts, problems=problems)
    report.ignored = merged_ignored(verdicts)
    modules = _group(tensors)
    report.problems += tensor_problems(modules) + shape_problems(modules, model)
    report.notes += part_notes(modules)
    return report


def _group(tensors: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    modules: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name, suffix = split_key(key)
        modules.setdefault(name, {})[suffix] = tensor
    return modules


def _short(names: list[str]) -> str:
    return ", ".join(names[:SHOWN_NAMES]) + (f", ... ({len(names) - SHOWN_NAMES} more)" if len(names) > SHOWN_NAMES
                                             else "")


def tensor_problems(modules: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """NaN/Inf, all-zero lora_up in every module, missing alpha, mixed weight dtypes."""
    import torch

    problems = []
    broken = sorted(f"{n}.{s}" for n, parts in modules.items() for s, t in parts.items()
                    if t.is_floating_point() and not torch.isfinite(t.float()).all())
    if broken:
        problems.append(f"{len(broken)} tensors hold NaN or Inf values (the LoRA breaks every picture): "
                        f"{_short(broken)}")
    ups = {n: parts["lora_up.weight"] for n, parts in modules.items() if "lora_up.weight" in parts}
    if ups and all(not t.float().any() for t in ups.values()):
        problems.append(f"every lora_up weight is zero ({len(ups)} modules): the file changes nothing. It was "
                        "saved before any training step, or training did not reach these weights")
    no_alpha = sorted(n for n, parts in modules.items() if "lora_down.weight" in parts and "alpha" not in parts)
    if no_alpha:
        problems.append(f"{len(no_alpha)} modules have no .alpha: consumers then scale by 1 (alpha = rank), which "
                        f"may not be what it was trained with: {_short(no_alpha)}")
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for parts in modules.values()
                     for s, t in parts.items() if s != "alpha")
    if len(dtypes) > 1:
        problems.append("mixed weight dtypes " + ", ".join(f"{d} ({n})" for d, n in dtypes.items())
                        + ": the file was merged or edited by a tool that did not cast consistently")
    return problems


def _layer_for(name: str, model: ModelLayers):
    layer = model.accepted("ComfyUI").get(name) or model.accepted("diffusers").get(name)
    return layer or a1111_lookup(name, model)[0]


def shape_problems(modules: Mapping[str, Mapping[str, Any]], model: ModelLayers) -> list[str]:
    """down / up / alpha shapes that disagree with each other or with the layer they patch (LoRA / LoCon only)."""
    problems = []
    for name, parts in sorted(modules.items()):
        down, up, alpha = parts.get("lora_down.weight"), parts.get("lora_up.weight"), parts.get("alpha")
        if down is None or up is None:
            if (down is None) != (up is None):
                problems.append(f"{name}: has {'lora_down' if up is None else 'lora_up'} without its other half")
            continue
        rank = down.shape[0]
        if up.dim() < 2 or up.shape[1] != rank or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
            problems.append(f"{name}: lora_down {list(down.shape)} and lora_up {list(up.shape)} do not fit "
                            f"together (rank {rank})")
            continue
        if alpha is not None and alpha.numel() != 1:
            problems.append(f"{name}: alpha has shape {list(alpha.shape)}; it must be one number")
        layer = _layer_for(name, model)
        if layer is None or "lora_mid.weight" in parts:
            continue
        kernel_area = 1 if layer.kernel is None else layer.kernel[0] * layer.kernel[1]
        if down[0].numel() != layer.in_dim * kernel_area or up.shape[0] != layer.out_dim:
            kernel = "" if layer.kernel is None else f", kernel {layer.kernel[0]}x{layer.kernel[1]}"
            problems.append(f"{name}: lora_down {list(down.shape)} / lora_up {list(up.shape)} do not fit the "
                            f"layer {layer.path} ({layer.in_dim} -> {layer.out_dim}{kernel}); consumers skip it "
                            "with an error")
    return problems


def network_type(suffixes: set[str], conv3x3: bool) -> str:
    """lora / locon / loha / lokr (+dora) from the key suffixes, as LyCORIS names them."""
    kind = "lora"
    if any(s.startswith("hada_") for s in suffixes):
        kind = "loha"
    elif any(s.startswith("lokr_") for s in suffixes):
        kind = "lokr"
    elif conv3x3 or "lora_mid.weight" in suffixes:
        kind = "locon"
    return kind + ("+dora" if "dora_scale" in suffixes else "")


def _part_of(name: str) -> str:
    return next((label for prefix, label in PARTS if name.startswith(prefix)), "other")


def part_notes(modules: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per part: modules, ranks, alphas, linear vs conv, dtypes and the network type."""
    by_part: dict[str, list[str]] = {}
    for name in modules:
        by_part.setdefault(_part_of(name), []).append(name)
    notes = []
    for _, label in PARTS + (("", "other"),):
        names = by_part.get(label)
        if not names:
            continue
        ranks, alphas, dtypes, kinds, suffixes = Counter(), Counter(), Counter(), Counter(), set()
        for name in names:
            parts = modules[name]
            suffixes |= set(parts)
            down = parts.get("lora_down.weight")
            rank = module_rank(parts)
            if rank is not None:
                ranks[rank] += 1
            if down is not None:
                kinds["conv3x3" if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1) else
                      "conv1x1" if down.dim() == 4 else "linear"] += 1
            if "alpha" in parts and parts["alpha"].numel() == 1:
                alphas[f"{parts['alpha'].reshape(()).item():g}"] += 1
            dtypes.update(str(t.dtype).removeprefix("torch.") for s, t in parts.items() if s != "alpha")
        notes.append(f"{label}: {len(names)} modules, {network_type(suffixes, bool(kinds['conv3x3']))}, "
                     f"rank {_counts(ranks)}, alpha {_counts(alphas) or 'none'}, "
                     f"{_counts(kinds) + ', ' if kinds else ''}"
                     f"{_counts(dtypes)}" + ("; every lora_up is zero" if _all_zero_up(modules, names) else ""))
    return notes


def module_rank(parts: Mapping[str, Any]) -> int | str | None:
    """The rank of one module from its tensors: LoRA's lora_down rows, LoHa's hada_w1_b rows, LoKr's low-rank
    halves (a LoKr of full matrices has no rank: "full")."""
    for suffix in ("lora_down.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        tensor = parts.get(suffix)
        if tensor is not None:
            return int(tensor.shape[0])
    return "full" if "lokr_w1" in parts else None


def _counts(counter: Counter) -> str:
    if len(counter) == 1:
        return str(next(iter(counter)))
    return ", ".join(f"{value} ({n})" for value, n in sorted(counter.items(), key=lambda item: str(item[0])))


def _all_zero_up(modules, names) -> bool:
    ups = [modules[n]["lora_up.weight"] for n in names if "lora_up.weight" in modules[n]]
    return bool(ups) and all(not t.float().any() for t in ups)


# ---------------------------------------------------------------------------------------------------------------
# show_metadata

LONG_VALUE = 300  # characters; longer values are summarised unless --full
SUMMARISED = ("ss_tag_frequency", "ss_dataset_dirs", "ss_datasets", "ss_bucket_info", "modelspec.thumbnail")


def decoded_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The header's strings with JSON values (objects, lists, numbers, booleans) decoded."""
    decoded = {}
    for key, value in sorted(metadata.items()):
        try:
            decoded[key] = json.loads(value) if value[:1] in "{[" or value in ("true", "false", "null") else value
        except ValueError:
            decoded[key] = value
    return decoded


def summarise(key: str, value: Any) -> Any:
    """A long value in a line: tag counts per folder, folders with their images and repeats, a thumbnail's size."""
    if key == "ss_tag_frequency" and isinstance(value, dict):
        return {folder: f"{len(tags)} tags, top: " + ", ".join(
            f"{t} ({n})" for t, n in sorted(tags.items(), key=lambda item: -item[1])[:5])
            for folder, tags in value.items() if isinstance(tags, dict)}
    if key == "ss_dataset_dirs" and isinstance(value, dict):
        return {folder: f"{info.get('img_count', '?')} images x {info.get('n_repeats', '?')} repeats"
                for folder, info in value.items() if isinstance(info, dict)}
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if key == "modelspec.thumbnail":
        return f"<image, {len(text)} characters>"
    if len(text) > LONG_VALUE or key in SUMMARISED:
        return text[:LONG_VALUE] + (f"... ({len(text)} characters; --full shows all)" if len(text) > LONG_VALUE
                                    else "")
    return value


def metadata_lines(metadata: Mapping[str, str], full: bool = False) -> list[str]:
    decoded = decoded_metadata(metadata)
    if not decoded:
        return ["(no metadata)"]
    width = max(len(k) for k in decoded)
    lines = []
    for key, value in decoded.items():
        shown = value if full else summarise(key, value)
        if isinstance(shown, (dict, list)):
            text = json.dumps(shown, ensure_ascii=False, indent=2 if full else None)
        else:
            text = str(shown)
        lines.append(f"{key.ljust(width)}  {text}")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# The commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer check_lora",
        description="Say whether ComfyUI, A1111/Forge and diffusers apply every key of a LoRA file, which keys "
                    "they ignore and why, and check its tensors (NaN, all-zero, shapes, alpha, dtypes).")
    parser.add_argument("file", help="the LoRA file (.safetensors, .ckpt or .pt)")
    parser.add_argument("--base", default=None, metavar="MODEL",
                        help="also check the shapes against this base model's own layers (single file, diffusers "
                             "folder, hub id or builtin:tiny-sd1); loads it on the CPU")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    report = check_lora_file(args.file, base=args.base)
    if args.json:
        print(json.dumps(report.as_json(), indent=2, ensure_ascii=False))
    else:
        print("\n".join(report.summary_lines()))
    return 0 if report.ok_for_webuis else 1  # diffusers refusing a LoHa/LoKr file is said, not failed


def build_metadata_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer show_metadata",
                                     description="Print a .safetensors file's metadata (ss_*, modelspec.*).")
    parser.add_argument("file", help="the .safetensors file")
    parser.add_argument("--full", action="store_true",
                        help="show long values (ss_tag_frequency, ss_dataset_dirs, ...) in full")
    parser.add_argument("--json", action="store_true", help="print the metadata as JSON, values decoded")
    return parser


def show_metadata_main(argv: list[str]) -> int:
    args = build_metadata_parser().parse_args(argv)
    path = Path(args.file).expanduser()
    if not path.is_file():
        raise ConfigError(f"file not found: {path}. Check the path.")
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(f"{path} is not a .safetensors file; only .safetensors files carry metadata.")
    metadata = read_header(path)[1]
    if args.json:
        json.dump(decoded_metadata(metadata), sys.stdout, indent=2, ensure_ascii=False)
        print()
    else:
        print("\n".join(metadata_lines(metadata, full=args.full)))
    return 0
