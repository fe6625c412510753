"""The built-in demo: a tiny SD1-architecture model (`builtin:tiny-sd1`, built from a shipped config with a
fixed seed, no download) and a few generated pictures with captions in a `N_token` folder. It proves the
whole path (setup, dataset, training, the LoRA file) in under two minutes on a CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from trainer.paths import PRESETS_DIR

log = logging.getLogger(__name__)

DEMO_MODEL = "builtin:tiny-sd1"
DEMO_PRESET = PRESETS_DIR / "demo.toml"
DEMO_FOLDER = "10_shp shape"  # 10 repeats, class token "shp shape"
SHAPES = ("circle", "square", "triangle", "ring")
COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (230, 200, 40)}


def draw_shape(shape: str, colour: tuple[int, int, int], background: tuple[int, int, int], size: int = 64,
               offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """An RGB uint8 picture of one filled shape on a plain background."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = size / 2 + offset[0], size / 2 + offset[1]
    r = size * 0.3
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif shape == "ring":
        mask = (dx**2 + dy**2 <= r**2) & (dx**2 + dy**2 >= (r * 0.6) ** 2)
    elif shape == "square":
        mask = (abs(dx) <= r * 0.85) & (abs(dy) <= r * 0.85)
    else:  # triangle pointing up
        mask = (dy <= r * 0.8) & (dy >= -r) & (abs(dx) <= (dy + r) * 0.6)
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = background
    image[mask] = colour
    return image


def write_demo_dataset(train_data_dir: str | Path, count: int = 8) -> Path:
    """`train_data_dir/10_shp shape/` with `count` PNGs and `.txt` captions; returns the image folder."""
    from PIL import Image

    folder = Path(train_data_dir) / DEMO_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colour_names = list(COLOURS)
    for i in range(count):
        shape, colour = SHAPES[i % len(SHAPES)], colour_names[(i // len(SHAPES)) % len(colour_names)]
        background = tuple(int(v) for v in rng.integers(150, 255, size=3))
        offset = tuple(int(v) for v in rng.integers(-6, 7, size=2))
        Image.fromarray(draw_shape(shape, COLOURS[colour], background, offset=offset)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"shp shape, {colour} {shape}, plain background", encoding="utf-8")
    return folder


def demo_pictures_pending(cfg) -> bool:
    """Whether the first run will generate the demo's pictures: the built-in model and a data folder that
    does not exist yet."""
    return (cfg.pretrained_model_name_or_path == DEMO_MODEL and bool(cfg.train_data_dir)
            and not Path(cfg.train_data_dir).exists())


def maybe_write_demo_dataset(cfg) -> None:
    """The demo model comes with its pictures: generate them when the demo's data folder does not exist yet."""
    if demo_pictures_pending(cfg):
        folder = write_demo_dataset(cfg.train_data_dir)
        log.info("Generated the demo pictures in %s", folder)
