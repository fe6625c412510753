"""`python -m trainer merge`: merge LoRA files into a base model and save one single-file .safetensors in the
LDM layout that A1111 / ComfyUI load.

    python -m trainer merge --model BASE --lora A.safetensors:0.8 --lora B.safetensors --output merged.safetensors

sd-scripts' networks/merge_lora.py spellings also work: --sd_model, --save_to, --models A B --ratios 0.8 1,
--precision, --save_precision. The family (SD1/SD2/SDXL) comes from the base model's weights.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from trainer.errors import ConfigError, ModelLoadError, did_you_mean
from trainer.models.checkpoint import classify_checkpoint, read_checkpoint_shapes
from trainer.models.export import merge_lora_into, save_single_file
from trainer.models.load import detect_model_family, load_models

logger = logging.getLogger(__name__)

PRECISIONS = {"float": "float32", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer merge",
        description="Merge LoRA files into a base model and save a single-file .safetensors (LDM layout).")
    parser.add_argument("--model", "--sd_model", dest="model", required=True,
                        help="base model: .safetensors/.ckpt file, diffusers folder, hub id or builtin:tiny-sd1")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:MULTIPLIER]",
                        help="a LoRA file, optionally with its multiplier (default 1.0); repeat for several")
    parser.add_argument("--models", nargs="+", default=[], metavar="FILE", help="sd-scripts style LoRA list")
    parser.add_argument("--ratios", nargs="+", type=float, default=[], metavar="R",
                        help="sd-scripts style multipliers, one per --models file")
    parser.add_argument("--output", "--save_to", dest="output", required=True,
                        help="the merged model to write (.safetensors)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="float",
                        help="dtype the base model is loaded and merged in (default float = fp32; fp16 needs "
                             "half the memory)")
    parser.add_argument("--save_precision", choices=sorted(PRECISIONS), default=None,
                        help="dtype of the saved file (default: same as --precision)")
    parser.add_argument("--v_parameterization", action="store_true",
                        help="the base is a v-prediction model (SD 2.x 768-v); recorded in the file's metadata")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    loras = lora_list(args.lora, args.models, args.ratios)
    output = Path(args.output).expanduser()
    _check_paths(args.model, loras, output, args.overwrite)

    import torch


    dtype = getattr(torch, PRECISIONS[args.precision])
    save_dtype = getattr(torch, PRECISIONS[args.save_precision or args.precision])
    family = detect_model_family(args.model)
    models = load_models(args.model, v2=family == "sd2", sdxl=family == "sdxl",
                         v_parameterization=args.v_parameterization, dtype=dtype, vae_dtype=dtype)
    counts = merge_lora_into(models, [str(p) for p, _ in loras], [m for _, m in loras])
    for (path, multiplier), count in zip(loras, counts):
        print(f"merged {path.name} x {multiplier:g}: {count} layers")
    metadata = merged_metadata(family, args.v_parameterization, output.stem, models.name, loras)
    save_single_file(models, output, save_dtype, metadata)
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB, {PRECISIONS[args.save_precision or args.precision]}"
          f", {family.upper()} single-file layout)")
    return 0


def lora_list(specs: list[str], models: list[str], ratios: list[float]) -> list[tuple[Path, float]]:
    """[(file, multiplier)] from --lora FILE[:M] entries and sd-scripts' --models/--ratios."""
    if ratios and len(ratios) != len(models):
        raise ConfigError(f"--ratios has {len(ratios)} values but --models has {len(models)} files; give one "
                          f"ratio per file (or none for 1.0 each).")
    loras = [parse_lora_spec(s) for s in specs]
    loras += [(Path(m).expanduser(), r) for m, r in zip(models, ratios or [1.0] * len(models))]
    if not loras:
        raise ConfigError("no LoRA to merge. Fix: add --lora FILE.safetensors (or FILE.safetensors:0.8 for a "
                          "multiplier of 0.8).")
    return loras


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """`A.safetensors:0.8` -> (A.safetensors, 0.8); without a number after the last colon the whole text is
    the path, so Windows paths (C:\\x\\A.safetensors) need nothing special."""
    spec = spec.strip().strip('"')
    path, sep, number = spec.rpartition(":")
    if sep and path and not Path(spec).expanduser().is_file():
        try:
            return Path(path.strip('"')).expanduser(), float(number)
        except ValueError:
            pass
    return Path(spec).expanduser(), 1.0


def _check_paths(model: str, loras: list[tuple[Path, float]], output: Path, overwrite: bool) -> None:
    """Everything that can be checked before minutes of loading: all problems at once."""
    problems = []
    for path, _ in loras:
        if not path.is_file():
            hint = did_you_mean(path.name, [p.name for p in path.parent.iterdir()]) if path.parent.is_dir() else ""
            problems.append(f'LoRA file "{path}" does not exist{hint}.')
    base = Path(model.strip().strip('"')).expanduser()
    if not base.exists() and not model.startswith("builtin:") and (base.is_absolute() or model.count("/") != 1):
        hint = did_you_mean(base.name, [p.name for p in base.parent.iterdir()]) if base.parent.is_dir() else ""
        problems.append(f'--model "{base}" does not exist{hint}. Expected a .safetensors/.ckpt file, a diffusers '
                        f'folder, or a Hugging Face hub id like "owner/name".')
    if base.is_file() and output.is_file() and base.resolve() == output.resolve():
        problems.append(f'--output "{output}" is the base model itself. Fix: write the merged model to a new file.')
    elif output.suffix.lower() != ".safetensors":
        problems.append(f'--output "{output}" must end in .safetensors (the merged model is written as '
                        f"safetensors only).")
    elif output.is_dir():
        problems.append(f'--output "{output}" is a folder. Fix: give a file name, e.g. "{output / "merged.safetensors"}".')
    elif output.exists() and not overwrite:
        problems.append(f'--output "{output}" already exists. Fix: choose another name, or add --overwrite to '
                        f"replace it.")
    if problems:
        raise ConfigError(problems)
    if base.is_file():
        _check_base_is_not_a_lora(base)


def _check_base_is_not_a_lora(base: Path) -> None:
    if base.suffix.lower() == ".safetensors" and classify_checkpoint(read_checkpoint_shapes(base)) == "lora":
        raise ModelLoadError(f'--model "{base}" is a LoRA file, not a base model. Fix: give the Stable Diffusion '
                             f"checkpoint as --model and the LoRA as --lora.")


def merged_metadata(family: str, v_parameterization: bool, title: str, base_name: str,
                    loras: list[tuple[Path, float]]) -> dict[str, str]:
    """A few modelspec keys, so the file says what it is and what it was merged from."""
    architecture = ARCHITECTURES[family]
    if family == "sd2" and v_parameterization:
        architecture = "stable-diffusion-v2-768-v"
    merged_from = ", ".join([base_name] + [f"{p.name}:{m:g}" for p, m in loras])
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": architecture,
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl"
            else "diffusers", "modelspec.title": title, "modelspec.merged_from": merged_from,
            "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S")}
