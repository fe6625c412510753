"""--masked_loss: mask-image subsets (image_dir + conditioning_data_dir) in the dataset config and on the
command line, masks cropped and flipped with their images, cached with latents, and applied to the loss."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_dreambooth_folder, make_image
from PIL import Image
from safetensors import safe_open

from trainer.config.args import parse_train_args
from trainer.data.config import DatasetSpec, SubsetSpec, load_dataset_config, resolve_datasets
from trainer.data.dataset import build_train_dataset
from trainer.errors import ConfigError, DatasetError
from trainer.train.run import run_training

RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "マスク data"


def write_toml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def toml_path(path: Path) -> str:
    return path.as_posix()  # forward slashes: valid in TOML strings on every OS


def arguments(**values) -> SimpleNamespace:
    defaults = dict(resolution="64", masked_loss=True, caption_extension=".txt")
    return SimpleNamespace(**{**defaults, **values})


# --- the dataset config -----------------------------------------------------------------------------------

MASK_TOML = """
[general]
caption_extension = ".txt"
resolution = 64
[[datasets]]
[[datasets.subsets]]
image_dir = "{images}"
conditioning_data_dir = "{masks}"
num_repeats = 3
{extra}
"""


def test_mask_subsets_are_legal_with_masked_loss_and_resolve(root):
    config = write_toml(root / "データ set.toml", MASK_TOML.format(images=toml_path(root / "img"),
                                                                   masks=toml_path(root / "mask"), extra=""))
    user_config = load_dataset_config(config, masked_loss=True)
    [spec] = resolve_datasets(arguments(dataset_config=str(config), alpha_mask=True), user_config)
    [subset] = spec.subsets
    assert subset.conditioning_data_dir == toml_path(root / "mask") and subset.num_repeats == 3
    assert subset.caption_extension == ".txt" and subset.alpha_mask is False  # the mask images are the mask


def test_mask_subsets_without_masked_loss_name_the_flag(root):
    config = write_toml(root / "a b.toml", MASK_TOML.format(images="img", masks="mask", extra=""))
    with pytest.raises(ConfigError) as error:
        load_dataset_config(config)
    assert "datasets[0].subsets[0].conditioning_data_dir" in str(error.value)
    assert "--masked_loss" in str(error.value)


@pytest.mark.parametrize("extra, expected", [
    ("class_tokens = \"sks\"", "not available for mask subsets"),
    ("is_reg = true", "not available for mask subsets"),
    ("alpha_mask = true", "not available for mask subsets"),
])
def test_dreambooth_only_keys_are_refused_in_mask_subsets(root, extra, expected):
    config = write_toml(root / "c.toml", MASK_TOML.format(images="img", masks="mask", extra=extra))
    with pytest.raises(ConfigError, match=expected):
        load_dataset_config(config, masked_loss=True)


def test_mixing_mask_and_plain_subsets_in_one_dataset_is_refused(root):
    text = MASK_TOML.format(images="img", masks="mask", extra="") + '[[datasets.subsets]]\nimage_dir = "other"\n'
    with pytest.raises(ConfigError, match="every subset of a dataset must have conditioning_data_dir"):
        load_dataset_config(write_toml(root / "d.toml", text), masked_loss=True)


def test_conditioning_data_dir_outside_a_subset_is_refused(root):
    text = '[general]\nconditioning_data_dir = "mask"\n'
    with pytest.raises(ConfigError, match="only allowed inside a \\[\\[datasets.subsets\\]\\]"):
        load_dataset_config(write_toml(root / "e.toml", text), masked_loss=True)


def test_random_crop_is_refused_for_mask_subsets(root):
    config = write_toml(root / "f.toml", MASK_TOML.format(images="img", masks="mask", extra="random_crop = true"))
    with pytest.raises(ConfigError, match="random_crop: not supported for mask subsets"):
        resolve_datasets(arguments(), load_dataset_config(config, masked_loss=True))


# --- the command line: --train_data_dir + --conditioning_data_dir ----------------------------------------

def test_command_line_flat_folder_is_one_mask_subset(root):
    make_image(root / "images" / "a.png")
    [spec] = resolve_datasets(arguments(train_data_dir=str(root / "images"),
                                        conditioning_data_dir=str(root / "masks")), None)
    [subset] = spec.subsets
    assert subset.image_dir == str(root / "images") and subset.num_repeats == 1  # sd-scripts' ControlNet layout
    assert subset.conditioning_data_dir == str(root / "masks")


def test_command_line_dreambooth_folders_get_masks_per_folder_and_reg_stays_unmasked(root):
    make_dreambooth_folder(root / "train", "10_sks shape", n=1)
    make_dreambooth_folder(root / "train", "2_other", n=1)
    make_dreambooth_folder(root / "reg", "1_shape", n=1)
    (root / "masks" / "10_sks shape").mkdir(parents=True)
    specs = resolve_datasets(arguments(train_data_dir=str(root / "train"), reg_data_dir=str(root / "reg"),
                                       conditioning_data_dir=str(root / "masks")), None)
    masks = {Path(s.image_dir).name: s.conditioning_data_dir for s in specs[0].subsets}
    assert masks == {"10_sks shape": str(root / "masks" / "10_sks shape"), "2_other": str(root / "masks"),
                     "1_shape": None}


def test_command_line_masks_are_ignored_without_masked_loss(root, caplog):
    make_dreambooth_folder(root / "train", n=1)
    with caplog.at_level(logging.WARNING):
        [spec] = resolve_datasets(arguments(masked_loss=False, train_data_dir=str(root / "train"),
                                            conditioning_data_dir=str(root / "masks")), None)
    assert all(s.conditioning_data_dir is None for s in spec.subsets)
    assert "--masked_loss" in caplog.text


# --- masks follow their images ----------------------------------------------------------------------------

def two_colour_image(path: Path, size=(96, 64), split: int = 40) -> None:
    """Red left of column `split`, blue from it on; a mask with white exactly over the red part."""
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[:, :split] = RED
    array[:, split:] = BLUE
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def white_left_mask(path: Path, size=(96, 64), split: int = 40) -> None:
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[:, :split] = 255
    array[:, :, 1:] = 0  # only R counts: a red-on-black mask reads as white-on-black
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def mask_dataset(root: Path, enable_bucket: bool = True, repeats: int = 12):
    two_colour_image(root / "img" / "a 画像.png")
    white_left_mask(root / "mask" / "a 画像.png")
    two_colour_image(root / "img" / "b.png")
    white_left_mask(root / "mask" / "b.bmp", size=(48, 32), split=20)  # half size: stretched to the image
    subset = SubsetSpec(image_dir=str(root / "img"), conditioning_data_dir=str(root / "mask"), num_repeats=repeats,
                        flip_aug=True, caption_extension=".txt")
    spec = DatasetSpec(resolution=(64, 64), enable_bucket=enable_bucket, min_bucket_reso=32, max_bucket_reso=128,
                       bucket_reso_steps=32, subsets=(subset,))
    return build_train_dataset([spec], seed=0)


def masks_and_flips(data) -> list[tuple[torch.Tensor, torch.Tensor | None, bool]]:
    items = []
    for index in range(len(data)):
        batch = data[index]
        images = batch["images"] if batch["images"] is not None else [None] * len(batch["flipped"])
        items += list(zip(batch["alpha_masks"], images, batch["flipped"]))
    return items


@pytest.mark.parametrize("enable_bucket", [True, False])
def test_mask_stays_on_the_marked_half_after_crop_and_flip(root, enable_bucket):
    data = mask_dataset(root, enable_bucket)
    items = masks_and_flips(data)
    assert {flipped for _, _, flipped in items} == {True, False}
    for mask, image, flipped in items:
        assert mask.shape == (64, 64) and image.shape == (3, 64, 64)  # 96x64 centre-cropped by 16 px a side
        red = image[0] > 0  # R is +1 on the red part, -1 on the blue
        edge = 40 if flipped else 24  # the colour boundary after the crop (and the mirror)
        keep = torch.ones(64, dtype=torch.bool)
        keep[edge - 2:edge + 2] = False  # the stretched half-size mask is blurred at the boundary
        assert torch.equal(mask[:, keep] > 0.5, red[:, keep])
        assert torch.all((mask[:, keep] < 0.02) | (mask[:, keep] > 0.98))


@pytest.mark.parametrize("enable_bucket", [False, True])
def test_alpha_mask_resize_keeps_colours_under_zero_alpha(root, enable_bucket):
    """Pillow premultiplies RGBA when resizing, which blackens colours under alpha 0; sd-scripts (OpenCV) keeps
    them for the VAE. Left half pure red with alpha 0, right half blue and opaque; 192x128 -> 96x64 -> crop 64."""
    rgba = np.zeros((128, 192, 4), dtype=np.uint8)
    rgba[:, :96] = (255, 0, 0, 0)
    rgba[:, 96:] = (0, 0, 255, 255)
    folder = root / "1_half"
    folder.mkdir(parents=True)
    Image.fromarray(rgba, "RGBA").save(folder / "半分.png")
    (folder / "半分.txt").write_text("half", encoding="utf-8")
    args = arguments(train_data_dir=str(root), masked_loss=False, alpha_mask=True, enable_bucket=enable_bucket,
                     min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=64)
    data = build_train_dataset(resolve_datasets(args, None), seed=0)
    data.set_epoch(1)
    batch = data[0]
    image, mask = batch["images"][0], batch["alpha_masks"][0]
    assert image.shape == (3, 64, 64) and mask.shape == (64, 64)
    red, blue = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])
    assert torch.allclose(image[:, :, :32], red[:, None, None].expand(3, 64, 32))  # not black
    assert torch.allclose(image[:, :, 32:], blue[:, None, None].expand(3, 64, 32))
    assert torch.equal(mask[:, :32], torch.zeros(64, 32)) and torch.equal(mask[:, 32:], torch.ones(64, 32))


def fake_encode(images: torch.Tensor) -> torch.Tensor:
    pooled = torch.nn.functional.avg_pool2d(images, 8)
    return torch.cat([pooled, pooled[:, :1]], dim=1)  # 4 "latent" channels


@pytest.mark.parametrize("to_disk", [False, True])
def test_masks_follow_cached_latents(root, to_disk):
    data = mask_dataset(root)
    data.cache_latents(fake_encode, vae_batch_size=2, to_disk=to_disk)
    if to_disk:  # sd-scripts' npz keys only: its alpha_mask key means the image's own alpha
        npz = next((root / "img").glob("*_sd.npz"))
        with np.load(npz) as cached:
            assert "alpha_mask" not in cached.files and "latents_flipped" in cached.files
    items = masks_and_flips(data)
    assert {flipped for _, _, flipped in items} == {True, False}
    for mask, _, flipped in items:
        columns = torch.arange(64)
        expected = columns >= 40 if flipped else columns < 24  # the red part after the crop (and the mirror)
        keep = (columns - (40 if flipped else 24)).abs() > 2
        assert torch.equal((mask > 0.5)[:, keep], expected[keep].expand(64, -1))


def test_missing_mask_names_the_image_and_the_expected_path(root):
    make_image(root / "img" / "one.png")
    make_image(root / "img" / "two 二.png")
    white_left_mask(root / "mask" / "one.png")
    subset = SubsetSpec(image_dir=str(root / "img"), conditioning_data_dir=str(root / "mask"))
    with pytest.raises(DatasetError) as error:
        build_train_dataset([DatasetSpec(resolution=(64, 64), subsets=(subset,))], seed=0)
    message = str(error.value)
    assert str(root / "img" / "two 二.png") in message and str(root / "mask" / "two 二.png") in message
    assert "one.png" not in message


def test_missing_mask_folder_is_a_dataset_error(root):
    make_image(root / "img" / "one.png")
    subset = SubsetSpec(image_dir=str(root / "img"), conditioning_data_dir=str(root / "nowhere"))
    with pytest.raises(DatasetError, match="Mask folder not found"):
        build_train_dataset([DatasetSpec(resolution=(64, 64), subsets=(subset,))], seed=0)


# --- end to end ----------------------------------------------------------------------------------------------

def black_masks_for(folder: Path, masks: Path) -> None:
    for png in folder.glob("*.png"):
        masks.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", Image.open(png).size, (0, 0, 0)).save(masks / png.name)


def lora_ups(path) -> list[torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return [f.get_tensor(k) for k in f.keys() if "lora_up" in k]


def training_args(model_dir, out_dir, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model_dir), "--output_dir", str(out_dir),
            "--output_name", "masked lora", "--resolution", "64", "--caption_extension", ".txt",
            "--network_module", "networks.lora", "--network_dim", "4", "--learning_rate", "1e-3",
            "--max_train_steps", "2", "--train_batch_size", "2", "--seed", "1", "--max_data_loader_n_workers", "0",
            "--masked_loss", *extra]


def test_all_black_masks_from_a_dataset_config_train_nothing(tiny_sd1_dir, root):
    images = make_dreambooth_folder(root, "画像 images", n=2)
    black_masks_for(images, root / "mask images")
    config = write_toml(root / "dataset config.toml", MASK_TOML.format(
        images=toml_path(images), masks=toml_path(root / "mask images"), extra=""))
    final = run_training(parse_train_args(training_args(tiny_sd1_dir, root / "out", "--dataset_config",
                                                        str(config))), listeners=[])
    assert all(not t.any() for t in lora_ups(final))


def test_all_black_masks_from_the_command_line_train_nothing_with_cached_latents(tiny_sd1_dir, root):
    images = make_dreambooth_folder(root / "train", "10_sks shape", n=2)
    black_masks_for(images, root / "masks")
    final = run_training(parse_train_args(training_args(
        tiny_sd1_dir, root / "out", "--train_data_dir", str(root / "train"), "--conditioning_data_dir",
        str(root / "masks"), "--cache_latents")), listeners=[])
    assert all(not t.any() for t in lora_ups(final))
