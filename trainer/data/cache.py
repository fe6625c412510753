"""Latent and text-encoder-output cache files with sd-scripts' names and npz keys (library/strategy_*.py), so caches
made by either tool are reused by the other.

Latents: `<image path without extension>_<W:04d>x<H:04d>_sd.npz` (SD1/2) or `_sdxl.npz` (SDXL), W x H
being the original image size, keys `latents` [4, h/8, w/8] (unscaled), `original_size` [W, H],
`crop_ltrb` [l, t, r, b], optional `latents_flipped` and `alpha_mask` [H, W]. A legacy `<stem>.npz` is
used instead when it exists. Writes go through a temporary file, so an interrupted run leaves no broken
cache behind.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.files import atomic_path

logger = logging.getLogger(__name__)

LATENTS_SUFFIX = {"sd1": "_sd.npz", "sd2": "_sd.npz", "sdxl": "_sdxl.npz"}
TE_OUTPUTS_SUFFIX = "_te_outputs.npz"


@dataclass
class CachedLatents:
    """Arrays of one cache file; shapes as in the module docstring."""

    latents: np.ndarray
    original_size: tuple[int, int]
    crop_ltrb: tuple[float, float, float, float]
    latents_flipped: np.ndarray | None = None
    alpha_mask: np.ndarray | None = None


def latents_npz_path(image_path: str | Path, image_size: tuple[int, int], family: str) -> Path:
    """The cache file for an image of `image_size` (W, H) and model family ("sd1", "sd2" or "sdxl")."""
    if family not in LATENTS_SUFFIX:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(LATENTS_SUFFIX)}")
    image_path = Path(image_path)
    base = image_path.with_suffix("")
    legacy = base.with_name(base.name + ".npz")
    if legacy.exists():  # sd-scripts still reads the old name when present
        return legacy
    return base.with_name(f"{base.name}_{image_size[0]:04d}x{image_size[1]:04d}{LATENTS_SUFFIX[family]}")


def image_size_from_npz_name(npz_path: str | Path) -> tuple[int, int] | None:
    """(W, H) encoded in a cache file name, or None for names without it."""
    parts = Path(npz_path).name[:-len(".npz")].split("_")
    if len(parts) < 3:
        return None
    width, _, height = parts[-2].partition("x")
    if not (width.isdigit() and height.isdigit()):
        return None
    return int(width), int(height)


def latents_npz_is_valid(npz_path: str | Path, bucket_reso: tuple[int, int], *, flip_aug: bool, alpha_mask: bool,
                         skip_check: bool = False) -> bool:
    """True when the file exists and holds what training needs (latents of the bucket's size, plus the
    flipped latents / alpha mask when those are used). `skip_check` trusts any existing file."""
    npz_path = Path(npz_path)
    if not npz_path.is_file():
        return False
    if skip_check:
        return True
    expected = (bucket_reso[1] // 8, bucket_reso[0] // 8)
    try:
        with np.load(npz_path) as npz:
            keys = set(npz.files)
            if not {"latents", "original_size", "crop_ltrb"} <= keys:
                return False
            if tuple(npz["latents"].shape[-2:]) != expected:  # made for another resolution: re-encode
                return False
            if flip_aug and "latents_flipped" not in keys:
                return False
            if alpha_mask and "alpha_mask" not in keys:
                return False
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        logger.warning("unreadable latent cache %s; it will be encoded again", npz_path)
        return False
    return True


def save_latents_npz(npz_path: str | Path, latents, original_size: tuple[int, int], crop_ltrb,
                     latents_flipped=None, alpha_mask=None) -> None:
    """Write (or update: other keys already in the file are kept) one latent cache file.

    Tensors or arrays are accepted; everything is stored as float32 as sd-scripts does (`.float()`).
    """
    npz_path = Path(npz_path)
    arrays: dict[str, np.ndarray] = {}
    if npz_path.is_file():
        try:
            with np.load(npz_path) as old:
                arrays = {key: old[key] for key in old.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            arrays = {}
    arrays["latents"] = _float32(latents)
    arrays["original_size"] = np.array(original_size)
    arrays["crop_ltrb"] = np.array(crop_ltrb)
    if latents_flipped is not None:
        arrays["latents_flipped"] = _float32(latents_flipped)
    if alpha_mask is not None:
        arrays["alpha_mask"] = _float32(alpha_mask)
    with atomic_path(npz_path) as temp, open(temp, "wb") as file:
        np.savez(file, **arrays)  # a file object, so numpy does not append ".npz" to the temporary name


def load_latents_npz(npz_path: str | Path) -> CachedLatents:
    with np.load(npz_path) as npz:
        return CachedLatents(
            latents=npz["latents"],
            original_size=tuple(npz["original_size"].tolist()),
            crop_ltrb=tuple(npz["crop_ltrb"].tolist()),
            latents_flipped=npz["latents_flipped"] if "latents_flipped" in npz.files else None,
            alpha_mask=npz["alpha_mask"] if "alpha_mask" in npz.files else None,
        )


def te_outputs_npz_path(image_path: str | Path) -> Path:
    """SDXL text-encoder output cache: `<image path without extension>_te_outputs.npz`."""
    base = Path(image_path).with_suffix("")
    return base.with_name(base.name + TE_OUTPUTS_SUFFIX)


def te_outputs_npz_is_valid(npz_path: str | Path) -> bool:
    npz_path = Path(npz_path)
    if not npz_path.is_file():
        return False
    try:
        with np.load(npz_path) as npz:
            return {"hidden_state1", "hidden_state2", "pool2"} <= set(npz.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False


def save_te_outputs_npz(npz_path: str | Path, hidden_state1, hidden_state2, pool2) -> None:
    """Keys hidden_state1 [n*75+2, 768], hidden_state2 [.., 1280], pool2 [1280]; bf16 is stored as float32."""
    arrays = {"hidden_state1": _numpy(hidden_state1), "hidden_state2": _numpy(hidden_state2), "pool2": _numpy(pool2)}
    with atomic_path(npz_path) as temp, open(temp, "wb") as file:
        np.savez(file, **arrays)


def load_te_outputs_npz(npz_path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(npz_path) as npz:
        return npz["hidden_state1"], npz["hidden_state2"], npz["pool2"]


def _float32(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        import torch

        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16
            value = value.float()
        value = value.numpy()
    return np.asarray(value)
