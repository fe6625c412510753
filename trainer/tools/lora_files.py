"""Reading and writing LoRA files for the LoRA-to-LoRA tools (resize_lora, merge_lora, extract_lora): one
module's (down, up, alpha) by kohya name, sd-scripts' --save_precision / --device values, output checks, and
an atomic save with sd-scripts' sshs hashes."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer import __version__
from trainer.errors import ConfigError, did_you_mean
from trainer.files import atomic_path, strip_path
from trainer.network.lora import read_weights_file
from trainer.network.metadata import base_model_version, modelspec_metadata, sshs_hashes

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
SAVE_PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OUTPUT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
# Key parts of LyCORIS networks that are not a plain down/up pair (LoHa, LoKr): an SVD of them means nothing here.
OTHER_NETWORK_MARKS = {"hada_w1": "LoHa", "hada_w2": "LoHa", "lokr_w1": "LoKr", "lokr_w2": "LoKr"}


@dataclass(frozen=True)
class LoraModuleWeights:
    """One kohya LoRA module as stored: down [r, in(, kh, kw)], up [out, r(, 1, 1)], alpha (None: = rank)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: torch.Tensor | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def is_conv3x3(self) -> bool:
        """A kxk conv (LoCon): it takes --new_conv_rank / --conv_dim; Linear and 1x1 layers take the main rank."""
        return self.down.dim() == 4 and tuple(self.down.shape[2:]) != (1, 1)


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a LoRA file; .ckpt/.pt files have no metadata."""
    tensors = read_weights_file(path)
    metadata: dict[str, str] = {}
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            metadata = dict(file.metadata() or {})
    return tensors, metadata


def split_modules(tensors: dict[str, torch.Tensor], source: Path
                  ) -> tuple[dict[str, LoraModuleWeights], dict[str, torch.Tensor]]:
    """({module name: weights}, {other key: tensor}) of a kohya-format LoRA; LoHa/LoKr files are refused."""
    for key in tensors:
        for mark, kind in OTHER_NETWORK_MARKS.items():
            if mark in key:
                raise ConfigError(f'"{source}" is a {kind} file (key {key}), not a LoRA: its weights are not one '
                                  f"down/up pair per layer, so they cannot be resized or merged here. Use LyCORIS' "
                                  f"own tools for it.")
    modules, used = {}, set()
    for key in tensors:
        if not key.endswith(DOWN):
            continue
        name = key[: -len(DOWN)]
        if name + UP not in tensors:
            raise ConfigError(f'"{source}": module {name} has a lora_down weight but no lora_up weight; the file is '
                              f"incomplete.")
        modules[name] = LoraModuleWeights(tensors[key], tensors[name + UP], tensors.get(name + ALPHA))
        used |= {key, name + UP, name + ALPHA}
    if not modules:
        raise ConfigError(f'"{source}" has no `.lora_down.weight` keys: it is not a kohya-format LoRA file.')
    return modules, {k: v for k, v in tensors.items() if k not in used}


def module_tensors(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """The three keys of one module; alpha is stored as a float tensor, as sd-scripts' tools write it."""
    return {name + DOWN: down.cpu().contiguous(), name + UP: up.cpu().contiguous(),
            name + ALPHA: torch.tensor(alpha, dtype=torch.float32)}


def resolve_device(name: str | None) -> torch.device:
    """--device: the GPU when none is given and one is there, else the CPU; an unusable name is refused."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f'--device "{name}" is not a device name ({error}). Use cuda, cuda:0 or cpu.') from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f'--device "{name}": this PyTorch sees no CUDA GPU. Fix: leave --device out (or use cpu), '
                          f"or install the CUDA build of torch (python -m trainer setup).")
    return device


def check_input(path_text: str, what: str) -> Path:
    path = Path(strip_path(path_text)).expanduser()
    if not path.is_file():
        hint = did_you_mean(path.name, [p.name for p in path.parent.iterdir()]) if path.parent.is_dir() else ""
        raise ConfigError(f'{what} "{path}" does not exist{hint}.')
    return path


def check_output(path_text: str, inputs: list[Path], overwrite: bool) -> Path:
    """--save_to: a new .safetensors/.ckpt/.pt file that is none of the inputs (never written over)."""
    path = Path(strip_path(path_text)).expanduser()
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f'--save_to "{path}" must end in .safetensors (or .ckpt / .pt / .pth).')
    if path.is_dir():
        raise ConfigError(f'--save_to "{path}" is a folder. Fix: give a file name, e.g. "{path / "lora.safetensors"}".')
    if path.exists() and any(path.resolve() == p.resolve() for p in inputs):
        raise ConfigError(f'--save_to "{path}" is one of the input files. Fix: write the result to a new file.')
    if path.exists() and not overwrite:
        raise ConfigError(f'--save_to "{path}" already exists. Fix: choose another name, or add --overwrite to '
                          f"replace it.")
    return path


def save_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
              dtype: torch.dtype) -> None:
    """Cast floating tensors to `dtype` (alpha too, as sd-scripts does), add sshs_model_hash/sshs_legacy_hash of the
    cast tensors, and write the file under a temporary name first. .ckpt/.pt files get no metadata."""
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    if path.suffix.lower() != ".safetensors":
        with atomic_path(path) as temp:
            torch.save(state, temp)
        return
    from safetensors.torch import save_file

    text = {str(k): str(v) for k, v in metadata.items() if not k.startswith("sshs_")}
    text["sshs_model_hash"], text["sshs_legacy_hash"] = sshs_hashes(state, text)
    with atomic_path(path) as temp:
        save_file(state, str(temp), metadata=text)


def family_of(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, bool]:
    """(sd1 | sd2 | sdxl, v-prediction) of a LoRA from its ss_base_model_version, else from its key names."""
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl") or any(k.startswith(("lora_te1_", "lora_te2_")) for k in tensors):
        return "sdxl", False
    if version.startswith("sd_v2") or metadata.get("ss_v2") == "True":
        return "sd2", version.endswith("_v")
    return "sd1", version.endswith("_v")


def rank_text(values: list[float | int]) -> str:
    """ss_network_dim / ss_network_alpha of several modules: the one value they share, else "Dynamic"."""
    return str(values[0]) if values and len(set(values)) == 1 else "Dynamic"


def network_metadata(*, family: str, v_parameterization: bool, title: str, dim: str, alpha: str,
                     network_args: dict | None, merged_from: str | None = None) -> dict[str, str]:
    """sd-scripts' minimum network metadata (build_minimum_network_metadata) plus the modelspec keys its tools
    add to a LoRA they make."""
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": alpha,
            "ss_v2": str(family == "sd2"), "ss_base_model_version": base_model_version(family, v_parameterization)}
    if network_args:
        meta["ss_network_args"] = json.dumps(network_args)
    meta.update(modelspec_metadata(family=family, v_parameterization=v_parameterization, title=title,
                                   resolution=None, timestamp=time.time(), clip_skip=None, min_timestep=None,
                                   max_timestep=None, merged_from=merged_from,
                                   implementation_version=f"trainer/{__version__}"))
    return meta
