"""Bucket list, bucket choice and resize/crop as sd-scripts does them (make_bucket_resolutions,
BucketManager.select_bucket, trim_and_resize_if_required), with sd-scripts' numbers."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from trainer.data.buckets import (
    BucketManager,
    color_augment,
    crop_around_face,
    crop_ltrb_for,
    face_info_from_name,
    make_bucket_resolutions,
    resize_and_crop,
)
from trainer.errors import ConfigError


def gradient_image(width: int, height: int) -> Image.Image:
    ys, xs = np.mgrid[0:height, 0:width]
    array = np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), (xs + ys) % 256], axis=-1)
    return Image.fromarray(array.astype(np.uint8))


def test_bucket_list_for_512_matches_the_spec_exactly():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
        (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]


def test_bucket_list_for_sdxl_contains_the_square_and_respects_limits():
    resos = make_bucket_resolutions((1024, 1024), 512, 2048, 64)
    assert (1024, 1024) in resos and (1216, 832) in resos and (832, 1216) in resos
    assert all(512 <= w <= 2048 and 512 <= h <= 2048 and w * h <= 1024 * 1024 for w, h in resos)


@pytest.mark.parametrize("size, bucket, resized", [
    ((1200, 800), (640, 384), (640, 427)),   # sd-scripts' own example
    ((512, 512), (512, 512), (512, 512)),    # exactly a bucket
    ((256, 256), (512, 512), (512, 512)),    # small images are upscaled
    ((800, 1200), (384, 640), (427, 640)),
    ((640, 384), (640, 384), (640, 384)),    # a predefined size is used as is
    ((3000, 500), (1024, 256), (1536, 256)),  # very wide: the widest bucket, cover by height
])
def test_select_bucket_normal_mode(size, bucket, resized):
    manager = BucketManager(False, (512, 512), 256, 1024, 64)
    chosen, resized_size, ar_error = manager.select_bucket(*size)
    assert (chosen, resized_size) == (bucket, resized)
    assert ar_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])


def test_select_bucket_no_upscale_only_shrinks_and_floors_to_steps():
    manager = BucketManager(True, (512, 512), 256, 1024, 64)
    assert manager.select_bucket(300, 200)[:2] == ((256, 192), (300, 200))  # small: not resized, cropped
    # 2000x1000 -> area 512^2 keeping 2:1 -> 724x362; rounding the height keeps 2:1 exactly
    assert manager.select_bucket(2000, 1000)[:2] == ((640, 320), (640, 320))


@pytest.mark.parametrize("max_reso, min_size, steps", [((64, 64), 0, 64), ((32, 32), 32, 64), ((64, 64), 64, 0)])
def test_settings_that_make_a_zero_size_bucket_are_a_config_error(max_reso, min_size, steps):
    with pytest.raises(ConfigError, match="bucket of size 0"):
        BucketManager(False, max_reso, min_size, 128, steps)


def test_no_upscale_image_thinner_than_a_step_does_not_divide_by_zero():
    manager = BucketManager(True, (512, 512), 256, 1024, 64)
    bucket, resized, _ = manager.select_bucket(100, 40)  # the caller reports the 0-high bucket with the file
    assert (bucket, resized) == ((64, 0), (100, 40))


def test_single_bucket_covers_the_resolution():
    manager = BucketManager.single((512, 512))
    assert manager.select_bucket(1200, 800)[:2] == ((512, 512), (768, 512))
    assert manager.select_bucket(100, 50)[:2] == ((512, 512), (1024, 512))


def test_resize_and_crop_centre_crops_and_reports_the_sdxl_quirk_crop():
    image = gradient_image(1200, 800)
    array, crop = resize_and_crop(image, (640, 427), (640, 384), random_crop=False, rng=random.Random(0),
                                  interpolation=None)
    assert array.shape == (384, 640, 3) and array.dtype == np.uint8
    expected = np.asarray(image.resize((640, 427), Image.Resampling.BOX))[21:21 + 384]
    np.testing.assert_array_equal(array, expected)
    # crop_ltrb is the box of the image *fitted inside* the bucket, not the crop applied (an sd-scripts quirk)
    assert crop == (32.0, 0, 608.0, 384)


def test_crop_ltrb_for_a_tall_image_is_fractional_like_sd_scripts():
    left, top, right, bottom = crop_ltrb_for((384, 640), (800, 1000))
    assert (left, right) == (0, 384)
    assert top == (640 - 384 / 0.8) // 2 and bottom == pytest.approx(top + 480)


def test_random_crop_moves_the_window_inside_the_image():
    image = gradient_image(100, 40)
    lefts = set()
    for seed in range(20):
        array, _ = resize_and_crop(image, (100, 40), (40, 40), random_crop=True, rng=random.Random(seed),
                                   interpolation="nearest")
        assert array.shape == (40, 40, 3)
        lefts.add(int(np.argmin(np.abs(np.asarray(image)[0, :, 0].astype(int) - int(array[0, 0, 0])))))
    assert len(lefts) > 5 and max(lefts) <= 60


def test_face_names_and_face_crop_keep_the_face_inside():
    assert face_info_from_name("photo_120_80_40_40") == (120, 80, 40, 40)
    assert face_info_from_name("photo_of_my_dog") is None and face_info_from_name("a_b") is None
    array = np.zeros((200, 300, 3), np.uint8)
    array[60:100, 100:140] = 255  # the "face": 40x40 centred at (120, 80)
    cropped = crop_around_face(array, (120, 80, 40, 40), (96, 96), (2.0, 4.0), random_crop=False,
                               rng=random.Random(0), interpolation=None)
    assert cropped.shape == (96, 96, 3)
    assert cropped.max() == 255  # the face is in the crop


def test_color_augment_changes_some_images_and_keeps_shape_and_alpha():
    array = np.asarray(gradient_image(32, 16).convert("RGBA")).copy()
    array[:, :, 3] = 77
    changed = 0
    for seed in range(30):
        result = color_augment(array, random.Random(seed))
        assert result.shape == array.shape and result.dtype == np.uint8
        assert (result[:, :, 3] == 77).all()
        changed += not np.array_equal(result, array)
    assert 3 <= changed <= 20  # p = 0.33
