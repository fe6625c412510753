"""trainer.tools.memory: the GPU memory estimate, made on the CPU from fake tensors.

The parameter and optimizer parts are checked against a real optimizer step of the tiny model (bytes summed
from the tensors themselves); the activation part against what autograd saves and against the same step on
real tensors, and for scaling with batch size, resolution and gradient checkpointing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from trainer import presets
from trainer.presets import load_preset
from trainer.tools import memory
from trainer.tools.memory import CudaAutocastLike, LiveBytes, estimate_training_memory

TINY = dict(resolution=64, mixed_precision="no", network_dim=8, train_text_encoder=True, cache_latents=True)
PARAMETER_TOLERANCE = 0.05  # tiny tensors: the estimate rounds each to the CUDA allocator's 512-byte blocks


@pytest.fixture(autouse=True)
def one_thread():
    """Real-tensor steps with one torch thread: on a shared 2-core machine two threads wait for each other at
    every operation. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_full_size_parameter_counts_match_the_published_architectures():
    # SD 1.5: UNet 859.52 M, CLIP-L 123.06 M, VAE 83.65 M; SDXL: UNet 2.567 B, OpenCLIP bigG 694.66 M
    assert memory.parameter_counts("sd15") == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    sdxl = memory.parameter_counts("sdxl")
    assert sdxl["unet"] == 2_567_463_684 and sdxl["text_encoder_2"] == 694_659_840


def test_optimizer_states_by_optimizer():
    shapes = [torch.Size([16, 320]), torch.Size([320, 16]), torch.Size([4])]
    n = 16 * 320 * 2 + 4
    assert memory.optimizer_state_bytes("AdamW", shapes) == (2 * 4 * n, None)
    assert memory.optimizer_state_bytes("Lion", shapes)[0] == 4 * n
    # 8-bit: one byte per state from 4096 elements (+ absmax per 256), fp32 below
    eight = memory.optimizer_state_bytes("AdamW8bit", shapes)[0]
    assert eight == 2 * (2 * (5120 + 20 * 4) + 4 * 4)
    assert memory.optimizer_state_bytes("Adafactor", shapes)[0] == ((16 + 320) * 2 + 4) * 4
    size, note = memory.optimizer_state_bytes("some.module.NewOptimizer", shapes)
    assert size == 2 * 4 * n and "assumed" in note


def test_parameters_and_optimizer_match_a_real_optimizer_step(tmp_path):
    from trainer.tools import bench

    cfg = dataclasses.replace(load_preset("presets/demo.toml"), train_batch_size=1,
                              max_data_loader_n_workers=0, cache_latents=False, network_dim=8)
    cfg = bench.bench_config(cfg, family="tiny-sd1", folder=tmp_path, steps=1, resolution=(64, 64), batch_size=1)
    bench.write_pictures(tmp_path / "img", (64, 64), count=2, caption_extension=cfg.caption_extension)
    models = bench.build_random_models("tiny-sd1", dtype=torch.float32, vae_dtype=torch.float32, device="cpu")
    from trainer.train.events import Reporter

    setup = bench.prepare_with_models(cfg, models, Reporter())
    bench.run_steps(setup, 1)
    network = setup.accelerator.unwrap_model(setup.network)
    frozen = [t for m in (models.unet, models.vae, *models.text_encoders) for t in (*m.parameters(), *m.buffers())]
    lora = [*network.parameters(), *network.buffers()]
    # AdamW's 0-dim step counters are left out: a few bytes, not worth modelling
    states = [v for state in setup.optimizer.state.values() for v in state.values() if v.dim() > 0]
    assert states  # the step really ran

    estimate = estimate_training_memory("tiny-sd1", **dict(TINY, cache_latents=False))
    d = estimate.details
    assert d["trainable_parameters"] == sum(p.numel() for p in network.parameters() if p.requires_grad)
    # Counted the allocator's way (512-byte blocks), each part is exact ...
    for name, tensors in (("frozen_bytes", frozen), ("lora_bytes", lora), ("optimizer_bytes", states)):
        assert d[name] == pytest.approx(memory.allocated_bytes(tensors), rel=0.005), name
    # ... and the plain sum of tensor sizes is within the stated tolerance (rounding only shows on tiny tensors).
    measured = sum(t.nbytes for t in (*frozen, *lora, *states))
    estimated = d["frozen_bytes"] + d["lora_bytes"] + d["optimizer_bytes"]
    assert measured <= estimated <= measured * (1 + PARAMETER_TOLERANCE)


def test_activations_scale_with_batch_and_resolution():
    def peak(**overrides):
        return estimate_training_memory("tiny-sd1", **dict(TINY, **overrides)).details["step_peak_bytes"]

    base = peak(batch_size=1)
    assert 1.7 < peak(batch_size=2) / base < 2.3  # per-sample activations dominate
    assert 3.0 < peak(resolution=128) / base < 4.6  # 4x the pixels, attention O(tokens) with SDPA


def test_gradient_checkpointing_and_fp16_lower_the_activations():
    full = estimate_training_memory("tiny-sd1", **dict(TINY, resolution=128))
    checkpointed = estimate_training_memory("tiny-sd1", **dict(TINY, resolution=128, gradient_checkpointing=True))
    half = estimate_training_memory("tiny-sd1", **dict(TINY, resolution=128, mixed_precision="fp16"))
    assert checkpointed.activations_gb < 0.8 * full.activations_gb
    assert half.activations_gb < full.activations_gb
    assert half.details["frozen_bytes"] < 0.55 * full.details["frozen_bytes"]  # fp16 weights
    assert half.total_gb == pytest.approx(half.parameters_gb + half.optimizer_gb + half.activations_gb)


def test_live_byte_count_agrees_with_what_autograd_saves():
    """Independent check of the counting: after a forward pass, the live bytes are the saved activations."""
    torch.manual_seed(0)
    parts, network = memory.training_models("tiny-sd1", dtype=torch.float32, vae_dtype=torch.float32, rank=8,
                                            conv_rank=None, train_text_encoder=False, gradient_checkpointing=False)
    weights = {t.untyped_storage().data_ptr() for m in (network, parts["unet"]) for t in m.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, 77, 32)
    tracker = LiveBytes()
    tracker.known([*network.parameters(), *parts["unet"].parameters(), *parts["unet"].buffers(), x, context])
    with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = parts["unet"](x, torch.tensor([10, 500]), encoder_hidden_states=context).sample
    assert out.requires_grad
    assert sum(saved.values()) <= tracker.live < 1.05 * sum(saved.values())


def test_fake_trace_equals_the_same_step_on_real_tensors():
    torch.manual_seed(0)
    args = dict(dtype=torch.float32, vae_dtype=torch.float32, rank=8, conv_rank=None, train_text_encoder=True,
                gradient_checkpointing=False)
    step = dict(batch=2, size=(64, 64), dtype=torch.float32, cache_latents=False)
    real = memory.step_peak_bytes(*memory.training_models("tiny-sd1", **args), "tiny-sd1", **step)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = memory.step_peak_bytes(*memory.training_models("tiny-sd1", **args), "tiny-sd1", **step)
    assert fake == pytest.approx(real, rel=0.02)


def test_cuda_autocast_rules_are_replayed_on_the_cpu():
    x32, w32 = torch.randn(2, 8), torch.randn(4, 8)
    x16 = torch.randn(1, 8, 4, 4, dtype=torch.float16)
    with CudaAutocastLike(torch.float16):
        assert F.linear(x32, w32).dtype == torch.float16  # matmuls in half
        assert F.group_norm(x16, 4).dtype == torch.float32  # norms in float32, as on CUDA
        assert F.silu(x16).dtype == torch.float16  # others keep their input's dtype
    assert F.linear(x32, w32).dtype == torch.float32


def test_estimate_for_a_config_and_the_card_margin():

    cfg = load_preset("presets/demo.toml")
    estimate = memory.estimate_for_config(cfg, "tiny-sd1")
    assert estimate.details["resolution"] == [64, 64] and estimate.details["batch_size"] == cfg.train_batch_size
    assert estimate.needs_card_gb == pytest.approx(max(estimate.total_gb, estimate.caching_gb) * presets.FRAGMENTATION
                                                   + presets.CUDA_OVERHEAD_GB)
    with pytest.raises(Exception, match="sd15"):
        memory.estimate_training_memory("sd16", resolution=64)


def test_fp8_storage_follows_diffusers_layerwise_casting_as_training_uses_it():
    """--fp8_base: the estimate's fp8 layers hold the same bytes, and a step needs the same memory, as with
    diffusers' apply_layerwise_casting (what trainer.train.build.freeze_models applies) on real tensors."""
    from diffusers.hooks import apply_layerwise_casting

    args = dict(dtype=torch.bfloat16, vae_dtype=torch.bfloat16, rank=8, conv_rank=None, train_text_encoder=False,
                gradient_checkpointing=False)
    step = dict(batch=2, size=(64, 64), dtype=torch.bfloat16, cache_latents=True)
    torch.manual_seed(0)
    parts, network = memory.training_models("tiny-sd1", **args)
    apply_layerwise_casting(parts["unet"], storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    fp8 = [p for p in parts["unet"].parameters() if p.dtype == torch.float8_e4m3fn]
    real = memory.step_peak_bytes(parts, network, "tiny-sd1", **step)
    emulated_parts, emulated_network = memory.training_models("tiny-sd1", fp8_unet=True, **args)
    emulated_fp8 = [p for p in emulated_parts["unet"].parameters() if p.dtype == torch.float8_e4m3fn]
    emulated = memory.step_peak_bytes(emulated_parts, emulated_network, "tiny-sd1", **step)
    assert fp8 and memory.allocated_bytes(emulated_fp8) == memory.allocated_bytes(fp8)
    # diffusers re-creates each fp8 weight after every forward; the counter sees those copies but not the
    # originals going away (they existed before it started), so the real count is high by the fp8 bytes.
    assert real - memory.allocated_bytes(fp8) == pytest.approx(emulated, rel=0.03)


def test_fp8_and_full_bf16_in_the_estimate():
    plain = estimate_training_memory("tiny-sd1", **dict(TINY, mixed_precision="bf16"))
    fp8 = estimate_training_memory("tiny-sd1", **dict(TINY, mixed_precision="bf16", fp8_base=True))
    assert fp8.details["frozen_bytes"] < 0.75 * plain.details["frozen_bytes"]
    assert any("gradient_checkpointing" in note for note in fp8.notes)
    half = estimate_training_memory("tiny-sd1", **dict(TINY, mixed_precision="bf16", full_bf16=True))
    assert half.details["optimizer_bytes"] == pytest.approx(plain.details["optimizer_bytes"] / 2, rel=0.02)


def test_loha_and_lokr_are_counted_by_their_own_factors():
    """LoHa has two factor pairs where LoRA has one (twice the parameters, same rank); a full-matrix LoKr holds
    out_l*in_m + out_k*in_n per layer, far fewer than a LoRA; each type's delta costs activations in the step."""
    def estimate(module, **options):
        return memory.estimate_training_memory("sd15", resolution=64, network_dim=4, network_module=module,
                                               network_options=options)

    lora, loha = estimate("networks.lora"), estimate("networks.loha")
    lokr = memory.estimate_training_memory("sd15", resolution=64, network_dim=100000, network_module="networks.lokr")
    assert loha.details["trainable_parameters"] == 2 * lora.details["trainable_parameters"]
    assert lokr.details["trainable_parameters"] < lora.details["trainable_parameters"] / 4
    assert loha.activations_gb > lora.activations_gb  # the full-size delta of every layer is built each step
