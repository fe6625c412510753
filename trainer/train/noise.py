"""Timesteps, noise and loss as sd-scripts computes them: pure functions of tensors and numbers.

Each feature that is off (None/0/False) returns its input unchanged, so the loop needs no `if`s."""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F


def sample_timesteps(batch: int, min_timestep: int | None, max_timestep: int | None, device) -> torch.Tensor:
    """Integer timesteps uniform in [min, max) (defaults 0 and 1000); min == max gives that constant."""
    low, high = min_timestep or 0, 1000 if max_timestep is None else max_timestep
    if low == high:
        return torch.full((batch,), high, dtype=torch.long, device=device)
    return torch.randint(low, high, (batch,), device=device, dtype=torch.long)


def make_noise(latents: torch.Tensor, *, noise_offset: float | None = None, offset_random_strength: bool = False,
               adaptive_noise_scale: float | None = None, multires_iterations: int | None = None,
               multires_discount: float = 0.3) -> torch.Tensor:
    """Gaussian noise with sd-scripts' optional offset and pyramid (multi-resolution) noise."""
    noise = torch.randn_like(latents)
    if noise_offset:
        # A random strength stays a tensor on the device: a .item() here would stall the GPU every step.
        offset = noise_offset * torch.rand((1, 1, 1, 1), device=latents.device) if offset_random_strength \
            else noise_offset
        if adaptive_noise_scale:
            mean = latents.mean(dim=(2, 3), keepdim=True).abs()
            offset = (offset + adaptive_noise_scale * mean).clamp(min=0)
        noise = noise + offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device)
    if multires_iterations:
        noise = pyramid_noise(noise, multires_iterations, multires_discount)
    return noise


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float) -> torch.Tensor:
    """Add upsampled low-resolution noise at random scales, then renormalise (multires noise)."""
    b, c, h, w = noise.shape
    for i in range(iterations):
        r = random.random() * 2 + 2  # scale factor in [2, 4), from Python's RNG: no device sync
        size = (max(1, int(h / r**i)), max(1, int(w / r**i)))
        noise = noise + F.interpolate(torch.randn(b, c, *size, device=noise.device), size=(h, w),
                                      mode="bilinear") * discount**i
        if size[0] == 1 or size[1] == 1:
            break
    return noise / noise.std()


def noisy_latents(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, *,
                  ip_noise_gamma: float | None = None, ip_random_strength: bool = False) -> torch.Tensor:
    """Forward diffusion; input perturbation adds extra noise to the input only, not to the target."""
    if ip_noise_gamma:
        gamma = ip_noise_gamma * (torch.rand(1, device=latents.device) if ip_random_strength else 1.0)
        noise = noise + gamma * torch.randn_like(latents)
    return scheduler.add_noise(latents, noise, timesteps)


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    v_parameterization: bool) -> torch.Tensor:
    return scheduler.get_velocity(latents, noise, timesteps) if v_parameterization else noise


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ/(1-ᾱ) at each timestep."""
    a = alphas_cumprod.to(timesteps.device)[timesteps]
    return a / (1 - a)


def huber_c(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, *, loss_type: str, schedule: str,
            c: float, scale: float) -> torch.Tensor | None:
    """Per-sample c for huber/smooth_l1 losses (None for l1/l2)."""
    if loss_type not in ("huber", "smooth_l1"):
        return None
    t = timesteps.float()
    if schedule == "constant":
        return torch.full_like(t, c * scale)
    if schedule == "exponential":
        return torch.exp(-t * (-math.log(c)) / 1000) * scale
    sigma = ((1 - alphas_cumprod.to(t.device)[timesteps]) / alphas_cumprod.to(t.device)[timesteps]).sqrt()
    return (1 - c) / (1 + sigma) ** 2 + c


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     c: torch.Tensor | None = None) -> torch.Tensor:
    """Loss per element, computed in fp32."""
    diff = pred.float() - target.float()
    if loss_type == "l2":
        return diff**2
    if loss_type == "l1":
        return diff.abs()
    c = c.view(-1, *([1] * (diff.dim() - 1)))
    smooth = 2 * ((diff**2 + c**2).sqrt() - c)
    return smooth * c if loss_type == "huber" else smooth


def apply_loss_mask(loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """--alpha_mask / --masked_loss: a (B, H, W) pixel mask in [0, 1] (alpha / 255 or a mask image's R / 255),
    area-averaged down to the latent size, weights the per-element loss."""
    if mask is None:
        return loss
    small = F.interpolate(mask.float().unsqueeze(1), size=loss.shape[2:], mode="area")
    return loss * small


def sample_weights(snr_t: torch.Tensor, *, v_parameterization: bool, min_snr_gamma: float | None,
                   scale_v_pred_loss_like_noise_pred: bool, v_pred_like_loss: float | None,
                   debiased_estimation: bool) -> torch.Tensor:
    """Per-sample factors applied after the per-sample mean, in sd-scripts' order.

    v_pred_like_loss adds loss*k*(s+1)/s, i.e. multiplies by 1 + k*(s+1)/s."""
    weight = torch.ones_like(snr_t)
    if min_snr_gamma:
        clipped = snr_t.clamp(max=min_snr_gamma)
        weight = weight * (clipped / (snr_t + 1) if v_parameterization else clipped / snr_t)
    s = snr_t.clamp(max=1000)
    if scale_v_pred_loss_like_noise_pred:
        weight = weight * s / (s + 1)
    if v_pred_like_loss:
        weight = weight * (1 + v_pred_like_loss * (s + 1) / s)
    if debiased_estimation:
        weight = weight * (1 / (s + 1) if v_parameterization else 1 / s.sqrt())
    return weight
