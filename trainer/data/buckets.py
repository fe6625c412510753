"""Aspect-ratio buckets and the image operations that fit an image to its bucket (sd-scripts' train_util.py).

Numbers follow sd-scripts (`model_util.make_bucket_resolutions`, `BucketManager.select_bucket`,
`trim_and_resize_if_required`) so the same images land in the same buckets. Resizing uses Pillow only:
sd-scripts' OpenCV "area" filter becomes Pillow's BOX filter (the same box average when shrinking).
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image

from trainer.errors import ConfigError, DatasetError

Size = tuple[int, int]  # (width, height), as sd-scripts writes resolutions

_PIL_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR, "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX, "box": Image.Resampling.BOX,
}


def make_bucket_resolutions(max_reso: Size, min_size: int, max_size: int, divisible: int) -> list[Size]:
    """All bucket sizes with about the area of `max_reso`, sides in [min_size, max_size] (sd-scripts' model_util.py).

    Settings that would make a bucket side 0 (and divide by it later) are a ConfigError.
    """
    area = max_reso[0] * max_reso[1]
    square = int(math.sqrt(area) // divisible) * divisible if divisible > 0 else 0
    if min_size < 1 or square < 1:
        raise ConfigError(f"Bucket settings make a bucket of size 0 (resolution {max_reso[0]}x{max_reso[1]}, "
                          f"min_bucket_reso {min_size}, bucket_reso_steps {divisible}): bucket_reso_steps must be "
                          "positive, and min_bucket_reso and the resolution's sides at least bucket_reso_steps.")
    resos = {(square, square)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, int((area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


class BucketManager:
    """Chooses a bucket and a resize for each image size.

    Normal mode picks the predefined bucket with the closest aspect ratio and scales the image to cover
    it. `no_upscale` mode only shrinks (to at most the area of `max_reso`) and makes the bucket the
    resized size floored to `reso_steps` (sd-scripts' BucketManager.select_bucket).
    """

    def __init__(self, no_upscale: bool, max_reso: Size, min_size: int | None, max_size: int | None,
                 reso_steps: int | None, predefined: list[Size] | None = None):
        self.no_upscale = no_upscale
        self.max_reso = max_reso
        self.max_area = max_reso[0] * max_reso[1]
        self.reso_steps = reso_steps
        if predefined is None and not no_upscale:
            predefined = make_bucket_resolutions(max_reso, min_size, max_size, reso_steps)
        self.predefined = list(predefined or [])
        self._predefined_set = set(self.predefined)
        self._aspect_ratios = [w / h for w, h in self.predefined]

    @classmethod
    def single(cls, resolution: Size) -> "BucketManager":
        """Bucketing off: one bucket of exactly `resolution`."""
        return cls(False, resolution, None, None, None, predefined=[tuple(resolution)])

    def select_bucket(self, width: int, height: int) -> tuple[Size, Size, float]:
        """(bucket (W,H), resized image size (W,H), bucket aspect ratio minus image aspect ratio)."""
        aspect = width / height
        if self.no_upscale:
            resized = self._shrunk_size(width, height, aspect)
            bucket = (resized[0] - resized[0] % self.reso_steps, resized[1] - resized[1] % self.reso_steps)
        else:
            bucket = (width, height)
            if bucket not in self._predefined_set:
                errors = [abs(ratio - aspect) for ratio in self._aspect_ratios]
                bucket = self.predefined[errors.index(min(errors))]  # the first one on ties, like argmin
            if aspect > bucket[0] / bucket[1]:  # wider than the bucket: match heights
                scale = bucket[1] / height
            else:
                scale = bucket[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        # no_upscale floors tiny images to a 0 side; the caller reports such an image, so do not divide by it
        ar_error = bucket[0] / bucket[1] - aspect if bucket[1] else math.inf
        return bucket, resized, ar_error

    def _round_to_steps(self, value: float) -> int:
        value = int(value + 0.5)
        return value - value % self.reso_steps

    def _shrunk_size(self, width: int, height: int, aspect: float) -> Size:
        if width * height <= self.max_area:
            return (width, height)
        resized_width = math.sqrt(self.max_area * aspect)
        resized_height = self.max_area / resized_width
        # round the width or the height to reso_steps, whichever keeps the aspect ratio closer
        width_rounded = self._round_to_steps(resized_width)
        height_for_width = self._round_to_steps(width_rounded / aspect)
        height_rounded = self._round_to_steps(resized_height)
        width_for_height = self._round_to_steps(height_rounded * aspect)
        error_w = abs(width_rounded / height_for_width - aspect) if height_for_width else math.inf
        error_h = abs(width_for_height / height_rounded - aspect) if height_rounded else math.inf
        if error_w < error_h:
            return (width_rounded, int(width_rounded / aspect + 0.5))
        return (int(height_rounded * aspect + 0.5), height_rounded)


def crop_ltrb_for(bucket_reso: Size, image_size: Size) -> tuple[float, float, float, float]:
    """SDXL crop conditioning as sd-scripts' trim_and_resize_if_required computes it.

    Not the crop really applied: the box the image would fill if *fitted inside* the bucket. Values can
    be fractional (sd-scripts keeps them so); they are truncated to int when a batch is built.
    """
    bucket_w, bucket_h = bucket_reso
    image_aspect = image_size[0] / image_size[1]
    if bucket_w / bucket_h > image_aspect:
        fitted_w, fitted_h = bucket_h * image_aspect, bucket_h
    else:
        fitted_w, fitted_h = bucket_w, bucket_w / image_aspect
    left = (bucket_w - fitted_w) // 2
    top = (bucket_h - fitted_h) // 2
    return left, top, left + fitted_w, top + fitted_h


def resize_image(image: Image.Image, size: Size, interpolation: str | None) -> Image.Image:
    """Resize with the named filter; by default box ("area") when shrinking both sides, else Lanczos.

    RGBA is resized channel group by channel group: Pillow premultiplies alpha when resampling RGBA, which
    turns the colours under alpha 0 black. sd-scripts (OpenCV) keeps them, and the VAE sees them, so RGB
    and alpha are resized separately with the same size and filter (the mask stays aligned).
    """
    if interpolation is None:
        shrinking = image.width >= size[0] and image.height >= size[1]
        interpolation = "area" if shrinking else "lanczos"
    resample = _PIL_FILTERS[interpolation]
    if image.mode == "RGBA":
        rgb = image.convert("RGB").resize(tuple(size), resample=resample)
        alpha = image.getchannel("A").resize(tuple(size), resample=resample)
        rgb.putalpha(alpha)
        return rgb
    return image.resize(tuple(size), resample=resample)


def resize_and_crop(image: Image.Image, resized_size: Size, bucket_reso: Size, *, random_crop: bool,
                    rng: random.Random, interpolation: str | None) -> tuple[np.ndarray, tuple]:
    """Resize to `resized_size`, then crop the excess to `bucket_reso` (centre, or random offsets).

    Returns (H x W x C uint8 array, crop_ltrb) where crop_ltrb follows `crop_ltrb_for`.
    """
    original_size = image.size
    if image.size != tuple(resized_size):
        image = resize_image(image, resized_size, interpolation)
    array = np.asarray(image)
    height, width = array.shape[:2]
    if width > bucket_reso[0]:
        excess = width - bucket_reso[0]
        left = rng.randint(0, excess) if random_crop else excess // 2
        array = array[:, left:left + bucket_reso[0]]
    if height > bucket_reso[1]:
        excess = height - bucket_reso[1]
        top = rng.randint(0, excess) if random_crop else excess // 2
        array = array[top:top + bucket_reso[1]]
    assert array.shape[:2] == (bucket_reso[1], bucket_reso[0]), (array.shape, bucket_reso)  # cover-resize
    return array, crop_ltrb_for(bucket_reso, original_size)


def face_info_from_name(stem: str) -> tuple[int, int, int, int] | None:
    """(cx, cy, w, h) from a face-crop file name `name_cx_cy_w_h`, else None."""
    tokens = stem.split("_")
    if len(tokens) < 5:
        return None
    try:
        cx, cy, w, h = (int(t) for t in tokens[-4:])
    except ValueError:
        return None
    return (cx, cy, w, h) if w > 0 and h > 0 else None


def crop_around_face(array: np.ndarray, face: tuple[int, int, int, int], target: Size,
                     face_range: tuple[float, float], *, random_crop: bool, rng: random.Random,
                     interpolation: str | None) -> np.ndarray:
    """sd-scripts' `crop_target`: scale so the face spans 1/b..1/a of the short side, crop around it.

    The image must be at least `target` in both sides (the caller checks).
    """
    height, width = array.shape[:2]
    target_w, target_h = target
    if (width, height) == (target_w, target_h):
        return array
    cx, cy, face_w, face_h = face
    face_size = max(face_w, face_h)
    short_side = min(target_w, target_h)
    min_scale = max(target_h / height, target_w / width)
    min_scale = min(1.0, max(min_scale, short_side / (face_size * face_range[1])))
    max_scale = min(1.0, max(min_scale, short_side / (face_size * face_range[0])))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
    image = resize_image(Image.fromarray(array), (new_w, new_h), interpolation)
    array = np.asarray(image)
    centre = (int(cy * scale + 0.5), int(cx * scale + 0.5))
    for axis, (size, length, face_pos) in enumerate(zip((target_h, target_w), (new_h, new_w), centre)):
        start = face_pos - size // 2
        if random_crop:  # off-centre more often, so backgrounds are seen too
            spread = max(length - face_pos, face_pos)
            start += rng.randint(0, spread) + rng.randint(0, spread) - spread
        elif face_range[0] != face_range[1] and face_size > short_side // 10 and face_size >= 40:
            start += rng.randint(-face_size // 20, face_size // 20)
        start = max(0, min(start, length - size))
        array = array[start:start + size] if axis == 0 else array[:, start:start + size]
    return array


def color_augment(array: np.ndarray, rng: random.Random) -> np.ndarray:
    """sd-scripts' color_aug: with p=0.33, a hue shift of up to 8/180 of the circle or a gamma of 0.95-1.05."""
    if rng.random() > 0.33:
        return array
    rgb = np.ascontiguousarray(array[:, :, :3])
    if rng.random() > 0.5:
        shift = rng.uniform(-8, 8)  # OpenCV hue units (180 = full circle); Pillow's HSV uses 256
        hsv = np.array(Image.fromarray(rgb).convert("HSV"))
        hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int32) + round(shift * 256 / 180)) % 256
        hsv_image = Image.frombytes("HSV", (hsv.shape[1], hsv.shape[0]), hsv.tobytes())
        rgb = np.asarray(hsv_image.convert("RGB"))
    else:
        gamma = rng.uniform(0.95, 1.05)
        # applied to 0-255 values, not 0-1, exactly as sd-scripts does (so it also brightens/darkens)
        rgb = np.clip(rgb.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)
    result = np.array(array, copy=True)
    result[:, :, :3] = rgb
    return result


def load_image(path, *, alpha: bool = False) -> Image.Image:
    """The image converted to RGB (RGBA for alpha masks); a damaged file is a DatasetError naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGBA" if alpha else "RGB")
    except (OSError, ValueError, SyntaxError) as error:  # UnidentifiedImageError is an OSError
        raise DatasetError(f"Cannot read image {path} ({error}). The file is damaged or not an image: delete it "
                           "or open and re-save it (PNG or JPEG).") from None


def fit_to_resolution(image: Image.Image, resized_size: Size, resolution: Size, *,
                      face: tuple[int, int, int, int] | None, face_range: tuple[float, float] | None,
                      random_crop: bool, rng: random.Random,
                      interpolation: str | None) -> tuple[np.ndarray, Size, tuple]:
    """Bucketing off (no --enable_bucket): face crop, exact size, or random crop as sd-scripts does; any other size
    (which sd-scripts rejects) is resized to cover `resolution` and cropped like a bucket.

    Returns (array, original size for conditioning, crop_ltrb); sd-scripts reports (0,0,0,0) as the crop
    and the cropped size as the original in its own three cases.
    """
    width, height = image.size
    target_w, target_h = resolution
    large_enough = width >= target_w and height >= target_h
    if face is not None and face_range is not None and large_enough:
        array = crop_around_face(np.asarray(image), face, resolution, face_range, random_crop=random_crop, rng=rng,
                                 interpolation=interpolation)
        return array, resolution, (0, 0, 0, 0)
    if (width, height) == (target_w, target_h):
        return np.asarray(image), resolution, (0, 0, 0, 0)
    if random_crop and large_enough:
        array = np.asarray(image)
        top = rng.randint(0, height - target_h)
        array = array[top:top + target_h]
        left = rng.randint(0, width - target_w)
        return array[:, left:left + target_w], resolution, (0, 0, 0, 0)
    array, crop = resize_and_crop(image, resized_size, resolution, random_crop=random_crop, rng=rng,
                                  interpolation=interpolation)
    return array, (width, height), crop
