"""Which module names of a kohya-format LoRA file ComfyUI, A1111 and diffusers apply to an SD1 / SD2 / SDXL
model, and why a name that none of them applies is left out.

Each consumer's rule below was read from its own key-mapping code:

ComfyUI (comfy/lora.py `model_lora_keys_clip`, `model_lora_keys_unet`, `load_lora`; comfy/weight_adapter/*.py).
Forge since its 2024 rewrite takes the same two functions (backend/patcher/lora.py loads them from its copies
in packages_3rdparty/*_lora_collection), so this verdict is Forge's too.
- Text encoders: only `<prefix>_text_model_encoder_layers_<N>_<part>` with part one of mlp_fc1, mlp_fc2,
  self_attn_q_proj/k_proj/v_proj/out_proj (its LORA_CLIP_MAP), N < 32. The first encoder (CLIP-L of SD1 and
  SDXL, OpenCLIP-H of SD2) answers to `lora_te_` and `lora_te1_`, SDXL's second (bigG) to `lora_te2_`, plus
  `lora_te2_text_projection`. A name without `text_model_` matches nothing.
- UNet: `lora_unet_` + the LDM path of any weight (`input_blocks_4_1_proj_in`, SAI/SGM style) and `lora_unet_`
  + the diffusers path of the same weight (`down_blocks_1_attentions_0_proj_in`), for every family.
- Suffixes it reads: alpha, dora_scale, lora_up/lora_down/lora_mid.weight, hada_*, lokr_*, oft_blocks, rescale,
  glora's a1/a2/b1/b2.weight, diff, diff_b, w_norm, b_norm, set_weight, reshape_weight. Every other key of the
  file is logged as "lora key not loaded".

A1111 (extensions-builtin/Lora/networks.py, v1.10: `convert_diffusers_name_to_compvis`, `load_network`,
`network_apply_weights`; Forge before 2024 used the same file).
- diffusers-style UNet names are converted to the LDM layout (`down_blocks_i_attentions_j` ->
  `input_blocks_{1+3i+j}_1`, ResNet conv1/conv2/time_emb_proj/conv_shortcut -> in_layers_2/out_layers_3/
  emb_layers_1/skip_connection, `up_blocks_i_upsamplers_0_conv` -> `output_blocks_{2+3i}_{2 if i > 0 else 1}`).
  The 3 there is layers_per_block + 1; we take layers_per_block from the model so the demo model checks too.
  The upsampler rule assumes up_blocks.0 has no attention (SD1/SD2): on SDXL a diffusers-style
  `up_blocks_0_upsamplers_0_conv` lands on no layer.
- Any `lora_unet_` name whose rest is an LDM path is taken as is ("SDXL loras seem to already have correct compvis
  keys"), so SAI-style names work for every family.
- Text encoders: `lora_te_text_model_encoder_layers_...` is the SD1/SD2 encoder (SD2's OpenCLIP spells the parts
  attn / mlp_c_fc / mlp_c_proj); `lora_te1_text_model_...` is SDXL's first encoder and, as a fallback, SD1's;
  `lora_te2_text_model_...` is SDXL's second. So `lora_te_` on SDXL and `lora_te1_` on SD2 match nothing.
- OpenCLIP layers (SD2, SDXL's second encoder) hold q/k/v in one MultiheadAttention: their q/k/v/out LoRAs are
  applied only when all four are in the file for that layer.

diffusers (diffusers/loaders/lora_pipeline.py `lora_state_dict` and loaders/lora_conversion_utils.py
`_maybe_map_sgm_blocks_to_diffusers`, `_convert_non_diffusers_lora_to_diffusers`, v0.42).
- `dora_scale` keys are dropped with a warning: a DoRA file is applied as a plain LoRA.
- The kohya conversion runs only when every key starts with lora_unet_, lora_te_, lora_te1_ or lora_te2_.
- SGM names (input_blocks...) are renumbered with the UNet's layers_per_block; a file with both SGM and
  diffusers-style UNet names loses all its SGM ones.
- Any key but lora_down.weight / lora_up.weight / alpha left after the conversion (LoHa, LoKr, an alpha without
  weights) or a lora_down without its lora_up makes the whole load fail.
- `lora_te_` / `lora_te1_` go to text_encoder, `lora_te2_` to text_encoder_2; a converted name that is no layer
  of the model is left out with a warning.

The layers themselves come from our own models (the shipped full-size configs built on the meta device, or a
loaded base model), never from a typed-in list; tests compare them with sd-scripts' own name lists.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from trainer.models.families import architecture as architecture_row
from trainer.network.keys import (
    UNET_PREFIX,
    find_lora_targets,
    layer_kind,
    text_encoder_kohya_path,
    text_encoder_prefixes,
)
from trainer.paths import MODEL_CONFIGS_DIR

if TYPE_CHECKING:
    from torch import nn

CONSUMERS = ("ComfyUI", "A1111", "diffusers")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")

# Per-module key suffixes each consumer reads (see the module docstring for the files).
COMFYUI_SUFFIXES = frozenset({
    "alpha", "dora_scale", "lora_up.weight", "lora_down.weight", "lora_mid.weight", "reshape_weight",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "oft_blocks", "rescale", "a1.weight", "a2.weight", "b1.weight", "b2.weight",
    "diff", "diff_b", "w_norm", "b_norm", "set_weight"})
A1111_SUFFIXES = frozenset({
    "alpha", "scale", "dora_scale", "lora_up.weight", "lora_down.weight", "lora_mid.weight",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "oft_blocks", "oft_diag", "a1.weight", "a2.weight", "b1.weight", "b2.weight",
    "diff", "diff_b", "w_norm", "b_norm", "weight", "on_input"})
DIFFUSERS_SUFFIXES = frozenset({"alpha", "lora_up.weight", "lora_down.weight"})
# The suffixes that make a module's update (alpha or dora_scale alone change nothing).
WEIGHT_SUFFIXES = frozenset(COMFYUI_SUFFIXES - {"alpha", "dora_scale", "rescale", "reshape_weight"})

_CLIP_PARTS = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.q_proj": "self_attn_q_proj",
               "self_attn.k_proj": "self_attn_k_proj", "self_attn.v_proj": "self_attn_v_proj",
               "self_attn.out_proj": "self_attn_out_proj"}
_CLIP_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")
_COMFYUI_MAX_CLIP_LAYERS = 32  # model_lora_keys_clip looks at layers 0..31
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class Layer:
    """One Linear / Conv2d a LoRA module can patch."""

    path: str      # module path in the diffusers UNet, or in the text encoder with `text_model.` kept
    part: str      # "unet", "te1" (the only encoder of SD1/SD2) or "te2"
    in_dim: int
    out_dim: int
    kernel: tuple[int, int] | None  # None for Linear

    @property
    def kind(self) -> str:
        if self.kernel is None:
            return "linear"
        return "conv1x1" if self.kernel == (1, 1) else "conv3x3"


@dataclass
class ModelLayers:
    """The LoRA-capable layers of one model, and the names each consumer maps onto them."""

    family: str                       # "sd1" | "sd2" | "sdxl"
    unet: dict[str, Layer]            # every Linear / Conv2d of the UNet, by diffusers path
    text: list[dict[str, Layer]]      # per text encoder: every Linear, by path with `text_model.`
    kohya: dict[str, Layer]           # the names sd-scripts writes (conv layers included)
    layers_per_block: int
    attention_up_blocks: frozenset[int]  # up_blocks with cross-attention (decides the LDM upsampler index)
    name: str = ""
    _cache: dict = field(default_factory=dict, repr=False)

    def accepted(self, consumer: str) -> dict[str, Layer]:
        """{module name: layer} of every name `consumer` maps onto this model (built once)."""
        if consumer not in self._cache:
            self._cache[consumer] = _ACCEPTED_BUILDERS[consumer](self)
        return self._cache[consumer]


def _us(path: str) -> str:
    return path.replace(".", "_")


def _layer(path: str, module: nn.Module, part: str) -> Layer:
    kernel = tuple(int(k) for k in module.kernel_size) if layer_kind(module) != "linear" else None
    out_dim, in_dim = module.weight.shape[:2]  # Linear [out, in]; Conv2d [out, in, kh, kw]
    return Layer(path, part, int(in_dim), int(out_dim), kernel)


def _text_path(path: str) -> str:
    """The encoder's path as kohya names assume it (transformers 4: `text_model.` first); `text_projection`
    sits beside `text_model` in CLIPTextModelWithProjection and keeps its name."""
    return path if path == "text_projection" else text_encoder_kohya_path(path)


def layers_of_models(text_encoders: Sequence[nn.Module], unet: nn.Module, family: str,
                     name: str = "") -> ModelLayers:
    """The layers and kohya names of real (or meta-device) models: what `check_lora --base` compares with."""
    sdxl = family == "sdxl"
    unet_layers = {path: _layer(path, m, "unet") for path, m in unet.named_modules() if layer_kind(m)}
    text: list[dict[str, Layer]] = []
    kohya: dict[str, Layer] = {}
    for index, (encoder, prefix) in enumerate(zip(text_encoders, text_encoder_prefixes(len(text_encoders), sdxl))):
        part = f"te{index + 1}"
        layers = {_text_path(p): _layer(_text_path(p), m, part)
                  for p, m in encoder.named_modules() if layer_kind(m) == "linear"}
        text.append(layers)
        for target in find_lora_targets(encoder, prefix=prefix, is_text_encoder=True, include_conv=False):
            kohya[target.name] = layers[_text_path(target.path)]
    for target in find_lora_targets(unet, prefix=UNET_PREFIX, is_text_encoder=False, include_conv=True, sdxl=sdxl):
        kohya[target.name] = unet_layers[target.path]
    config = unet.config
    attention_up = frozenset(i for i, kind in enumerate(config.up_block_types) if "CrossAttn" in kind)
    return ModelLayers(family, unet_layers, text, kohya, int(config.layers_per_block), attention_up, name)


@functools.cache
def architecture_layers(architecture: str) -> ModelLayers:
    """The layers of a shipped architecture (sd15, sd2-512, sdxl, tiny-sd1...), built once per process on the
    meta device: no weights, a few seconds for SDXL."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    row = architecture_row(architecture)
    root = MODEL_CONFIGS_DIR / row.name
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_json_file(root / "text_encoder" / "config.json"))]
        if (root / "text_encoder_2").is_dir():
            encoders.append(CLIPTextModelWithProjection(
                CLIPTextConfig.from_json_file(root / "text_encoder_2" / "config.json")))
    return layers_of_models(encoders, unet, row.family, name=architecture)


# ---------------------------------------------------------------------------------------------------------------
# diffusers UNet path <-> LDM (SAI/SGM) path, for any layers_per_block

_RESNET_LDM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
_OUTSIDE_BLOCKS_LDM = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
                       "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                       "add_embedding.linear_2": "label_emb.0.2"}
_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)")


def _inner(kind: str, rest: str) -> str | None:
    if kind == "resnets":
        return _RESNET_LDM.get(rest)
    return rest


def ldm_unet_path(path: str, layers_per_block: int, attention_up_blocks: Iterable[int]) -> str | None:
    """`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in`; None for a layer the LDM UNet
    does not have under that name (only Linear/Conv2d paths are meant)."""
    if path in _OUTSIDE_BLOCKS_LDM:
        return _OUTSIDE_BLOCKS_LDM[path]
    if m := _MID.fullmatch(path):
        kind, j, rest = m[1], int(m[2]), _inner(m[1], m[3])
        return None if rest is None else f"middle_block.{1 if kind == 'attentions' else 2 * j}.{rest}"
    m = _BLOCK.fullmatch(path)
    if not m:
        return None
    side, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
    if side == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(layers_per_block + 1) * (i + 1)}.0.op" if rest == "conv" else None
        inner = _inner(kind, rest)
        if inner is None:
            return None
        return f"input_blocks.{(layers_per_block + 1) * i + j + 1}.{1 if kind == 'attentions' else 0}.{inner}"
    per_level = layers_per_block + 1
    if kind == "upsamplers":
        index = 2 if i in set(attention_up_blocks) else 1
        return f"output_blocks.{per_level * i + per_level - 1}.{index}.conv" if rest == "conv" else None
    inner = _inner(kind, rest)
    if inner is None:
        return None
    return f"output_blocks.{per_level * i + j}.{1 if kind == 'attentions' else 0}.{inner}"


# ---------------------------------------------------------------------------------------------------------------
# What each consumer maps


def _clip_names(layers: Mapping[str, Layer], prefixes: Sequence[str]) -> dict[str, Layer]:
    names = {}
    for path, layer in layers.items():
        m = _CLIP_LAYER.fullmatch(path)
        if m and int(m[1]) < _COMFYUI_MAX_CLIP_LAYERS and m[2] in _CLIP_PARTS:
            for prefix in prefixes:
                names[f"{prefix}_text_model_encoder_layers_{m[1]}_{_CLIP_PARTS[m[2]]}"] = layer
    return names


def _comfyui_accepted(model: ModelLayers) -> dict[str, Layer]:
    names: dict[str, Layer] = {}
    for path, layer in model.unet.items():
        names[f"lora_unet_{_us(path)}"] = layer
        ldm = ldm_unet_path(path, model.layers_per_block, model.attention_up_blocks)
        if ldm:
            names[f"lora_unet_{_us(ldm)}"] = layer
    names.update(_clip_names(model.text[0], ("lora_te", "lora_te1")))
    if len(model.text) > 1:
        names.update(_clip_names(model.text[1], ("lora_te2",)))
        if "text_projection" in model.text[1]:
            names["lora_te2_text_projection"] = model.text[1]["text_projection"]
    return names


def _ldm_unet_modules(model: ModelLayers) -> dict[str, Layer]:
    """A1111's own module names of the UNet: `diffusion_model_` + the LDM path with `_`."""
    names = {}
    for path, layer in model.unet.items():
        ldm = ldm_unet_path(path, model.layers_per_block, model.attention_up_blocks)
        if ldm:
            names[f"diffusion_model_{_us(ldm)}"] = layer
    return names


_OPENCLIP_PARTS = {"mlp.fc1": "mlp_c_fc", "mlp.fc2": "mlp_c_proj", "self_attn.out_proj": "attn_out_proj",
                   "self_attn.q_proj": "attn", "self_attn.k_proj": "attn", "self_attn.v_proj": "attn"}


def _a1111_text_modules(model: ModelLayers) -> dict[str, Layer]:
    """A1111's module names of the text encoders: CLIP-L as transformers names it (`transformer_text_model_...`,
    SDXL: `0_` first), OpenCLIP (SD2, SDXL's second: `1_`) as `model_transformer_resblocks_N_...`, where q/k/v
    are one MultiheadAttention (`..._attn`)."""
    names: dict[str, Layer] = {}
    openclip = [model.family == "sd2", model.family == "sdxl"]
    lead = ["0_", "1_"] if model.family == "sdxl" else ["", ""]
    for index, layers in enumerate(model.text):
        for path, layer in layers.items():
            if not openclip[index]:
                names[f"{lead[index]}transformer_{_us(path)}"] = layer
            elif (m := _CLIP_LAYER.fullmatch(path)) and m[2] in _OPENCLIP_PARTS:
                names[f"{lead[index]}model_transformer_resblocks_{m[1]}_{_OPENCLIP_PARTS[m[2]]}"] = layer
    return names


_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                 "conv_shortcut": "skip_connection"}


def a1111_compvis_name(name: str, family: str, layers_per_block: int = 2) -> str:
    """A1111's `convert_diffusers_name_to_compvis` (see the module docstring), as our own rules."""
    per_level = layers_per_block + 1
    if m := re.match(r"lora_unet_conv_in(.*)", name):
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    if m := re.match(r"lora_unet_conv_out(.*)", name):
        return f"diffusion_model_out_2{m[1]}"
    if m := re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", name):
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    if m := re.match(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        i, j = int(m[2]), int(m[4])
        rest = _A1111_RESNET.get(m[5], m[5]) if m[3] == "resnets" else m[5]
        block = per_level * i + j + (1 if m[1] == "down" else 0)
        side = "input_blocks" if m[1] == "down" else "output_blocks"
        return f"diffusion_model_{side}_{block}_{1 if m[3] == 'attentions' else 0}_{rest}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", name):
        rest = _A1111_RESNET.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{rest}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", name):
        return f"diffusion_model_input_blocks_{per_level + int(m[1]) * per_level}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", name):
        i = int(m[1])
        return f"diffusion_model_output_blocks_{per_level - 1 + i * per_level}_{2 if i > 0 else 1}_conv"
    if m := re.match(r"lora_te(2?)_text_model_encoder_layers_(\d+)_(.+)", name):
        second, layer, rest = m[1] == "2", m[2], m[3]
        if second or family == "sd2":
            rest = rest.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
            return f"{'1_' if second else ''}model_transformer_resblocks_{layer}_{rest}"
        return f"transformer_text_model_encoder_layers_{layer}_{rest}"
    return name


def a1111_lookup(name: str, model: ModelLayers) -> tuple[Layer | None, bool]:
    """(the layer A1111 patches for `name`, whether it goes through a MultiheadAttention), following
    `load_network`'s order of tries."""
    modules = model.accepted("A1111")
    key = a1111_compvis_name(name, model.family, model.layers_per_block)
    if key in modules:
        return modules[key], key.endswith("_attn")
    m = re.match(r"(.*)_([qkv]_proj)$", key)
    if m and m[1] in modules:
        return modules[m[1]], True
    if "lora_unet" in name:
        return modules.get(name.replace("lora_unet", "diffusion_model")), False
    if "lora_te1_text_model" in name:
        found = modules.get(name.replace("lora_te1_text_model", "0_transformer_text_model"))
        return found or modules.get(name.replace("lora_te1_text_model", "transformer_text_model")), False
    return None, False


def _a1111_modules(model: ModelLayers) -> dict[str, Layer]:
    return {**_ldm_unet_modules(model), **_a1111_text_modules(model)}


def _diffusers_accepted(model: ModelLayers) -> dict[str, Layer]:
    """The diffusers-style kohya names diffusers converts back onto a layer: the UNet's own paths with `_`,
    `lora_te_`/`lora_te1_` + the first encoder's, `lora_te2_` + the second's."""
    names = {f"lora_unet_{_us(path)}": layer for path, layer in model.unet.items()}
    for path, layer in model.text[0].items():
        names[f"lora_te_{_us(path)}"] = names[f"lora_te1_{_us(path)}"] = layer
    if len(model.text) > 1:
        names.update({f"lora_te2_{_us(path)}": layer for path, layer in model.text[1].items()})
    return names


_ACCEPTED_BUILDERS = {"ComfyUI": _comfyui_accepted, "A1111": _a1111_modules, "diffusers": _diffusers_accepted}

_SGM = ("input_blocks", "middle_block", "output_blocks")
_NOT_SGM = ("down_blocks", "mid_block", "up_blocks")
_SGM_INNER = ("resnets", "attentions", "upsamplers")


def diffusers_sgm_name(name: str, layers_per_block: int) -> str | None:
    """`_maybe_map_sgm_blocks_to_diffusers` on one module name: `lora_unet_input_blocks_4_1_proj_in` ->
    `lora_unet_down_blocks_1_attentions_0_proj_in`; None where diffusers raises for the name."""
    outside = {"lora_unet_input_blocks_0_0": "lora_unet_conv_in", "lora_unet_out_2": "lora_unet_conv_out",
               "lora_unet_time_embed_0": "lora_unet_time_embedding_linear_1",
               "lora_unet_time_embed_2": "lora_unet_time_embedding_linear_2",
               "lora_unet_label_emb_0_0": "lora_unet_add_embedding_linear_1",
               "lora_unet_label_emb_0_2": "lora_unet_add_embedding_linear_2"}
    if name in outside:
        return outside[name]
    converted = _sgm_blocks(name, layers_per_block)
    if converted is None:
        return None
    for ldm, diffusers in _SGM_RESNET:  # `_convert_unet_lora_key`'s renames of LDM ResNet parts
        converted = converted.replace(ldm, diffusers)
    return converted


_SGM_RESNET = (("_emb_layers_1", "_time_emb_proj"), ("_in_layers_2", "_conv1"), ("_out_layers_3", "_conv2"),
               ("_skip_connection", "_conv_shortcut"), ("_downsamplers_0_op", "_downsamplers_0_conv"))


def _sgm_blocks(name: str, layers_per_block: int) -> str | None:
    parts = name.split("_")
    if not any(p in name for p in _SGM) or "text" in name:
        return name
    try:
        block, inner = int(parts[4]), parts[5]
        per_level = layers_per_block + 1
        if "middle_block" in name:
            key_part = {0: ["resnets", "0"], 1: ["attentions", "0"], 2: ["resnets", "1"]}[block]
            return "_".join(["lora", "unet", "mid", "block"] + key_part + parts[5:])
        if "input_blocks" in name:
            level, layer = divmod(block - 1, per_level)
            kind, layer = ("downsamplers", 0) if "op" in name else (_SGM_INNER[int(inner)], layer)
            return "_".join(["lora", "unet", "down", "blocks", str(level), kind, str(layer)] + parts[6:])
        level, layer = divmod(block, per_level)
        kind = _SGM_INNER[int(inner)]
        return "_".join(["lora", "unet", "up", "blocks", str(level), kind, str(layer if int(inner) < 2 else 0)]
                        + parts[6:])
    except (ValueError, IndexError, KeyError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# The verdict per consumer


@dataclass
class Verdict:
    """What one consumer does with a file: the keys it leaves out (and why), or why it refuses the whole file."""

    consumer: str
    applied_modules: int = 0
    ignored: dict[str, str] = field(default_factory=dict)  # key -> reason
    fails: str | None = None  # the whole file does not load

    @property
    def all_applied(self) -> bool:
        return self.fails is None and not self.ignored


def split_key(key: str) -> tuple[str, str]:
    """`name.lora_up.weight` -> (`name`, `lora_up.weight`)."""
    name, _, suffix = key.partition(".")
    return name, suffix


def _modules(keys: Iterable[str]) -> dict[str, list[str]]:
    by_name: dict[str, list[str]] = {}
    for key in keys:
        name, suffix = split_key(key)
        by_name.setdefault(name, []).append(suffix)
    return by_name


def why_unmatched(name: str, model: ModelLayers) -> str:
    """A reason a person can act on, for a module name that matches no layer."""
    if re.match(r"lora_te\d?_encoder_", name):
        return ("text-encoder name without `text_model_` (written by a trainer that walked a transformers 5 "
                "CLIPTextModel, e.g. LyCORIS); rename `..._encoder_layers_` to `..._text_model_encoder_layers_`")
    if not name.startswith(KOHYA_PREFIXES):
        return f"`{name.split('_')[0]}_...` is not a kohya prefix (lora_unet_, lora_te_, lora_te1_, lora_te2_)"
    if name.startswith(("lora_te1_", "lora_te2_")) and model.family != "sdxl":
        return f"an SDXL text-encoder name (lora_te1_/lora_te2_), but the model is {model.family.upper()}"
    if name.startswith("lora_te_") and model.family == "sdxl":
        return "an SD1/SD2 text-encoder name (lora_te_) on SDXL, which has lora_te1_ and lora_te2_"
    return f"no layer of the {model.family.upper()} model has this name (a file for another base model?)"


def comfyui_verdict(by_name: Mapping[str, list[str]], model: ModelLayers) -> Verdict:
    verdict = Verdict("ComfyUI")
    accepted = model.accepted("ComfyUI")
    for name, suffixes in by_name.items():
        if name not in accepted:
            reason = why_unmatched(name, model)
            verdict.ignored.update({f"{name}.{s}": reason for s in suffixes})
            continue
        unread = [s for s in suffixes if s not in COMFYUI_SUFFIXES]
        verdict.ignored.update({f"{name}.{s}": f"`.{s}` is no key type ComfyUI reads" for s in unread})
        verdict.applied_modules += any(s in WEIGHT_SUFFIXES for s in suffixes)
    return verdict


def a1111_verdict(by_name: Mapping[str, list[str]], model: ModelLayers) -> Verdict:
    verdict = Verdict("A1111")
    attention_parts: dict[str, set[str]] = {}
    for name, suffixes in by_name.items():
        layer, through_mha = a1111_lookup(name, model)
        if layer is None:
            reason = why_unmatched(name, model)
            if name.startswith("lora_te1_") and model.family == "sd2":
                reason = "SD2's text encoder answers only to lora_te_ (ComfyUI also takes lora_te1_)"
            verdict.ignored.update({f"{name}.{s}": reason for s in suffixes})
            continue
        unread = [s for s in suffixes if s not in A1111_SUFFIXES]
        verdict.ignored.update({f"{name}.{s}": f"`.{s}` is no key type A1111 reads" for s in unread})
        if not any(s in A1111_SUFFIXES - {"alpha", "scale", "dora_scale"} for s in suffixes):
            verdict.fails = (f"{name}: A1111 finds no network type for keys {', '.join(suffixes)} and stops loading "
                             "the file (\"Could not find a module type\")")
        if through_mha or re.search(r"resblocks_\d+_attn_out_proj$", a1111_compvis_name(name, model.family)):
            layer_name, _, part = name.rpartition("_self_attn_")
            attention_parts.setdefault(layer_name, set()).add(part)
        verdict.applied_modules += 1
    for layer_name, parts in attention_parts.items():
        missing = [p for p in _ATTENTION_PARTS if p not in parts]
        if missing:
            reason = (f"this OpenCLIP layer's q/k/v/out are one MultiheadAttention, patched only when all four "
                      f"are in the file; missing {', '.join(missing)}")
            for part in parts:
                name = f"{layer_name}_self_attn_{part}"
                verdict.ignored.update({f"{name}.{s}": reason for s in by_name[name]})
                verdict.applied_modules -= 1
    return verdict


def diffusers_verdict(by_name: Mapping[str, list[str]], model: ModelLayers) -> Verdict:
    verdict = Verdict("diffusers")
    names = dict(by_name)
    for name, suffixes in names.items():
        if "dora_scale" in suffixes:
            verdict.ignored[f"{name}.dora_scale"] = "DoRA magnitudes are dropped by diffusers: it applies the file as plain LoRA"
    strangers = [n for n in names if not n.startswith(KOHYA_PREFIXES)]
    if strangers:
        verdict.fails = (f"diffusers converts a kohya file only when every key starts with lora_unet_/lora_te_/"
                         f"lora_te1_/lora_te2_; {strangers[0]} does not, so no key is converted")
        return verdict
    sgm = [n for n in names if any(p in n for p in _SGM)]
    if sgm and any(any(p in n for p in _NOT_SGM) for n in names if n not in sgm):
        for n in sgm:
            verdict.ignored.update({f"{n}.{s}": "SGM-style names (input_blocks...) are dropped by diffusers when "
                                    "the file also has diffusers-style ones (down_blocks...)" for s in names.pop(n)})
    accepted = model.accepted("diffusers")
    for name, suffixes in names.items():
        weights = [s for s in suffixes if s != "dora_scale"]
        leftover = [s for s in weights if s not in DIFFUSERS_SUFFIXES]
        if weights and (leftover or "lora_down.weight" not in weights or "lora_up.weight" not in weights):
            what = f"`.{leftover[0]}`" if leftover else "a module without both lora_down and lora_up"
            verdict.fails = f"{name}: diffusers cannot convert {what}, and the whole load fails"
            continue
        converted = diffusers_sgm_name(name, model.layers_per_block) if name in sgm else name
        if converted not in accepted:
            reason = why_unmatched(name, model)
            verdict.ignored.update({f"{name}.{s}": reason for s in weights})
        elif "lora_down.weight" in weights:
            verdict.applied_modules += 1
    return verdict


def consumer_verdicts(keys: Iterable[str], model: ModelLayers) -> dict[str, Verdict]:
    """{consumer: Verdict} for a LoRA file's keys on `model`."""
    by_name = _modules(keys)
    return {"ComfyUI": comfyui_verdict(by_name, model), "A1111": a1111_verdict(by_name, model),
            "diffusers": diffusers_verdict(by_name, model)}


def merged_ignored(verdicts: Mapping[str, Verdict]) -> dict[str, str]:
    """{key: "ComfyUI, A1111: reason"} over all consumers, consumers with the same reason named together."""
    merged: dict[str, dict[str, list[str]]] = {}
    for verdict in verdicts.values():
        for key, reason in verdict.ignored.items():
            merged.setdefault(key, {}).setdefault(reason, []).append(verdict.consumer)
    return {key: "; ".join(f"{', '.join(names)}: {reason}" for reason, names in reasons.items())
            for key, reasons in merged.items()}


WHOLE_FILE = "<whole file>"  # the key of ignored_keys' entry for consumers that refuse the whole file


def ignored_keys(keys: Iterable[str], model: ModelLayers) -> dict[str, str]:
    """`merged_ignored` for a LoRA file's keys on `model`, plus one entry per consumer that refuses the whole
    file (its key is `<whole file>`)."""
    verdicts = consumer_verdicts(keys, model)
    ignored = merged_ignored(verdicts)
    refusals = [f"{v.consumer}: {v.fails}" for v in verdicts.values() if v.fails]
    if refusals:
        ignored[WHOLE_FILE] = "; ".join(refusals)
    return ignored
