"""trainer.models.families: the one table of model families and shipped architectures."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from trainer.errors import ConfigError
from trainer.models.families import (
    ARCHITECTURES,
    FAMILY_OF,
    architecture,
    architecture_for_config,
    build_architecture,
    tokenizers_for,
)
from trainer.paths import MODEL_CONFIGS_DIR
from trainer.presets import load_preset, preset_prefix, preset_tiers

PRESETS = Path(__file__).resolve().parents[1] / "presets"


def test_architecture_comes_from_the_config_flags():
    cfg = load_preset(PRESETS / "sd15-6gb.toml")
    assert architecture_for_config(cfg) == "sd15"
    assert architecture_for_config(load_preset(PRESETS / "demo.toml")) == "tiny-sd1"
    assert architecture_for_config(dataclasses.replace(cfg, sdxl=True)) == "sdxl"
    assert architecture_for_config(dataclasses.replace(cfg, v2=True, v_parameterization=True)) == "sd2-768-v"
    assert architecture_for_config(dataclasses.replace(cfg, v2=True)) == "sd2-512"


def test_every_architecture_has_its_shipped_configs_and_preset_tiers():
    for name, arch in ARCHITECTURES.items():
        assert (MODEL_CONFIGS_DIR / name / "unet" / "config.json").is_file(), name
        assert FAMILY_OF[name] == arch.family and preset_prefix(arch.family) == arch.preset_prefix
        assert preset_tiers(arch.preset_prefix), f"no presets/{arch.preset_prefix}-<N>gb.toml"
    assert (MODEL_CONFIGS_DIR / "sdxl" / "text_encoder_2").is_dir()


def test_unknown_architecture_names_the_choices():
    with pytest.raises(ConfigError, match="sd15.*sdxl"):
        architecture("sd16")


def test_sdxl_is_built_with_two_text_encoders_and_two_tokenizers_on_the_meta_device():
    with torch.device("meta"):
        parts = build_architecture("sdxl", dtype=torch.float16, vae_dtype=torch.float32)
    assert len(parts["text_encoders"]) == 2 and len(tokenizers_for("sdxl")) == 2
    assert next(parts["unet"].parameters()).dtype == torch.float16
    assert next(parts["vae"].parameters()).dtype == torch.float32
