"""Training state for `--resume`: accelerate's save_state folder (LoRA weights, optimizer, scheduler, random
states) plus sd-scripts' `train_state.json` ({"current_epoch", "current_step"}), written atomically.

Our train_state.json also holds `"run"`: what the state belongs to (optimizer, network shape, dataset, seed,
batch), so a --resume into another run is refused or warned about by name instead of failing at its first
step or training on silently. sd-scripts reads only the two step fields, so the file stays its format."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.errors import UserError

TRAIN_STATE_FILE = "train_state.json"

log = logging.getLogger(__name__)


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


class StepBoundary:
    """The random streams (python, numpy, torch CPU and CUDA) and accelerate's micro-batch count as they were
    just after the last optimizer step. A Ctrl-C lands inside a step whose micro-batches have drawn their
    timesteps and noise and counted themselves: the state folder written then must hold the values at the
    end of the step it is named after, or the resumed run draws other noise and, under gradient
    accumulation, steps the optimizer after the wrong micro-batch."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.mark()

    def mark(self) -> None:
        self.python, self.numpy, self.torch = random.getstate(), np.random.get_state(), torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.micro_step = self.accelerator.step

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        self.accelerator.step = self.micro_step


def describe_run(*, optimizer: str, network_module: str, network: torch.nn.Module, dataset, seed: int,
                 batch_size: int, gradient_accumulation_steps: int) -> dict:
    """What a state folder belongs to, as train_state.json's "run" records it. The pictures are named by
    folder and file name (not the full path): a dataset moved to another drive is still the same dataset."""
    shapes = sorted(f"{name}:{tuple(t.shape)}" for name, t in network.state_dict().items())
    pictures = sorted(f"{r.path.parent.name}/{r.path.name}:{r.num_repeats}:{int(r.is_reg)}"
                      for r in getattr(dataset, "records", []))
    return {
        "optimizer": optimizer,
        "network": {"module": network_module, "tensors": len(shapes), "shapes": _digest(shapes)},
        "dataset": {"batches_per_epoch": len(dataset), "pictures": len(pictures), "files": _digest(pictures)},
        "seed": seed, "train_batch_size": batch_size, "gradient_accumulation_steps": gradient_accumulation_steps,
    }


def _digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:16]


def check_state_fits(folder: str | Path, run: dict) -> None:
    """Before --resume loads a state: another optimizer or network is refused (it would fail at the first step
    or load wrong shapes), naming both; another dataset, seed or batch continues with a warning, as the run
    then is no longer the one that was saved. States without a record (older, or sd-scripts') pass here
    and are checked by load_training_state."""
    saved = _read_state_file(Path(folder)).get("run")
    if not isinstance(saved, dict):
        return
    where = f"--resume {folder}"
    if saved.get("optimizer") != run["optimizer"]:
        raise UserError(f"{where}: the state was saved with the optimizer {saved.get('optimizer')}, this run uses "
                        f"{run['optimizer']}. Resume with the same --optimizer_type, or start a new run.")
    if saved.get("network") != run["network"]:
        was, now = saved.get("network") or {}, run["network"]
        raise UserError(f"{where}: the state holds another network ({was.get('module')}, {was.get('tensors')} "
                        f"tensors) than this run ({now['module']}, {now['tensors']} tensors, or other shapes). "
                        "Resume with the same --network_module, --network_dim, --conv_dim and --network_args "
                        "(and the same model), or start a new run.")
    changed = [key if isinstance(run[key], dict) else f"{key} ({saved.get(key)} then, {run[key]} now)"
               for key in ("dataset", "seed", "train_batch_size", "gradient_accumulation_steps")
               if saved.get(key) != run[key]]
    if changed:
        log.warning("%s: the %s differ(s) from the run that saved this state; training continues from its "
                    "weights and optimizer, but it is no longer an exact continuation of that run.",
                    where, ", ".join(changed))


def save_training_state(accelerator, folder: Path, *, epoch: int, step: int, run: dict | None = None) -> Path:
    """Write the state to a temporary folder, then swap it in: a crash never leaves half a state."""
    folder = Path(folder)
    temp = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    fields = {"current_epoch": epoch, "current_step": step, **({"run": run} if run else {})}
    try:
        accelerator.save_state(str(temp))
        (temp / TRAIN_STATE_FILE).write_text(json.dumps(fields), encoding="utf-8")
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
        return int(_read_state_file(folder)["current_step"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"--resume {folder}: {TRAIN_STATE_FILE} is damaged ({e!r}); it should hold "
                        '{"current_epoch": N, "current_step": N}.') from None


def _read_state_file(folder: Path) -> dict:
    try:
        fields = json.loads((folder / TRAIN_STATE_FILE).read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise UserError(f"--resume {folder}: {TRAIN_STATE_FILE} is damaged ({e}); it should hold "
                        '{"current_epoch": N, "current_step": N}.') from None
    if not isinstance(fields, dict):
        raise UserError(f"--resume {folder}: {TRAIN_STATE_FILE} is damaged; it should hold "
                        '{"current_epoch": N, "current_step": N}.')
    return fields


def load_training_state(accelerator, folder: str | Path, optimizer=None) -> int:
    """Restore a state folder; returns the optimizer steps it had done. A missing folder is an error, never a
    silent fresh start. With `optimizer`, a state written for another optimizer type is refused: torch loads
    its settings without complaint and the first step would fail on a missing one (SGD on an AdamW state:
    KeyError 'momentum')."""
    done = read_state_step(folder)
    expected = [set(group) for group in optimizer.param_groups] if optimizer is not None else None
    try:
        accelerator.load_state(str(folder))
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise UserError(f"--resume {folder}: the state does not fit this run ({e}). Resume with the same "
                        "network and optimizer settings as the run that saved it.") from None
    if expected is not None:
        missing = sorted(set().union(*expected) - set().union(*(set(g) for g in optimizer.param_groups)))
        if missing:
            kind = type(getattr(optimizer, "optimizer", optimizer)).__name__  # inside accelerate's wrapper
            raise UserError(f"--resume {folder}: the state was saved with another optimizer (its settings lack "
                            f"{', '.join(missing)}, which {kind} needs). Resume with the --optimizer_type of "
                            "the run that saved it, or start a new run.")
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
