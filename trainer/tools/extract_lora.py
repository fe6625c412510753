"""`python -m trainer extract_lora`: the difference between a fine-tuned and its original checkpoint as a LoRA,
with sd-scripts' networks/extract_lora_from_models.py arguments:

    python -m trainer extract_lora --model_org base.safetensors --model_tuned tuned.safetensors \\
        --save_to tuned-lora.safetensors --dim 32 --conv_dim 16

Each layer a LoRA covers (the layers our LoRANetwork trains: attention blocks, with --conv_dim also the ResNet and
up/down-sampling convs) gets the best rank-`dim` approximation of (tuned - original) by SVD, clamped at
--clamp_quantile as sd-scripts does; alpha = rank, so the scale is 1. As in sd-scripts, the text encoder is
extracted only when one of its layers changed by more than --min_diff; layers that did not change at all are
left out. Single .safetensors/.ckpt files, diffusers folders and hub ids load as for training.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from trainer.errors import ConfigError
from trainer.files import strip_path
from trainer.models.load import detect_model_family, load_models, looks_like_hub_id
from trainer.network import lora_math
from trainer.network.keys import UNET_PREFIX, find_lora_targets, text_encoder_prefixes
from trainer.tools.lora_files import (
    SAVE_PRECISIONS,
    check_output,
    module_tensors,
    network_metadata,
    resolve_device,
    save_lora,
)

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer extract_lora", allow_abbrev=False,
                                     description="Extract a LoRA from the difference of two models by SVD "
                                                 "(sd-scripts' networks/extract_lora_from_models.py arguments).")
    parser.add_argument("--model_org", required=True, help="the original model: .safetensors/.ckpt, diffusers "
                                                           "folder or hub id")
    parser.add_argument("--model_tuned", required=True, help="the fine-tuned model; the LoRA is tuned - original")
    parser.add_argument("--save_to", required=True, help="the LoRA file to write (.safetensors)")
    parser.add_argument("--dim", type=int, default=4, help="rank of the LoRA (default 4)")
    parser.add_argument("--conv_dim", type=int, default=None,
                        help="rank for 3x3 convs; also extracts the ResNet convs (LoCon). Default: none")
    parser.add_argument("--v2", action="store_true", help="the models are SD 2.x (checked against the weights)")
    parser.add_argument("--sdxl", action="store_true", help="the models are SDXL (checked against the weights)")
    parser.add_argument("--v_parameterization", action="store_true", default=None,
                        help="record the LoRA as v-prediction (default: as --v2)")
    parser.add_argument("--clamp_quantile", type=float, default=0.99,
                        help="clamp the LoRA weights at this quantile of their values (default 0.99; 1: no clamp)")
    parser.add_argument("--min_diff", type=float, default=0.01,
                        help="the text encoder is extracted only if a layer of it changed by more than this "
                             "(default 0.01)")
    parser.add_argument("--device", default=None, help="where the SVD runs: cuda or cpu (default: cuda if present)")
    parser.add_argument("--save_precision", choices=sorted(SAVE_PRECISIONS), default=None,
                        help="dtype of the saved file (default float)")
    parser.add_argument("--load_precision", choices=sorted(SAVE_PRECISIONS), default=None,
                        help="dtype the models are loaded in (default float; fp16 halves the memory)")
    parser.add_argument("--no_metadata", action="store_true", help="leave out the modelspec.* metadata "
                                                                   "(the ss_* network keys are always written)")
    parser.add_argument("--overwrite", action="store_true", help="replace --save_to if it exists")
    return parser


def _check_model(spec: str, what: str) -> Path | None:
    """The model's local path (None for builtin: and hub ids); a missing local path is refused before loading."""
    text = strip_path(spec)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if text.startswith("builtin:") or looks_like_hub_id(text):
        return None
    raise ConfigError(f'{what} "{path}" does not exist. Expected a .safetensors/.ckpt file, a diffusers folder, or '
                      f'a Hugging Face hub id like "owner/name".')


def lora_layers(models, *, sdxl: bool, include_conv: bool) -> tuple[dict[str, torch.nn.Module], dict[str, torch.nn.Module]]:
    """({kohya name: text-encoder layer}, {kohya name: UNet layer}) that a LoRA of these models covers."""
    text = {}
    for encoder, prefix in zip(models.text_encoders, text_encoder_prefixes(len(models.text_encoders), sdxl)):
        text.update({t.name: t.module for t in find_lora_targets(encoder, prefix=prefix, is_text_encoder=True,
                                                                  include_conv=False)})
    unet = {t.name: t.module for t in find_lora_targets(models.unet, prefix=UNET_PREFIX, is_text_encoder=False,
                                                         include_conv=include_conv, sdxl=sdxl)}
    return text, unet


def weight_differences(org: dict[str, torch.nn.Module], tuned: dict[str, torch.nn.Module]):
    """{name: tuned - original weight in fp32}; models whose layers differ in names or shapes are refused."""
    if org.keys() != tuned.keys() or any(org[n].weight.shape != tuned[n].weight.shape for n in org):
        raise ConfigError("--model_org and --model_tuned are not the same architecture (their LoRA layers differ "
                          "in names or shapes): both must be SD1.x, both SD2.x or both SDXL.")
    return {name: tuned[name].weight.detach().float() - org[name].weight.detach().float() for name in org}


def extract_modules(diffs: dict[str, torch.Tensor], dim: int, conv_dim: int | None, clamp_quantile: float,
                    device) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the LoRA's tensors, names of unchanged layers left out): the best rank-dim split of each change."""
    state, unchanged = {}, []
    with torch.no_grad():
        for name, diff in diffs.items():
            if not diff.any():
                unchanged.append(name)
                continue
            rank = conv_dim if diff.dim() == 4 and tuple(diff.shape[2:]) != (1, 1) and conv_dim else dim
            down, up = lora_math.best_rank_split(diff.to(device), rank, clamp_quantile)
            state.update(module_tensors(name, down, up, float(down.shape[0])))
    return state, unchanged


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.v2 and args.sdxl:
        raise ConfigError("--v2 and --sdxl cannot both be given: SD 2.x and SDXL are different models.")
    if args.dim < 1 or (args.conv_dim is not None and args.conv_dim < 1):
        raise ConfigError("--dim and --conv_dim must be at least 1.")
    inputs = [p for p in (_check_model(args.model_org, "--model_org"), _check_model(args.model_tuned, "--model_tuned"))
              if p is not None]
    output = check_output(args.save_to, [p for p in inputs if p.is_file()], args.overwrite)
    device = resolve_device(args.device)
    family = "sdxl" if args.sdxl else "sd2" if args.v2 else detect_model_family(strip_path(args.model_org))
    v_parameterization = args.v2 if args.v_parameterization is None else args.v_parameterization  # as sd-scripts
    dtype = SAVE_PRECISIONS[args.load_precision or "float"]
    flags = dict(v2=family == "sd2", sdxl=family == "sdxl", v_parameterization=v_parameterization, dtype=dtype)
    layers = []
    for spec in (args.model_org, args.model_tuned):
        print(f"loading {strip_path(spec)}")
        layers.append(lora_layers(load_models(strip_path(spec), **flags), sdxl=family == "sdxl",
                                  include_conv=args.conv_dim is not None))
    (org_text, org_unet), (tuned_text, tuned_unet) = layers
    text_diffs = weight_differences(org_text, tuned_text)
    largest = max((float(d.abs().max()) for d in text_diffs.values()), default=0.0)
    if largest <= args.min_diff:
        logger.warning("the text encoder is the same (largest change %.3g <= --min_diff %g): extracting the UNet "
                       "only.", largest, args.min_diff)
        text_diffs = {}
    diffs = {**text_diffs, **weight_differences(org_unet, tuned_unet)}
    state, unchanged = extract_modules(diffs, args.dim, args.conv_dim, args.clamp_quantile, device)
    if not state:
        raise ConfigError("the two models have the same weights in every LoRA layer: there is nothing to extract.")
    save_lora(output, state, _metadata(args, family, v_parameterization, output), SAVE_PRECISIONS[args.save_precision
                                                                                               or "float"])
    print(f"wrote {output}: {len(state) // 3} modules at rank {args.dim}"
          + (f" (conv {args.conv_dim})" if args.conv_dim else "") + f"; {len(unchanged)} unchanged layers left out")
    return 0


def _metadata(args: argparse.Namespace, family: str, v_parameterization: bool, output: Path) -> dict[str, str]:
    """The keys sd-scripts' extract writes: ss_network_* (alpha = dim), ss_v2, ss_base_model_version, modelspec."""
    network_args = {"conv_dim": str(args.conv_dim), "conv_alpha": str(float(args.conv_dim))} if args.conv_dim else {}
    meta = network_metadata(family=family, v_parameterization=v_parameterization, title=output.stem,
                            dim=str(args.dim), alpha=str(float(args.dim)), network_args=network_args)
    meta["ss_network_args"] = json.dumps(network_args)
    return meta if not args.no_metadata else {k: v for k, v in meta.items() if not k.startswith("modelspec.")}
