"""`--debug_dataset`: show what training would be fed, without loading any model.

One epoch of the dataset exactly as the loop would get it (bucket, crop, flip, colour augmentation, caption
shuffle/dropout/warmup all applied): each batch is printed (image paths, bucket resolution, captions, loss
weights) and its images are written as PNGs to `<output_dir>/debug_dataset/`. sd-scripts shows the images
in an OpenCV window instead; files work everywhere, also over SSH."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from trainer.config.args import TrainConfig
from trainer.data.dataset import make_dataloader
from trainer.files import atomic_path
from trainer.train.build import build_dataset, plan_run
from trainer.train.events import Reporter
from trainer.train.resolve import resolve_model_family, resolve_seed

log = logging.getLogger(__name__)

FOLDER = "debug_dataset"


def debug_dataset(cfg: TrainConfig, reporter: Reporter) -> Path:
    """Go through one epoch; returns the folder the images went to."""
    from accelerate.utils import set_seed

    started = time.time()
    seed = resolve_seed(cfg.seed)
    set_seed(seed)
    if cfg.pretrained_model_name_or_path:  # SDXL allows finer bucket steps; telling needs no weights
        cfg = resolve_model_family(cfg)
    dataset = build_dataset(cfg, seed)
    plan = plan_run(len(dataset), max_train_steps=cfg.max_train_steps, max_train_epochs=cfg.max_train_epochs,
                    batch_size=cfg.train_batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                    seed=seed)
    dataset.set_max_train_steps(plan.max_train_steps)
    dataset.set_epoch(1)
    folder = Path(cfg.output_dir or "output") / FOLDER
    loader = make_dataloader(dataset, num_workers=cfg.max_data_loader_n_workers, persistent_workers=False,
                             seed=seed)
    log.info("--debug_dataset: %d batches in epoch 1 (seed %d); images go to %s", len(loader), seed, folder)
    written = 0
    for index, batch in enumerate(loader):
        step = index // cfg.gradient_accumulation_steps
        dataset.set_current_step((index + 1) // cfg.gradient_accumulation_steps)  # as the loop does, for token warmup
        files = write_batch_images(batch, folder, index + 1)
        written += len(files)
        show_batch(batch, index + 1, len(loader), step, files, reporter)
    log.info("--debug_dataset: wrote %d image(s) to %s; nothing was trained.", written, folder)
    reporter.emit("info", message=f"debug_dataset: {written} image(s) in {folder} ({time.time() - started:.0f} s)")
    return folder


def show_batch(batch: dict, number: int, total: int, step: int, files: list[Path], reporter: Reporter) -> None:
    """Log one batch for people; emit it as a `debug_batch` event for the events file."""
    height, width = (int(v) for v in batch["target_sizes_hw"][0])
    weights = [round(float(w), 4) for w in batch["loss_weights"]]
    log.info("batch %d/%d (step %d): bucket %dx%d, %d image(s)", number, total, step, width, height,
             len(batch["captions"]))
    for i, caption in enumerate(batch["captions"]):
        original_h, original_w = (int(v) for v in batch["original_sizes_hw"][i])
        crop_top, crop_left = (int(v) for v in batch["crop_top_lefts"][i])
        flipped = ", flipped" if batch["flipped"][i] else ""
        log.info("  [%d] %s (original %dx%d, crop left/top %d,%d%s), loss weight %g", i, batch["image_paths"][i],
                 original_w, original_h, crop_left, crop_top, flipped, weights[i])
        log.info("      caption: %s", caption)
    reporter.emit("debug_batch", batch=number, step=step, bucket=[width, height],
                  image_paths=list(batch["image_paths"]), captions=list(batch["captions"]), loss_weights=weights,
                  flipped=list(batch["flipped"]), files=[str(f) for f in files])


def write_batch_images(batch: dict, folder: Path, number: int) -> list[Path]:
    """The batch's images (and alpha masks) as PNGs, named by batch, position and source file."""
    from PIL import Image

    images = batch.get("images")
    if images is None:  # cached latents from a --dataset_class: nothing to look at
        return []
    masks = batch.get("alpha_masks")
    files = []
    for i, image in enumerate(images):
        stem = Path(batch["image_paths"][i]).stem or "image"
        path = folder / f"{number:04d}_{i}_{stem}.png"
        _save_png(Image.fromarray(to_uint8(image)), path)
        if masks is not None:
            mask = (masks[i].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            _save_png(Image.fromarray(mask), path.with_name(f"{path.stem}_mask.png"))
        files.append(path)
    return files


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> H x W x 3 uint8."""
    pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).numpy()


def _save_png(image, path: Path) -> None:
    with atomic_path(path) as temp:
        image.save(temp, format="PNG")
