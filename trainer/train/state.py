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
    step: int = 0            # optimizer steps already done
    epoch: int = 1           # the epoch to continue in (1-based)
    batches_to_skip: int = 0  # batches of that epoch already trained on


def resume_point(done_steps: int, steps_per_epoch: int, gradient_accumulation_steps: int) -> ResumePoint:
    """Where to continue, from the number of optimizer steps done (robust to mid-epoch saves)."""
    epoch, into_epoch = divmod(done_steps, steps_per_epoch)
    return ResumePoint(done_steps, epoch + 1, into_epoch * gradient_accumulation_steps)


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


def load_training_state(accelerator, folder: str | Path) -> int:
    """Restore a state folder; returns the optimizer steps it had done. A missing folder is an error, never a
    silent fresh start."""
    folder = check_state_folder(folder)
    try:
        done = int(json.loads((folder / TRAIN_STATE_FILE).read_text(encoding="utf-8"))["current_step"])
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
