"""Hashes and modelspec keys stored in a LoRA file's metadata (sd-scripts' train_util.py, sai_model_spec.py).

No torch at import: `sshs_hashes` imports safetensors' torch helpers only when called.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import logging
import mimetypes
from pathlib import Path
from typing import Mapping

logger = logging.getLogger(__name__)

MODELSPEC_VERSION = "1.0.1"
FAMILIES = ("sd1", "sd2", "sdxl")
IMPLEMENTATION_SGM = "https://github.com/Stability-AI/generative-models"  # SDXL LoRA
IMPLEMENTATION_DIFFUSERS = "diffusers"  # SD1.x / SD2.x LoRA

# The A1111 "old" hash and sshs_legacy_hash both read 64 KiB at 1 MiB.
_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"model family must be one of {', '.join(FAMILIES)}, got {family!r}")


def base_model_version(family: str, v_parameterization: bool) -> str:
    """ss_base_model_version: sd_v1, sd_v1_v, sd_v2, sd_v2_v or sdxl_base_v1-0 (sd-scripts' values)."""
    _check_family(family)
    if family == "sdxl":
        return "sdxl_base_v1-0"
    return ("sd_v1" if family == "sd1" else "sd_v2") + ("_v" if v_parameterization else "")


def _legacy_hash(blob: bytes) -> str:
    return hashlib.sha256(blob[_LEGACY_OFFSET:_LEGACY_OFFSET + _LEGACY_LENGTH]).hexdigest()[:8]


def sshs_hashes(state_dict: Mapping, metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-webui-additional-networks computes them: serialise the
    tensors with only the ss_* metadata; the model hash is the SHA-256 of the bytes after the 8-byte
    length and the JSON header, the legacy hash the first 8 hex of the SHA-256 of 64 KiB at 1 MiB of the
    whole blob (for a small file an empty read: e3b0c442)."""
    from safetensors.torch import save

    training_metadata = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    blob = save(dict(state_dict), training_metadata)
    header_length = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_length:]).hexdigest()
    return model_hash, _legacy_hash(blob)


def a1111_model_hashes(path: str | Path) -> tuple[str, str]:
    """(old A1111 hash, full-file SHA-256) of a model file, for ss_sd_model_hash / ss_new_sd_model_hash."""
    full = hashlib.sha256()
    with open(path, "rb") as file:
        file.seek(_LEGACY_OFFSET)
        old = hashlib.sha256(file.read(_LEGACY_LENGTH)).hexdigest()[:8]
        file.seek(0)
        while chunk := file.read(1 << 20):
            full.update(chunk)
    return old, full.hexdigest()


def _architecture(family: str, v_parameterization: bool) -> str:
    if family == "sdxl":
        return "stable-diffusion-xl-v1-base/lora"
    if family == "sd2":
        return ("stable-diffusion-v2-768-v" if v_parameterization else "stable-diffusion-v2-512") + "/lora"
    return "stable-diffusion-v1/lora"


def _default_resolution(family: str, v_parameterization: bool) -> tuple[int, int]:
    if family == "sdxl":
        return (1024, 1024)
    return (768, 768) if family == "sd2" and v_parameterization else (512, 512)


def _thumbnail_data_url(thumbnail: str) -> str | None:
    """A thumbnail is stored as a data URL; a file path is read and encoded, a missing file is skipped."""
    if thumbnail.startswith("data:"):
        return thumbnail
    path = Path(thumbnail)
    if not path.is_file():
        logger.warning("thumbnail file not found, not stored in the metadata: %s", path)
        return None
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def modelspec_metadata(*, family: str, v_parameterization: bool, title: str | None,
                       resolution: tuple[int, int] | None, timestamp: float, clip_skip: int | None,
                       min_timestep: int | None, max_timestep: int | None, description: str | None = None,
                       author: str | None = None, license: str | None = None, tags: str | None = None,
                       usage_hint: str | None = None, thumbnail: str | None = None,
                       merged_from: str | None = None, trigger_phrase: str | None = None,
                       preprocessor: str | None = None, is_negative_embedding: str | bool | None = None,
                       implementation_version: str) -> dict[str, str]:
    """The `modelspec.*` keys of a LoRA file (library/sai_model_spec.py). `resolution` is (W, H); None gives the family
    default. `title` None gives `LoRA@<timestamp>`. Keys whose value is None are left out."""
    _check_family(family)
    width, height = resolution or _default_resolution(family, v_parameterization)
    timestep_range = None
    if min_timestep is not None or max_timestep is not None:
        timestep_range = f"{0 if min_timestep is None else min_timestep},{1000 if max_timestep is None else max_timestep}"
    values = {
        "sai_model_spec": MODELSPEC_VERSION,
        "architecture": _architecture(family, v_parameterization),
        "implementation": IMPLEMENTATION_SGM if family == "sdxl" else IMPLEMENTATION_DIFFUSERS,
        "title": title if title else f"LoRA@{timestamp}",
        "resolution": f"{width}x{height}",
        "description": description,
        "author": author,
        # Local time without zone, whole seconds, as sd-scripts writes it.
        "date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "implementation_version": implementation_version,
        "license": license,
        "usage_hint": usage_hint,
        "thumbnail": _thumbnail_data_url(thumbnail) if thumbnail else None,
        "tags": tags,
        "merged_from": merged_from,
        "trigger_phrase": trigger_phrase,
        "prediction_type": "v" if v_parameterization else "epsilon",
        "timestep_range": timestep_range,
        "encoder_layer": None if clip_skip is None else str(clip_skip),
        "preprocessor": preprocessor,
        "is_negative_embedding": is_negative_embedding,
    }
    return {f"modelspec.{key}": str(value) for key, value in values.items() if value is not None}
