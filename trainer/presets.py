"""The shipped presets as card tiers, and the one list of advice for needing less GPU memory.

presets/<prefix>-<N>gb.toml is the tier for an N GB card (prefix sd15, sd2, sdxl: the architecture table in
trainer.models.families). The out-of-memory message, the Windows VRAM-spill warning, `doctor --config` and
`bench` all take their advice from `memory_advice`, so they never disagree. Torch-free."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from trainer.config.args import TrainConfig, parse_train_args
from trainer.errors import ConfigError
from trainer.models.families import ARCHITECTURES, architecture_name
from trainer.paths import PRESETS_DIR, short_path

CARD_SLACK_GB = 0.5  # a card sold as 6 GB reports a little less (5.8-6.0 GiB)
FRAGMENTATION = 1.10  # reserved / allocated; an assumption until calibrated on a GPU
CUDA_OVERHEAD_GB = 0.5  # CUDA context + cuBLAS/cuDNN workspaces, not seen by torch's memory counters
DEFAULT_NETWORK_DIM = 4  # sd-scripts' --network_dim when none is given

# Where memory ran out (trainer.train.phases) -> the words for the user.
PHASE_WORDS = {"load": "loading the model and moving it to the GPU", "cache_latents": "caching latents",
               "cache_text": "caching the text encoder outputs", "sample": "generating sample images",
               "validate": "validation"}


def load_preset(path: str | Path) -> TrainConfig:
    """A training TOML read as `train --config_file PATH` would read it."""
    if not Path(path).is_file():
        raise ConfigError(f'--config "{path}" does not exist. Fix: give a training TOML, e.g. presets/sd15-8gb.toml.')
    return parse_train_args(["--config_file", str(path)])


def preset_prefix(family: str) -> str:
    """"sd1" -> "sd15": the file-name prefix of a family's card tiers."""
    return ARCHITECTURES[architecture_name(family)].preset_prefix


def preset_tiers(prefix: str, presets_dir: Path = PRESETS_DIR) -> list[tuple[int, Path]]:
    """The shipped presets of one model family by the card size in their names, smallest first:
    [(6, presets/sd15-6gb.toml), (8, ...), (12, ...)]."""
    return sorted((int(m.group(1)), p) for p in Path(presets_dir).glob(f"{prefix}-*gb.toml")
                  if (m := re.fullmatch(rf"{prefix}-(\d+)gb", p.stem)))


def stated_peak_gb(config: str | Path) -> float | None:
    """The (upper) GB figure of a preset's "# Expected peak VRAM: ..." comment, or None."""
    try:
        lines = Path(config).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    start = next((i for i, line in enumerate(lines) if "expected peak vram" in line.lower()), None)
    if start is None:
        return None
    for line in lines[start:]:
        if not line.lstrip().startswith("#"):
            break
        match = re.search(r"(\d+(?:\.\d+)?)(?:\s*[-–]\s*(\d+(?:\.\d+)?))?\s*GB", line, re.IGNORECASE)
        if match:
            return float(match.group(2) or match.group(1))
    return None


def lower_tier(cfg: Any, family: str, card_gb: float | None, presets_dir: Path = PRESETS_DIR) -> str | None:
    """The largest shipped preset below the one this config came from (if it came from one) that fits the card
    (if its size is known)."""
    tiers = preset_tiers(preset_prefix(family), presets_dir)
    source = Path(cfg.config_file).resolve() if cfg.config_file else None
    current = next((gb for gb, p in tiers if source is not None and
                    (p.resolve() == source or p.name == source.name)), None)
    below = [(gb, p) for gb, p in tiers if current is None or gb < current]
    if card_gb is None and current is None:
        fitting = tiers[:1]  # nothing known: the smallest tier
    else:
        fitting = [(gb, p) for gb, p in below if card_gb is None or gb <= card_gb + CARD_SLACK_GB]
    if not fitting:
        return None
    gb, path = fitting[-1]
    return f"the {gb} GB preset {short_path(path).as_posix()} (copy your paths into it)"


def memory_advice(cfg: Any, family: str, phase: str = "train", card_gb: float | None = None) -> list[str]:
    """What to change in this config to need less GPU memory in `phase` ("train", "sample", "validate",
    "cache_latents", "cache_text", "load"), biggest saving first; settings already at their saving value are
    left out."""
    steps = []
    if phase == "sample":
        steps.append("make sample images smaller (--w / --h in the prompt file) or turn sampling off "
                     "(sample_every_n_steps / sample_every_n_epochs)")
    if phase == "cache_latents" and cfg.vae_batch_size > 1:
        steps.append(f"vae_batch_size = 1 (now {cfg.vae_batch_size})")
    if phase in ("train", "sample", "validate", "cache_text") and cfg.train_batch_size > 1:
        steps.append(f"train_batch_size = 1 (now {cfg.train_batch_size}) with gradient_accumulation_steps = "
                     f"{cfg.train_batch_size * cfg.gradient_accumulation_steps} to keep the effective batch")
    if phase != "cache_latents":
        steps += _model_savers(cfg, family)
    steps += _size_savers(cfg)
    if phase != "cache_latents":
        if cfg.mixed_precision == "no":
            steps.append('mixed_precision = "bf16" (RTX 30xx and newer) or "fp16"')
        if not (cfg.fp8_base or cfg.fp8_base_unet):
            steps.append("fp8_base = true (stores the frozen model in 8 bits; needs mixed_precision)")
    tier = lower_tier(cfg, family, card_gb)
    if tier:
        steps.append(f"start from {tier}")
    steps.append("close other programs that use the GPU (browsers, games, other UIs)")
    return steps


def _model_savers(cfg: Any, family: str) -> list[str]:
    steps = []
    if not cfg.gradient_checkpointing:
        steps.append("gradient_checkpointing = true")
    if not cfg.cache_latents:
        steps.append("cache_latents = true (the VAE then leaves the GPU)")
    if family == "sdxl" and not cfg.cache_text_encoder_outputs:
        steps.append("cache_text_encoder_outputs = true with network_train_unet_only = true (the two text "
                     "encoders then leave the GPU)")
    elif cfg.train_text_encoder:
        steps.append("network_train_unet_only = true")
    return steps


def _size_savers(cfg: Any) -> list[str]:
    steps = []
    width, height = cfg.resolution or (512, 512)
    side = max(width, height)
    if cfg.enable_bucket and cfg.max_bucket_reso > side:
        steps.append(f"max_bucket_reso = {side} (now {cfg.max_bucket_reso})")
    smaller = max(256, (side * 7 // 8) // 64 * 64)
    if smaller < side:
        steps.append(f'resolution = "{smaller}" (now {width}x{height}; memory grows with the pixel count)')
    if (cfg.network_dim or DEFAULT_NETWORK_DIM) > 32:
        steps.append(f"network_dim = 32 or less (now {cfg.network_dim})")
    return steps
