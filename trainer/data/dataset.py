"""The training dataset: images and captions found once, assigned to buckets, served as pre-formed batches.

Follows sd-scripts' DreamBoothDataset/FineTuningDataset (library/train_util.py): repeats, the balancing
of regularisation images, buckets whose batches never mix, per-epoch reshuffles seeded with
`seed + epoch`. The epoch, step and max-steps counters live in shared memory so DataLoader worker
processes (forked or spawned) see what the training loop sets. The dataset never loads models: latent
caching takes an `encode` callable.

Loss masks come from the PNG alpha (`alpha_mask`) or, for --masked_loss subsets, from a mask
image with the image's file stem in `conditioning_data_dir` (R channel / 255, white = 1). A mask of another
size than its image is first resized (bilinear) to the image size; it is then resized, cropped and flipped
exactly like its image and delivered as "alpha_masks". With latents cached in RAM the cropped mask is kept
with them; with the disk cache it is read from its file each time (sd-scripts' npz `alpha_mask` key means
the image's own alpha, and a mask edited later must not be served stale).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from trainer.data import cache as cache_files
from trainer.data.buckets import (
    BucketManager,
    color_augment,
    face_info_from_name,
    fit_to_resolution,
    load_image,
    resize_and_crop,
)
from trainer.data.captions import CaptionRules, count_tags, process_caption
from trainer.data.config import DatasetSpec, SubsetSpec
from trainer.data.folders import (
    IMAGE_EXTENSIONS,
    balance_reg_images,
    list_images,
    read_finetune_metadata,
    read_folder_captions,
    read_image_size,
)
from trainer.data.pictures import (
    WARNING,
    LoggedProgress,
    default_cache_file,
    name_files,
    picture_findings,
    verify_pictures,
)
from trainer.errors import ConfigError, DatasetError
from trainer.files import atomic_write_text

logger = logging.getLogger(__name__)

Size = tuple[int, int]
INFO_CACHE_FILE = "metadata_cache.json"  # sd-scripts' --cache_info file in each image folder


@dataclass
class ImageRecord:
    """One image as registered (once, whatever its repeats)."""

    path: Path
    caption: str
    is_reg: bool
    num_repeats: int
    subset: int  # index into TrainDataset.subsets
    dataset: int
    image_size: Size | None = None  # original (W, H)
    bucket_reso: Size | None = None
    resized_size: Size | None = None
    latents: torch.Tensor | None = None  # RAM cache, unscaled [4, h/8, w/8]
    latents_flipped: torch.Tensor | None = None
    alpha_mask: torch.Tensor | None = None
    crop_ltrb: tuple | None = None
    npz_path: Path | None = None  # disk cache
    mask_path: Path | None = None  # --masked_loss: the mask image in the subset's conditioning_data_dir


@dataclass
class UsedSubset:
    """A subset that contributed images (skipped ones are not kept, as in sd-scripts)."""

    spec: SubsetSpec
    dataset: int
    img_count: int
    rules: CaptionRules


@dataclass
class DatasetPlan:
    """Per dataset: its buckets (record indices, repeats included) and its batches."""

    spec: DatasetSpec
    buckets: list[tuple[Size, list[int]]] = field(default_factory=list)
    batches: list[tuple[int, int]] = field(default_factory=list)  # (bucket index, batch index in bucket)
    num_train_images: int = 0
    num_reg_images: int = 0
    num_validation_images: int = 0
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    bucket_info: dict | None = None


# --- building ---------------------------------------------------------------------------------------------

def build_train_dataset(specs: list[DatasetSpec], *, seed: int, max_train_steps_hint: int | None = None,
                        prior_loss_weight: float = 1.0) -> "TrainDataset":
    """Scan images and captions of every dataset, apply repeats and reg balancing, assign buckets.

    Images held out by validation_split become `validation_dataset()`."""
    records: list[ImageRecord] = []
    held_out: list[ImageRecord] = []
    subsets: list[UsedSubset] = []
    plans, ranges = [], []
    for index, spec in enumerate(specs):
        plan = DatasetPlan(spec)
        if spec.is_dreambooth:
            new_records = _scan_dreambooth(spec, index, plan, subsets, seed, held_out)
        else:
            new_records = _scan_finetune(spec, index, plan, subsets, seed)
        ranges.append(range(len(records), len(records) + len(new_records)))
        records.extend(new_records)
        plans.append(plan)
    _check_pictures(records + held_out, subsets)  # every dataset's bad pictures named at once
    for index, (plan, indices) in enumerate(zip(plans, ranges)):
        _assign_buckets(plan, records, indices)
        _log_plan(index, plan)
    if not any(plan.batches for plan in plans):
        raise DatasetError("No training images found in any dataset. Check image_dir / --train_data_dir: images "
                           f"({', '.join(IMAGE_EXTENSIONS)}) must be directly inside the subset folders.")
    validation = _validation_dataset(held_out, subsets, specs, seed) if held_out else None
    return TrainDataset(records, subsets, plans, seed=seed, prior_loss_weight=prior_loss_weight,
                        max_train_steps=max_train_steps_hint or 0, validation=validation)


def _scan_dreambooth(spec: DatasetSpec, index: int, plan: DatasetPlan, subsets: list[UsedSubset],
                     seed: int, held_out: list[ImageRecord]) -> list[ImageRecord]:
    train, reg = [], []
    for subset in spec.subsets:
        if subset.num_repeats < 1:
            logger.warning("ignoring subset %s: num_repeats %d is less than 1", subset.image_dir, subset.num_repeats)
            continue
        paths, captions, sizes = _load_image_folder(subset)
        if not paths:
            continue
        masks = find_mask_images(subset, paths) if subset.conditioning_data_dir else [None] * len(paths)
        keep, held = range(len(paths)), []
        if spec.validation_split > 0 and not subset.is_reg:  # reg images are never held out
            seed_for_split = spec.validation_seed if spec.validation_seed is not None else seed
            keep, held = split_train_val(len(paths), spec.validation_split, seed_for_split)
            plan.num_validation_images += len(held)
        subset_index = len(subsets)
        subsets.append(UsedSubset(subset, index, len(keep), CaptionRules.from_subset(subset)))
        count_tags(plan.tag_frequency, Path(subset.image_dir).name, [captions[i] for i in keep])
        target = reg if subset.is_reg else train
        for i in keep:
            target.append(ImageRecord(paths[i], captions[i], subset.is_reg, subset.num_repeats, subset_index,
                                      index, sizes[i], mask_path=masks[i]))
        held_out.extend(ImageRecord(paths[i], captions[i], False, 1, subset_index, index, sizes[i],
                                    mask_path=masks[i]) for i in held)
        if subset.is_reg:
            plan.num_reg_images += subset.num_repeats * len(keep)
        else:
            plan.num_train_images += subset.num_repeats * len(keep)
    return train + balance_reg_images(reg, plan.num_train_images)


def split_train_val(count: int, split: float, seed: int) -> tuple[list[int], list[int]]:
    """As sd-scripts splits: indices shuffled with `seed`; training keeps the first ceil(n * (1 - split)), validation
    the last round(n * split). As in sd-scripts the two can share an image when both round up (n=3, 0.5)."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    train = order[:math.ceil(count * (1 - split))]
    validation = order[count - round(count * split):]
    return train, validation


def _load_image_folder(subset: SubsetSpec) -> tuple[list[Path], list[str], list[Size | None]]:
    """Every image of the folder with its caption (and size when --cache_info knows it)."""
    folder = Path(subset.image_dir)
    if not folder.is_dir():
        raise DatasetError(f"Image folder not found: {folder}. Check image_dir (or --train_data_dir); relative "
                           f"paths are taken from the current folder {Path.cwd()}.")
    info_file = folder / INFO_CACHE_FILE
    if subset.cache_info and info_file.is_file():
        paths, captions, sizes = _read_info_cache(info_file)
    else:
        paths = list_images(folder)
        captions, sizes = None, [None] * len(paths)
    if not paths:
        _warn_empty_folder(folder)
        return [], [], []
    if captions is None:
        captions = read_folder_captions(paths, subset.caption_extension, subset.class_tokens,
                                        subset.enable_wildcard, folder)
    if subset.cache_info and not info_file.is_file():  # the whole folder: the split is made after reading
        sizes = [read_image_size(path) for path in paths]
        _write_info_cache(info_file, paths, captions, sizes)
    return paths, captions, sizes


def find_mask_images(subset: SubsetSpec, images: list[Path]) -> list[Path]:
    """The mask of each image: the file with the image's stem in `conditioning_data_dir` (any image
    extension; .png first, as sd-scripts globs). A missing mask is a DatasetError naming the image and
    the expected path; masks without an image are only reported."""
    folder = Path(subset.conditioning_data_dir)
    if not folder.is_dir():
        raise DatasetError(f"Mask folder not found: {folder} (conditioning_data_dir of the subset {subset.image_dir}). "
                           "Check the path; relative paths are taken from the current folder "
                           f"{Path.cwd()}.")
    if os.path.samefile(folder, subset.image_dir):
        raise DatasetError(f"conditioning_data_dir {folder} is the image folder itself; put the mask images in a "
                           "folder of their own (with the same file names as the images).")
    exact: dict[str, Path] = {}
    folded: dict[str, Path] = {}  # Windows users name files case-insensitively
    for mask in sorted(list_images(folder), key=lambda p: IMAGE_EXTENSIONS.index(p.suffix.lower())):
        exact.setdefault(mask.stem, mask)
        folded.setdefault(mask.stem.casefold(), mask)
    masks = [exact.get(image.stem) or folded.get(image.stem.casefold()) for image in images]
    missing = [image for image, mask in zip(images, masks) if mask is None]
    if missing:
        shown = "\n".join(f"  {image} -> expected {folder / (image.stem + '.png')}" for image in missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DatasetError(f"No mask image for {len(missing)} of {len(images)} image(s) of {subset.image_dir}: each "
                           f"image needs a mask with the same file name (any image extension) in {folder}:\n"
                           f"{shown}{more}")
    unused = len(set(exact.values()) - set(masks))
    if unused:
        logger.warning("%s: %d mask image(s) have no image of the same name in %s and are not used",
                       folder, unused, subset.image_dir)
    return masks


def _warn_empty_folder(folder: Path) -> None:
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir())
    hint = (f"; it has subfolders ({', '.join(subfolders[:5])}) but subsets are not searched recursively: "
            "point image_dir at the folder that holds the images") if subfolders else ""
    logger.warning("ignoring subset %s: no images found%s", folder, hint)


def _read_info_cache(info_file: Path) -> tuple[list[Path], list[str], list[Size]]:
    try:
        metas = json.loads(info_file.read_text(encoding="utf-8"))
        captions = [meta["caption"] for meta in metas.values()]
        sizes = [tuple(meta["resolution"]) for meta in metas.values()]
        return [Path(key) for key in metas], captions, sizes
    except (ValueError, KeyError, TypeError) as error:
        raise DatasetError(f"{info_file} is damaged ({error}); delete it and it will be rebuilt.") from None


def _write_info_cache(info_file: Path, paths: list[Path], captions: list[str], sizes: list[Size]) -> None:
    metas = {str(path): {"caption": caption, "resolution": list(size)}
             for path, caption, size in zip(paths, captions, sizes)}
    atomic_write_text(info_file, json.dumps(metas, ensure_ascii=False, indent=2))


def _scan_finetune(spec: DatasetSpec, index: int, plan: DatasetPlan, subsets: list[UsedSubset],
                   seed: int) -> list[ImageRecord]:
    if spec.validation_split > 0:
        logger.warning("validation_split is applied to DreamBooth-style subsets (image folders) only; the "
                       "fine-tuning dataset %d (metadata_file) is trained on whole.", index)
    records = []
    for subset in spec.subsets:
        if subset.num_repeats < 1:
            logger.warning("ignoring subset %s: num_repeats %d is less than 1", subset.metadata_file,
                           subset.num_repeats)
            continue
        entries, tags = read_finetune_metadata(subset.metadata_file, subset.image_dir, subset.caption_separator,
                                               subset.enable_wildcard)
        if not entries:
            logger.warning("ignoring subset %s: no image entries", subset.metadata_file)
            continue
        subset_index = len(subsets)
        subsets.append(UsedSubset(subset, index, len(entries), CaptionRules.from_subset(subset)))
        count_tags(plan.tag_frequency, Path(subset.metadata_file).name, tags)
        for path, caption, size in entries:
            records.append(ImageRecord(path, caption, False, subset.num_repeats, subset_index, index, size))
        plan.num_train_images += len(entries) * subset.num_repeats
    return records


def _validation_dataset(held_out: list[ImageRecord], subsets: list[UsedSubset], specs: list[DatasetSpec],
                        seed: int) -> "TrainDataset":
    """The held-out images once each (no repeats, no reg images), in buckets made by the training rules,
    with every augmentation and caption randomness off, so each validation sees the same batches (their sizes
    were read with the training pictures'; `_check_pictures`)."""
    counts = Counter(record.subset for record in held_out)
    plain = [UsedSubset(spec, used.dataset, counts[i], CaptionRules.from_subset(spec))
             for i, used in enumerate(subsets) for spec in [_without_randomness(used.spec)]]
    plans = []
    for index, spec in enumerate(specs):  # held_out is in dataset order
        plan = DatasetPlan(spec)
        members = [i for i, record in enumerate(held_out) if record.dataset == index]
        if members:
            _assign_buckets(plan, held_out, range(members[0], members[-1] + 1))
        plan.num_train_images = len(members)
        plans.append(plan)
    logger.info("validation: %d held-out images in %d batches", len(held_out), sum(len(p.batches) for p in plans))
    return TrainDataset(held_out, plain, plans, seed=seed)


def _without_randomness(subset: SubsetSpec) -> SubsetSpec:
    return dataclasses.replace(subset, num_repeats=1, flip_aug=False, color_aug=False, random_crop=False,
                               face_crop_aug_range=None, shuffle_caption=False, caption_dropout_rate=0.0,
                               caption_dropout_every_n_epochs=0, caption_tag_dropout_rate=0.0, token_warmup_step=0)


def _check_pictures(records: list[ImageRecord], subsets: list[UsedSubset]) -> None:
    """Every picture decoded once before training (cached: trainer.data.pictures), so a damaged one stops the
    run now, with all of them named, instead of at its batch; the stored sizes come with it. What trains but
    not as the user thinks (a picture stored sideways, transparency) is a warning."""
    facts = verify_pictures([record.path for record in records], cache_file=default_cache_file(),
                            progress=LoggedProgress())
    masked = {str(record.path) for record in records if subsets[record.subset].spec.alpha_mask}
    for level, message, files in picture_findings(facts, masked):
        if level == WARNING:
            logger.warning("%s: %s", message, name_files(files))
    for record, fact in zip(records, facts):
        if record.image_size is None:
            record.image_size = (fact.width, fact.height)


def _assign_buckets(plan: DatasetPlan, records: list[ImageRecord], indices: range) -> None:
    spec = plan.spec
    if spec.enable_bucket:
        if spec.bucket_no_upscale:
            logger.info("min_bucket_reso/max_bucket_reso are not used with bucket_no_upscale: buckets follow "
                        "the image sizes")
        manager = BucketManager(spec.bucket_no_upscale, spec.resolution, spec.min_bucket_reso,
                                spec.max_bucket_reso, spec.bucket_reso_steps)
    else:
        manager = BucketManager.single(spec.resolution)
    members: dict[Size, list[int]] = {}
    ar_errors = []
    for i in indices:
        record = records[i]
        record.bucket_reso, record.resized_size, ar_error = manager.select_bucket(*record.image_size)
        if min(record.bucket_reso) < 8:
            raise DatasetError(f"Image {record.path} ({record.image_size[0]}x{record.image_size[1]}) is too small "
                               f"for bucket_reso_steps {spec.bucket_reso_steps} with bucket_no_upscale; remove it "
                               "or upscale it.")
        ar_errors.append(abs(ar_error))
        members.setdefault(record.bucket_reso, []).extend([i] * record.num_repeats)
    plan.buckets = sorted(members.items())
    for bucket_index, (_, items) in enumerate(plan.buckets):
        for batch_index in range(math.ceil(len(items) / spec.batch_size)):
            plan.batches.append((bucket_index, batch_index))
    if spec.enable_bucket:
        plan.bucket_info = {
            "buckets": {i: {"resolution": list(reso), "count": len(items)}
                        for i, (reso, items) in enumerate(plan.buckets)},
            "mean_img_ar_error": float(np.mean(ar_errors)) if ar_errors else 0.0,
        }


def _log_plan(index: int, plan: DatasetPlan) -> None:
    logger.info("dataset %d: %d train images with repeats, %d reg images with repeats, %d batches of up to %d",
                index, plan.num_train_images, plan.num_reg_images, len(plan.batches), plan.spec.batch_size)
    if plan.bucket_info:
        for i, (reso, items) in enumerate(plan.buckets):
            logger.info("  bucket %d: resolution %s, count %d", i, reso, len(items))
        logger.info("  mean aspect-ratio error (without repeats): %.4f", plan.bucket_info["mean_img_ar_error"])


# --- the torch Dataset ------------------------------------------------------------------------------------

class SharedProgress:
    """Epoch, step and total steps that the loop sets and DataLoader worker processes read (captions depend
    on them). Plain ints in shared memory are written atomically, so no lock is needed."""

    def _init_progress(self, max_train_steps: int = 0) -> None:
        self._epoch = multiprocessing.Value("i", 0, lock=False)
        self._step = multiprocessing.Value("i", 0, lock=False)
        self._max_train_steps = multiprocessing.Value("i", int(max_train_steps), lock=False)

    def set_epoch(self, epoch: int) -> None:
        """Epochs are 1-based."""
        self._epoch.value = int(epoch)

    def set_current_step(self, step: int) -> None:
        self._step.value = int(step)

    def set_max_train_steps(self, max_train_steps: int) -> None:
        self._max_train_steps.value = int(max_train_steps)

    @property
    def current_epoch(self) -> int:
        return self._epoch.value


class TrainDataset(SharedProgress, torch.utils.data.Dataset):
    """Item i is a whole batch (a dict); see `__getitem__`. Length = batches per epoch. Each epoch reshuffles
    bucket contents and batch order with seed + epoch."""

    def __init__(self, records: list[ImageRecord], subsets: list[UsedSubset], plans: list[DatasetPlan], *,
                 seed: int, prior_loss_weight: float = 1.0, max_train_steps: int = 0,
                 validation: "TrainDataset | None" = None):
        self.records = records
        self.subsets = subsets
        self.plans = plans
        self.seed = seed
        self.prior_loss_weight = prior_loss_weight
        self._init_progress(max_train_steps)
        self._offsets = np.cumsum([0] + [len(plan.batches) for plan in plans]).tolist()
        self._order_epoch = -1
        self._order: list[tuple[list, list]] = []
        self._validation = validation

    def validation_dataset(self) -> "TrainDataset | None":
        """The images held out by validation_split as a dataset of their own (None without a split).
        Its epoch stays 0, so its batch order never changes."""
        return self._validation

    def __len__(self) -> int:
        return self._offsets[-1]

    # per-epoch order --------------------------------------------------------------------------------------
    def _order_for(self, epoch: int) -> list[tuple[list, list]]:
        """Per dataset (batch order, bucket contents) after the shuffles of epochs 0..epoch.

        sd-scripts shuffles once when the buckets are made (epoch 0), then again at each new epoch,
        each time after random.seed(seed + epoch); reproduced here so any process gets the same order.
        """
        if epoch < self._order_epoch or not self._order:
            self._order = [(list(plan.batches), [list(items) for _, items in plan.buckets]) for plan in self.plans]
            self._order_epoch = -1
        while self._order_epoch < epoch:
            self._order_epoch += 1
            for batches, contents in self._order:  # each dataset seeds anew, as each sd-scripts dataset does
                rng = random.Random(self.seed + self._order_epoch)
                rng.shuffle(batches)
                for bucket in contents:
                    rng.shuffle(bucket)
        return self._order

    def batch_records(self, index: int) -> list[ImageRecord]:
        """The records of batch `index` in the current epoch."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        dataset = int(np.searchsorted(self._offsets, index, side="right")) - 1
        batches, contents = self._order_for(self._epoch.value)[dataset]
        bucket, batch = batches[index - self._offsets[dataset]]
        size = self.plans[dataset].spec.batch_size
        return [self.records[i] for i in contents[bucket][batch * size:(batch + 1) * size]]

    # items ------------------------------------------------------------------------------------------------
    def __getitem__(self, index: int) -> dict:
        """One batch. Keys (B = batch size, H x W = bucket size):
        images (B,3,H,W) in [-1,1] or None when latents are cached; latents (B,4,H/8,W/8) unscaled or None;
        captions list[str]; loss_weights (B,); original_sizes_hw, crop_top_lefts, target_sizes_hw (B,2) long;
        image_paths list[str]; flipped list[bool]; alpha_masks (B,H,W) or None; network_multipliers (B,).
        """
        records = self.batch_records(index)
        epoch, step, max_steps = self._epoch.value, self._step.value, self._max_train_steps.value
        # augmentation randomness depends only on (seed, epoch, batch), not on which worker runs it
        rng = random.Random(f"{self.seed}:{epoch}:{index}")
        samples = [self._sample(record, rng, epoch, step, max_steps) for record in records]
        return _collate(samples)

    def _sample(self, record: ImageRecord, rng: random.Random, epoch: int, step: int, max_steps: int) -> dict:
        used = self.subsets[record.subset]
        subset = used.spec
        flipped = subset.flip_aug and rng.random() < 0.5
        if record.latents is not None or record.npz_path is not None:
            sample = self._cached_sample(record, subset, flipped)
        else:
            sample = self._image_sample(record, subset, flipped, rng)
        target_w, target_h = sample["target_size"]
        left, top, right, _ = sample.pop("crop_ltrb")
        if flipped:  # crop-left as seen in the mirrored image, as sd-scripts records it
            left = target_w - right
        original_w, original_h = sample.pop("original_size")
        sample.update(
            original_hw=(int(original_h), int(original_w)), crop_top_left=(int(top), int(left)),
            target_hw=(int(target_h), int(target_w)), flipped=flipped, path=str(record.path),
            loss_weight=self.prior_loss_weight if record.is_reg else 1.0,
            multiplier=self.plans[record.dataset].spec.network_multiplier,
            caption=process_caption(record.caption, used.rules, rng=rng, epoch=epoch, step=step,
                                    max_train_steps=max_steps))
        return sample

    def _cached_sample(self, record: ImageRecord, subset: SubsetSpec, flipped: bool) -> dict:
        if record.latents is not None:
            latents = record.latents_flipped if flipped else record.latents
            mask, crop, original = record.alpha_mask, record.crop_ltrb, record.image_size
        else:
            cached = cache_files.load_latents_npz(record.npz_path)
            if flipped and cached.latents_flipped is None:  # only possible with skip_cache_check
                raise DatasetError(f"{record.npz_path} has no flipped latents (needed by flip_aug). Delete the file "
                                   "or run without --skip_cache_check so it is made again.")
            latents = torch.from_numpy(cached.latents_flipped if flipped else cached.latents)
            # a file may carry an alpha mask from an earlier --alpha_mask run: use it only when asked for
            use_alpha = subset.alpha_mask and cached.alpha_mask is not None
            mask = torch.from_numpy(cached.alpha_mask) if use_alpha else None
            if record.mask_path is not None:
                mask = self._bucket_mask(record)
            crop, original = cached.crop_ltrb, cached.original_size
        if mask is not None and flipped:
            mask = torch.flip(mask, dims=[1])
        target = (latents.shape[2] * 8, latents.shape[1] * 8)
        return dict(image=None, latents=latents.float(), alpha_mask=mask, target_size=target, crop_ltrb=crop,
                    original_size=original)

    def _image_sample(self, record: ImageRecord, subset: SubsetSpec, flipped: bool, rng: random.Random) -> dict:
        image = load_image(record.path, alpha=subset.alpha_mask)
        state = rng.getstate()
        array, original, crop = self._fit(image, record, subset, rng)
        mask_array = None
        if record.mask_path is not None:
            # the same function, sizes and random draws as the image, so the mask covers the same pixels
            same_draws = random.Random()
            same_draws.setstate(state)
            mask_array = self._fit(load_mask(record.mask_path, image.size), record, subset, same_draws)[0]
        if subset.color_aug:
            array = color_augment(array, rng)
        if flipped:
            array = array[:, ::-1]
            mask_array = None if mask_array is None else mask_array[:, ::-1]
        if mask_array is not None:
            mask = mask_to_tensor(mask_array)
        else:
            mask = alpha_mask_of(array) if subset.alpha_mask else None
        tensor = image_to_tensor(array[:, :, :3])
        return dict(image=tensor, latents=None, alpha_mask=mask, target_size=(tensor.shape[2], tensor.shape[1]),
                    crop_ltrb=crop, original_size=original)

    def _fit(self, image, record: ImageRecord, subset: SubsetSpec, rng: random.Random) -> tuple:
        """(array, original size, crop_ltrb): the image (or its mask) resized and cropped to its bucket."""
        spec = self.plans[record.dataset].spec
        if spec.enable_bucket:
            array, crop = resize_and_crop(image, record.resized_size, record.bucket_reso,
                                          random_crop=subset.random_crop, rng=rng,
                                          interpolation=subset.resize_interpolation)
            return array, image.size, crop
        face = face_info_from_name(record.path.stem) if subset.face_crop_aug_range else None
        return fit_to_resolution(image, record.resized_size, spec.resolution, face=face,
                                 face_range=subset.face_crop_aug_range, random_crop=subset.random_crop, rng=rng,
                                 interpolation=subset.resize_interpolation)

    def _bucket_mask(self, record: ImageRecord) -> torch.Tensor:
        """The mask cropped as latent caching crops the image (cover-resize, centre crop), not flipped."""
        subset = self.subsets[record.subset].spec
        array, _ = resize_and_crop(load_mask(record.mask_path, record.image_size), record.resized_size,
                                   record.bucket_reso, random_crop=False, rng=random.Random(0),
                                   interpolation=subset.resize_interpolation)
        return mask_to_tensor(array)

    # latent caching ---------------------------------------------------------------------------------------
    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], *, vae_batch_size: int, to_disk: bool,
                      family: str = "sd1", skip_cache_check: bool = False,
                      progress: Callable[[int, int], None] | None = None) -> None:
        """Encode every image once: kept in RAM, or in sd-scripts' .npz files next to the images.

        `encode` maps images (B,3,H,W) in [-1,1] to unscaled latents (B,4,H/8,W/8) (a VAE sample).
        Call before making the DataLoader. Valid existing .npz files are reused (`skip_cache_check`:
        any existing file). `progress(done, total)` is called after each VAE batch.
        """
        self._refuse_uncacheable()
        todo = []
        for record in self.records:
            if to_disk:
                record.npz_path = cache_files.latents_npz_path(record.path, record.image_size, family)
                subset = self.subsets[record.subset].spec
                if cache_files.latents_npz_is_valid(record.npz_path, record.bucket_reso, flip_aug=subset.flip_aug,
                                                    alpha_mask=subset.alpha_mask, skip_check=skip_cache_check):
                    continue
            todo.append(record)
        logger.info("caching latents: %d images to encode, %d reused from disk", len(todo),
                    len(self.records) - len(todo))
        groups: dict[tuple, list[ImageRecord]] = {}
        for record in todo:
            subset = self.subsets[record.subset].spec
            groups.setdefault((record.bucket_reso, subset.flip_aug, subset.alpha_mask), []).append(record)
        done, step = 0, max(1, vae_batch_size)
        for (_, flip_aug, alpha_mask), members in sorted(groups.items()):
            for start in range(0, len(members), step):
                chunk = members[start:start + step]
                self._encode_chunk(chunk, encode, flip_aug=flip_aug, alpha_mask=alpha_mask, to_disk=to_disk)
                done += len(chunk)
                if progress is not None:
                    progress(done, len(todo))

    def _refuse_uncacheable(self) -> None:
        bad = [used.spec.image_dir or used.spec.metadata_file for used in self.subsets
               if used.spec.color_aug or used.spec.random_crop]
        if bad:
            raise ConfigError(f"--cache_latents / --cache_latents_to_disk cannot be used with color_aug or "
                              f"random_crop (set for: {', '.join(bad)}): cached latents cannot change per epoch. "
                              "Turn those augmentations off or do not cache latents.")

    def _encode_chunk(self, chunk: list[ImageRecord], encode: Callable, *, flip_aug: bool, alpha_mask: bool,
                      to_disk: bool) -> None:
        arrays, crops = [], []
        for record in chunk:
            subset = self.subsets[record.subset].spec
            array, crop = resize_and_crop(load_image(record.path, alpha=alpha_mask), record.resized_size,
                                          record.bucket_reso, random_crop=False, rng=random.Random(0),
                                          interpolation=subset.resize_interpolation)
            arrays.append(array)
            crops.append(crop)
        images = torch.stack([image_to_tensor(array[:, :, :3]) for array in arrays])
        with torch.no_grad():
            latents = encode(images).float().cpu()
            flipped = encode(torch.flip(images, dims=[3])).float().cpu() if flip_aug else None
        if not torch.isfinite(latents).all() or (flipped is not None and not torch.isfinite(flipped).all()):
            raise DatasetError(f"The VAE produced NaN/inf latents for {chunk[0].path} (and its batch). The VAE "
                               "overflows in fp16: use --no_half_vae or an fp16-fixed VAE.")
        for i, record in enumerate(chunk):
            mask = alpha_mask_of(arrays[i]) if alpha_mask else None
            latents_flipped = None if flipped is None else flipped[i]
            if to_disk:  # mask images are not written into the npz (see the module docstring)
                cache_files.save_latents_npz(record.npz_path, latents[i], record.image_size, crops[i],
                                             latents_flipped, mask)
            else:
                record.latents, record.latents_flipped = latents[i].clone(), latents_flipped
                record.crop_ltrb = crops[i]
                record.alpha_mask = self._bucket_mask(record) if record.mask_path is not None else mask

    # information for metadata -----------------------------------------------------------------------------
    @property
    def num_train_images(self) -> int:
        """Training images times repeats, all datasets (ss_num_train_images)."""
        return sum(plan.num_train_images for plan in self.plans)

    @property
    def num_reg_images(self) -> int:
        """Reg images times folder repeats, before balancing (ss_num_reg_images)."""
        return sum(plan.num_reg_images for plan in self.plans)

    @property
    def num_validation_images(self) -> int:
        """Images held out by validation_split (not trained on)."""
        return sum(plan.num_validation_images for plan in self.plans)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """{folder name: {tag: count}}; a folder used by several datasets is counted once (the first)."""
        merged: dict[str, dict[str, int]] = {}
        for plan in self.plans:
            for directory, counts in plan.tag_frequency.items():
                merged.setdefault(directory, counts)
        return merged

    def dataset_dirs_info(self) -> dict[str, dict[str, int]]:
        """{folder name: {"n_repeats", "img_count"}} of non-reg subsets; repeated names get " (2)", " (3)"."""
        info: dict[str, dict[str, int]] = {}
        for used in self.subsets:
            if used.spec.is_reg:
                continue
            source = used.spec.metadata_file if used.spec.metadata_file else used.spec.image_dir
            name, n = Path(source).name, 2
            key = name
            while key in info:
                key, n = f"{name} ({n})", n + 1
            info[key] = {"n_repeats": used.spec.num_repeats, "img_count": used.img_count}
        return info

    def reg_dataset_dirs_info(self) -> dict[str, dict[str, int]]:
        return {Path(used.spec.image_dir).name: {"n_repeats": used.spec.num_repeats, "img_count": used.img_count}
                for used in self.subsets if used.spec.is_reg}

    def bucket_info(self) -> dict | None:
        """Bucket counts of the first dataset (ss_bucket_info); None without bucketing."""
        return self.plans[0].bucket_info if self.plans else None

    def datasets_metadata(self) -> list[dict]:
        """The ss_datasets metadata list, one entry per dataset, as sd-scripts writes it."""
        return [self._dataset_metadata(index, plan) for index, plan in enumerate(self.plans)]

    def _dataset_metadata(self, index: int, plan: DatasetPlan) -> dict:
        spec = plan.spec
        return {
            "is_dreambooth": spec.is_dreambooth, "batch_size_per_device": spec.batch_size,
            "num_train_images": plan.num_train_images, "num_reg_images": plan.num_reg_images,
            "resolution": list(spec.resolution), "enable_bucket": bool(spec.enable_bucket),
            "min_bucket_reso": spec.min_bucket_reso if spec.enable_bucket else None,
            "max_bucket_reso": spec.max_bucket_reso if spec.enable_bucket else None,
            "tag_frequency": plan.tag_frequency, "bucket_info": plan.bucket_info,
            "resize_interpolation": spec.resize_interpolation,
            "subsets": [_subset_metadata(used, spec.is_dreambooth) for used in self.subsets if used.dataset == index],
        }


def _subset_metadata(used: UsedSubset, is_dreambooth: bool) -> dict:
    s = used.spec
    meta = {"img_count": used.img_count, "num_repeats": s.num_repeats, "color_aug": bool(s.color_aug),
            "flip_aug": bool(s.flip_aug), "random_crop": bool(s.random_crop),
            "shuffle_caption": bool(s.shuffle_caption), "keep_tokens": s.keep_tokens,
            "keep_tokens_separator": s.keep_tokens_separator, "secondary_separator": s.secondary_separator,
            "enable_wildcard": bool(s.enable_wildcard), "caption_prefix": s.caption_prefix,
            "caption_suffix": s.caption_suffix, "resize_interpolation": s.resize_interpolation}
    if s.image_dir:
        meta["image_dir"] = Path(s.image_dir).name
    if is_dreambooth:
        meta["class_tokens"] = s.class_tokens
        meta["is_reg"] = s.is_reg
    else:
        meta["metadata_file"] = Path(s.metadata_file).name
    return meta


# --- batches --------------------------------------------------------------------------------------------

def image_to_tensor(array: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> (3, H, W) float in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    channels_first = np.array(np.transpose(array, (2, 0, 1)), dtype=np.float32)  # a writable copy
    return torch.from_numpy(channels_first).div_(127.5).sub_(1.0)


def load_mask(path: Path, image_size: Size):
    """A mask image's R channel as an 8-bit PIL image of `image_size` (W, H); a mask of another size is
    resized to the image first (bilinear), so it can be cropped exactly like the image."""
    from PIL import Image

    mask = load_image(path).getchannel("R")
    if mask.size != tuple(image_size):
        if path not in _RESIZED_MASKS_REPORTED:  # once per file and process, not every epoch
            _RESIZED_MASKS_REPORTED.add(path)
            logger.warning("mask %s is %dx%d but its image is %dx%d: the mask is stretched to the image size",
                           path, *mask.size, *image_size)
        mask = mask.resize(tuple(image_size), resample=Image.BILINEAR)
    return mask


_RESIZED_MASKS_REPORTED: set[Path] = set()


def mask_to_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W) uint8 mask -> float32 in [0, 1] (white = 1)."""
    return torch.from_numpy(np.asarray(array, dtype=np.float32) / 255.0)


def alpha_mask_of(array: np.ndarray) -> torch.Tensor:
    """(H, W) loss mask: alpha / 255, or ones for an image without alpha."""
    if array.shape[2] == 4:
        return torch.from_numpy(array[:, :, 3].astype(np.float32) / 255.0)
    return torch.ones(array.shape[:2], dtype=torch.float32)


def _collate(samples: list[dict]) -> dict:
    images = [s["image"] for s in samples]
    latents = [s["latents"] for s in samples]
    masks = [s["alpha_mask"] for s in samples]
    if any(m is not None for m in masks):
        height, width = samples[0]["target_hw"]
        masks = [m if m is not None else torch.ones(height, width) for m in masks]
    return {
        "images": torch.stack(images) if images[0] is not None else None,
        "latents": torch.stack(latents) if latents[0] is not None else None,
        "captions": [s["caption"] for s in samples],
        "loss_weights": torch.tensor([s["loss_weight"] for s in samples], dtype=torch.float32),
        "original_sizes_hw": torch.tensor([s["original_hw"] for s in samples], dtype=torch.long),
        "crop_top_lefts": torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long),
        "target_sizes_hw": torch.tensor([s["target_hw"] for s in samples], dtype=torch.long),
        "image_paths": [s["path"] for s in samples],
        "flipped": [s["flipped"] for s in samples],
        "alpha_masks": torch.stack(masks) if masks[0] is not None else None,
        "network_multipliers": torch.tensor([s["multiplier"] for s in samples], dtype=torch.float32),
    }


def _single_batch(items: list[dict]) -> dict:
    """collate_fn: the DataLoader's batch size is 1 because every item already is a batch."""
    return items[0]


class EpochOrder(torch.utils.data.Sampler):
    """The order of the pre-formed batches in an epoch: a permutation that depends on (seed, epoch) alone.

    A torch generator seeded once would run on from epoch to epoch, so a run resumed in epoch 3 would get
    epoch 1's order again; drawn from the epoch instead, a --resume (and accelerate's skip_first_batches)
    sees the very order the uninterrupted run saw, and every process of a multi-GPU run the same one. The
    epoch is read from the dataset each time iteration starts (the loop sets it first)."""

    def __init__(self, dataset: TrainDataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        order = list(range(len(self.dataset)))
        random.Random(f"order:{self.seed}:{self.dataset.current_epoch}").shuffle(order)
        return iter(order)


def make_dataloader(dataset: TrainDataset, *, num_workers: int, persistent_workers: bool,
                    seed: int) -> torch.utils.data.DataLoader:
    """DataLoader over the pre-formed batches in EpochOrder; workers capped at the CPU count (0 = main process)."""
    workers = max(0, min(int(num_workers), os.cpu_count() or 1))
    # Each iteration draws its workers' base seed from this generator; without one it would come from the
    # global torch stream, one number per epoch, and a run resumed mid-epoch (whose iteration starts after the
    # state is restored) would draw other noise than the run it continues. Items take their randomness from
    # (seed, epoch, index) alone, so the worker seeds need not follow the epoch.
    generator = torch.Generator().manual_seed(seed)
    # Pinned batches let the copy to the GPU overlap the previous step instead of waiting for it.
    return torch.utils.data.DataLoader(dataset, batch_size=1, sampler=EpochOrder(dataset, seed),
                                       collate_fn=_single_batch, num_workers=workers,
                                       persistent_workers=persistent_workers and workers > 0,
                                       generator=generator, pin_memory=torch.cuda.is_available(),
                                       worker_init_fn=ignore_ctrl_break if workers else None)


def ignore_ctrl_break(worker_id: int = 0) -> None:
    """In a data-loader worker on Windows: Ctrl-Break (the GUI's Stop, sent to the whole process group) is the
    main process's to handle, which saves the LoRA; a worker dying of it first would turn the stop into a
    "worker exited unexpectedly" crash. Elsewhere there is no SIGBREAK, and torch's workers already leave
    Ctrl-C to the main process."""
    import signal

    if hasattr(signal, "SIGBREAK"):
        signal.signal(signal.SIGBREAK, signal.SIG_IGN)
