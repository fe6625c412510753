"""Write loaded models back as one single-file checkpoint in the original LDM layout (the layout A1111,
ComfyUI and sd-scripts read), and merge LoRA files into the base model before that (`python -m trainer merge`).

The key tables below are the inverse of what load.py reads through diffusers' single-file converter; the
tests check each direction against the other and against diffusers' reader. Done: SD1.x (UNet, VAE, CLIP-L),
SD2.x (UNet, VAE, OpenCLIP ViT-H), SDXL base (UNet, VAE, CLIP-L, OpenCLIP bigG). Not written: the DDPM
schedule buffers (betas, alphas_cumprod, ...), which readers rebuild from their own config, and EMA copies.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from trainer.files import atomic_path
from trainer.models.checkpoint import SD1_TE, SD2_TE, SDXL_TE1, SDXL_TE2, UNET, VAE, classify_checkpoint
from trainer.network.lora import LoRANetwork, NetworkWeightsError, network_type_of, read_weights_file

if TYPE_CHECKING:
    import torch

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
TEXT_ENCODERS = {"sd1": 1, "sd2": 1, "sdxl": 2}

# ---------------------------------------------------------------------------------------------------------------
# UNet: diffusers module paths -> LDM (`input_blocks.N.M`, `middle_block.N`, `output_blocks.N.M`)

UNET_OUTSIDE_BLOCKS = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                       "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
                       "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
# A diffusers ResnetBlock2D part -> the LDM ResBlock's nn.Sequential index.
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def unet_to_ldm(unet) -> dict[str, Any]:
    """A diffusers UNet2DConditionModel's weights under LDM names (without the model.diffusion_model. prefix).
    Attention internals (transformer_blocks.*, proj_in, norm) keep their names in both layouts."""
    config = unet.config
    per_block = config.layers_per_block
    if not isinstance(per_block, int):  # a per-level list; SD1/SD2/SDXL all use one number
        if len(set(per_block)) != 1:
            raise ValueError(f"cannot write a UNet with layers_per_block={per_block} in the LDM layout")
        per_block = per_block[0]
    up_has_attention = ["CrossAttn" in t for t in config.up_block_types]
    return {_unet_key(k, per_block, up_has_attention): v for k, v in unet.state_dict().items()}


def _unet_key(key: str, per_block: int, up_has_attention: list[bool]) -> str:
    module, _, param = key.rpartition(".")
    if module in UNET_OUTSIDE_BLOCKS:
        return f"{UNET_OUTSIDE_BLOCKS[module]}.{param}"
    step = per_block + 1  # LDM counts a level's layers plus its down/upsampler
    if m := _BLOCK.fullmatch(key):
        side, level, kind, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "downsamplers":  # downsamplers.0.conv.weight -> input_blocks.N.0.op.weight
            return f"input_blocks.{(level + 1) * step}.0.op.{rest.removeprefix('conv.')}"
        if kind == "upsamplers":  # after the level's last ResNet (and its attention, if any)
            return f"output_blocks.{level * step + per_block}.{2 if up_has_attention[level] else 1}.{rest}"
        if side == "down":
            block = f"input_blocks.{1 + level * step + index}"
        else:
            block = f"output_blocks.{level * step + index}"
        return f"{block}.0.{_resnet_part(rest, key)}" if kind == "resnets" else f"{block}.1.{rest}"
    if m := _MID.fullmatch(key):
        kind, index, rest = m.groups()
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * int(index)}.{_resnet_part(rest, key)}"
    raise ValueError(f"cannot write UNet weight {key!r} in the LDM layout (not part of an SD1/SD2/SDXL UNet)")


def _resnet_part(rest: str, key: str) -> str:
    part, _, param = rest.rpartition(".")
    if part not in UNET_RESNET:
        raise ValueError(f"cannot write UNet weight {key!r} in the LDM layout (unknown ResNet part {part!r})")
    return f"{UNET_RESNET[part]}.{param}"


# ---------------------------------------------------------------------------------------------------------------
# VAE: diffusers AutoencoderKL -> LDM (encoder.down.N.block.M, decoder.up.N (numbered bottom-up), mid.block_1)

VAE_RENAMES = {"conv_shortcut": "nin_shortcut", "conv_norm_out": "norm_out"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_ENCODER = re.compile(r"encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.+)")
_VAE_DECODER = re.compile(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)")
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def vae_to_ldm(vae) -> dict[str, Any]:
    """An AutoencoderKL's weights under LDM names (without first_stage_model.). The mid-block attention is
    Linear in diffusers and a 1x1 Conv2d in LDM: its weights get two trailing 1-dims (a view, no copy)."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        ldm = _vae_key(key, levels)
        out[ldm] = value[:, :, None, None] if ".attn_1." in ldm and value.ndim == 2 else value
    return out


def _vae_key(key: str, levels: int) -> str:
    for old, new in VAE_RENAMES.items():
        key = key.replace(f".{old}.", f".{new}.")
    if m := _VAE_ENCODER.fullmatch(key):
        level, kind, index, rest = m.groups()
        return f"encoder.down.{level}.block.{index}.{rest}" if kind == "resnets" else \
            f"encoder.down.{level}.downsample.{rest}"
    if m := _VAE_DECODER.fullmatch(key):
        level, kind, index, rest = m.groups()
        ldm_level = levels - 1 - int(level)  # diffusers counts decoder levels top-down, LDM bottom-up
        return f"decoder.up.{ldm_level}.block.{index}.{rest}" if kind == "resnets" else \
            f"decoder.up.{ldm_level}.upsample.{rest}"
    if m := _VAE_MID.fullmatch(key):
        side, kind, index, rest = m.groups()
        if kind == "resnets":
            return f"{side}.mid.block_{int(index) + 1}.{rest}"
        part, _, param = rest.rpartition(".")
        if part in VAE_ATTENTION:
            return f"{side}.mid.attn_1.{VAE_ATTENTION[part]}.{param}"
    elif key.split(".")[-2] in ("conv_in", "conv_out", "norm_out", "quant_conv", "post_quant_conv"):
        return key
    raise ValueError(f"cannot write VAE weight {key!r} in the LDM layout (not part of an SD AutoencoderKL)")


# ---------------------------------------------------------------------------------------------------------------
# Text encoders: CLIP-L keeps the transformers names; OpenCLIP (SD2, SDXL's second encoder) has its own


def _clip_state(text_encoder) -> dict[str, Any]:
    """The state dict without the `text_model.` level (transformers 5 dropped it from CLIPTextModel only)."""
    return {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}


def clip_l_to_ldm(text_encoder) -> dict[str, Any]:
    """OpenAI CLIP-L as SD1 / SDXL files store it: `text_model.<transformers name>`, plus the position_ids
    buffer real files carry (transformers no longer saves it; older readers expect it)."""
    import torch

    state = _clip_state(text_encoder)
    out = {f"text_model.{k}": v for k, v in state.items() if k != "embeddings.position_ids"}
    positions = state["embeddings.position_embedding.weight"].shape[0]
    out["text_model.embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    return out


OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                "embeddings.position_embedding.weight": "positional_embedding",
                "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_CLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def openclip_to_ldm(text_encoder, *, sd2_last_layer: bool = False) -> dict[str, Any]:
    """A transformers CLIP text model in OpenCLIP's layout (without the cond_stage_model.model. or
    conditioner.embedders.1.model. prefix): q/k/v joined into one in_proj, and text_projection transposed
    (OpenCLIP computes x @ P, transformers x @ W.T).

    `sd2_last_layer`: SD2's text encoder is OpenCLIP ViT-H without its 24th block, because SD2 conditions
    on the penultimate layer; files still carry that block and a text_projection. Like sd-scripts, fill
    them with a copy of the last block and an identity projection: no SD2 pipeline ever uses them.
    """
    import torch

    out, qkv = {}, {}
    for key, value in _clip_state(text_encoder).items():
        if key in OPENCLIP_TOP:
            out[OPENCLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T
        elif key == "embeddings.position_ids":
            continue
        elif (m := _CLIP_LAYER.fullmatch(key)) and m.group(2) in OPENCLIP_LAYER:
            out[f"transformer.resblocks.{m.group(1)}.{OPENCLIP_LAYER[m.group(2)]}.{m.group(3)}"] = value
        elif (m := _CLIP_LAYER.fullmatch(key)) and m.group(2) in ("self_attn.q_proj", "self_attn.k_proj",
                                                                  "self_attn.v_proj"):
            qkv[(int(m.group(1)), m.group(3), m.group(2)[-6])] = value
        else:
            raise ValueError(f"cannot write text-encoder weight {key!r} in the OpenCLIP layout")
    for layer, param in sorted({(k[0], k[1]) for k in qkv}):
        joined = torch.cat([qkv[(layer, param, part)] for part in "qkv"])  # OpenCLIP's order: q, k, v
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = joined
    # OpenCLIP's contrastive temperature; files carry it, nothing in SD uses it. ln(100), the trained value.
    out["logit_scale"] = torch.tensor(math.log(100.0), dtype=out["token_embedding.weight"].dtype)
    if sd2_last_layer:
        last = text_encoder.config.num_hidden_layers - 1
        block = f"transformer.resblocks.{last}."
        out.update({k.replace(block, f"transformer.resblocks.{last + 1}."): v.clone()
                    for k, v in list(out.items()) if k.startswith(block)})
        width = text_encoder.config.hidden_size
        out["text_projection"] = torch.eye(width, dtype=out["token_embedding.weight"].dtype)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Whole models


def to_ldm_state_dict(models) -> dict[str, torch.Tensor]:
    """The single-file LDM state dict of a LoadedModels (or anything with family, unet, vae, text_encoders).

    SD1: model.diffusion_model., first_stage_model., cond_stage_model.transformer.text_model.
    SD2: ... cond_stage_model.model. (OpenCLIP). SDXL: ... conditioner.embedders.0.transformer.text_model.
    (CLIP-L) and conditioner.embedders.1.model. (OpenCLIP bigG). Tensors are the models' own (no copy) where
    the layouts agree.
    """
    family = models.family
    if family not in TEXT_ENCODERS:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(TEXT_ENCODERS)}")
    encoders = list(models.text_encoders)
    if len(encoders) != TEXT_ENCODERS[family]:
        raise ValueError(f"{FAMILY_NAMES[family]} has {TEXT_ENCODERS[family]} text encoder(s), got {len(encoders)}")
    out = _prefixed(UNET, unet_to_ldm(models.unet))
    out.update(_prefixed(VAE, vae_to_ldm(models.vae)))
    if family == "sd1":
        out.update(_prefixed(SD1_TE, clip_l_to_ldm(encoders[0])))
    elif family == "sd2":
        out.update(_prefixed(SD2_TE, openclip_to_ldm(encoders[0], sd2_last_layer=True)))
    else:
        out.update(_prefixed(SDXL_TE1, clip_l_to_ldm(encoders[0])))
        out.update(_prefixed(SDXL_TE2, openclip_to_ldm(encoders[1])))
    return out


def _prefixed(prefix: str, state: Mapping[str, Any]) -> dict[str, Any]:
    return {prefix + k: v for k, v in state.items()}


def save_single_file(models, path: str | Path, dtype=None, metadata: Mapping[str, str] | None = None) -> Path:
    """Write `models` as one LDM-layout .safetensors (what A1111 / ComfyUI load), floating tensors cast to
    `dtype` (None keeps each tensor's own). The file appears complete under `path` or not at all."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"single-file export writes .safetensors only, got {path.name}")
    state = {}
    for key, value in to_ldm_state_dict(models).items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        state[key] = value.contiguous()
    with atomic_path(path) as temp:
        save_file(state, str(temp), metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    return path


# ---------------------------------------------------------------------------------------------------------------
# Merging LoRA files into the base weights


def merge_lora_into(models, lora_paths: Sequence[str | Path], multipliers: Sequence[float]) -> list[int]:
    """Add each LoRA file, times its multiplier, into the weights of `models` (in place). The network for each
    file is built from the file's own keys (ranks, alphas, conv layers), so any kohya-format LoRA / LoCon
    fits. Returns the number of layers merged per file. A file for another model family, or not a LoRA,
    raises NetworkWeightsError (a ModelLoadError) naming the file and what it is for."""
    if len(lora_paths) != len(multipliers):
        raise ValueError(f"{len(lora_paths)} LoRA files but {len(multipliers)} multipliers")
    counts = []
    for path, multiplier in zip(lora_paths, multipliers):
        weights = read_weights_file(path)
        _check_lora_fits(weights, path, models)
        try:
            network = LoRANetwork.from_weights(models.text_encoders, models.unet, weights,
                                               sdxl=models.family == "sdxl", source="the LoRA")
        except NetworkWeightsError as error:
            raise NetworkWeightsError(f'LoRA "{path}" does not fit the base model "{models.name}" '
                                      f"({FAMILY_NAMES[models.family]}): {error}\n{_fit_hint(path, models)}") from None
        try:
            network.merge_to_base(float(multiplier))
        except ValueError as error:  # NaN / inf in the LoRA: nothing of it was merged
            raise NetworkWeightsError(f'LoRA "{path}" cannot be merged: {error}. Fix: use an earlier save of '
                                      f"this LoRA (training probably diverged).") from None
        counts.append(len(network.lora_modules()))
    return counts


def lora_family(weights: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> str | None:
    """The family a kohya LoRA was trained for, from its ss_base_model_version or its names and shapes
    (cross-attention context width: 768 SD1, 1024 SD2, 2048 SDXL); None when it cannot tell."""
    version = (metadata or {}).get("ss_base_model_version", "")
    if version.startswith(("sd_v1", "sd_v2", "sdxl")):
        return {"sd_v1": "sd1", "sd_v2": "sd2"}.get(version[:5], "sdxl")
    for key, value in weights.items():
        if not key.endswith((".lora_down.weight", ".hada_w1_b")) or len(value.shape) < 2:
            continue
        if "attn2_to_k" in key:  # input = the text encoder's context width
            return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(int(value.shape[1]))
        if key.startswith("lora_te_") and "_self_attn_q_proj" in key:  # input = the text encoder's width
            return {768: "sd1", 1024: "sd2"}.get(int(value.shape[1]))
    names = [k.partition(".")[0] for k in weights]
    if any(n.startswith(("lora_te1_", "lora_te2_")) or "_input_blocks_" in n or "_output_blocks_" in n
           for n in names):  # SDXL's two text encoders; sd-scripts names SDXL UNet layers the SGM way
        return "sdxl"
    return None


def _check_lora_fits(weights: Mapping[str, Any], path, models) -> None:
    if network_type_of(weights) is None:
        kind = classify_checkpoint({k: tuple(v.shape) for k, v in weights.items()})
        what = f"a full {FAMILY_NAMES[kind]} checkpoint" if kind in FAMILY_NAMES else \
            "a network file of a type this trainer does not know" if kind == "lora" else "not a LoRA"
        raise NetworkWeightsError(f'"{path}" is {what}, not a kohya-format LoRA / LoCon / LoHa / LoKr (no lora_down, '
                                  f"hada_ or lokr_ weights). Fix: pass such .safetensors files as --lora and the base "
                                  f"model as --model.")
    family = lora_family(weights, _safetensors_metadata(path))
    if family is not None and family != models.family:
        raise NetworkWeightsError(f'LoRA "{path}" was trained for {FAMILY_NAMES[family]}, but the base model '
                                  f'"{models.name}" is {FAMILY_NAMES[models.family]}. {_fit_hint(path, models)}')


def _fit_hint(path, models) -> str:
    trained_on = _safetensors_metadata(path).get("ss_sd_model_name")
    where = f' (its metadata says it was trained on "{trained_on}")' if trained_on else ""
    return f"Fix: merge it into the base model it was trained on{where}, or use a LoRA made for " \
           f"{FAMILY_NAMES[models.family]}."


def _safetensors_metadata(path) -> dict[str, str]:
    if Path(path).suffix.lower() != ".safetensors":
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # already read once by read_weights_file; metadata is only a hint
        return {}
