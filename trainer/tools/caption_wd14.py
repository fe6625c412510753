"""Danbooru-style tags from SmilingWolf's WD14 taggers (v2 and v3: `model.onnx` + `selected_tags.csv`),
run by onnxruntime, as sd-scripts' finetune/tag_images_by_wd14_tagger.py does with `--onnx`.

The model sees the picture padded to a white square, resized to its input size, in BGR order, as float32
0-255, NHWC. It gives one score (0-1) per row of `selected_tags.csv`, whose `category` column says what the
row is: 9 rating (general, sensitive, questionable, explicit), 0 general tag, 4 character."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from trainer.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_REPO = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
MODEL_FILE, TAGS_FILE = "model.onnx", "selected_tags.csv"
FILES = (MODEL_FILE, TAGS_FILE)
RATING, GENERAL, CHARACTER = "9", "0", "4"
DEFAULT_SIZE = 448  # the input size of every WD14 tagger; read from the model when it says
PIP_HINT = ("WD14 tagging needs onnxruntime. Install it into the trainer's environment: "
            "python -m pip install onnxruntime-gpu  (NVIDIA card; CPU only: python -m pip install onnxruntime)")


@dataclass(frozen=True)
class Label:
    name: str       # as written into captions (after --remove_underscore)
    category: str   # RATING, GENERAL, CHARACTER or another Danbooru category (not used)


@dataclass(frozen=True)
class TagRules:
    general_threshold: float = 0.35
    character_threshold: float = 0.35
    undesired: frozenset[str] = frozenset()
    first: tuple[str, ...] = ()      # --always_first_tags, in the order given
    character_first: bool = False    # --character_tags_first
    rating: str = ""                 # "first" / "last": the most likely rating tag there; "" none


def caption_name(tag: str, remove_underscore: bool) -> str:
    """sd-scripts' --remove_underscore: `long_hair` -> `long hair`, but short emoticons such as `^_^` stay."""
    return tag.replace("_", " ") if remove_underscore and len(tag) > 3 else tag


def read_labels(path: Path, remove_underscore: bool = False) -> list[Label]:
    """The rows of `selected_tags.csv` (header `tag_id,name,category,count`), in model-output order."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the tags file ({e}).") from None
    if not rows or rows[0][:3] != ["tag_id", "name", "category"]:
        raise ConfigError(f"{path}: not a WD14 tags file (its first line must be 'tag_id,name,category,count', "
                          f"it is {','.join(rows[0]) if rows else 'empty'!r}). Use the selected_tags.csv of the model.")
    return [Label(caption_name(row[1], remove_underscore), row[2].strip()) for row in rows[1:] if len(row) >= 3]


def select_tags(scores: Sequence[float], labels: Sequence[Label], rules: TagRules) -> list[str]:
    """The caption's tags: general tags then character tags whose score reaches their threshold, in the
    tags file's order, without the undesired ones; then the rating and --always_first_tags moved forward."""
    general, character, ratings = [], [], []
    for label, score in zip(labels, scores):
        if label.category == RATING:
            ratings.append((score, label.name))
        elif label.name in rules.undesired:
            continue
        elif label.category == GENERAL and score >= rules.general_threshold:
            general.append(label.name)
        elif label.category == CHARACTER and score >= rules.character_threshold:
            character.append(label.name)
    tags = character + general if rules.character_first else general + character
    if rules.rating and ratings:
        rating = max(ratings, key=lambda pair: pair[0])[1]  # the first of equals, as numpy's argmax
        if rating not in rules.undesired:
            tags = [rating, *tags] if rules.rating == "first" else [*tags, rating]
    first = [tag for tag in rules.first if tag in tags]
    return first + [tag for tag in tags if tag not in first]


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """An RGB picture as the tagger's input row: white-padded square, `size` x `size`, BGR, float32 0-255."""
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    # sd-scripts resizes with cv2's INTER_AREA when shrinking (PIL's box filter is the same average) and
    # Lanczos when enlarging
    resample = Image.Resampling.BOX if side >= size else Image.Resampling.LANCZOS
    pixels = np.asarray(square.resize((size, size), resample), dtype=np.float32)
    return np.ascontiguousarray(pixels[:, :, ::-1])


class Tagger:
    """A loaded WD14 tagger: `tags(images)` gives each picture's tags."""

    def __init__(self, folder: Path, rules: TagRules, remove_underscore: bool = False, batch_size: int = 1):
        ort = require_onnxruntime()
        model, tags_file = folder / MODEL_FILE, folder / TAGS_FILE
        for needed in (model, tags_file):
            if not needed.is_file():
                raise ConfigError(f"{needed} is missing: a WD14 model folder holds {' and '.join(FILES)} "
                                  "(pass --force_download to fetch them again).")
        self.labels = read_labels(tags_file, remove_underscore)
        self.rules = rules
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        providers = [p for p in wanted if p in ort.get_available_providers()] or None
        try:
            self.session = ort.InferenceSession(str(model), providers=providers)
        except Exception as e:  # a truncated download, not an ONNX file
            raise ConfigError(f"{model}: onnxruntime cannot load it ({e}). Pass --force_download to fetch it "
                              "again.") from None
        self.input = self.session.get_inputs()[0]
        self.size, fixed_batch = _input_layout(self.input.shape, model)
        self.batch_size = fixed_batch or batch_size
        if fixed_batch and fixed_batch != batch_size:
            log.info("%s takes batches of %d pictures: using --batch_size %d", model.name, fixed_batch, fixed_batch)
        log.info("WD14 tagger %s on %s", folder, self.session.get_providers()[0])

    def tags(self, images: Sequence[Image.Image]) -> list[list[str]]:
        rows = np.stack([preprocess(image, self.size) for image in images])
        if len(rows) < self.batch_size:  # a model with a fixed batch: fill the last one, drop the extra scores
            rows = np.concatenate([rows, np.zeros((self.batch_size - len(rows), *rows.shape[1:]), rows.dtype)])
        scores = self.session.run(None, {self.input.name: rows})[0][: len(images)]
        if scores.shape[-1] != len(self.labels):
            raise ConfigError(f"the tagger gives {scores.shape[-1]} scores but its {TAGS_FILE} has "
                              f"{len(self.labels)} tags: the two files come from different models.")
        return [select_tags(row, self.labels, self.rules) for row in scores]


def _input_layout(shape: Sequence, model: Path) -> tuple[int, int | None]:
    """(picture size, fixed batch size or None) of an NHWC input `[batch, H, W, 3]`."""
    if len(shape) != 4 or shape[-1] != 3:
        raise ConfigError(f"{model}: its input is {list(shape)}, not [batch, height, width, 3] as WD14 taggers "
                          "take; use a SmilingWolf wd-*-tagger model.")
    size = shape[1] if isinstance(shape[1], int) and shape[1] > 0 else DEFAULT_SIZE
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    return size, batch


def require_onnxruntime():
    """onnxruntime, or the one message that says how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(PIP_HINT) from None
    return onnxruntime
