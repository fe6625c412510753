"""Training state for `--resume`: accelerate's save_state folder (LoRA weights, optimizer, scheduler, random
states) plus sd-scripts' `train_state.json` ({"current_epoch", "current_step"}), written atomically."""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError

TRAIN_STATE_FILE = "train_state.json"


@dataclass(frozen=True)
class ResumePoint:
    """Where the loop starts: a fresh run is ResumePoint()."""
    step: int = 0            # the global step counter's start (optimizer steps counted as done)
    epoch: int = 1           # the epoch to start in (1-based)
    batches_to_skip: int = 0  # batches of that epoch not trained on (again)


def resume_point(done_steps: int, steps_per_epoch: int, gradient_accumulation_steps: int) -> ResumePoint:
    """Where to continue, from the number of optimizer steps done (robust to mid-epoch saves)."""
    epoch, into_epoch = divmod(done_steps, steps_per_epoch)
    return ResumePoint(done_steps, epoch + 1, into_epoch * gradient_accumulation_steps)


def initial_step_of(*, initial_step: int | None, initial_epoch: int | None, state_step: int | None,
                    steps_per_epoch: int) -> int:
    """sd-scripts' precedence (train_network.py's resume logic): --initial_step, else --initial_epoch (1-based: epoch e
    starts after e-1 epochs of optimizer steps), else the --resume state's current_step, else 0."""
    if initial_step is not None:
        return initial_step
    if initial_epoch is not None:
        return (initial_epoch - 1) * steps_per_epoch
    return state_step or 0


def start_point(initial_step: int, *, skip_until_initial_step: bool, steps_per_epoch: int,
                gradient_accumulation_steps: int) -> ResumePoint:
    """Where the loop starts for an initial step.

    With --skip_until_initial_step the run continues exactly there: the global step counter starts at
    `initial_step` and the batches of the epoch already trained on are skipped. (sd-scripts' own code sets
    the counter to the step within the epoch and mixes batches with steps under gradient accumulation;
    we restore the full count, as its documentation says.)

    Without it, sd-scripts only fast-forwards the epoch counter: the global step restarts at 0, the epoch
    is trained from its first batch, and the run goes on until max_train_steps *new* steps or the last
    epoch. Odd, but kept for compatibility: a plain `--resume` therefore trains more steps than the
    original plan unless it resumes at an epoch boundary of an epoch-based run."""
    if skip_until_initial_step:
        return resume_point(initial_step, steps_per_epoch, gradient_accumulation_steps)
    return ResumePoint(step=0, epoch=initial_step // steps_per_epoch + 1)


def save_training_state(accelerator, folder: Path, *, epoch: int, step: int) -> Path:
    """Write the state to a temporary folder, then swap it in: a crash never leaves half a state."""
    folder = Path(folder)
    temp = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        accelerator.save_state(str(temp))
        (temp / TRAIN_STATE_FILE).write_text(json.dumps({"current_epoch": epoch, "current_step": step}),
                                             encoding="utf-8")
        if folder.exists():
            old = folder.with_name(f"{folder.name}.old-{uuid.uuid4().hex[:8]}")
            folder.rename(old)
            temp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            temp.rename(folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return folder


def read_state_step(folder: str | Path) -> int:
    """The optimizer steps a state folder had done (its train_state.json), without loading the state."""
    folder = check_state_folder(folder)
    try:
        return int(json.loads((folder / TRAIN_STATE_FILE).read_text(encoding="utf-8"))["current_step"])
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise UserError(f"--resume {folder}: {TRAIN_STATE_FILE} is damaged ({e}); it should hold "
                        '{"current_epoch": N, "current_step": N}.') from None


def load_training_state(accelerator, folder: str | Path) -> int:
    """Restore a state folder; returns the optimizer steps it had done. A missing folder is an error, never a
    silent fresh start."""
    done = read_state_step(folder)
    try:
        accelerator.load_state(str(folder))
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise UserError(f"--resume {folder}: the state does not fit this run ({e}). Resume with the same "
                        "network and optimizer settings as the run that saved it.") from None
    return done


def check_state_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not (folder / TRAIN_STATE_FILE).is_file():
        hint = " (it has no train_state.json: is it a state folder written by --save_state?)" if folder.is_dir() else ""
        raise UserError(f"--resume {folder}: no training state there{hint}. Give a '<name>-state' or "
                        "'<name>-step00000500-state' folder from an earlier run with --save_state.")
    return folder


def remove_state(folder: Path | None) -> None:
    if folder is not None and folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
