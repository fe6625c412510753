"""Latent caching with a fake encoder: sd-scripts' file names and npz keys, reuse, and what may not be cached."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_dreambooth_folder, make_image

from trainer.data import cache as cache_files
from trainer.data.config import DatasetSpec, SubsetSpec
from trainer.data.dataset import build_train_dataset
from trainer.errors import ConfigError, DatasetError


class FakeEncoder:
    """(B,3,H,W) -> (B,4,H/8,W/8): pooled colours plus a constant channel; counts images encoded."""

    def __init__(self):
        self.images = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images += images.shape[0]
        pooled = F.avg_pool2d(images, 8)
        return torch.cat([pooled, torch.full_like(pooled[:, :1], 0.5)], dim=1)


def build(folder: Path, *, resolution=(32, 32), **subset_values):
    spec = DatasetSpec(resolution=resolution, batch_size=2, enable_bucket=True, min_bucket_reso=16,
                       max_bucket_reso=64, bucket_reso_steps=16,
                       subsets=(SubsetSpec(image_dir=str(folder), caption_extension=".txt", **subset_values),))
    return build_train_dataset([spec], seed=0)


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_dreambooth_folder(tmp_path / "キャッシュ data", "2_sks shape", n=3, size=(48, 32))


def test_disk_cache_names_keys_and_shapes_follow_sd_scripts(folder):
    data = build(folder, flip_aug=True)
    encoder, reports = FakeEncoder(), []
    data.cache_latents(encoder, vae_batch_size=2, to_disk=True, family="sd1",
                       progress=lambda done, total: reports.append((done, total)))
    assert encoder.images == 6  # 3 images, plus their mirrored copies
    assert reports == [(2, 3), (3, 3)]
    files = sorted(p.name for p in folder.glob("*.npz"))
    assert files == ["img_0_0048x0032_sd.npz", "img_1_0048x0032_sd.npz", "img_2_0048x0032_sd.npz"]
    with np.load(folder / files[0]) as npz:
        assert set(npz.files) == {"latents", "original_size", "crop_ltrb", "latents_flipped"}
        bucket = data.records[0].bucket_reso
        assert npz["latents"].shape == (4, bucket[1] // 8, bucket[0] // 8) and npz["latents"].dtype == np.float32
        assert npz["original_size"].tolist() == [48, 32]
        assert len(npz["crop_ltrb"]) == 4


def test_valid_cache_files_are_reused_and_stale_ones_redone(folder):
    build(folder).cache_latents(FakeEncoder(), vae_batch_size=4, to_disk=True)
    again = FakeEncoder()
    build(folder).cache_latents(again, vae_batch_size=4, to_disk=True)
    assert again.images == 0
    needs_flipped = FakeEncoder()
    build(folder, flip_aug=True).cache_latents(needs_flipped, vae_batch_size=4, to_disk=True)
    assert needs_flipped.images == 6  # latents_flipped was missing
    other_size = FakeEncoder()
    build(folder, resolution=(64, 64)).cache_latents(other_size, vae_batch_size=4, to_disk=True)
    assert other_size.images == 3  # latents of another bucket size: encoded again
    trusting = FakeEncoder()
    build(folder).cache_latents(trusting, vae_batch_size=4, to_disk=True, skip_cache_check=True)
    assert trusting.images == 0


def test_sdxl_suffix_and_the_legacy_npz_name(folder):
    image = folder / "img_0.png"
    assert cache_files.latents_npz_path(image, (48, 32), "sdxl").name == "img_0_0048x0032_sdxl.npz"
    (folder / "img_0.npz").write_bytes(b"")
    assert cache_files.latents_npz_path(image, (48, 32), "sd2") == folder / "img_0.npz"
    assert cache_files.image_size_from_npz_name(folder / "img_1_0048x0032_sdxl.npz") == (48, 32)
    assert cache_files.image_size_from_npz_name(folder / "img_0.npz") is None


def test_items_carry_cached_latents_and_flipped_latents(folder):
    for to_disk in (False, True):
        data = build(folder, flip_aug=True)
        data.cache_latents(FakeEncoder(), vae_batch_size=3, to_disk=to_disk)
        flips = set()
        for epoch in range(1, 4):
            data.set_epoch(epoch)
            for i in range(len(data)):
                batch = data[i]
                assert batch["images"] is None and batch["latents"].shape[:2] == (len(batch["image_paths"]), 4)
                assert torch.equal(batch["target_sizes_hw"][0], torch.tensor(batch["latents"].shape[2:]) * 8)
                for latents, flipped, path in zip(batch["latents"], batch["flipped"], batch["image_paths"]):
                    image = build_image_tensor(path, batch["target_sizes_hw"][0])
                    expected = FakeEncoder()(torch.flip(image, dims=[3]) if flipped else image)[0]
                    assert torch.allclose(latents, expected, atol=1e-5)
                    flips.add(flipped)
        assert flips == {False, True}


def build_image_tensor(path: str, target_hw: torch.Tensor) -> torch.Tensor:
    """The same centre-cropped bucket image the cache encoded, as (1,3,H,W) in [-1,1]."""
    import random

    from PIL import Image

    from trainer.data.buckets import BucketManager, resize_and_crop
    from trainer.data.dataset import image_to_tensor

    image = Image.open(path).convert("RGB")
    height, width = target_hw.tolist()
    resized = BucketManager.single((width, height)).select_bucket(*image.size)[1]
    array, _ = resize_and_crop(image, resized, (width, height), random_crop=False, rng=random.Random(0),
                               interpolation=None)
    return image_to_tensor(array)[None]


def test_existing_cache_files_are_updated_keeping_other_keys(tmp_path):
    path = tmp_path / "a_0016x0016_sd.npz"
    np.savez(path, extra=np.arange(3))
    cache_files.save_latents_npz(path, torch.zeros(4, 2, 2), (16, 16), (0, 0, 16, 16))
    with np.load(path) as npz:
        assert set(npz.files) == {"extra", "latents", "original_size", "crop_ltrb"}
    assert not list(tmp_path.glob("*.tmp-*"))  # written through a temporary file
    loaded = cache_files.load_latents_npz(path)
    assert loaded.original_size == (16, 16) and loaded.latents_flipped is None


def test_alpha_masks_are_cached_and_served(tmp_path):
    folder = tmp_path / "1_alpha"
    make_image(folder / "a.png", size=(32, 32), mode="RGBA")
    data = build(folder, alpha_mask=True)
    data.cache_latents(FakeEncoder(), vae_batch_size=1, to_disk=True)
    with np.load(next(folder.glob("*_sd.npz"))) as npz:
        assert npz["alpha_mask"].shape == (32, 32)
    assert data[0]["alpha_masks"].shape == (1, 32, 32)


def test_color_aug_and_random_crop_cannot_be_cached(folder):
    for values in ({"color_aug": True}, {"random_crop": True}):
        with pytest.raises(ConfigError, match="cannot be used with color_aug or random_crop"):
            build(folder, **values).cache_latents(FakeEncoder(), vae_batch_size=1, to_disk=False)


def test_nan_latents_are_reported_with_the_fix(folder):
    with pytest.raises(DatasetError, match="--no_half_vae"):
        build(folder).cache_latents(lambda x: FakeEncoder()(x) * float("nan"), vae_batch_size=1, to_disk=True)
    assert not list(folder.glob("*.npz"))


def test_text_encoder_output_cache_files(tmp_path):
    path = cache_files.te_outputs_npz_path(tmp_path / "img 1.png")
    assert path.name == "img 1_te_outputs.npz" and not cache_files.te_outputs_npz_is_valid(path)
    cache_files.save_te_outputs_npz(path, torch.ones(77, 8, dtype=torch.bfloat16), torch.ones(77, 16), torch.ones(16))
    assert cache_files.te_outputs_npz_is_valid(path)
    hidden1, hidden2, pool2 = cache_files.load_te_outputs_npz(path)
    assert hidden1.dtype == np.float32 and hidden2.shape == (77, 16) and pool2.shape == (16,)
