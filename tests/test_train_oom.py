"""Running out of GPU memory: one message naming the phase and what to lower; the weights so far are kept."""

import json
from types import SimpleNamespace

import torch

from trainer.cli import main
from trainer.presets import lower_tier, memory_advice

OOM = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def base_args(model_dir, data_dir, out_dir, *extra):
    return ["--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(data_dir),
            "--output_dir", str(out_dir), "--output_name", "my lora", "--resolution", "64",
            "--caption_extension", ".txt", "--network_dim", "4", "--max_train_steps", "4",
            "--train_batch_size", "2", "--seed", "1", "--max_data_loader_n_workers", "0", *extra]


def oom_on_call(monkeypatch, n):
    from trainer.train import loop

    real, calls = loop.compute_loss, {"n": 0}

    def compute_loss(setup, batch, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(setup, batch, **kwargs)

    monkeypatch.setattr(loop, "compute_loss", compute_loss)


def test_oom_in_training_names_the_step_the_settings_and_keeps_the_weights(
        tiny_sd1_dir, train_data_dir, tmp_path, monkeypatch, capsys):
    oom_on_call(monkeypatch, 3)
    code = main(["train", *base_args(tiny_sd1_dir, train_data_dir, tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "Out of GPU memory while training step 3" in err and "Traceback" not in err
    saved = tmp_path / "my lora-step00000002.safetensors"
    assert saved.exists() and not (tmp_path / "my lora.safetensors").exists()
    assert str(saved) in err and "--network_weights" in err
    # biggest saving first, for this config (batch 2, no checkpointing, no latent cache, text encoder trained)
    order = ["train_batch_size = 1 (now 2) with gradient_accumulation_steps = 2", "gradient_checkpointing = true",
             "cache_latents = true", "network_train_unet_only = true", "fp8_base = true", "presets/sd15-6gb.toml"]
    positions = [err.find(text) for text in order]
    assert -1 not in positions and positions == sorted(positions), positions
    failed = [json.loads(line) for line in (tmp_path / "my lora.events.jsonl").read_text(encoding="utf-8")
              .splitlines() if '"failed"' in line]
    assert failed and "Out of GPU memory" in failed[-1]["reason"]


def test_oom_on_the_first_step_saves_nothing(tiny_sd1_dir, train_data_dir, tmp_path, monkeypatch, capsys):
    oom_on_call(monkeypatch, 1)
    code = main(["train", *base_args(tiny_sd1_dir, train_data_dir, tmp_path, "--gradient_checkpointing",
                                     "--train_batch_size", "1")])
    assert code == 2
    err = capsys.readouterr().err
    assert "training step 1" in err and "Nothing was trained yet" in err
    assert "gradient_checkpointing = true" not in err and "train_batch_size = 1" not in err  # already set
    assert not list(tmp_path.glob("*.safetensors"))


def test_oom_while_caching_latents_names_that_phase(tiny_sd1_dir, train_data_dir, tmp_path, monkeypatch, capsys):
    from diffusers import AutoencoderKL

    def encode(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(AutoencoderKL, "encode", encode)
    code = main(["train", *base_args(tiny_sd1_dir, train_data_dir, tmp_path, "--cache_latents",
                                     "--vae_batch_size", "4")])
    assert code == 2
    err = capsys.readouterr().err
    assert "while caching latents" in err and "vae_batch_size = 1 (now 4)" in err
    assert "train_batch_size" not in err  # the training batch does not matter while caching


def cfg(**overrides):
    values = dict(train_batch_size=1, gradient_accumulation_steps=1, gradient_checkpointing=True,
                  cache_latents=True, cache_text_encoder_outputs=False, train_text_encoder=True, sdxl=False,
                  v2=False, resolution=(1024, 1024), enable_bucket=True, max_bucket_reso=2048,
                  mixed_precision="bf16", fp8_base=False, fp8_base_unet=False, vae_batch_size=1, config_file=None, network_dim=16)
    return SimpleNamespace(**{**values, **overrides})


def test_sdxl_steps_cache_the_text_encoders_then_shrink_the_pictures():
    steps = memory_advice(cfg(sdxl=True), "sdxl", "train", 8.0)
    text = " | ".join(steps)
    assert text.index("cache_text_encoder_outputs = true with network_train_unet_only = true") < \
        text.index("max_bucket_reso = 1024 (now 2048)") < text.index('resolution = "896"') < \
        text.index("fp8_base = true") < text.index("presets/sdxl-8gb.toml")


def test_lower_tier_steps_down_from_the_preset_in_use_or_fits_the_card():
    assert "presets/sd15-6gb.toml" in lower_tier(cfg(config_file="presets/sd15-8gb.toml"), "sd1", None)
    assert "presets/sdxl-6gb.toml" in lower_tier(cfg(config_file="presets/sdxl-8gb.toml"), "sdxl", None)
    assert lower_tier(cfg(config_file="presets/sdxl-6gb.toml"), "sdxl", None) is None  # already the lowest
    assert "presets/sd15-12gb.toml" in lower_tier(cfg(), "sd1", 11.9)
