"""`--dataset_class pkg.module.Class`: a dataset written by the user, behind the interface the loop uses.

sd-scripts constructs the class as `Class(tokenizer, max_token_length, resolution, debug_dataset)` and
takes each item as a whole batch. We do the same; the contract (docs/dataset_class.md):

* `len(obj)` is the number of batches per epoch; `obj[i]` returns one batch, a dict with
  `"images"`: float tensor (B, 3, H, W) in [-1, 1] (or `"latents"`: unscaled VAE latents (B, 4, H/8, W/8))
  and `"captions"`: list of B strings. Optional: `"loss_weights"` (B,), `"image_paths"` (or sd-scripts'
  `"image_keys"`), `"alpha_masks"` (B, H, W), SDXL's `"original_sizes_hw"`, `"crop_top_lefts"`,
  `"target_sizes_hw"` (B, 2), `"network_multipliers"` (B,). `"input_ids"` is ignored: the trainer
  tokenizes the captions itself, so `tokenizer` is passed as None.
* Optional methods, called before items are fetched (also in DataLoader workers): `set_current_epoch(e)`
  (1-based), `set_current_step(s)`, `set_max_train_steps(n)`. Optional attributes `num_train_images`,
  `num_reg_images` (for the summary and metadata).
"""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from trainer.data.dataset import SharedProgress
from trainer.errors import ConfigError, DatasetError, did_you_mean

CONTRACT_DOC = "docs/dataset_class.md"
_COUNTERS = ("set_current_epoch", "set_current_step", "set_max_train_steps")


def load_dataset_class(spec: str, *, resolution, max_token_length: int | None,
                       debug_dataset: bool) -> "CustomDataset":
    """Import `pkg.module.Class` (the current folder is importable, as for sd-scripts run from its folder) and
    construct it the way sd-scripts does."""
    cls = _import_class(spec)
    try:
        inner = cls(None, max_token_length, resolution, debug_dataset)
    except Exception as error:  # the user's code: say where it failed, the message is theirs
        raise DatasetError(f"--dataset_class {spec}: creating it failed at {_where(error)}: "
                           f"{type(error).__name__}: {error}. It is called as {cls.__name__}(tokenizer=None, "
                           f"max_token_length, resolution, debug_dataset); see {CONTRACT_DOC}.") from None
    dataset = CustomDataset(inner, spec)
    if len(dataset) < 1:
        raise DatasetError(f"--dataset_class {spec}: the dataset has no batches (len() is {len(inner)}).")
    return dataset


def _import_class(spec: str):
    module_name, _, class_name = spec.rpartition(".")
    if not module_name or not class_name:
        raise ConfigError(f"--dataset_class {spec}: give the module and the class, like mypackage.mydata.MyDataset.")
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.append(str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"--dataset_class {spec}: cannot import {module_name} ({error}). Put {module_name}.py "
                          "(or the package) in the folder you start training from, or on PYTHONPATH.") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        classes = [name for name, value in vars(module).items() if isinstance(value, type)]
        raise ConfigError(f"--dataset_class {spec}: {module_name} has no class {class_name}"
                          f"{did_you_mean(class_name, classes)}.")
    return cls


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


class CustomDataset(SharedProgress, torch.utils.data.Dataset):
    """The user's dataset with our TrainDataset's interface: counters shared with DataLoader workers and
    forwarded before each item, batches checked and completed with defaults, no metadata or validation."""

    def __init__(self, inner: Any, name: str):
        self.inner = inner
        self.name = name
        self._init_progress()
        self._forwarded: dict[str, int] = {}  # per process: what the inner object was last told
        self.records: list = []
        self.subsets: list = []

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict:
        self._forward_counters()
        return complete_batch(self.inner[index], f"{self.name}[{index}]")

    def _forward_counters(self) -> None:
        for method, value in zip(_COUNTERS, (self._epoch.value, self._step.value, self._max_train_steps.value)):
            setter = getattr(self.inner, method, None)
            if callable(setter) and self._forwarded.get(method) != value:
                setter(value)
                self._forwarded[method] = value

    # the TrainDataset interface ---------------------------------------------------------------------------
    def validation_dataset(self) -> None:
        return None

    def cache_latents(self, *args, **kwargs) -> None:
        raise ConfigError(f"--cache_latents cannot be used with --dataset_class {self.name}: the class serves its "
                          "own batches; return \"latents\" from it to use cached latents.")

    @property
    def num_train_images(self) -> int:
        return int(getattr(self.inner, "num_train_images", 0) or 0)

    @property
    def num_reg_images(self) -> int:
        return int(getattr(self.inner, "num_reg_images", 0) or 0)

    num_validation_images = 0

    def tag_frequency(self) -> dict:
        return {}

    def dataset_dirs_info(self) -> dict:
        return {}

    def reg_dataset_dirs_info(self) -> dict:
        return {}

    def bucket_info(self) -> None:
        return None

    def datasets_metadata(self) -> list:
        return []


def complete_batch(batch: Any, where: str) -> dict:
    """Check a batch from a --dataset_class against the contract and fill in what it may leave out."""
    if not isinstance(batch, dict):
        raise DatasetError(f"--dataset_class {where} returned {type(batch).__name__}, not a dict batch "
                           f"(see {CONTRACT_DOC}).")
    images, latents = batch.get("images"), batch.get("latents")
    pixels = images if images is not None else latents
    channels = 3 if images is not None else 4
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[1] != channels:
        raise DatasetError(f"--dataset_class {where}: needs \"images\" as a float tensor (B, 3, H, W) in [-1, 1] "
                           f"or \"latents\" (B, 4, H/8, W/8); got {_describe(pixels)} (see {CONTRACT_DOC}).")
    size = len(pixels)
    captions = batch.get("captions")
    if not isinstance(captions, (list, tuple)) or len(captions) != size or \
            not all(isinstance(c, str) for c in captions):
        raise DatasetError(f"--dataset_class {where}: needs \"captions\", a list of {size} strings (one per "
                           f"image); got {_describe(captions)}.")
    height, width = images.shape[2:] if images is not None else (latents.shape[2] * 8, latents.shape[3] * 8)
    sizes = torch.tensor([[height, width]] * size, dtype=torch.long)
    paths = batch.get("image_paths") or batch.get("image_keys") or [f"{where}/{i}" for i in range(size)]
    return {
        "images": images, "latents": latents, "captions": list(captions),
        "loss_weights": _vector(batch.get("loss_weights"), size),
        "original_sizes_hw": batch.get("original_sizes_hw", sizes),
        "crop_top_lefts": batch.get("crop_top_lefts", torch.zeros(size, 2, dtype=torch.long)),
        "target_sizes_hw": batch.get("target_sizes_hw", sizes),
        "image_paths": [str(p) for p in paths], "flipped": list(batch.get("flipped") or [False] * size),
        "alpha_masks": batch.get("alpha_masks"),
        "network_multipliers": _vector(batch.get("network_multipliers"), size),
    }


def _vector(value, size: int) -> torch.Tensor:
    return torch.ones(size) if value is None else torch.as_tensor(value, dtype=torch.float32).reshape(size)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return "nothing" if value is None else type(value).__name__
