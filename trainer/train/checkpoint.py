"""Where and when LoRA files are written: sd-scripts' file names, cadence and retention.

Files are always written to a temporary name and renamed (the network's save does that), so a crash or
Ctrl-C never leaves a half-written `.safetensors` under a real name; and a Ctrl-C pressed while a file is
being written waits until it is complete (trainer.interrupts.held)."""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

from trainer import interrupts
from trainer.errors import UserError
from trainer.models.families import architecture_for_config
from trainer.network.consumers import WHOLE_FILE, architecture_layers, ignored_keys
from trainer.train.hub import hub_uploader
from trainer.train.metadata import with_progress
from trainer.train.state import remove_state, save_training_state

log = logging.getLogger(__name__)


WRITING_NOTICE = "Ctrl-C: the file being written is finished first; then the LoRA so far is saved and the run stops."
LAST_SAVE_NOTICE = "Ctrl-C again: the LoRA so far is still being written; the run stops as soon as it is saved."


@dataclass(frozen=True)
class SavePolicy:
    output_dir: Path
    output_name: str | None
    extension: str = "safetensors"
    every_n_epochs: int | None = None
    every_n_steps: int | None = None
    keep_last_n_epochs: int | None = None
    keep_last_n_steps: int | None = None
    save_state: bool = False              # a state folder beside each periodic file (and at the end)
    save_state_at_end: bool = False
    keep_last_n_epochs_state: int | None = None
    keep_last_n_steps_state: int | None = None

    def final_file(self) -> Path:
        return self.output_dir / f"{self.output_name or 'last'}.{self.extension}"

    def epoch_file(self, epoch: int) -> Path:
        return self.output_dir / f"{self.output_name or 'epoch'}-{epoch:06d}.{self.extension}"

    def step_file(self, step: int) -> Path:
        return self.output_dir / f"{self.output_name or 'at'}-step{step:08d}.{self.extension}"

    # sd-scripts' state folder names (accelerate's save_state layout + train_state.json)
    def final_state(self) -> Path:
        return self.output_dir / f"{self.output_name or 'last'}-state"

    def epoch_state(self, epoch: int) -> Path:
        return self.output_dir / f"{self.output_name or 'epoch'}-{epoch:06d}-state"

    def step_state(self, step: int) -> Path:
        return self.output_dir / f"{self.output_name or 'at'}-step{step:08d}-state"

    def saves_at_epoch_end(self, epoch: int, num_epochs: int) -> bool:
        """`epoch` is 1-based; the last epoch is saved as the final file instead."""
        return bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0 and epoch < num_epochs

    def saves_at_step(self, step: int, max_steps: int) -> bool:
        return bool(self.every_n_steps) and step % self.every_n_steps == 0 and step < max_steps

    def epoch_file_to_remove(self, epoch: int) -> Path | None:
        if not (self.keep_last_n_epochs and self.every_n_epochs):
            return None
        old = epoch - self.every_n_epochs * self.keep_last_n_epochs
        return self.epoch_file(old) if old > 0 else None

    def step_file_to_remove(self, step: int) -> Path | None:
        old = self._old_step(step, self.keep_last_n_steps)
        return self.step_file(old) if old else None

    def epoch_state_to_remove(self, epoch: int) -> Path | None:
        keep = self.keep_last_n_epochs_state or self.keep_last_n_epochs
        if not (keep and self.every_n_epochs):
            return None
        old = epoch - self.every_n_epochs * keep
        return self.epoch_state(old) if old > 0 else None

    def step_state_to_remove(self, step: int) -> Path | None:
        old = self._old_step(step, self.keep_last_n_steps_state or self.keep_last_n_steps)
        return self.step_state(old) if old else None

    def _old_step(self, step: int, keep: int | None) -> int | None:
        if not (keep and self.every_n_steps):
            return None
        old = step - keep - 1
        old -= old % self.every_n_steps
        return old if old > 0 else None


def check_output_dir(output_dir: Path) -> None:
    """Fail before training, not after an hour, when the output folder cannot be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{time.time_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"Cannot write to the output folder {output_dir}: {e.strerror or e}.\n"
                        "Fix: choose another --output_dir, or check the folder's permissions "
                        "(and that it is not a file).") from None


# What a write cut by a kill or a power cut leaves: safetensors' own temporary file (".tmp" and six letters or
# digits, hidden), and ours (files.atomic_path: "<name>.tmp-<8 hex>"; state folders also "<name>.old-<8 hex>").
SAFETENSORS_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")
OUR_TEMP = re.compile(r".*\.(tmp|old)-[0-9a-f]{8}")
LEFTOVER_AGE_S = 120  # younger ones may belong to a run writing into the same folder right now


def remove_leftovers(output_dir: Path, output_name: str | None, now: float | None = None) -> list[Path]:
    """Remove the half-written files and state folders an earlier run left when it was killed mid-write (they
    are never used again and can be gigabytes). Only what is certainly such a leftover goes: our temporary
    names that start with this run's --output_name, and safetensors' hidden temporary files that begin like a
    safetensors file, each untouched for two minutes. Returns what was removed; each is logged."""
    now = time.time() if now is None else now
    names = (output_name,) if output_name else ("last", "epoch", "at")  # SavePolicy's names without one
    removed = []
    for path in sorted(output_dir.iterdir()) if output_dir.is_dir() else []:
        try:
            ours = bool(OUR_TEMP.fullmatch(path.name)) and any(_named_after(path.name, n) for n in names)
            if not (ours or _is_safetensors_temp(path)) or now - path.stat().st_mtime < LEFTOVER_AGE_S:
                continue
            size = _size_of(path)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError:
            continue  # in use (Windows) or gone already: leave it
        removed.append(path)
        log.info("Removed %s (%.0f MB): a half-written file left by an earlier run that was stopped mid-write.",
                 path, size / 1e6)
    return removed


def _named_after(name: str, output_name: str) -> bool:
    """"my lora.safetensors.tmp-..", "my lora-step00000002...", "my lora-state.old-..": not "my lora2..."."""
    return name.startswith(output_name) and name[len(output_name):][:1] in (".", "-")


def _is_safetensors_temp(path: Path) -> bool:
    if not (SAFETENSORS_TEMP.fullmatch(path.name) and path.is_file()):
        return False
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"  # an 8-byte header length, then the JSON header


def _size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Saver:
    """Writes LoRA files with fresh metadata; the caller decides when (SavePolicy says which name)."""

    def __init__(self, policy: SavePolicy, save: Callable[[Path, dict[str, str]], None],
                 metadata: Callable[[int, int], dict[str, str]], on_saved: Callable[[Path], None],
                 save_state: Callable[[Path, int, int], None] | None = None,
                 eval_mode: Callable[[], ContextManager] = contextlib.nullcontext):
        self.policy = policy
        self._eval_mode = eval_mode  # schedule-free optimizers: save the averaged weights (train.optim)
        self._save = save
        self._metadata = metadata
        self._on_saved = on_saved
        self._save_state = save_state if (policy.save_state or policy.save_state_at_end) else None
        # Runs before every file this saver writes (step, epoch, final, Ctrl-C, out of memory): the loop sets
        # it to its check that the losses and weights are finite, so no path can write a broken LoRA.
        self.before_write: Callable[[int], None] = lambda step: None

    def save(self, path: Path, step: int, epoch: int, notice: str = WRITING_NOTICE) -> Path:
        self.before_write(step)
        with interrupts.held(notice), self._eval_mode():
            self._save(path, self._metadata(step, epoch))
        self._on_saved(path)
        return path

    def state(self, folder: Path, step: int, epoch: int, *, periodic: bool = True,
              notice: str = WRITING_NOTICE) -> None:
        if self._save_state and (self.policy.save_state or not periodic):
            with interrupts.held(notice):
                self._save_state(folder, step, epoch)
            self._on_saved(folder)

    def at_epoch_end(self, epoch: int, num_epochs: int, step: int) -> None:
        if self.policy.saves_at_epoch_end(epoch, num_epochs):
            self.save(self.policy.epoch_file(epoch), step, epoch)
            _remove(self.policy.epoch_file_to_remove(epoch))
            self.state(self.policy.epoch_state(epoch), step, epoch)
            _remove_state(self.policy.epoch_state_to_remove(epoch) if self.policy.save_state else None)

    def at_step(self, step: int, max_steps: int, epoch: int) -> None:
        if self.policy.saves_at_step(step, max_steps):
            self.save(self.policy.step_file(step), step, epoch)
            _remove(self.policy.step_file_to_remove(step))
            self.state(self.policy.step_state(step), step, epoch)
            _remove_state(self.policy.step_state_to_remove(step) if self.policy.save_state else None)

    def final(self, step: int, epoch: int) -> Path:
        path = self.save(self.policy.final_file(), step, epoch)
        self.state(self.policy.final_state(), step, epoch, periodic=False)
        return path

    def interrupted(self, step: int, epoch: int) -> Path:
        """What a Ctrl-C leaves: the weights so far under the step-file name (never the final name), and the
        state to --resume from when states are being saved. A second Ctrl-C waits for both (and says so)."""
        with interrupts.held(LAST_SAVE_NOTICE, then_raise=False):
            path = self.save(self.policy.step_file(step), step, epoch, notice=LAST_SAVE_NOTICE)
            self.state(self.policy.step_state(step), step, epoch, periodic=False, notice=LAST_SAVE_NOTICE)
        return path


class LoraKeyCheck:
    """After each save: would ComfyUI, A1111 or diffusers ignore any key of the file? (trainer.network.consumers,
    the rules `python -m trainer check_lora` uses.) Names only, no tensor is read; the accepted names are built
    once per run from the architecture on the meta device. Warns once per distinct set of ignored keys, so a
    run that saves every epoch says it once, at the first save."""

    SHOWN = 10

    def __init__(self, architecture: str):
        self.architecture = architecture
        self._warned: frozenset[str] | None = None
        self._noted = False

    def __call__(self, path: Path, keys) -> dict[str, str]:
        try:
            ignored = ignored_keys(keys, architecture_layers(self.architecture))
        except Exception as error:  # the check must never cost the user a saved file
            log.debug("LoRA key check skipped: %s", error)
            return {}
        whole_file = ignored.pop(WHOLE_FILE, None)  # diffusers loads plain LoRA only: a LoHa/LoKr is refused
        if whole_file and not self._noted:
            self._noted = True
            log.info("%s: %s (diffusers loads plain LoRA only; the warnings are about ComfyUI and A1111)", path,
                     whole_file)
        if ignored and frozenset(ignored) != self._warned:
            self._warned = frozenset(ignored)
            by_reason: dict[str, list[str]] = {}
            for key in sorted(ignored):
                modules = by_reason.setdefault(ignored[key], [])
                if key.split(".")[0] not in modules:
                    modules.append(key.split(".")[0])
            lines = [f"  {reason}: {', '.join(names[:self.SHOWN])}"
                     + (f", ... ({len(names) - self.SHOWN} more)" if len(names) > self.SHOWN else "")
                     for reason, names in by_reason.items()]
            log.warning("%s: %d keys would be ignored when this LoRA is loaded (ComfyUI's \"lora key not loaded\"):"
                        "\n%s\nDetails: python -m trainer check_lora \"%s\"", path, len(ignored), "\n".join(lines), path)
        return ignored


def _remove_state(folder: Path | None) -> None:
    remove_state(folder)


def _remove(path: Path | None) -> None:
    if path is not None and path.exists():
        path.unlink()


def build_saver(cfg: Any, network, metadata: dict[str, str], reporter: Any, accelerator, eval_mode=None, *,
                every_n_epochs: int | None, run: dict | None = None) -> "Saver":
    """The Saver of this run (`every_n_epochs`: --save_every_n_epochs as build derives it): sd-scripts'
    cadence and names, written by the main process only; --huggingface_repo_id uploads what it saves.
    `run` (state.describe_run) goes into each state's train_state.json."""
    policy = SavePolicy(output_dir=Path(cfg.output_dir or "output"), output_name=cfg.output_name,
                        extension=cfg.save_model_as, every_n_epochs=every_n_epochs,
                        every_n_steps=cfg.save_every_n_steps, keep_last_n_epochs=cfg.save_last_n_epochs,
                        keep_last_n_steps=cfg.save_last_n_steps, save_state=cfg.save_state,
                        save_state_at_end=cfg.save_state_on_train_end,
                        keep_last_n_epochs_state=cfg.save_last_n_epochs_state,
                        keep_last_n_steps_state=cfg.save_last_n_steps_state)
    dtype = save_dtype_for(cfg.save_precision)
    check_keys = LoraKeyCheck(architecture_for_config(cfg))

    def save(path: Path, meta: dict[str, str]) -> None:
        if accelerator.is_main_process:
            network.save_weights(path, dtype, meta if cfg.save_model_as == "safetensors" else None)
            check_keys(path, network.state_dict().keys())

    def save_state(folder: Path, step: int, epoch: int) -> None:
        if accelerator.is_main_process:
            save_training_state(accelerator, folder, epoch=epoch, step=step, run=run)

    if accelerator.is_main_process:  # --huggingface_repo_id: upload what is saved (trainer.train.hub)
        uploader = hub_uploader(cfg, (policy.final_file(), policy.final_state()))
        reporter.listeners += [uploader] if uploader else []
    return Saver(policy, save,
                 metadata=lambda step, epoch: with_progress(metadata, step, epoch, minimal=cfg.no_metadata),
                 on_saved=lambda path: reporter.emit("saved", path=str(path)), save_state=save_state,
                 **({"eval_mode": eval_mode} if eval_mode else {}))


def save_dtype_for(save_precision: str | None):
    """The torch dtype of --save_precision, or None to keep the LoRA's own."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}.get(save_precision or "")
