"""--full_fp16 (fp16 LoRA with a GradScaler that may unscale fp16 gradients) and --torch_compile/--dynamo_backend."""

import logging

import pytest
import torch
from conftest import read_lora

from trainer.config.args import parse_train_args
from trainer.errors import ConfigError
from trainer.models.compile import check_backend, compile_unet
from trainer.network.lora import network_from_args
from trainer.train.events import Reporter
from trainer.train.optim import build_optimizer
from trainer.train.precision import allow_fp16_unscale, fp16_optimizer_args

ARGS = ["--pretrained_model_name_or_path", "model.safetensors", "--train_data_dir", "data"]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")


def run_args(model_dir, data_dir, out_dir, *extra):
    return ["--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(data_dir),
            "--output_dir", str(out_dir), "--output_name", "lora", "--resolution", "64", "--caption_extension",
            ".txt", "--network_dim", "4", "--learning_rate", "1e-3", "--max_train_steps", "2",
            "--train_batch_size", "2", "--seed", "1", "--max_data_loader_n_workers", "0", *extra]


# ------------------------------------------------------------------------------------------- full_fp16

@pytest.mark.parametrize("extra", [[], ["--mixed_precision", "bf16"]])
def test_full_fp16_needs_mixed_precision_fp16(extra):
    with pytest.raises(ConfigError) as e:
        parse_train_args(ARGS + ["--full_fp16", *extra])
    assert e.value.problems == [f"--full_fp16 needs --mixed_precision fp16 (got {extra[-1] if extra else 'no'})."]
    assert parse_train_args(ARGS + ["--full_fp16", "--mixed_precision", "fp16"]).full_fp16


def test_full_bf16_needs_mixed_precision_bf16():
    with pytest.raises(ConfigError, match="--full_bf16 needs --mixed_precision bf16"):
        parse_train_args(ARGS + ["--full_bf16", "--mixed_precision", "fp16"])


def scaled_fp16_grads(scaler, grad_values):
    """An fp16 parameter whose gradient, after `scaler.scale(loss).backward()`, is scale * grad_values."""
    param = torch.nn.Parameter(torch.zeros(len(grad_values), dtype=torch.float16))
    loss = (param.float() * torch.tensor(grad_values)).sum()
    scaler.scale(loss).backward()
    return param


def test_patched_scaler_unscales_fp16_gradients_and_still_skips_overflow():
    plain = torch.amp.GradScaler("cpu", init_scale=1024.0)
    param = scaled_fp16_grads(plain, [0.5, -0.25])
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        plain.unscale_(torch.optim.SGD([param], lr=1.0))

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    allow_fp16_unscale(scaler)
    param = scaled_fp16_grads(scaler, [0.5, -0.25])
    assert param.grad.tolist() == [512.0, -256.0]
    optimizer = torch.optim.SGD([param], lr=1.0)
    scaler.unscale_(optimizer)  # as accelerate does before clipping
    assert param.grad.dtype == torch.float16 and param.grad.tolist() == [0.5, -0.25]
    scaler.step(optimizer)
    scaler.update()
    assert param.tolist() == [-0.5, 0.25]

    overflow = scaled_fp16_grads(scaler, [1e4, 1.0])  # 1e4 * 1024 is inf in fp16
    optimizer = torch.optim.SGD([overflow], lr=1.0)
    scaler.step(optimizer)
    scaler.update()
    assert overflow.tolist() == [0.0, 0.0] and scaler.get_scale() == 512.0  # step skipped, scale halved

    with pytest.raises(ValueError):  # only the patched instance changed, not torch's class
        fresh = torch.amp.GradScaler("cpu")
        fresh.unscale_(torch.optim.SGD([scaled_fp16_grads(fresh, [1.0])], lr=1.0))


def fp16_adamw_step(optimizer_args):
    """One AdamW step on fp16 weights through the patched scaler; grads: 0 (lora_down at step 1) and tiny."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    allow_fp16_unscale(scaler)
    param = scaled_fp16_grads(scaler, [0.0, 1e-6, 1e-3])
    optimizer, described = build_optimizer("AdamW", [{"params": [param]}], 1e-3, optimizer_args)
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([param], 1.0)
    scaler.step(optimizer)
    scaler.update()
    return param.detach(), described


def test_full_fp16_adamw_is_fused_so_zero_gradients_do_not_give_nan():
    args = fp16_optimizer_args("AdamW", ["weight_decay=0.01"])
    assert args == ["weight_decay=0.01", "fused=True"]
    weights, described = fp16_adamw_step(args)
    assert "fused=True" in described
    assert weights.dtype == torch.float16 and torch.isfinite(weights).all()
    assert weights[0] == 0 and weights[1] < 0 and weights[2] < 0  # no gradient: no step; tiny ones still count
    unfused, _ = fp16_adamw_step(["foreach=True"])  # what plain fp16 AdamW does: 0/0 with eps rounded to 0
    assert torch.isnan(unfused).any()


def test_fp16_optimizer_args_leave_other_choices_alone(caplog):
    assert fp16_optimizer_args("SGDNesterov", ["momentum=0.9"]) == ["momentum=0.9"]
    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert fp16_optimizer_args("AdamW", ["foreach=True"]) == ["foreach=True"]
    assert "NaN" in caplog.text
    assert fp16_optimizer_args("AdamW", ["fused=True"]) == ["fused=True"]


@no_cuda
def test_full_fp16_on_cpu_trains_fp32_with_a_warning(tiny_sd1_dir, train_data_dir, tmp_path, caplog):
    from trainer.train.build import prepare_training
    from trainer.train.loop import train

    cfg = parse_train_args(run_args(tiny_sd1_dir, train_data_dir, tmp_path, "--mixed_precision", "fp16",
                                    "--full_fp16"))
    with caplog.at_level(logging.WARNING, logger="trainer"):
        setup = prepare_training(cfg, Reporter())
    assert "--full_fp16 needs fp16 autocast on a CUDA GPU" in caplog.text
    assert {p.dtype for p in setup.network.parameters()} == {torch.float32}
    tensors, meta = read_lora(train(setup, Reporter()))
    assert {t.dtype for k, t in tensors.items() if k.endswith("weight")} == {torch.float32}
    assert meta["ss_full_fp16"] == "False" and meta["ss_mixed_precision"] == "no"


# ------------------------------------------------------------------------------------------- torch.compile

def unet_with_lora(tiny_sd1):
    unet = tiny_sd1["unet"].requires_grad_(False)
    network = network_from_args([tiny_sd1["text_encoder"]], unet, {}, rank=4, alpha=1)
    network.apply_to(apply_text_encoder=False, apply_unet=True)
    torch.manual_seed(0)
    for p in network.parameters():
        torch.nn.init.normal_(p, std=0.1)  # lora_up starts at 0: make the LoRA change the output
    return unet, network


def unet_step(unet, network):
    """The UNet's output and the LoRA's gradients (none when the LoRA is off) for one fixed input."""
    torch.manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, unet.config.cross_attention_dim)
    network.zero_grad(set_to_none=True)
    out = unet(x, torch.tensor([10, 500]), encoder_hidden_states=context).sample
    if not out.requires_grad:
        return out, []
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in network.parameters()]


def test_compiled_unet_runs_the_lora_hooks(tiny_sd1):
    unet, network = unet_with_lora(tiny_sd1)
    eager_out, eager_grads = unet_step(unet, network)
    network.set_multiplier(0.0)
    base_out, _ = unet_step(unet, network)
    network.set_multiplier(1.0)
    assert (eager_out - base_out).abs().max() > 1e-3

    assert compile_unet(unet, "aot_eager", "cpu")  # traces forward and backward, runs them without codegen
    out, grads = unet_step(unet, network)
    assert unet._compiled_call_impl is not None
    torch.testing.assert_close(out, eager_out)
    assert len(grads) == len(eager_grads) > 0
    for grad, eager in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager)
    network.set_multiplier(0.0)  # a changed multiplier is seen by the compiled UNet
    torch.testing.assert_close(unet_step(unet, network)[0], base_out)


def test_unknown_backend_is_a_config_error():
    assert check_backend("Aot_Eager") == "aot_eager"
    with pytest.raises(ConfigError, match='--dynamo_backend inductr: not a torch.compile backend.*did you mean '
                                          '"inductor"'):
        check_backend("inductr")


def test_dynamo_backend_alone_only_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="trainer"):
        cfg = parse_train_args(ARGS + ["--dynamo_backend", "eager"])
    assert cfg.dynamo_backend == "eager" and not cfg.torch_compile
    assert "--dynamo_backend eager has no effect without --torch_compile" in caplog.text


def test_backend_without_its_compiler_falls_back_to_eager_with_one_warning(tiny_sd1, monkeypatch, caplog):
    import torch._inductor.config

    # what a Windows user without MSVC meets: inductor finds no C++ compiler
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("no-such-c++-compiler",))
    unet = tiny_sd1["unet"]
    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert not compile_unet(unet, "inductor", "cpu")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "inductor backend does not work here" in warnings[0] and "C++ compiler" in warnings[0]
    assert "training without torch.compile" in warnings[0]
    assert unet._compiled_call_impl is None


def test_torch_compile_trains_a_lora(tiny_sd1_dir, train_data_dir, tmp_path):
    from trainer.train.build import prepare_training
    from trainer.train.loop import train

    cfg = parse_train_args(run_args(tiny_sd1_dir, train_data_dir, tmp_path, "--torch_compile", "--dynamo_backend",
                                    "eager", "--network_train_unet_only"))
    setup = prepare_training(cfg, Reporter())
    assert setup.models.unet._compiled_call_impl is not None
    tensors, _ = read_lora(train(setup, Reporter()))
    ups = [t for k, t in tensors.items() if "lora_up" in k]
    assert all(torch.isfinite(t).all() for t in ups) and any(t.abs().sum() > 0 for t in ups)
