"""One loss computation: batch -> latents -> text states -> noise at sampled timesteps -> UNet prediction ->
weighted loss, in sd-scripts' order.

The loop, validation, the memory estimate and bench all call `compute_loss` on explicit `StepParts` (as
nanoGPT's one forward serves training and its loss estimate), so what they measure is what training runs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch

from trainer.errors import UserError
from trainer.models.text import encode_batch
from trainer.train import noise as N

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    pass


class LatentNaNs:
    """NaN latents from a VAE encoding on the fly (SDXL's VAE overflows in fp16). Each batch's flag stays on
    the device until `check` reads them all; an fp16 SDXL VAE is then an error naming the fix, anything else a
    warning, once per run (the latents were already replaced by 0, as sd-scripts does)."""

    def __init__(self):
        self.pending: list[tuple[torch.Tensor, list[str], str, torch.dtype]] = []
        self.warned = False

    def add(self, flag: torch.Tensor, batch: dict, family: str, vae_dtype: torch.dtype) -> None:
        self.pending.append((flag, [str(p) for p in batch.get("image_paths", [])[:3]], family, vae_dtype))

    def check(self) -> None:
        if not self.pending:
            return
        flags = torch.stack([entry[0] for entry in self.pending]).tolist()
        found = [entry for entry, flag in zip(self.pending, flags) if flag]
        self.pending.clear()
        for _, paths, family, vae_dtype in found:
            self._found(", ".join(paths), family, vae_dtype)

    def _found(self, paths: str, family: str, vae_dtype: torch.dtype) -> None:
        if family == "sdxl" and vae_dtype == torch.float16:
            raise UserError(f"The VAE produced NaN latents for {paths}: the SDXL VAE overflows in fp16. Fix: add "
                            "--no_half_vae (keeps the VAE in fp32), or use an fp16-fixed SDXL VAE with --vae "
                            "(e.g. madebyollin/sdxl-vae-fp16-fix), or --cache_latents with --no_half_vae.")
        if not self.warned:
            self.warned = True
            log.warning("The VAE produced NaN latents for %s; they were replaced by 0 (as sd-scripts does). If "
                        "this repeats, use --no_half_vae or another VAE.", paths)


@dataclass(frozen=True)
class DiffusionSettings:
    """Everything the noise and loss functions need, taken from the config once."""
    v_parameterization: bool
    latent_scale: float
    clip_skip: int | None
    max_token_length: int | None
    min_timestep: int | None
    max_timestep: int | None
    noise_offset: float | None
    noise_offset_random_strength: bool
    adaptive_noise_scale: float | None
    multires_noise_iterations: int | None
    multires_noise_discount: float
    ip_noise_gamma: float | None
    ip_noise_gamma_random_strength: bool
    loss_type: str
    huber_schedule: str
    huber_c: float
    huber_scale: float
    min_snr_gamma: float | None
    scale_v_pred_loss_like_noise_pred: bool
    v_pred_like_loss: float | None
    debiased_estimation_loss: bool
    weighted_captions: bool = False  # `(word:1.2)` syntax in captions (trainer.models.prompt_weights)

    @classmethod
    def from_config(cls, cfg: Any, *, v_parameterization: bool, latent_scale: float) -> "DiffusionSettings":
        names = [f for f in cls.__dataclass_fields__ if f not in ("v_parameterization", "latent_scale")]
        return cls(v_parameterization=v_parameterization, latent_scale=latent_scale,
                   **{n: getattr(cfg, n) for n in names})


@dataclass(frozen=True)
class StepParts:
    """Everything one loss computation reads, and nothing else."""
    models: Any                   # trainer.models.load.LoadedModels (frozen UNet, VAE, text encoders, scheduler)
    settings: DiffusionSettings
    device: torch.device
    autocast: Callable[[], ContextManager]  # accelerate's autocast for --mixed_precision
    weight_dtype: torch.dtype     # the frozen base weights' dtype
    train_text_encoder: bool      # text-encoder LoRA modules learn: encode with gradients
    text_cache: Any = None        # SDXL --cache_text_encoder_outputs: trainer.train.text_cache's cache


def compute_loss(parts: StepParts, batch: dict, *, timestep: int | None = None,
                 latent_nans: LatentNaNs | None = None) -> torch.Tensor:
    """One micro-batch's loss (a scalar), sd-scripts' order of noise, prediction and weighting.

    `timestep` fixes the timestep of the whole batch (validation) instead of sampling one per image.
    `latent_nans` collects NaN-latent flags to read later (training steps); without it they are read at once."""
    s, models, device = parts.settings, parts.models, parts.device
    latents = batch_latents(batch, models.vae, s.latent_scale, device, parts.weight_dtype, family=models.family,
                            nans=latent_nans)
    if parts.text_cache is not None:  # SDXL --cache_text_encoder_outputs
        conditioning = parts.text_cache.conditioning(batch, device)
    else:
        with torch.set_grad_enabled(parts.train_text_encoder and torch.is_grad_enabled()):
            conditioning = encode_batch(models, batch, max_token_length=s.max_token_length, clip_skip=s.clip_skip,
                                        device=device, weighted=s.weighted_captions)
    low, high = (s.min_timestep, s.max_timestep) if timestep is None else (timestep, timestep)
    timesteps = N.sample_timesteps(latents.shape[0], low, high, device)
    noise = N.make_noise(latents, noise_offset=s.noise_offset, offset_random_strength=s.noise_offset_random_strength,
                         adaptive_noise_scale=s.adaptive_noise_scale, multires_iterations=s.multires_noise_iterations,
                         multires_discount=s.multires_noise_discount)
    noisy = N.noisy_latents(models.noise_scheduler, latents, noise, timesteps, ip_noise_gamma=s.ip_noise_gamma,
                            ip_random_strength=s.ip_noise_gamma_random_strength)
    with parts.autocast():
        prediction = models.unet(noisy.to(parts.weight_dtype), timesteps,
                                 **conditioning.unet_kwargs(parts.weight_dtype)).sample
    target = N.training_target(models.noise_scheduler, latents, noise, timesteps, s.v_parameterization)
    mask = batch.get("alpha_masks")
    return weighted_loss(prediction, target, timesteps, batch["loss_weights"].to(device, non_blocking=True), s,
                         models.noise_scheduler.alphas_cumprod,
                         mask=None if mask is None else mask.to(device, non_blocking=True))


def weighted_loss(prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                  loss_weights: torch.Tensor, s: DiffusionSettings, alphas_cumprod: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    c = N.huber_c(timesteps, alphas_cumprod, loss_type=s.loss_type, schedule=s.huber_schedule, c=s.huber_c,
                  scale=s.huber_scale)
    elementwise = N.apply_loss_mask(N.elementwise_loss(prediction, target, s.loss_type, c), mask)
    per_sample = elementwise.mean(dim=(1, 2, 3)) * loss_weights
    per_sample = per_sample * N.sample_weights(
        N.snr(alphas_cumprod, timesteps), v_parameterization=s.v_parameterization, min_snr_gamma=s.min_snr_gamma,
        scale_v_pred_loss_like_noise_pred=s.scale_v_pred_loss_like_noise_pred,
        v_pred_like_loss=s.v_pred_like_loss, debiased_estimation=s.debiased_estimation_loss)
    return per_sample.mean()


def batch_latents(batch: dict, vae, latent_scale: float, device, dtype: torch.dtype, *,
                  family: str = "sd1", nans: LatentNaNs | None = None) -> torch.Tensor:
    """Cached latents, or the VAE's sample of the images; scaled as the UNet expects.

    NaN latents come from a VAE overflowing in fp16 (SDXL's VAE does): they are replaced by 0 (as sd-scripts
    does) without asking the GPU whether there are any; their flag goes to `nans`, checked later. Without
    `nans` they are checked here (a GPU sync): an fp16 SDXL VAE is an error naming the fix, else a warning."""
    # Batches come in pageable memory; a blocking copy would also wait for all queued GPU work.
    if batch.get("latents") is not None:
        latents = batch["latents"].to(device, non_blocking=True)
    else:
        vae_dtype = next(vae.parameters()).dtype
        with torch.no_grad():
            latents = vae.encode(batch["images"].to(device, vae_dtype, non_blocking=True)).latent_dist.sample()
            found = torch.isnan(latents).any()
            latents = torch.where(found, torch.nan_to_num(latents, nan=0.0), latents)
        checker = nans if nans is not None else LatentNaNs()
        checker.add(found, batch, family, vae_dtype)
        if nans is None:
            checker.check()
    return (latents * latent_scale).to(dtype)
