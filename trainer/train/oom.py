"""Out of GPU memory: say where it happened, what the card has, and what to lower, biggest saving first.

The loop turns `torch.cuda.OutOfMemoryError` into `TrainingOutOfMemory` after saving the weights so far (as
Ctrl-C does); `run_training` turns either into one `UserError` with the steps for this config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from trainer.errors import UserError

# Where in the code the memory ran out -> what the user calls that moment (innermost match wins; the caching
# phases only count inside a function named cache*: the same files also serve the training step).
_PHASES = (("trainer/train/sample.py", "sample", "generating sample images"),
           ("trainer/train/validate.py", "validate", "validation"),
           ("trainer/train/text_cache.py", "cache_text", "caching the text encoder outputs"),
           ("trainer/train/build.py", "cache_latents", "caching latents"),
           ("trainer/data/", "cache_latents", "caching latents"))


@dataclass(eq=False)
class TrainingOutOfMemory(Exception):
    """The loop ran out of GPU memory; `saved` is the step file written on the way out (None: nothing)."""
    phase: str  # "train" | "sample" | "validate" | "cache_latents" | "cache_text" | "load"
    where: str
    step: int
    saved: Path | None
    family: str | None = None


OUT_OF_MEMORY = (TrainingOutOfMemory, torch.cuda.OutOfMemoryError)


def phase_of(tb: TracebackType | None, step: int | None) -> tuple[str, str]:
    """(key, words) for where the memory ran out, from the innermost of our frames that names a phase."""
    found = None
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if "/trainer/" in name or name.startswith("trainer/"):
            hit = next(((key, words) for part, key, words in _PHASES if part in name), None)
            if hit and (not hit[0].startswith("cache") or tb.tb_frame.f_code.co_name.startswith("cache")):
                found = hit
        tb = tb.tb_next
    if found:
        return found
    return ("train", f"training step {step}") if step is not None else ("load", "moving the model to the GPU")


def stopped_by_oom(error: BaseException, setup, step: int, epoch: int) -> TrainingOutOfMemory:
    """In the loop's `except`: free what the failed step held, save the weights so far if a step finished."""
    phase, where = phase_of(error.__traceback__, step + 1)
    error.__traceback__ = None  # its frames hold the failed step's activations
    _free_cache()
    from trainer.train.loop import NonFiniteLoss

    saved = None
    if step > 0:
        try:
            saved = setup.saver.interrupted(step, epoch)
        except (torch.cuda.OutOfMemoryError, NonFiniteLoss):  # the saver refuses to write broken weights
            saved = None
    return TrainingOutOfMemory(phase, where, step, saved, getattr(setup.models, "family", None))


def out_of_memory_error(cfg, error: BaseException, family: str | None = None) -> UserError:
    """The one message for the user: phase, card, saved file, and the settings to change for this config."""
    if isinstance(error, TrainingOutOfMemory):
        stop = error
    else:  # before the loop (loading, latent or text caching): nothing trained, nothing to save
        phase, where = phase_of(error.__traceback__, None)
        error.__traceback__ = None
        _free_cache()
        stop = TrainingOutOfMemory(phase, where, 0, None, family)
    card = card_text()
    steps = memory_steps(cfg, stop.family or ("sdxl" if cfg.sdxl else "sd1"), stop.phase, card_gb())
    if stop.saved is not None:
        kept = (f"The LoRA trained so far (step {stop.step}) was saved to {stop.saved}; continue from it with "
                f"--network_weights \"{stop.saved}\".")
    else:
        kept = "Nothing was trained yet, nothing was saved."
    numbered = " ".join(f"({i}) {s}." for i, s in enumerate(steps, 1))
    return UserError(f"Out of GPU memory while {stop.where} ({card}). {kept} To fit, change these in your "
                     f"config, the biggest saving first, one at a time: {numbered}")


def card_gb() -> float | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30


def card_text() -> str:
    total = card_gb()
    if total is None:
        return "no CUDA card visible to torch"
    index = torch.cuda.current_device()
    peak = torch.cuda.max_memory_reserved(index) / 2**30
    return (f"{torch.cuda.get_device_name(index)} has {total:.1f} GB; this run held up to {peak:.1f} GB, "
            f"other programs use the rest")


def _free_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def memory_steps(cfg, family: str, phase: str, card: float | None) -> list[str]:
    """What to change in this config to need less GPU memory in `phase`, biggest saving first."""
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
    tier = lower_tier(cfg, family, card)
    if tier:
        steps.append(f"start from {tier}")
    steps.append("close other programs that use the GPU (browsers, games, other UIs)")
    return steps


def _model_savers(cfg, family: str) -> list[str]:
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


def _size_savers(cfg) -> list[str]:
    steps = []
    width, height = cfg.resolution or (512, 512)
    side = max(width, height)
    if cfg.enable_bucket and cfg.max_bucket_reso > side:
        steps.append(f"max_bucket_reso = {side} (now {cfg.max_bucket_reso})")
    smaller = max(256, (side * 7 // 8) // 64 * 64)
    if smaller < side:
        steps.append(f'resolution = "{smaller}" (now {width}x{height}; memory grows with the pixel count)')
    return steps


def lower_tier(cfg, family: str, card: float | None) -> str | None:
    """The next lower shipped preset than the one this config came from, else the largest that fits the card."""
    from trainer.doctor import CARD_SLACK_GB, preset_tiers, short_path

    tiers = preset_tiers("sdxl" if family == "sdxl" else "sd2" if cfg.v2 else "sd15")
    current = next((gb for gb, p in tiers if cfg.config_file and Path(cfg.config_file).name == p.name), None)
    if current is not None:
        fitting = [(gb, p) for gb, p in tiers if gb < current]
    elif card is not None:
        fitting = [(gb, p) for gb, p in tiers if gb <= card + CARD_SLACK_GB]
    else:
        fitting = tiers[:1]
    if not fitting:
        return None
    gb, path = fitting[-1]
    return f"the {gb} GB preset {short_path(path).as_posix()} (copy your paths into it)"
