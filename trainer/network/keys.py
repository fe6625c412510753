"""Which layers get a LoRA, and the kohya name each one is saved under, as sd-scripts' networks/lora.py
names them (its real name lists: tests/fixtures/lora-keys/).

The name rules are plain string functions with explicit tables, so they can be tested against the
spec lists without building a model. `find_lora_targets` is the one function that walks a model.
torch, diffusers and transformers are imported only inside it: importing this module stays cheap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

UNET_PREFIX = "lora_unet"
TE_PREFIX = "lora_te"  # SD1.x / SD2.x: one text encoder
SDXL_TE_PREFIXES = ("lora_te1", "lora_te2")  # SDXL: CLIP-L, then OpenCLIP bigG

TEXT_MODEL = "text_model."


@dataclass(frozen=True)
class LoraTarget:
    """One layer that gets a LoRA: its kohya name, its path in the model, the layer, and its kind."""

    name: str
    path: str
    module: nn.Module
    kind: str  # "linear" | "conv1x1" | "conv3x3"


def kohya_name(prefix: str, module_path: str) -> str:
    """`lora_unet` + `down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in`."""
    return f"{prefix}.{module_path}".replace(".", "_")


def text_encoder_prefixes(count: int, sdxl: bool) -> tuple[str, ...]:
    """The name prefix of each text encoder: ("lora_te",) for SD1/2, ("lora_te1", "lora_te2") for SDXL."""
    expected = 2 if sdxl else 1
    if count != expected:
        raise ValueError(f"{'SDXL' if sdxl else 'SD1.x/SD2.x'} has {expected} text encoder(s), got {count}")
    return SDXL_TE_PREFIXES if sdxl else (TE_PREFIX,)


def text_encoder_kohya_path(module_path: str) -> str:
    """transformers 5.x `CLIPTextModel` dropped its `text_model.` level; kohya names still contain
    `text_model_` (see tests/fixtures/lora-keys/README.md), so put it back when it is missing."""
    return module_path if module_path.startswith(TEXT_MODEL) else TEXT_MODEL + module_path


# ---------------------------------------------------------------------------------------------------
# SDXL UNet: diffusers module paths <-> SAI/SGM paths (full table: tests/fixtures/lora-keys/sdxl-diffusers-map.txt).
# SDXL's topology is fixed: 3 levels, 2 ResNets per down level and 3 per up level, attention in down
# levels 1-2 and up levels 0-1, a downsampler after down levels 0-1 and an upsampler after up levels 0-1.

_SDXL_LEVELS = 3
_SDXL_DOWN_LAYERS = 2
_SDXL_UP_LAYERS = 3

# ResNet parts that can hold a LoRA: diffusers name -> SGM name.
_RESNET_TO_SAI = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_RESNET_FROM_SAI = {sai: diffusers for diffusers, sai in _RESNET_TO_SAI.items()}

_DIFFUSERS_DOWN = re.compile(r"down_blocks\.(\d+)\.(attentions|resnets|downsamplers)\.(\d+)\.(.+)")
_DIFFUSERS_MID = re.compile(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)")
_DIFFUSERS_UP = re.compile(r"up_blocks\.(\d+)\.(attentions|resnets|upsamplers)\.(\d+)\.(.+)")
_SAI_INPUT = re.compile(r"input_blocks\.(\d+)\.(\d+)\.(.+)")
_SAI_MIDDLE = re.compile(r"middle_block\.(\d+)\.(.+)")
_SAI_OUTPUT = re.compile(r"output_blocks\.(\d+)\.(\d+)\.(.+)")


def _table_part(table: dict[str, str], part: str, path: str) -> str:
    if part not in table:
        raise ValueError(f"no SDXL name mapping for {path!r} (only {', '.join(sorted(table))} in ResNet blocks)")
    return table[part]


def _check(condition: bool, path: str) -> None:
    if not condition:
        raise ValueError(f"{path!r} is not a module path of the SDXL UNet's LoRA layers")


def sdxl_sai_path(diffusers_path: str) -> str:
    """`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in` (diffusers -> SGM layout)."""
    if m := _DIFFUSERS_DOWN.fullmatch(diffusers_path):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        _check(level < _SDXL_LEVELS, diffusers_path)
        if kind == "downsamplers":
            _check(j == 0 and rest == "conv" and level < _SDXL_LEVELS - 1, diffusers_path)
            return f"input_blocks.{3 * (level + 1)}.0.op"
        _check(j < _SDXL_DOWN_LAYERS, diffusers_path)
        block = 3 * level + j + 1
        if kind == "attentions":
            return f"input_blocks.{block}.1.{rest}"
        return f"input_blocks.{block}.0.{_table_part(_RESNET_TO_SAI, rest, diffusers_path)}"
    if m := _DIFFUSERS_MID.fullmatch(diffusers_path):
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            _check(j == 0, diffusers_path)
            return f"middle_block.1.{rest}"
        _check(j < 2, diffusers_path)
        return f"middle_block.{2 * j}.{_table_part(_RESNET_TO_SAI, rest, diffusers_path)}"
    if m := _DIFFUSERS_UP.fullmatch(diffusers_path):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        _check(level < _SDXL_LEVELS, diffusers_path)
        if kind == "upsamplers":
            _check(j == 0 and rest == "conv" and level < _SDXL_LEVELS - 1, diffusers_path)
            return f"output_blocks.{3 * level + 2}.2.conv"
        _check(j < _SDXL_UP_LAYERS, diffusers_path)
        block = 3 * level + j
        if kind == "attentions":
            return f"output_blocks.{block}.1.{rest}"
        return f"output_blocks.{block}.0.{_table_part(_RESNET_TO_SAI, rest, diffusers_path)}"
    _check(False, diffusers_path)
    raise AssertionError("unreachable")


def sdxl_diffusers_path(sai_path: str) -> str:
    """`input_blocks.4.1.proj_in` -> `down_blocks.1.attentions.0.proj_in` (the inverse of `sdxl_sai_path`)."""
    if m := _SAI_INPUT.fullmatch(sai_path):
        block, part, rest = int(m[1]), int(m[2]), m[3]
        _check(0 < block <= 3 * _SDXL_LEVELS - 1, sai_path)
        if block % 3 == 0:  # input_blocks 3 and 6 are the downsamplers
            _check(part == 0 and rest == "op", sai_path)
            return f"down_blocks.{block // 3 - 1}.downsamplers.0.conv"
        level, j = divmod(block - 1, 3)
        if part == 1:
            return f"down_blocks.{level}.attentions.{j}.{rest}"
        _check(part == 0, sai_path)
        return f"down_blocks.{level}.resnets.{j}.{_table_part(_RESNET_FROM_SAI, rest, sai_path)}"
    if m := _SAI_MIDDLE.fullmatch(sai_path):
        part, rest = int(m[1]), m[2]
        if part == 1:
            return f"mid_block.attentions.0.{rest}"
        _check(part in (0, 2), sai_path)
        return f"mid_block.resnets.{part // 2}.{_table_part(_RESNET_FROM_SAI, rest, sai_path)}"
    if m := _SAI_OUTPUT.fullmatch(sai_path):
        block, part, rest = int(m[1]), int(m[2]), m[3]
        _check(block < 3 * _SDXL_LEVELS, sai_path)
        level, j = divmod(block, 3)
        if part == 2:  # output_blocks 2 and 5 end with the upsampler
            _check(j == 2 and rest == "conv" and level < _SDXL_LEVELS - 1, sai_path)
            return f"up_blocks.{level}.upsamplers.0.conv"
        if part == 1:
            return f"up_blocks.{level}.attentions.{j}.{rest}"
        _check(part == 0, sai_path)
        return f"up_blocks.{level}.resnets.{j}.{_table_part(_RESNET_FROM_SAI, rest, sai_path)}"
    _check(False, sai_path)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------
# The model walker


def _container_types(is_text_encoder: bool, include_conv: bool) -> tuple[type, ...]:
    """The blocks whose Linear/Conv2d layers get a LoRA (sd-scripts' target classes). isinstance, not class names:
    transformers' SDPA attention variants subclass CLIPAttention, so they are covered too."""
    if is_text_encoder:
        from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention

        return (CLIPAttention, CLIPMLP)
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    if not include_conv:
        return (Transformer2DModel,)
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    return (Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D)


# Layers of a diffusers Transformer2DModel that get a LoRA: proj_in and proj_out, plus per transformer block
# attn1 and attn2 (to_q, to_k, to_v, to_out.0) and the feed-forward (ff.net.0.proj, ff.net.2).
_PROJECTIONS = 2
_LAYERS_PER_TRANSFORMER_BLOCK = 10


def expected_attention_targets(unet: nn.Module) -> int:
    """How many LoRA layers the attention blocks of a diffusers UNet should give (SD1.5: 192, SDXL: 722)."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return sum(_PROJECTIONS + _LAYERS_PER_TRANSFORMER_BLOCK * len(block.transformer_blocks)
               for block in unet.modules() if isinstance(block, Transformer2DModel))


def layer_kind(layer: nn.Module) -> str | None:
    """"linear", "conv1x1", "conv3x3" (any kernel larger than 1x1 follows the 3x3 rules), or None."""
    from torch import nn

    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, nn.Conv2d):
        return "conv1x1" if tuple(layer.kernel_size) == (1, 1) else "conv3x3"
    return None


def find_lora_targets(model: nn.Module, *, prefix: str, is_text_encoder: bool, include_conv: bool,
                      sdxl: bool = False) -> list[LoraTarget]:
    """Every Linear / Conv2d inside the target blocks of `model`, in `named_modules()` order.

    `include_conv` adds the ResNet, downsample and upsample blocks of a UNet (LoCon, `conv_dim`).
    With `sdxl=True` a UNet's names use the SGM layout (`input_blocks_4_1_...`) as sd-scripts' SDXL
    UNet does; `path` always stays the module's real path in `model`.
    """
    containers = _container_types(is_text_encoder, include_conv)
    map_to_sai = sdxl and not is_text_encoder
    seen: set[int] = set()
    targets: list[LoraTarget] = []
    for container_path, container in model.named_modules():
        if not isinstance(container, containers):
            continue
        for child_path, layer in container.named_modules():
            kind = layer_kind(layer)
            if kind is None or id(layer) in seen:
                continue
            seen.add(id(layer))
            path = f"{container_path}.{child_path}" if container_path else child_path
            name_path = path
            if is_text_encoder:
                name_path = text_encoder_kohya_path(path)
            elif map_to_sai:
                name_path = sdxl_sai_path(path)
            targets.append(LoraTarget(kohya_name(prefix, name_path), path, layer, kind))
    return targets
