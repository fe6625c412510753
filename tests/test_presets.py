"""The card presets: each one, exactly as shipped, trains on the tiny model with only its size scaled down.

What is replaced is what a user edits (model, folders, name) and what makes a run long (resolution, epochs,
worker processes); every memory and training setting of the tier stays as the preset has it. On a CPU, fp16
falls back to fp32 with a warning, as it does for a user without a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_dreambooth_folder
from safetensors import safe_open

from trainer.config.args import parse_train_args
from trainer.train.events import RecordingListener
from trainer.train.run import run_training

PRESETS = Path(__file__).resolve().parents[1] / "presets"
CARD_PRESETS = sorted(PRESETS.glob("*gb.toml"))


def test_every_card_tier_has_a_preset():
    names = {p.stem for p in CARD_PRESETS}
    assert {"sd15-6gb", "sd15-8gb", "sd15-12gb", "sd2-8gb", "sdxl-6gb", "sdxl-8gb", "sdxl-12gb"} <= names


@pytest.mark.parametrize("preset", CARD_PRESETS, ids=lambda p: p.stem)
def test_preset_trains_on_the_tiny_model_with_its_own_settings(preset, request, tmp_path):
    family = preset.stem.split("-")[0]  # sd15, sd2, sdxl
    sdxl = family == "sdxl"
    model = request.getfixturevalue({"sd15": "tiny_sd1_dir", "sd2": "tiny_sd2_dir", "sdxl": "tiny_sdxl_dir"}[family])
    data = tmp_path / "img"
    make_dreambooth_folder(data, folder="1_sks shape", n=2)  # one epoch = one or two steps
    shipped = parse_train_args(["--config_file", str(preset)])
    cfg = parse_train_args(["--config_file", str(preset), "--pretrained_model_name_or_path", str(model),
                            "--train_data_dir", str(data), "--output_dir", str(tmp_path / "out"),
                            "--resolution", "64", "--min_bucket_reso", "64", "--max_bucket_reso", "128",
                            "--max_train_epochs", "1", "--max_data_loader_n_workers", "0"])
    for name in ("network_dim", "network_alpha", "optimizer_type", "gradient_checkpointing", "cache_latents",
                 "cache_text_encoder_outputs", "network_train_unet_only", "train_batch_size", "mixed_precision",
                 "no_half_vae", "sdpa", "xformers", "save_precision", "lr_scheduler", "v2", "v_parameterization",
                 "fp8_base", "fp8_base_unet"):
        assert getattr(cfg, name) == getattr(shipped, name), name  # the tier's settings are untouched
    recorder = RecordingListener()
    final = run_training(cfg, listeners=[recorder])
    assert final.name == f"{shipped.output_name}.safetensors" and recorder.of("finished")
    with safe_open(str(final), "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata()
    prefix = "lora_unet_" if cfg.network_train_unet_only else "lora_"
    assert keys and all(k.startswith(prefix) for k in keys)
    assert metadata["ss_network_dim"] == str(shipped.network_dim)
    assert metadata["ss_base_model_version"] == {"sd15": "sd_v1", "sd2": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}[family]
    assert metadata["ss_v2"] == str(family == "sd2")
