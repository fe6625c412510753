"""Hash and modelspec metadata as sd-scripts writes it (sshs_* and A1111 hashes, library/sai_model_spec.py)."""

from __future__ import annotations

import datetime
import hashlib
import subprocess
import sys

import pytest

from trainer.network.metadata import a1111_model_hashes, base_model_version, modelspec_metadata, sshs_hashes


def spec(**overrides) -> dict[str, str]:
    values = dict(family="sd1", v_parameterization=False, title="my lora", resolution=None, timestamp=1_700_000_000.5,
                  clip_skip=None, min_timestep=None, max_timestep=None, implementation_version="trainer/0.1.0")
    return modelspec_metadata(**(values | overrides))


def test_metadata_module_does_not_import_torch():
    code = "import sys, trainer.network.metadata, trainer.network.keys; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("family, v, expected", [
    ("sd1", False, "sd_v1"), ("sd1", True, "sd_v1_v"), ("sd2", False, "sd_v2"), ("sd2", True, "sd_v2_v"),
    ("sdxl", False, "sdxl_base_v1-0"),
])
def test_base_model_version(family, v, expected):
    assert base_model_version(family, v) == expected


@pytest.mark.parametrize("family, v, architecture, implementation, resolution", [
    ("sd1", False, "stable-diffusion-v1/lora", "diffusers", "512x512"),
    ("sd2", False, "stable-diffusion-v2-512/lora", "diffusers", "512x512"),
    ("sd2", True, "stable-diffusion-v2-768-v/lora", "diffusers", "768x768"),
    ("sdxl", False, "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models",
     "1024x1024"),
])
def test_modelspec_architecture_implementation_and_default_resolution(family, v, architecture, implementation,
                                                                       resolution):
    metadata = spec(family=family, v_parameterization=v)
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["modelspec.implementation"] == implementation
    assert metadata["modelspec.resolution"] == resolution
    assert metadata["modelspec.prediction_type"] == ("v" if v else "epsilon")


def test_modelspec_fixed_keys_and_formats():
    metadata = spec(resolution=(768, 512), clip_skip=2, author="me", tags="a,b")
    assert metadata["modelspec.sai_model_spec"] == "1.0.1"
    assert metadata["modelspec.title"] == "my lora"
    assert metadata["modelspec.resolution"] == "768x512"  # W x H
    assert metadata["modelspec.date"] == datetime.datetime.fromtimestamp(1_700_000_000).isoformat()
    assert len(metadata["modelspec.date"]) == 19  # local time to the second, no zone
    assert metadata["modelspec.encoder_layer"] == "2"
    assert metadata["modelspec.implementation_version"] == "trainer/0.1.0"
    assert metadata["modelspec.author"] == "me" and metadata["modelspec.tags"] == "a,b"
    assert "modelspec.timestep_range" not in metadata and "modelspec.license" not in metadata
    assert "modelspec.hash_sha256" not in metadata
    assert all(isinstance(v, str) for v in metadata.values())


def test_modelspec_title_fallback_and_timestep_range():
    metadata = spec(title=None, min_timestep=100, max_timestep=None)
    assert metadata["modelspec.title"] == "LoRA@1700000000.5"
    assert metadata["modelspec.timestep_range"] == "100,1000"
    assert spec(max_timestep=500)["modelspec.timestep_range"] == "0,500"


def test_thumbnail_file_becomes_data_url_and_missing_file_is_skipped(tmp_path):
    image = tmp_path / "サム ネイル.png"
    image.write_bytes(b"\x89PNG fake")
    assert spec(thumbnail=str(image))["modelspec.thumbnail"] == "data:image/png;base64,iVBORyBmYWtl"
    assert "modelspec.thumbnail" not in spec(thumbnail=str(tmp_path / "missing.png"))


def test_a1111_hashes(tmp_path):
    path = tmp_path / "model file.safetensors"
    data = bytes(range(256)) * (5 * 4096 + 7)  # ~5 MiB, not a multiple of the chunk size
    path.write_bytes(data)
    old, new = a1111_model_hashes(path)
    assert old == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert new == hashlib.sha256(data).hexdigest()


def test_sshs_hashes_use_only_ss_metadata_and_read_past_the_header():
    import torch

    tensors = {"b.weight": torch.arange(600_000, dtype=torch.float32).reshape(1000, 600), "a.alpha": torch.tensor(1)}
    model_hash, legacy_hash = sshs_hashes(tensors, {"ss_seed": "1"})
    # Keys outside ss_* (modelspec, sshs) do not change either hash.
    assert sshs_hashes(tensors, {"ss_seed": "1", "modelspec.title": "x" * 500}) == (model_hash, legacy_hash)
    other_model, other_legacy = sshs_hashes(tensors, {"ss_seed": "123456789"})
    assert other_model == model_hash  # the model hash covers tensor bytes only
    assert other_legacy != legacy_hash  # the legacy hash window moves with the header
    assert len(model_hash) == 64 and len(legacy_hash) == 8
