"""`python -m trainer merge_lora`: several LoRA files into one LoRA file (not into a model: that is `merge`).

    python -m trainer merge_lora --models a.safetensors b.safetensors --ratios 0.7 0.5 --save_to ab.safetensors
    python -m trainer merge_lora --models a.safetensors b.safetensors --ratios 1 1 --new_rank 16 --save_to ab16.safetensors

Without --new_rank the modules are concatenated: the merged file's rank is the sum of the ranks and its delta is
exactly sum(ratio_i * delta_i) (each file's alpha/rank and ratio are folded into its lora_up columns, and one
alpha per module carries the largest of them). With --new_rank (and --new_conv_rank) the summed delta is cut to
that rank by SVD, as sd-scripts' networks/svd_merge_lora.py does, including its 0.99 quantile clamp.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from trainer.errors import ConfigError
from trainer.network import lora_math
from trainer.tools.lora_files import (
    SAVE_PRECISIONS,
    LoraModuleWeights,
    check_input,
    check_output,
    family_of,
    module_tensors,
    network_metadata,
    rank_text,
    read_lora,
    resolve_device,
    save_lora,
    split_modules,
)
from trainer.tools.merge import lora_list

logger = logging.getLogger(__name__)

SVD_CLAMP_QUANTILE = 0.99  # sd-scripts' svd_merge_lora.py CLAMP_QUANTILE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer merge_lora", allow_abbrev=False,
                                     description="Merge LoRA files into one LoRA file (sd-scripts' merge_lora.py / "
                                                 "svd_merge_lora.py arguments).")
    parser.add_argument("--models", nargs="+", default=[], metavar="FILE", help="the LoRA files to merge")
    parser.add_argument("--ratios", nargs="+", type=float, default=[], metavar="R",
                        help="one multiplier per --models file (default 1 each; negative subtracts)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:MULTIPLIER]",
                        help="a LoRA file with its multiplier, as `merge` takes them; repeat for several")
    parser.add_argument("--save_to", required=True, help="the merged LoRA to write (.safetensors)")
    parser.add_argument("--new_rank", type=int, default=None,
                        help="cut the summed delta to this rank by SVD (svd_merge_lora.py); default: concatenate "
                             "(exact, rank = sum of the ranks)")
    parser.add_argument("--new_conv_rank", type=int, default=None, help="rank for 3x3 convs with --new_rank "
                                                                        "(default: --new_rank)")
    parser.add_argument("--clamp_quantile", type=float, default=SVD_CLAMP_QUANTILE,
                        help="with --new_rank: clamp the new weights at this quantile, as sd-scripts does "
                             "(default 0.99; 1 keeps the exact best rank-k)")
    parser.add_argument("--save_precision", choices=sorted(SAVE_PRECISIONS), default=None,
                        help="dtype of the saved file (default float)")
    parser.add_argument("--precision", choices=sorted(SAVE_PRECISIONS), default="float",
                        help="accepted for sd-scripts' command lines; the sums are always computed in float32")
    parser.add_argument("--device", default=None, help="where the SVD runs: cuda or cpu (default: cuda if present)")
    parser.add_argument("--overwrite", action="store_true", help="replace --save_to if it exists")
    return parser


def _flat_shape(weights: LoraModuleWeights) -> tuple[int, ...]:
    """(out, in, kh, kw) with Linear as a 1x1 conv: SD2's proj_in/proj_out are saved either way."""
    kernel = tuple(weights.down.shape[2:]) or (1, 1)
    return (weights.up.shape[0], weights.down.shape[1], *kernel)


def scaled_factors(entries: list[tuple[float, LoraModuleWeights]]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down [R, n], up [out, R], largest |ratio * alpha / rank|) with up @ down * largest == sum ratio_i *
    delta_i: each file's ratio x scale is folded into its up columns relative to the largest, so the common
    case (same alpha/rank, ratio 1) keeps the weights as they were."""
    coefficients = [ratio * lora_math.lora_scale(w.rank, w.alpha) for ratio, w in entries]
    largest = max(abs(c) for c in coefficients) or 1.0
    down = torch.cat([w.down.float().flatten(1) for _, w in entries])
    up = torch.cat([w.up.float().flatten(1) * (c / largest) for (_, w), c in zip(entries, coefficients)], dim=1)
    return down, up, largest


def merge_module(entries: list[tuple[float, LoraModuleWeights]], new_rank: int | None, clamp_quantile: float | None,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down, up, alpha) of one merged module in the first file's shapes: concatenated, or SVD to `new_rank`."""
    first = entries[0][1]
    weight_shape = (first.up.shape[0], *first.down.shape[1:])
    down, up, scale = scaled_factors(entries)
    if new_rank is None:
        return *lora_math.module_shaped(down, up, weight_shape), scale * down.shape[0]
    # The dense SVD of the summed delta, as sd-scripts takes it: the clamp below depends on the signs the SVD
    # gives each direction, and the same routine on the same matrix gives the same signs.
    u, s, vh = lora_math.matrix_svd((up.to(device) * scale) @ down.to(device))
    rank = min(new_rank, up.shape[0], first.down.shape[1], s.numel())  # sd-scripts caps by the channels too
    new_down, new_up = lora_math.truncate(u, s, vh, rank, clamp_quantile)
    return *lora_math.module_shaped(new_down.cpu(), new_up.cpu(), weight_shape), float(rank)


def collect_modules(files: list[tuple[Path, float]]) -> tuple[dict[str, list[tuple[float, LoraModuleWeights]]],
                                                                list[tuple[dict, dict]]]:
    """({module name: [(ratio, weights) of each file that has it]}, [(tensors, metadata) of each file]); files
    for different base models, other network types or extra keys are refused, all problems at once."""
    by_name: dict[str, list[tuple[float, LoraModuleWeights]]] = {}
    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    read, problems = [], []
    for path, ratio in files:
        tensors, metadata = read_lora(path)
        modules, others = split_modules(tensors, path)
        if others:
            problems.append(f'"{path}" has keys that are not LoRA weights ({", ".join(sorted(others)[:3])}); '
                            f"only plain kohya LoRA / LoCon files can be merged.")
        for name, weights in modules.items():
            shape = _flat_shape(weights)
            if name in shapes and shapes[name][0] != shape:
                problems.append(f'{name}: "{path.name}" changes a layer of shape {list(shape)}, "{shapes[name][1].name}" '
                                f"one of {list(shapes[name][0])}. Are they LoRAs for different base models "
                                f"(SD1.x / SD2.x / SDXL)?")
                continue
            shapes.setdefault(name, (shape, path))
            by_name.setdefault(name, []).append((ratio, weights))
        read.append((tensors, metadata))
    families = {family_of(t, m)[0] == "sdxl" for t, m in read}
    if len(families) > 1:
        problems.append("SDXL and SD1.x/SD2.x LoRAs cannot be merged together.")
    if problems:
        raise ConfigError(problems[:12])
    return by_name, read


def merged_metadata(merged: dict[str, tuple[torch.Tensor, torch.Tensor, float]], read: list[tuple[dict, dict]],
                    files: list[tuple[Path, float]], title: str) -> dict[str, str]:
    """sd-scripts' minimum network metadata: one dim/alpha when all main modules share it, else "Dynamic";
    conv_dim/conv_alpha in ss_network_args when there are 3x3 convs; modelspec with merged_from."""
    def is_conv3x3(down: torch.Tensor) -> bool:
        return down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)

    main = [(d.shape[0], a) for d, _, a in merged.values() if not is_conv3x3(d)]
    conv = [(d.shape[0], a) for d, _, a in merged.values() if is_conv3x3(d)]
    network_args = ({"conv_dim": rank_text([r for r, _ in conv]), "conv_alpha": rank_text([a for _, a in conv])}
                    if conv else None)
    family, v_parameterization = family_of(*read[0])
    titles = [m.get("modelspec.title") or path.stem for (_, m), (path, _) in zip(read, files)]
    return network_metadata(family=family, v_parameterization=v_parameterization, title=title,
                            dim=rank_text([r for r, _ in main]), alpha=rank_text([a for _, a in main]),
                            network_args=network_args, merged_from=", ".join(titles))


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    files = [(check_input(str(path), "LoRA file"), ratio) for path, ratio in lora_list(args.lora, args.models,
                                                                                         args.ratios)]
    output = check_output(args.save_to, [path for path, _ in files], args.overwrite)
    if args.new_rank is not None and (args.new_rank < 1 or (args.new_conv_rank or 1) < 1):
        raise ConfigError("--new_rank and --new_conv_rank must be at least 1.")
    if args.new_rank is None and args.new_conv_rank is not None:
        raise ConfigError("--new_conv_rank needs --new_rank (without it the ranks are concatenated, exactly).")
    device = resolve_device(args.device) if args.new_rank is not None else torch.device("cpu")
    conv_rank = args.new_conv_rank or args.new_rank
    by_name, read = collect_modules(files)
    merged = {}
    with torch.no_grad():
        for name, entries in by_name.items():
            rank = conv_rank if entries[0][1].is_conv3x3 else args.new_rank
            merged[name] = merge_module(entries, rank, args.clamp_quantile, device)
    state = {}
    for name, (down, up, alpha) in merged.items():
        state.update(module_tensors(name, down, up, alpha))
    save_dtype = SAVE_PRECISIONS[args.save_precision or "float"]
    save_lora(output, state, merged_metadata(merged, read, files, output.stem), save_dtype)
    how = f"SVD to rank {args.new_rank}" if args.new_rank else "concatenated, exact"
    print(f"wrote {output}: {len(files)} files, {len(merged)} modules ({how}), {save_dtype}")
    return 0
