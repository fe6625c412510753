"""Out of GPU memory: say where it happened, what the card has, and what to lower, biggest saving first.

The loop turns `torch.cuda.OutOfMemoryError` into `TrainingOutOfMemory` after saving the weights so far (as
Ctrl-C does); `run_training` turns either into one `UserError` with the steps for this config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.presets import PHASE_WORDS, memory_advice
from trainer.train.phases import phase_of
from trainer.train.step import NonFiniteLoss


@dataclass(eq=False)
class TrainingOutOfMemory(Exception):
    """The loop ran out of GPU memory; `saved` is the step file written on the way out (None: nothing)."""
    phase: str  # "train" | "sample" | "validate" | "cache_latents" | "cache_text" | "load"
    where: str
    step: int
    saved: Path | None
    family: str | None = None


OUT_OF_MEMORY = (TrainingOutOfMemory, torch.cuda.OutOfMemoryError)


def where_of(error: BaseException, step: int | None) -> tuple[str, str]:
    """(phase, words) for where the memory ran out: the phase the error was raised in (trainer.train.phases),
    else the training step when the loop was running, else loading."""
    key = phase_of(error)
    if key is None or key == "train":
        return ("train", f"training step {step}") if step is not None else ("load", PHASE_WORDS["load"])
    return key, PHASE_WORDS[key]


def stopped_by_oom(error: BaseException, setup, step: int, epoch: int) -> TrainingOutOfMemory:
    """In the loop's `except`: free what the failed step held, save the weights so far if a step finished."""
    phase, where = where_of(error, step + 1)
    error.__traceback__ = None  # its frames hold the failed step's activations
    _free_cache()
    saved = None
    if step > 0:
        try:
            saved = setup.saver.interrupted(step, epoch)
        except (torch.cuda.OutOfMemoryError, NonFiniteLoss):  # the saver refuses to write broken weights
            saved = None
    return TrainingOutOfMemory(phase, where, step, saved, getattr(setup.models, "family", None))


def out_of_memory_error(cfg, error: BaseException, family: str | None = None) -> UserError:
    """The one message for the user: phase, card, saved file, and the settings to change for this config."""
    if isinstance(error, TrainingOutOfMemory):
        stop = error
    else:  # before the loop (loading, latent or text caching): nothing trained, nothing to save
        phase, where = where_of(error, None)
        error.__traceback__ = None
        _free_cache()
        stop = TrainingOutOfMemory(phase, where, 0, None, family)
    card = card_text()
    steps = memory_advice(cfg, stop.family or ("sdxl" if cfg.sdxl else "sd1"), stop.phase, card_gb())
    if stop.saved is not None:
        kept = (f"The LoRA trained so far (step {stop.step}) was saved to {stop.saved}; continue from it with "
                f"--network_weights \"{stop.saved}\".")
    else:
        kept = "Nothing was trained yet, nothing was saved."
    numbered = " ".join(f"({i}) {s}." for i, s in enumerate(steps, 1))
    return UserError(f"Out of GPU memory while {stop.where} ({card}). {kept} To fit, change these in your "
                     f"config, the biggest saving first, one at a time: {numbered}")


def card_gb() -> float | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30


def card_text() -> str:
    total = card_gb()
    if total is None:
        return "no CUDA card visible to torch"
    index = torch.cuda.current_device()
    peak = torch.cuda.max_memory_reserved(index) / 2**30
    return (f"{torch.cuda.get_device_name(index)} has {total:.1f} GB; this run held up to {peak:.1f} GB, "
            f"other programs use the rest")


def _free_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
