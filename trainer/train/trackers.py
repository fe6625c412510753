"""Experiment trackers (--logging_dir, --log_with): listeners that turn the loop's events into sd-scripts'
TensorBoard / wandb tags (train_network.py), so dashboards and scripts written for sd-scripts' logs keep working.

Both libraries are optional: when one is missing the run warns once, naming the pip command, and trains on.
The "step" event is throttled, so trackers read its `steps` list: one entry per optimizer step since the last
event ({step, epoch, loss, average, lr, d, max_norm}), gathered by the loop without extra GPU syncs."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError
from trainer.train.events import Event

log = logging.getLogger(__name__)

DEFAULT_TRACKER_NAME = "network_train"  # sd-scripts' train_network.py project name
# Left out of --log_config: secrets, and paths (they name the user's folders and files).
PRIVATE_ARGS = frozenset({
    "wandb_api_key", "huggingface_token", "pretrained_model_name_or_path", "vae", "tokenizer_cache_dir",
    "train_data_dir", "reg_data_dir", "conditioning_data_dir", "output_dir", "logging_dir", "dataset_config",
    "in_json", "sample_prompts", "network_weights", "base_weights", "resume", "config_file", "output_config",
    "log_tracker_config", "dataset_class"})


def run_dir(logging_dir: str | Path, log_prefix: str | None, now: float | None = None) -> Path:
    """sd-scripts' run folder: `<logging_dir>/<log_prefix><YYYYmmddHHMMSS>` (local time)."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(time.time() if now is None else now))
    return Path(logging_dir) / f"{log_prefix or ''}{stamp}"


def sanitized_config(cfg: Any) -> dict[str, Any]:
    """--log_config: the arguments without secrets and paths; values a tracker can show (lists as text)."""
    import dataclasses

    values = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in PRIVATE_ARGS or value is None:
            continue
        values[f.name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return values


def step_tags(entry: dict, descriptions: list[str], train_unet_only: bool) -> dict[str, float]:
    """sd-scripts' per-step tags (generate_step_logs). QUIRK kept on purpose: its `for ... else` also logs
    `lr/textencoder` = the first group's lr (unless UNet-only) and `lr/group<i>` for the remaining groups."""
    tags = {"loss/current": entry["loss"], "loss/average": entry["average"]}
    if entry.get("max_norm") is not None:
        keys_scaled, mean_norm, max_norm = entry["max_norm"]
        tags.update({"max_norm/keys_scaled": keys_scaled, "max_norm/max_key_norm": max_norm,
                     "norm/avg_key_norm": mean_norm})
    lrs, ds = entry["lr"], entry.get("d") or [None] * len(entry["lr"])
    for i, (lr, d) in enumerate(zip(lrs, ds)):
        desc = descriptions[i] if i < len(descriptions) else f"group{i}"
        tags[f"lr/{desc}"] = lr
        if d is not None:  # D-Adaptation / Prodigy: the effective learning rate
            tags[f"lr/d*lr/{desc}"] = d * lr
    first = 0
    if not train_unet_only and lrs:
        tags["lr/textencoder"] = lrs[0]
        first = 1
    for i in range(first, len(lrs)):
        tags[f"lr/group{i}"] = lrs[i]
        if ds[i] is not None:
            tags[f"lr/d*lr/group{i}"] = ds[i] * lrs[i]
    return {k: float(v) for k, v in tags.items() if v is not None}


class TrackerListener:
    """Turns events into (tags, step, epoch) calls of `log`; subclasses write them to one tracker.
    Per-step tags go at the global step; per-epoch tags (loss/epoch_average, epoch validation) at the epoch."""

    def __init__(self, *, train_unet_only: bool = False):
        self.train_unet_only = train_unet_only
        self.descriptions: list[str] = []
        self.epoch_average: tuple[int, float] | None = None  # (epoch, moving average at its last step)
        self.last_step = 0

    def handle(self, event: Event) -> None:
        handler = getattr(self, f"on_{event.kind}", None)
        if handler:
            handler(event.data)

    def on_run_started(self, d: dict) -> None:
        self.descriptions = list(d.get("lr_descriptions") or [])
        self.start()

    def on_step(self, d: dict) -> None:
        for entry in d.get("steps") or ():
            if self.epoch_average and entry["epoch"] != self.epoch_average[0]:
                self._log_epoch_average()
            self.log(step_tags(entry, self.descriptions, self.train_unet_only), entry["step"], entry["epoch"],
                     step_cadence=True)
            self.last_step = entry["step"]
            if entry["average"] is not None:
                self.epoch_average = (entry["epoch"], entry["average"])

    def on_validation(self, d: dict) -> None:
        cadence = "step" if d["cadence"] == "step" else "epoch"
        tags = {f"loss/validation/{cadence}_average": d["loss"]}
        if d.get("divergence") is not None:
            tags[f"loss/validation/{cadence}_divergence"] = d["divergence"]
        at = d["step"] if cadence == "step" else d["epoch"]
        self.log(tags, at, d["epoch"], step_cadence=cadence == "step", global_step=d["step"])

    def on_finished(self, d: dict) -> None:
        self._log_epoch_average()

    def _log_epoch_average(self) -> None:
        if self.epoch_average:
            epoch, average = self.epoch_average
            self.log({"loss/epoch_average": average}, epoch, epoch, step_cadence=False, global_step=self.last_step)
            self.epoch_average = None

    def start(self) -> None: ...

    def log(self, tags: dict[str, float], at: int, epoch: int, *, step_cadence: bool,
            global_step: int | None = None) -> None: ...

    def close(self) -> None: ...


class TensorBoardListener(TrackerListener):
    """Event files in `<run dir>/<tracker name>/`, as accelerate's TensorBoard tracker writes them for sd-scripts.
    The folder is made when training starts, so a run that fails while loading leaves nothing behind."""

    def __init__(self, folder: Path, writer_class, *, config: dict | None = None, init_kwargs: dict | None = None,
                 train_unet_only: bool = False):
        super().__init__(train_unet_only=train_unet_only)
        self.folder = folder
        self.writer_class = writer_class
        self.config = config
        self.init_kwargs = init_kwargs or {}
        self.writer = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer = self.writer_class(str(self.folder), **self.init_kwargs)
        if self.config:
            self.writer.add_hparams(self.config, metric_dict={})

    def log(self, tags, at, epoch, *, step_cadence, global_step=None) -> None:
        if self.writer is None:
            return
        for tag, value in tags.items():
            self.writer.add_scalar(tag, value, global_step=at)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbListener(TrackerListener):
    """wandb run named by --wandb_run_name in project <tracker name>; like sd-scripts, each log carries
    `global_step` and `epoch` fields instead of a wandb step (epoch tags would otherwise go backwards)."""

    def __init__(self, wandb, project: str, folder: Path | None, *, api_key: str | None = None,
                 config: dict | None = None, init_kwargs: dict | None = None, train_unet_only: bool = False):
        super().__init__(train_unet_only=train_unet_only)
        self.wandb, self.project, self.folder, self.api_key = wandb, project, folder, api_key
        self.config = config
        self.init_kwargs = init_kwargs or {}
        self.run = None

    def start(self) -> None:
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            os.environ["WANDB_DIR"] = str(self.folder)
        if self.api_key:
            self.wandb.login(key=self.api_key)
        self.run = self.wandb.init(project=self.project, config=self.config, **self.init_kwargs)

    def log(self, tags, at, epoch, *, step_cadence, global_step=None) -> None:
        if self.run is not None:
            self.run.log({**tags, "global_step": at if global_step is None else global_step, "epoch": epoch})

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("--logging_dir: TensorBoard is not installed, so nothing is logged there; training goes on. "
                    "To get the TensorBoard logs: pip install tensorboard")
        return None
    return SummaryWriter


def _wandb():
    try:
        import wandb
    except ImportError:
        log.warning("--log_with wandb: wandb is not installed, so nothing is logged to wandb; training goes on. "
                    "To log to wandb: pip install wandb")
        return None
    return wandb


def tracker_init_kwargs(cfg: Any) -> dict[str, dict]:
    """Keyword arguments per tracker ("tensorboard", "wandb"): --log_tracker_config's TOML replaces the
    --wandb_run_name default, as in sd-scripts."""
    if not cfg.log_tracker_config:
        return {"wandb": {"name": cfg.wandb_run_name}} if cfg.wandb_run_name else {}
    import toml

    path = Path(cfg.log_tracker_config)
    try:
        data = toml.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"--log_tracker_config {path}: cannot read it ({e.strerror or e}). Check the path.") from None
    except (toml.TomlDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--log_tracker_config {path}: not a valid UTF-8 TOML file ({e}). It holds tables "
                          "such as [wandb] with wandb.init options.") from None
    return {name: dict(value) for name, value in data.items() if isinstance(value, dict)}


def tracker_listeners(cfg: Any, now: float | None = None) -> list[TrackerListener]:
    """The trackers a config asks for: --logging_dir alone means TensorBoard; --log_with tensorboard/wandb/all."""
    log_with = cfg.log_with or ("tensorboard" if cfg.logging_dir else None)
    if log_with is None:
        return []
    folder = run_dir(cfg.logging_dir, cfg.log_prefix, now) if cfg.logging_dir else None
    name = cfg.log_tracker_name or DEFAULT_TRACKER_NAME
    config = sanitized_config(cfg) if cfg.log_config else None
    kwargs = tracker_init_kwargs(cfg)
    unet_only = bool(cfg.network_train_unet_only)
    listeners: list[TrackerListener] = []
    if log_with in ("tensorboard", "all") and folder is not None:
        writer_class = _summary_writer()
        if writer_class is not None:
            listeners.append(TensorBoardListener(folder / name, writer_class, config=config,
                                                 init_kwargs=kwargs.get("tensorboard"), train_unet_only=unet_only))
    if log_with in ("wandb", "all"):
        wandb = _wandb()
        if wandb is not None:
            listeners.append(WandbListener(wandb, name, folder, api_key=cfg.wandb_api_key, config=config,
                                           init_kwargs=kwargs.get("wandb"), train_unet_only=unet_only))
    return listeners
