"""Block-wise `--network_args` of sd-scripts' networks/lora.py: the UNet block each LoRA
module belongs to, per-block ranks and alphas (`block_dims`, `block_alphas`, `conv_block_dims`,
`conv_block_alphas`), per-block learning-rate weights (`down_lr_weight`, `mid_lr_weight`, `up_lr_weight`,
`block_lr_zero_threshold`) and the LoRA+ ratios.

Blocks are numbered as sd-scripts numbers them. SD1.x/SD2.x: 25 blocks, 0 (conv_in, never a LoRA), IN 1-11,
MID 12, OUT 13-24. SDXL: 23 blocks, 0 (embeddings), input_blocks 1-9, middle_block 10-12, output_blocks 13-21,
22 (out). Plain Python with no torch: args.py checks the values with these functions before torch is loaded.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from trainer.errors import ConfigError

log = logging.getLogger(__name__)

BLOCK_DIM_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
LR_WEIGHT_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
LORAPLUS_KEYS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")

# (down/up weights, mid weights) per family; SDXL's lr list also gets 1.0 for its blocks 0 and 22.
_LR_LENGTHS = {False: (12, 1), True: (9, 3)}

_SD_UPDOWN = re.compile(r"lora_unet_(up|down)_blocks_(\d+)_(resnets|attentions|upsamplers|downsamplers)_(\d+)_")
_SDXL_PART = re.compile(r"lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_")
_SDXL_FIRST = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}


def block_count(sdxl: bool) -> int:
    return 23 if sdxl else 25


def family_name(sdxl: bool) -> str:
    return "SDXL" if sdxl else "SD1.x/SD2.x"


def block_index(lora_name: str, sdxl: bool) -> int:
    """The sd-scripts block number of a UNet LoRA module; -1 for text-encoder (or unknown) names."""
    if sdxl:
        if m := _SDXL_PART.match(lora_name):
            return _SDXL_FIRST[m[1]] + int(m[2])
        return -1
    if m := _SD_UPDOWN.match(lora_name):
        level, kind, j = int(m[2]), m[3], int(m[4])
        within = 3 * level + (2 if kind in ("upsamplers", "downsamplers") else j)
        return 1 + within if m[1] == "down" else 13 + within
    return 12 if lora_name.startswith("lora_unet_mid_block_") else -1


# ---------------------------------------------------------------------------------------------------
# Reading the values (they arrive as strings, as in sd-scripts)


def _numbers(key: str, text: str, kind: type, *, empty=None) -> list:
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item and empty is not None:  # sd-scripts reads an empty lr weight as 0
            values.append(empty)
            continue
        try:
            values.append(kind(item))
        except ValueError:
            what = "whole numbers" if kind is int else "numbers"
            raise ConfigError(f"--network_args {key}={text}: {item!r} is not a number; {key} takes {what} "
                              "separated by commas") from None
    return values


def _count_problem(key: str, count: int, sdxl: bool | None) -> str | None:
    if sdxl is None:
        if count in (block_count(False), block_count(True)):
            return None
        expected = f"{block_count(False)} values for SD1.x/SD2.x or {block_count(True)} for SDXL"
    elif count == block_count(sdxl):
        return None
    else:
        expected = f"{block_count(sdxl)} values for {family_name(sdxl)} models"
    return f"--network_args {key} has {count} values, but needs {expected} (one per block, as in sd-scripts)"


def per_block_values(options: Mapping[str, str], key: str, sdxl: bool | None) -> list | None:
    """`block_dims` etc. as a list of one value per block; the count must fit the family (any family if None)."""
    if options.get(key) is None:
        return None
    values = _numbers(key, options[key], int if key.endswith("dims") else float)
    if key.endswith("dims") and any(v < 0 for v in values):
        raise ConfigError(f"--network_args {key}={options[key]}: ranks cannot be negative (0 = no LoRA there)")
    problem = _count_problem(key, len(values), sdxl)
    if problem:
        raise ConfigError(problem)
    return values


def preset_weights(key: str, text: str, length: int) -> list[float]:
    """`cosine`, `sine`, `linear`, `reverse_linear`, `zeros`, each with an optional `+base` added."""
    name, plus, base_text = text.partition("+")
    if name not in PRESETS:
        raise ConfigError(f"--network_args {key}={text}: expected {length} comma-separated weights (shorter lists "
                          f"are padded with 1.0) or one of {', '.join(PRESETS)}, optionally with +base (e.g. "
                          "cosine+0.1). A single number is not read as a weight (sd-scripts ignores it).")
    try:
        base = float(base_text) if plus else 0.0
    except ValueError:
        raise ConfigError(f"--network_args {key}={text}: {base_text!r} after '+' is not a number") from None
    steps = [i / (length - 1) for i in range(length)]
    shape = {"cosine": [math.sin(math.pi * s / 2) for s in reversed(steps)],
             "sine": [math.sin(math.pi * s / 2) for s in steps],
             "linear": steps, "reverse_linear": list(reversed(steps)), "zeros": [0.0] * length}[name]
    return [w + base for w in shape]


def _raw_lr_weights(options: Mapping[str, str], key: str, length: int) -> list[float] | None:
    text = options.get(key)
    if text is None:
        return None
    # As in sd-scripts: mid is always a list; down/up without a comma name a preset.
    if key == "mid_lr_weight" or "," in text:
        return _numbers(key, text, float, empty=0.0)
    return preset_weights(key, text, length)


def _fit_length(key: str, weights: list[float], length: int) -> list[float]:
    if len(weights) > length:
        log.warning("--network_args %s: %d values given, only the first %d are used.", key, len(weights), length)
        return weights[:length]
    if len(weights) < length:
        log.warning("--network_args %s: %d values given; the other %d blocks get 1.0.", key, len(weights),
                    length - len(weights))
        return weights + [1.0] * (length - len(weights))
    return weights


def block_lr_weights(options: Mapping[str, str], sdxl: bool) -> list[float] | None:
    """One lr weight per block (None when no *_lr_weight is given). Short lists are padded with 1.0, long ones
    cut; weights at or below block_lr_zero_threshold (default 0) become 0, so those blocks get no LoRA."""
    if all(options.get(k) is None for k in LR_WEIGHT_KEYS):
        return None
    threshold = float_option(options, "block_lr_zero_threshold") or 0.0
    side, mid = _LR_LENGTHS[sdxl]
    parts = []
    for key, length in zip(LR_WEIGHT_KEYS, (side, mid, side)):
        weights = _raw_lr_weights(options, key, length)
        if weights is None:
            parts.append([1.0] * length)
        else:
            parts.append([w if w > threshold else 0.0 for w in _fit_length(key, weights, length)])
    weights = parts[0] + parts[1] + parts[2]
    return [1.0, *weights, 1.0] if sdxl else weights


def float_option(options: Mapping[str, str], key: str) -> float | None:
    text = options.get(key)
    if text is None or text == "None":
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--network_args {key}={text}: expected a number") from None


def loraplus_ratios(options: Mapping[str, str]) -> tuple[float | None, float | None, float | None]:
    """(loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio); each must be > 0."""
    ratios = tuple(float_option(options, key) for key in LORAPLUS_KEYS)
    for key, ratio in zip(LORAPLUS_KEYS, ratios):
        if ratio is not None and ratio <= 0:
            raise ConfigError(f"--network_args {key}={options[key]}: the LoRA+ ratio multiplies the lora_up "
                              "learning rate and must be above 0 (typical: 16)")
    return ratios  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------
# Per-block ranks


@dataclass(frozen=True)
class BlockDims:
    """Rank and alpha per block for Linear / 1x1 layers, and for 3x3 convs (None: no 3x3 LoRA). Rank 0 means
    the block gets no LoRA module."""
    dims: Sequence[int]
    alphas: Sequence[float | int | None]
    conv_dims: Sequence[int] | None = None
    conv_alphas: Sequence[float | int | None] | None = None

    def for_layer(self, index: int, conv3x3: bool) -> tuple[int, float | int | None] | None:
        if conv3x3:
            if self.conv_dims is None or not self.conv_dims[index]:
                return None
            return self.conv_dims[index], self.conv_alphas[index]
        return (self.dims[index], self.alphas[index]) if self.dims[index] else None

    @property
    def uses_conv(self) -> bool:
        return self.conv_dims is not None


def block_dims(options: Mapping[str, str], sdxl: bool, *, rank: int, alpha: float | int | None,
               conv_rank: int | None, conv_alpha: float | int | None,
               lr_weights: Sequence[float] | None) -> BlockDims | None:
    """sd-scripts' block mode: on when block_dims or any *_lr_weight is given (None otherwise). Missing lists
    take network_dim/alpha (conv_dim/alpha) for every block; blocks whose lr weight is 0 get rank 0."""
    dims = per_block_values(options, "block_dims", sdxl)
    if dims is None and lr_weights is None:
        ignored = [k for k in BLOCK_DIM_KEYS[1:] if options.get(k) is not None]
        if ignored:
            log.warning("--network_args %s: ignored without block_dims or *_lr_weight (as in sd-scripts).",
                        ", ".join(ignored))
        return None
    count = block_count(sdxl)
    dims = dims or [rank] * count
    alphas = per_block_values(options, "block_alphas", sdxl) or [alpha] * count
    conv_dims = per_block_values(options, "conv_block_dims", sdxl)
    conv_alpha = 1.0 if conv_alpha is None else conv_alpha  # sd-scripts' default once conv dims are given
    if conv_dims is not None:
        conv_alphas = per_block_values(options, "conv_block_alphas", sdxl) or [conv_alpha] * count
    elif conv_rank:
        conv_dims, conv_alphas = [conv_rank] * count, [conv_alpha] * count
    else:
        conv_alphas = None
    if lr_weights is not None:
        dims = [0 if w == 0 else d for d, w in zip(dims, lr_weights)]
        if conv_dims is not None:
            conv_dims = [0 if w == 0 else d for d, w in zip(conv_dims, lr_weights)]
    return BlockDims(dims, alphas, conv_dims, conv_alphas)


def check_block_options(options: Mapping[str, str], sdxl: bool | None) -> list[str]:
    """Every problem in the block / LoRA+ values; `sdxl=None` (family not known yet) accepts either count."""
    problems = []
    checks = [lambda k=k: per_block_values(options, k, sdxl) for k in BLOCK_DIM_KEYS]
    checks += [lambda k=k: _raw_lr_weights(options, k, _LR_LENGTHS[bool(sdxl)][k == "mid_lr_weight"])
               for k in LR_WEIGHT_KEYS]
    checks += [lambda: float_option(options, "block_lr_zero_threshold"), lambda: loraplus_ratios(options)]
    for check in checks:
        try:
            check()
        except ConfigError as error:
            problems += error.problems
    return problems
