"""The training loop: read it top to bottom in one sitting.

Each step: batch -> latents -> text states -> noise at sampled timesteps -> UNet prediction -> loss ->
backward -> (on the last micro-step) clip, optimizer and scheduler step. Logging and saving happen only when
the optimizer actually stepped. Features that are off do nothing inside their helpers.

No step reads a value back from the GPU: that would make the CPU wait for the GPU, which then idles while the
CPU queues the next step's kernels. Losses, NaN-latent flags and --scale_weight_norms results stay on the
device until `StepMeter.check` reads them all at once: when the console is refreshed (a few times a second)
and before a LoRA file is written (docs/benchmarks.md lists what still syncs, and why)."""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import Callable

import torch

from trainer import interrupts
from trainer.errors import DatasetError
from trainer.train.build import TrainingSetup
from trainer.train.events import Reporter
from trainer.train.oom import stopped_by_oom
from trainer.train.state import StepBoundary
from trainer.train.step import LatentNaNs, NonFiniteLoss, compute_loss
from trainer.train.watch import NO_WATCH, SpillWatch

log = logging.getLogger(__name__)


class RunState:
    """What the steps of one run share: the LoRA parameters, listed once (walking the network's module tree
    costs about a millisecond a step with a real model), and the NaN-latent flags not read yet."""

    def __init__(self, setup: TrainingSetup):
        self.parameters = list(setup.network.parameters())
        self.latent_nans = LatentNaNs()
        self.stopping = False  # Ctrl-C or out of memory: the processes are no longer in step


def train(setup: TrainingSetup, reporter: Reporter, watch: SpillWatch = NO_WATCH) -> Path:
    """Run the whole plan; returns the final LoRA file. Ctrl-C saves the weights so far and re-raises; so does
    running out of GPU memory, as `oom.TrainingOutOfMemory`. `watch` times each step (watch.py says why)."""
    acc, plan, network = setup.accelerator, setup.plan, setup.network
    start = setup.resume  # build.plan_start: a fresh run, --resume, --initial_step/--initial_epoch
    reporter.emit("run_started", total_steps=plan.max_train_steps, num_epochs=plan.num_epochs,
                  start_step=start.step, start_epoch=start.epoch, summary=summary_lines(setup),
                  lr_descriptions=list(setup.lr_descriptions))
    run = RunState(setup)
    meter = StepMeter(plan.max_train_steps, start_step=start.step, window=plan.num_batches_per_epoch)
    meter.on_read.append(run.latent_nans.check)
    meter.stop_at_read = setup.accelerator.num_processes == 1
    setup.saver.before_write = lambda at: check_finite(setup, meter, run, at)
    step, epoch = start.step, start.epoch
    boundary = StepBoundary(acc)  # the random streams as they were after the last optimizer step
    interrupts.begin_training()  # a Ctrl-C held during start-up stops here, before the first step
    if not start.step:
        setup.sampler.at_first()
    try:
        for epoch in range(start.epoch, plan.num_epochs + 1):
            set_epoch(setup, epoch)
            network.train()
            batches = setup.dataloader
            if epoch == start.epoch and start.batches_to_skip:
                batches = acc.skip_first_batches(setup.dataloader, start.batches_to_skip)
            for batch in batches:
                with watch.timing():  # the step alone: data loading and sample/save pauses are not timed
                    loss = micro_step(setup, batch, run)
                meter.add(loss.detach())
                if not acc.sync_gradients:
                    continue
                step += 1
                boundary.mark()
                meter.max_norm = apply_max_norm(setup)  # the trackers' max_norm/* of this step (on the device)
                setup.dataset.set_current_step(step)
                report_step(reporter, meter, step, epoch, setup)
                setup.saver.at_step(step, plan.max_train_steps, epoch)
                setup.sampler.at_step(step)
                setup.validator.at_step(step, epoch, meter.moving_average)
                if step >= plan.max_train_steps:
                    break
            setup.saver.at_epoch_end(epoch, plan.num_epochs, step)
            setup.sampler.at_epoch_end(epoch)
            setup.validator.at_epoch_end(epoch, step, meter.moving_average)
            if step >= plan.max_train_steps:
                break
    except torch.cuda.OutOfMemoryError as e:
        run.stopping = True
        raise stopped_by_oom(e, setup, step, epoch) from None
    except (KeyboardInterrupt, DatasetError) as stop:
        # Ctrl-C, or a picture that turned out unreadable only when its batch came: keep the steps so far.
        run.stopping = True
        # The step under way had drawn its noise (and counted its micro-batches): its state folder must
        # continue from the end of `step`, as the uninterrupted run did.
        boundary.restore()
        path = setup.saver.interrupted(step, epoch) if step > 0 else None
        if isinstance(stop, DatasetError):
            raise DatasetError(f"{stop}\n{kept_steps(setup, step, path)}") from None
        reporter.emit("interrupted", step=step, message=f"Saved the LoRA so far to {path}." if path else
                      "Nothing trained yet, nothing saved.")
        raise
    final = setup.saver.final(step, epoch)
    setup.sampler.at_end()
    reporter.emit("finished", path=str(final), steps=step, seconds=time.time() - meter.started)
    return final


def kept_steps(setup: TrainingSetup, step: int, path) -> str:
    """What a run stopped by a bad picture leaves, and how to go on once the picture is fixed."""
    if path is None:
        return "Nothing was trained yet, nothing saved."
    state = setup.saver.policy.step_state(step)
    if not state.is_dir():
        return (f"The {step} step(s) trained before it are saved: {path}. (With --save_state a run stopped like "
                "this can be continued exactly; this one starts again once the picture is fixed or removed.)")
    return (f"The {step} step(s) trained before it are saved: {path}. Once the picture is fixed or removed, "
            f'continue with --resume "{state}" --skip_until_initial_step (the same dataset, or a warning says '
            "it differs).")


def check_finite(setup: TrainingSetup, meter: StepMeter, run: RunState, step: int) -> None:
    """Before any LoRA file is written: every loss so far and every LoRA weight must be finite, on every
    process (one bad process makes all weights bad through the averaged gradients). One GPU read per save.
    Raises NonFiniteLoss naming the first bad step, on all processes alike, so none waits for the others."""
    problem = None
    try:
        meter.check(step)
    except NonFiniteLoss as e:
        problem = str(e)
    with torch.no_grad():
        finite = torch.stack([p.isfinite().all() for p in run.parameters]).all().float()
    finite = finite * (0.0 if problem else 1.0)
    # Processes stop for Ctrl-C or out of memory each at its own point: a collective then could wait forever,
    # so each judges its own copy (identical while they train in step).
    if setup.accelerator.num_processes > 1 and not run.stopping:
        finite = setup.accelerator.reduce(finite, reduction="mean")
    if problem is None and float(finite) < 1.0:
        problem = (f"the LoRA weights became non-finite by step {step}" if setup.accelerator.num_processes == 1
                   else f"another process's loss or weights became non-finite by step {step}")
    if problem:
        raise NonFiniteLoss(problem)


def set_epoch(setup: TrainingSetup, epoch: int) -> None:
    """The dataset's epoch (1-based: it seeds the batch order and caption dropout). accelerate's DataLoader
    passes its own count of iterations to `dataset.set_epoch` each time it starts one, which would be 0-based
    and wrong after --resume / --initial_epoch; so its count is set to ours too."""
    setup.dataset.set_epoch(epoch)
    if hasattr(setup.dataloader, "set_epoch"):
        setup.dataloader.set_epoch(epoch)


def micro_step(setup: TrainingSetup, batch: dict, run: RunState | None = None) -> torch.Tensor:
    """Forward and backward of one batch; on the last micro-batch of an accumulation the gradients are
    averaged across processes, clipped, and the optimizer and scheduler step. Returns the batch's loss (on the
    device). Without `run` (one step on its own), NaN latents are checked at once, which waits for the GPU."""
    acc, network = setup.accelerator, setup.network
    parameters = run.parameters if run is not None else list(network.parameters())
    with acc.accumulate(network):
        loss = compute_loss(setup.step, batch, latent_nans=run.latent_nans if run is not None else None)
        acc.backward(loss)
        with interrupts.held():  # a Ctrl-C waits for the step to finish: never half-updated weights
            if acc.sync_gradients:
                average_gradients(network, acc, parameters)
                if setup.max_grad_norm:
                    acc.clip_grad_norm_(parameters, setup.max_grad_norm)
            setup.optimizer.step()
            setup.lr_scheduler.step()
            setup.optimizer.zero_grad(set_to_none=True)
    return loss


def average_gradients(network, accelerator, parameters: list[torch.nn.Parameter] | None = None) -> None:
    """Data parallel: every process trained on its own batches; average the LoRA gradients so that all
    processes take the same optimizer step and keep identical weights. One process: nothing to do."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in (parameters if parameters is not None else network.parameters()) if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = accelerator.reduce(flat, reduction="mean")
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def apply_max_norm(setup: TrainingSetup) -> torch.Tensor | None:
    """--scale_weight_norms: [modules scaled, mean norm, max norm] for the trackers, left on the device
    (`StepMeter.check` reads it with the losses); None when off."""
    if setup.scale_weight_norms:
        return setup.accelerator.unwrap_model(setup.network).max_norm_regularization(setup.scale_weight_norms)
    return None


class StepMeter:
    """Loss average and speed without a GPU sync every step: losses (and --scale_weight_norms results) stay on
    the device and are read in one transfer by `check`, which `read` calls when the console is refreshed (at
    most a few times a second) and the loop calls before a LoRA file is written. Each optimizer step is
    marked, so a read also gives every step since the last one (`steps`: what trackers log per step)."""

    def __init__(self, total_steps: int, refresh_seconds: float = 0.25, start_step: int = 0, window: int = 1):
        self.total_steps = total_steps
        self.start_step = start_step
        self.refresh_seconds = refresh_seconds
        self.started = time.time()
        self.last_report = 0.0
        self.losses: list[torch.Tensor] = []  # on the device, not read yet
        self.values: list[float] = []  # read, not reported yet (marks' "_end" index this list + `losses`)
        self.loss: float | None = None
        self.recent: deque[torch.Tensor] = deque(maxlen=max(1, window))
        self.marks: list[dict] = []  # per optimizer step since the last read: its data and where its losses end
        self.max_norm: torch.Tensor | tuple | None = None  # --scale_weight_norms result of the current step
        self.window: deque[float] = deque(maxlen=max(1, window))  # read values, for each step's average
        self.on_read: list[Callable[[], None]] = []  # other device checks to run with each read
        # With several processes a console refresh must not stop one of them alone (the others would wait in
        # the next gradient all-reduce forever): the loss found there is kept, and raised by the next `check`
        # at a save, which all processes reach together (loop.check_finite).
        self.stop_at_read = True
        self.failure: str | None = None

    def add(self, loss: torch.Tensor) -> None:
        self.losses.append(loss)
        self.recent.append(loss)

    def moving_average(self) -> float | None:
        """Mean loss of the last `window` micro-batches (an epoch's worth: sd-scripts' loss/average)."""
        return torch.stack(list(self.recent)).float().mean().item() if self.recent else None

    def mark(self, step: int, epoch: int, lrs: list[float], ds: list[float | None] | None = None,
             max_norm: torch.Tensor | tuple | None = None) -> None:
        """An optimizer step ended after the micro-batches added so far (no GPU sync)."""
        self.marks.append({"step": step, "epoch": epoch, "lr": lrs, "d": ds, "max_norm": max_norm,
                           "_end": len(self.values) + len(self.losses)})

    def due(self, step: int) -> bool:
        return step in (1, self.total_steps) or time.time() - self.last_report >= self.refresh_seconds

    def check(self, step: int) -> None:
        """Read everything still on the device (one transfer) and stop on a non-finite loss, naming the first
        step it happened in (`step`, the step now running, for micro-batches of no marked step)."""
        if self.failure:
            raise NonFiniteLoss(self.failure)
        for callback in self.on_read:
            callback()
        norms = [m for m in self.marks if isinstance(m["max_norm"], torch.Tensor)]
        if not self.losses and not norms:
            return
        parts = [torch.stack(self.losses).float()] if self.losses else []
        parts += [m["max_norm"].float().reshape(-1) for m in norms]
        flat = torch.cat(parts).tolist()
        first_new, count = len(self.values), len(self.losses)
        self.values += flat[:count]
        self.losses.clear()
        for i, mark in enumerate(norms):
            scaled, mean, top = flat[count + 3 * i:count + 3 * i + 3]
            mark["max_norm"] = (int(scaled), mean, top)
        for index in range(first_new, len(self.values)):
            if not math.isfinite(self.values[index]):
                at = next((m["step"] for m in self.marks if m["_end"] > index), step)
                self.failure = f"the loss became {self.values[index]} at step {at}"
                raise NonFiniteLoss(self.failure)

    def read(self, step: int) -> dict:
        try:
            self.check(step)
        except NonFiniteLoss:
            if self.stop_at_read:
                raise
        self.last_report = time.time()
        values, self.values = self.values, []
        if values:
            self.loss = sum(values) / len(values)
        elapsed = time.time() - self.started
        done = step - self.start_step
        return {"loss": self.loss, "it_per_s": done / elapsed if elapsed > 0 else None, "steps": self._steps(values)}

    def _steps(self, values: list[float]) -> list[dict]:
        """Each marked step's loss (its last micro-batch, sd-scripts' loss/current) and the moving average
        of the last `window` micro-batches at that point (loss/average)."""
        steps, start = [], 0
        for mark in self.marks:
            end = mark.pop("_end")
            self.window.extend(values[start:end])
            start = end
            if end:
                steps.append({**mark, "loss": values[end - 1], "average": sum(self.window) / len(self.window)})
        self.window.extend(values[start:])  # micro-batches of a step not finished yet
        self.marks.clear()
        return steps


def report_step(reporter: Reporter, meter: StepMeter, step: int, epoch: int, setup: TrainingSetup) -> None:
    lrs = [group["lr"] for group in setup.optimizer.param_groups]
    ds = [group.get("d") if isinstance(group.get("d"), float) else None for group in setup.optimizer.param_groups]
    meter.mark(step, epoch, lrs, ds if any(d is not None for d in ds) else None, meter.max_norm)
    if not meter.due(step):
        return
    data = meter.read(step)
    vram = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    reporter.emit("step", step=step, total=meter.total_steps, epoch=epoch, lr=lrs, vram_gb=vram, **data)


def summary_lines(setup: TrainingSetup) -> list[str]:
    p, d = setup.plan, setup.dataset
    return [f"images: {d.num_train_images} (with repeats), regularisation: {d.num_reg_images}; "
            f"batches per epoch: {p.num_batches_per_epoch}",
            f"steps: {p.max_train_steps} over {p.num_epochs} epoch(s), {p.steps_per_epoch} per epoch; "
            f"total batch size {p.total_batch_size}; seed {p.seed}"]
