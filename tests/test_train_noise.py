"""Timesteps, noise and loss weighting, as sd-scripts' train_network.py computes them."""

import math

import torch
from diffusers import DDPMScheduler

from trainer.train import noise as N


def scheduler():
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False)


def test_timesteps_respect_bounds():
    t = N.sample_timesteps(1000, 200, 300, "cpu")
    assert t.dtype == torch.long and t.min() >= 200 and t.max() < 300
    assert N.sample_timesteps(4, None, None, "cpu").max() < 1000
    assert torch.equal(N.sample_timesteps(3, 500, 500, "cpu"), torch.full((3,), 500))


def test_noise_features_off_give_plain_gaussian_noise():
    latents = torch.randn(2, 4, 8, 8)
    torch.manual_seed(0)
    plain = N.make_noise(latents)
    torch.manual_seed(0)
    assert torch.equal(plain, torch.randn_like(latents))


def test_noise_offset_shifts_channel_means():
    latents = torch.zeros(64, 4, 8, 8)
    torch.manual_seed(0)
    plain = N.make_noise(latents)
    torch.manual_seed(0)
    offset = N.make_noise(latents, noise_offset=1.0)
    per_channel_shift = (offset - plain).mean(dim=(2, 3))
    assert per_channel_shift.std() > 0.5  # one shared offset per sample and channel
    assert torch.allclose((offset - plain).std(dim=(2, 3)), torch.zeros(64, 4), atol=1e-5)


def test_pyramid_noise_is_normalised():
    noise = N.pyramid_noise(torch.randn(2, 4, 32, 32), iterations=6, discount=0.3)
    assert math.isclose(noise.std().item(), 1.0, rel_tol=1e-4)


def test_ip_noise_gamma_changes_only_the_input():
    sch, latents, noise = scheduler(), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    assert torch.equal(N.noisy_latents(sch, latents, noise, t), sch.add_noise(latents, noise, t))
    assert not torch.equal(N.noisy_latents(sch, latents, noise, t, ip_noise_gamma=0.1),
                           sch.add_noise(latents, noise, t))


def test_v_prediction_target():
    sch, latents, noise, t = scheduler(), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([500])
    assert torch.equal(N.training_target(sch, latents, noise, t, False), noise)
    a = sch.alphas_cumprod[500]
    expected = a.sqrt() * noise - (1 - a).sqrt() * latents
    assert torch.allclose(N.training_target(sch, latents, noise, t, True), expected, atol=1e-5)


def test_min_snr_weights_match_formula():
    snr = torch.tensor([0.5, 5.0, 50.0])
    w = N.sample_weights(snr, v_parameterization=False, min_snr_gamma=5.0, scale_v_pred_loss_like_noise_pred=False,
                         v_pred_like_loss=None, debiased_estimation=False)
    assert torch.allclose(w, torch.tensor([1.0, 1.0, 0.1]))
    wv = N.sample_weights(snr, v_parameterization=True, min_snr_gamma=5.0, scale_v_pred_loss_like_noise_pred=False,
                          v_pred_like_loss=None, debiased_estimation=False)
    assert torch.allclose(wv, torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))


def test_other_weightings():
    snr = torch.tensor([1.0, 4.0])
    kw = dict(v_parameterization=False, min_snr_gamma=None, scale_v_pred_loss_like_noise_pred=False,
              v_pred_like_loss=None, debiased_estimation=False)
    assert torch.equal(N.sample_weights(snr, **kw), torch.ones(2))
    assert torch.allclose(N.sample_weights(snr, **{**kw, "debiased_estimation": True}), torch.tensor([1.0, 0.5]))
    assert torch.allclose(N.sample_weights(snr, **{**kw, "scale_v_pred_loss_like_noise_pred": True}),
                          torch.tensor([0.5, 0.8]))
    assert torch.allclose(N.sample_weights(snr, **{**kw, "v_pred_like_loss": 0.5}), torch.tensor([2.0, 1.625]))


def test_losses():
    pred, target = torch.zeros(2, 1, 1, 1), torch.tensor([1.0, -2.0]).view(2, 1, 1, 1)
    assert torch.equal(N.elementwise_loss(pred, target, "l2").flatten(), torch.tensor([1.0, 4.0]))
    assert torch.equal(N.elementwise_loss(pred, target, "l1").flatten(), torch.tensor([1.0, 2.0]))
    c = torch.tensor([0.1, 0.1])
    huber = N.elementwise_loss(pred, target, "huber", c).flatten()
    assert torch.allclose(huber, 2 * 0.1 * ((torch.tensor([1.0, 4.0]) + 0.01).sqrt() - 0.1))
    smooth = N.elementwise_loss(pred, target, "smooth_l1", c).flatten()
    assert torch.allclose(smooth, 2 * ((torch.tensor([1.0, 4.0]) + 0.01).sqrt() - 0.1))


def test_huber_c_schedules():
    ac = scheduler().alphas_cumprod
    t = torch.tensor([0, 999])
    assert N.huber_c(t, ac, loss_type="l2", schedule="snr", c=0.1, scale=1.0) is None
    assert torch.allclose(N.huber_c(t, ac, loss_type="huber", schedule="constant", c=0.1, scale=2.0),
                          torch.tensor([0.2, 0.2]))
    exp = N.huber_c(t, ac, loss_type="huber", schedule="exponential", c=0.1, scale=1.0)
    assert math.isclose(exp[0].item(), 1.0) and math.isclose(exp[1].item(), 0.1 ** 0.999, rel_tol=1e-5)
    snr_c = N.huber_c(t, ac, loss_type="huber", schedule="snr", c=0.1, scale=1.0)
    assert snr_c[0] > 0.9 and abs(snr_c[1].item() - 0.1) < 0.01  # large at low noise, -> c at high noise


def test_loss_mask_is_area_averaged_to_latent_size():
    loss = torch.ones(1, 4, 2, 2)
    mask = torch.zeros(1, 16, 16)
    mask[:, :8, :] = 1.0  # top half of the picture counts
    masked = N.apply_loss_mask(loss, mask)
    assert torch.equal(masked[0, :, 0], torch.ones(4, 2)) and torch.equal(masked[0, :, 1], torch.zeros(4, 2))
    assert N.apply_loss_mask(loss, None) is loss
