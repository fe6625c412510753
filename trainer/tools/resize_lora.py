"""`python -m trainer resize_lora`: a LoRA (or LoCon) file at a lower rank, by SVD of each module's delta, with
sd-scripts' networks/resize_lora.py arguments:

    python -m trainer resize_lora --model big.safetensors --save_to small.safetensors --new_rank 8
    python -m trainer resize_lora --model big.safetensors --save_to dyn.safetensors --new_rank 32 \\
        --dynamic_method sv_fro --dynamic_param 0.9 --verbose

Each module keeps its effective scale (new alpha = old alpha / old rank * new rank), so the resized file at the
old rank gives the same delta. Differences from sd-scripts, on purpose: --new_conv_rank applies to kxk convs only
(as its help says; sd-scripts' code also gives it to 1x1 convs), a module never gets more ranks than its delta
has (sd-scripts pads with near-zero directions), and the SVD runs on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from dataclasses import dataclass

import torch

from trainer.errors import ConfigError
from trainer.network import lora_math
from trainer.tools.lora_files import (
    SAVE_PRECISIONS,
    LoraModuleWeights,
    check_input,
    check_output,
    module_tensors,
    read_lora,
    resolve_device,
    save_lora,
    split_modules,
)

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer resize_lora", allow_abbrev=False,
                                     description="Resize a LoRA / LoCon file to a lower rank by SVD "
                                                 "(sd-scripts' networks/resize_lora.py arguments).")
    parser.add_argument("--model", required=True, help="the LoRA file to resize (.safetensors, .ckpt or .pt)")
    parser.add_argument("--save_to", required=True, help="the resized file to write (.safetensors)")
    parser.add_argument("--new_rank", type=int, default=4,
                        help="rank of the output (default 4); with --dynamic_method the largest rank allowed")
    parser.add_argument("--new_conv_rank", type=int, default=None,
                        help="rank for 3x3 conv modules (LoCon); default: --new_rank")
    parser.add_argument("--dynamic_method", choices=lora_math.DYNAMIC_METHODS, default=None,
                        help="pick each module's rank from its singular values: sv_ratio (largest/kept <= param), "
                             "sv_fro (keep param of the Frobenius norm), sv_cumulative (keep param of their sum)")
    parser.add_argument("--dynamic_param", type=float, default=None, help="the target of --dynamic_method")
    parser.add_argument("--save_precision", choices=sorted(SAVE_PRECISIONS), default=None,
                        help="dtype of the saved file (default float)")
    parser.add_argument("--device", default=None, help="where the SVD runs: cuda or cpu (default: cuda if present)")
    parser.add_argument("--verbose", action="store_true", help="print the retained norm and rank of every module")
    parser.add_argument("--overwrite", action="store_true", help="replace --save_to if it exists")
    return parser


@dataclass(frozen=True)
class ResizedModule:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    retained: lora_math.Retained


def resize_module(weights: LoraModuleWeights, max_rank: int, method: str | None = None, param: float | None = None,
                  device: torch.device | str = "cpu") -> ResizedModule:
    """One module at its new rank: SVD of up @ down (the scale left out, as sd-scripts does, so the dynamic rules
    see the same singular values), U S into up, Vh into down, alpha = old scale * new rank."""
    down, up = weights.down.to(device), weights.up.to(device)
    u, s, vh = lora_math.product_svd(up, down)
    full_length = min(up.shape[0], down[0].numel())
    rank = min(lora_math.choose_rank(s, max_rank, method, param, full_length), s.numel())
    new_down, new_up = lora_math.module_shaped(*lora_math.truncate(u, s, vh, rank), weights.down.shape)
    scale = torch.tensor(lora_math.lora_scale(weights.rank, weights.alpha), dtype=torch.float32)
    return ResizedModule(new_down.cpu(), new_up.cpu(), float(scale * rank), lora_math.retained(s, rank))


def verbose_line(name: str, module: ResizedModule, dynamic: bool) -> str:
    """One module's line as sd-scripts' --verbose prints it."""
    kept = module.retained
    line = (f"{name:75} | sum(S) retained: {kept.sum_retained:.1%}, fro retained: {kept.fro_retained:.1%}, "
            f"max(S) ratio: {kept.max_ratio:0.1f}")
    return line + (f", dynamic | dim: {module.down.shape[0]}, alpha: {module.alpha}" if dynamic else "")


def resize_modules(modules: dict[str, LoraModuleWeights], new_rank: int, new_conv_rank: int,
                   method: str | None, param: float | None, device, verbose: bool) -> dict[str, ResizedModule]:
    resized = {}
    for name, weights in modules.items():
        rank = new_conv_rank if weights.is_conv3x3 else new_rank
        with torch.no_grad():
            resized[name] = resize_module(weights, rank, method, param, device)
        if verbose:
            print(verbose_line(name, resized[name], method is not None))
    if verbose:
        kept = [m.retained.fro_retained for m in resized.values() if m.retained.fro_retained == m.retained.fro_retained]
        if kept:
            print(f"Average Frobenius norm retention: {statistics.mean(kept):.2%} | "
                  f"std: {statistics.pstdev(kept):0.3f}")
    return resized


def resized_metadata(metadata: dict[str, str], *, old_rank: int, new_rank: int, new_conv_rank: int,
                     new_alpha: float | None, method: str | None, param: float | None) -> dict[str, str]:
    """sd-scripts' updates: ss_network_dim / ss_network_alpha (or "Dynamic") and a note in front of
    ss_training_comment; every other key stays."""
    result = dict(metadata)
    comment = metadata.get("ss_training_comment", "")
    if method is None:
        conv = "" if new_rank == new_conv_rank else f" (conv: {new_conv_rank})"
        result["ss_training_comment"] = f"dimension is resized from {old_rank} to {new_rank}{conv}; {comment}"
        result["ss_network_dim"] = str(new_rank)
        result["ss_network_alpha"] = str(new_alpha)
    else:
        result["ss_training_comment"] = f"Dynamic resize with {method}: {param} from {old_rank}; {comment}"
        result["ss_network_dim"] = "Dynamic"
        result["ss_network_alpha"] = "Dynamic"
    return result


def _check_ranks(args: argparse.Namespace) -> None:
    problems = []
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        problems.append("--new_rank and --new_conv_rank must be at least 1.")
    if args.dynamic_method and not args.dynamic_param:
        problems.append(f"--dynamic_method {args.dynamic_method} needs --dynamic_param (e.g. 0.9 for sv_fro / "
                        f"sv_cumulative, 2 to 10 for sv_ratio).")
    if args.dynamic_param is not None and args.dynamic_param <= 0:
        problems.append("--dynamic_param must be above 0.")
    if problems:
        raise ConfigError(problems)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    _check_ranks(args)
    source = check_input(args.model, "--model")
    output = check_output(args.save_to, [source], args.overwrite)
    device = resolve_device(args.device)
    conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
    tensors, metadata = read_lora(source)
    modules, others = split_modules(tensors, source)
    if args.dynamic_method:
        print(f"dynamic ranks by {args.dynamic_method}: {args.dynamic_param}, at most {args.new_rank}")
    resized = resize_modules(modules, args.new_rank, conv_rank, args.dynamic_method, args.dynamic_param, device,
                             args.verbose)
    state = {k: v.float() if v.is_floating_point() else v for k, v in others.items()}
    for name, module in resized.items():
        state.update(module_tensors(name, module.down, module.up, module.alpha))
    main_modules = [name for name, weights in modules.items() if not weights.is_conv3x3] or list(modules)
    conv_modules = [name for name, weights in modules.items() if weights.is_conv3x3]
    new_rank, new_conv_rank = args.new_rank, conv_rank
    if args.dynamic_method is None:
        new_rank, new_conv_rank = _written_ranks(resized, main_modules, conv_modules, new_rank, conv_rank)
    meta = resized_metadata(metadata, old_rank=max(w.rank for w in modules.values()), new_rank=new_rank,
                            new_conv_rank=new_conv_rank, new_alpha=resized[main_modules[-1]].alpha,
                            method=args.dynamic_method, param=args.dynamic_param)
    save_dtype = SAVE_PRECISIONS[args.save_precision or "float"]
    save_lora(output, state, meta, save_dtype)
    ranks = sorted({m.down.shape[0] for m in resized.values()})
    print(f"wrote {output}: {len(resized)} modules, rank {_rank_range(ranks)} (was "
          f"{_rank_range(sorted({w.rank for w in modules.values()}))}), {save_dtype}")
    return 0


def _written_ranks(resized: dict[str, ResizedModule], main_modules: list[str], conv_modules: list[str],
                   new_rank: int, new_conv_rank: int) -> tuple[int, int]:
    """The ranks the file really has: a module whose delta has fewer ranks than asked keeps its own (a warning)."""
    def largest(names: list[str], asked: int) -> int:
        return max((resized[n].down.shape[0] for n in names), default=asked)

    kept, kept_conv = largest(main_modules, new_rank), largest(conv_modules, new_conv_rank)
    if kept < new_rank or kept_conv < new_conv_rank:
        logger.warning("the file has at most rank %d (conv %d), below --new_rank %d / --new_conv_rank %d: "
                       "those modules keep their rank (resizing up adds nothing).", kept, kept_conv, new_rank,
                       new_conv_rank)
    return kept, kept_conv


def _rank_range(ranks: list[int]) -> str:
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
