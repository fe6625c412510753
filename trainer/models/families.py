"""The one table of model families and the architectures shipped for them.

Two words, used everywhere with these meanings:
- family: "sd1" | "sd2" | "sdxl" - what the tokenizer padding, the text-encoder layers and the LoRA key names
  depend on (`LoadedModels.family`).
- architecture: a config folder shipped in trainer/models/configs ("sd15", "sd2-512", "sd2-768-v", "sdxl",
  "tiny-sd1"), from which a full-size model is built with random weights (bench, the memory estimate) or a
  single-file checkpoint is read.

This module imports no torch at import time: the doctor and the presets use the table before torch exists."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from trainer.errors import ConfigError, did_you_mean
from trainer.models.tokenizer import openai_clip_tokenizer
from trainer.paths import MODEL_CONFIGS_DIR

FAMILIES = ("sd1", "sd2", "sdxl")
LATENT_SCALE = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}  # the VAE latents' scaling factor


@dataclass(frozen=True)
class Architecture:
    name: str                 # the config folder under trainer/models/configs
    family: str               # "sd1" | "sd2" | "sdxl"
    preset_prefix: str        # presets/<prefix>-<N>gb.toml are its card tiers
    v_parameterization: bool  # the architecture is trained with v-prediction (SD 2.x 768-v)


ARCHITECTURES = {a.name: a for a in (
    Architecture("sd15", "sd1", "sd15", False),
    Architecture("tiny-sd1", "sd1", "sd15", False),  # the built-in demo model
    Architecture("sd2-512", "sd2", "sd2", False),
    Architecture("sd2-768-v", "sd2", "sd2", True),
    Architecture("sdxl", "sdxl", "sdxl", False),
)}
FAMILY_OF = {name: a.family for name, a in ARCHITECTURES.items()}


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ConfigError(f'Unknown model architecture "{name}"{did_you_mean(name, ARCHITECTURES)}. '
                          f"Choose one of: {', '.join(ARCHITECTURES)}.")
    return ARCHITECTURES[name]


def architecture_name(family: str, *, v_parameterization: bool = False, tiny: bool = False) -> str:
    """The shipped config of a family: SD 2.x by its prediction type, SD 1.x the demo size when `tiny`."""
    if family == "sd1":
        return "tiny-sd1" if tiny else "sd15"
    if family == "sd2":
        return "sd2-768-v" if v_parameterization else "sd2-512"
    return "sdxl"


def architecture_for_config(cfg: Any) -> str:
    """The shipped architecture a training config trains: from builtin:tiny-sd1, --sdxl, --v2
    (+ --v_parameterization). Reads the flags only: no model file is opened."""
    tiny = str(cfg.pretrained_model_name_or_path or "").strip() == "builtin:tiny-sd1"
    family = "sdxl" if cfg.sdxl else "sd2" if cfg.v2 else "sd1"
    return architecture_name(family, v_parameterization=cfg.v_parameterization, tiny=tiny)


def tokenizers_for(family: str) -> list:
    """The CLIP tokenizers of a family, built offline (SD 2.x and SDXL's second encoder pad with "!")."""
    if family == "sd1":
        return [openai_clip_tokenizer()]
    if family == "sd2":
        return [openai_clip_tokenizer(pad_token="!")]
    return [openai_clip_tokenizer(), openai_clip_tokenizer(pad_token="!")]


def build_architecture(name: str, *, dtype: Any, vae_dtype: Any) -> dict[str, Any]:
    """UNet, VAE and text encoder(s) of a shipped config with freshly initialised weights, in `dtype`.

    Built with `dtype` as torch's default dtype, so no float32 copy of a full-size model ever exists. Under a
    `torch.device(...)` context the weights are created there; under FakeTensorMode they cost nothing."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = MODEL_CONFIGS_DIR / architecture(name).name

    def clip_config(sub: str):
        config = CLIPTextConfig.from_json_file(root / sub / "config.json")
        config.dtype = dtype  # transformers builds the inner text model in the config's dtype otherwise
        return config

    with default_dtype(dtype):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        encoders = [CLIPTextModel(clip_config("text_encoder"))]
        if (root / "text_encoder_2").is_dir():
            encoders.append(CLIPTextModelWithProjection(clip_config("text_encoder_2")))
    with default_dtype(vae_dtype):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoders=[e.eval() for e in encoders])


@contextmanager
def default_dtype(dtype: Any) -> Iterator[None]:
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
