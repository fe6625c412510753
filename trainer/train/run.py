"""Run one training from a TrainConfig: listeners on, parts built, loop run, failures explained."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from trainer import interrupts
from trainer.config.args import TrainConfig
from trainer.demo import maybe_write_demo_dataset
from trainer.errors import UserError
from trainer.train.build import prepare_training
from trainer.train.debug_dataset import debug_dataset
from trainer.train.events import ConsoleListener, JsonlListener, Listener, Reporter, events_file
from trainer.train.loop import train
from trainer.train.oom import OUT_OF_MEMORY, out_of_memory_error
from trainer.train.step import NonFiniteLoss
from trainer.train.trackers import tracker_listeners
from trainer.train.watch import spill_watch

log = logging.getLogger(__name__)

NAN_HINT = ("Try --mixed_precision bf16 (or no), --no_half_vae, or a lower --learning_rate. "
            "Old GTX 10xx/16xx cards cannot train in fp16.")


class WarningsToEvents(logging.Handler):
    """Our log warnings also become events, so the JSON-lines file (and the GUI) sees them."""

    def __init__(self, reporter: Reporter):
        super().__init__(logging.WARNING)
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        self.reporter.emit("warning", message=record.getMessage(), source=record.name)


def is_main_process() -> bool:
    """Before the Accelerator exists: `accelerate launch` / torchrun set RANK for each process."""
    return int(os.environ.get("RANK", "0")) == 0


def default_listeners(cfg: TrainConfig) -> list[Listener]:
    """The console bar, and the JSON-lines file beside the LoRA for other programs to follow."""
    listeners: list[Listener] = [ConsoleListener()]
    try:
        listeners.append(JsonlListener(events_file(cfg.output_dir, cfg.output_name)))
    except OSError:
        pass  # an unwritable output folder is reported with its fix by the pre-flight check
    return listeners


def run_training(cfg: TrainConfig, listeners: list[Listener] | None = None) -> Path:
    """Train and return the final LoRA file (with --debug_dataset: the folder of batch images). User mistakes
    surface as UserError; Ctrl-C saves and re-raises."""
    if is_main_process():
        maybe_write_demo_dataset(cfg)
    if listeners is None:  # data parallel: only the main process reports and writes files
        listeners = default_listeners(cfg) if is_main_process() else []
    reporter = Reporter(listeners)
    bridge = WarningsToEvents(reporter)
    logging.getLogger("trainer").addHandler(bridge)
    try:
        if cfg.debug_dataset:  # look at the batches instead of training; no model is loaded
            interrupts.begin_training()  # Ctrl-C ends the viewing at once
            return debug_dataset(cfg, reporter)
        if is_main_process():  # --logging_dir / --log_with: TensorBoard, wandb (a missing package warns once)
            reporter.listeners += tracker_listeners(cfg)
        try:
            setup = prepare_training(cfg, reporter)
            return train(setup, reporter, spill_watch(cfg, setup, reporter))
        except NonFiniteLoss as e:
            raise UserError(f"Training stopped: {e}. {NAN_HINT} Nothing was written after that step; files "
                            "saved before it are fine.") from None
        except OUT_OF_MEMORY as e:  # in the loop, or while loading or caching before it
            raise out_of_memory_error(cfg, e) from None
    except UserError as e:
        reporter.emit("failed", reason=str(e))
        raise
    finally:
        logging.getLogger("trainer").removeHandler(bridge)
        reporter.close()
