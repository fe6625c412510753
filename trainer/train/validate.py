"""Validation loss on the images held out by validation_split, as sd-scripts' train_network.py computes it.

Each validation batch is scored at fixed timesteps (`linspace(min_t, max_t, 6)[1:-1]`: 200/400/600/800 by
default) with noise drawn after seeding every random generator with --validation_seed (or --seed), so two
validations of the same weights give the same number. The generators' states are put back afterwards:
a run that validates trains exactly as one that does not."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Iterator

import numpy as np
import torch

from trainer.train.events import Reporter
from trainer.train.optim import eval_mode_for
from trainer.train.phases import phase
from trainer.train.step import compute_loss

NUM_TIMESTEPS = 4  # sd-scripts' NUM_VALIDATION_TIMESTEPS


def validation_timesteps(min_timestep: int | None, max_timestep: int | None, count: int = NUM_TIMESTEPS) -> list[int]:
    """`count` evenly spaced timesteps strictly inside [min, max] (defaults 0 and 1000), truncated to ints."""
    low = 0 if min_timestep is None else min_timestep
    high = 1000 if max_timestep is None else max_timestep
    return [int(t) for t in np.linspace(low, high, count + 2, dtype=int)[1:-1]]


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch (CPU and CUDA), Python's `random` and numpy; restore all their states on exit."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    python, numpy_state = random.getstate(), np.random.get_state()
    torch.manual_seed(seed)  # also seeds every CUDA device
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(python)
        np.random.set_state(numpy_state)


def validation_loss(setup, batches: Iterable[dict], *, timesteps: Iterable[int] = (200, 400, 600, 800),
                    seed: int) -> float:
    """Mean loss over every (batch, timestep) pair, without gradients and with the network in eval mode
    (no LoRA dropout); the network's mode and every random state are restored afterwards."""
    network = setup.network
    was_training = network.training
    losses = []
    with seeded_rng(seed), torch.no_grad():
        network.eval()
        try:
            for batch in batches:
                for timestep in timesteps:
                    losses.append(compute_loss(setup.step, batch, timestep=int(timestep)).float())
        finally:
            network.train(was_training)
    if not losses:
        raise ValueError("validation_loss needs at least one batch")
    return torch.stack(losses).mean().item()  # one device sync for the whole validation


@dataclass(frozen=True)
class ValidationSchedule:
    """sd-scripts' cadence: every n steps (never at step 0) if asked, and at the end of every n-th epoch
    (every epoch by default) and always of the last one."""
    every_n_steps: int | None
    every_n_epochs: int | None
    num_epochs: int

    def at_step(self, step: int) -> bool:
        return bool(self.every_n_steps) and step > 0 and step % self.every_n_steps == 0

    def at_epoch_end(self, epoch: int) -> bool:
        return not self.every_n_epochs or epoch % self.every_n_epochs == 0 or epoch >= self.num_epochs


class Validator:
    """Validates the training setup's network on `dataset` (the held-out images) when the schedule says so
    and emits a "validation" event: {step, epoch, loss, divergence (validation - training moving average),
    cadence: "step" | "epoch"} ("kind" is the event's own name in the JSON-lines file)."""

    def __init__(self, setup, dataset, schedule: ValidationSchedule, reporter: Reporter, *, seed: int,
                 timesteps: list[int], max_batches: int | None = None,
                 eval_mode: Callable[[], ContextManager] = contextlib.nullcontext):
        self.setup = setup
        self.eval_mode = eval_mode  # schedule-free optimizers: validate the averaged weights (train.optim)
        self.dataset = dataset
        self.schedule = schedule
        self.reporter = reporter
        self.seed = seed
        self.timesteps = timesteps
        self.num_batches = len(dataset) if max_batches is None else min(max_batches, len(dataset))

    def at_step(self, step: int, epoch: int, train_loss: Callable[[], float | None]) -> None:
        if self.schedule.at_step(step):
            self.validate("step", step, epoch, train_loss)

    def at_epoch_end(self, epoch: int, step: int, train_loss: Callable[[], float | None]) -> None:
        if self.schedule.at_epoch_end(epoch):
            self.validate("epoch", step, epoch, train_loss)

    def validate(self, cadence: str, step: int, epoch: int, train_loss: Callable[[], float | None]) -> float:
        batches = (self.dataset[i] for i in range(self.num_batches))
        with phase("validate"), self.eval_mode():
            loss = validation_loss(self.setup, batches, timesteps=self.timesteps, seed=self.seed)
        train = train_loss()
        self.reporter.emit("validation", cadence=cadence, step=step, epoch=epoch, loss=loss,
                           divergence=None if train is None else loss - train)
        return loss


class NoValidator:
    """Stands in when there is nothing to validate on (no validation_split, or --max_validation_steps 0)."""

    def at_step(self, step: int, epoch: int, train_loss: Callable[[], float | None]) -> None: ...

    def at_epoch_end(self, epoch: int, step: int, train_loss: Callable[[], float | None]) -> None: ...


def build_validator(cfg, setup, reporter: Reporter):
    """A Validator over the dataset's held-out images, or a NoValidator when there are none."""
    dataset = setup.dataset.validation_dataset()
    if dataset is None or len(dataset) == 0 or cfg.max_validation_steps == 0:
        return NoValidator()
    schedule = ValidationSchedule(cfg.validate_every_n_steps, cfg.validate_every_n_epochs, setup.plan.num_epochs)
    seed = cfg.validation_seed if cfg.validation_seed is not None else setup.plan.seed
    return Validator(setup, dataset, schedule, reporter, seed=seed,
                     timesteps=validation_timesteps(cfg.min_timestep, cfg.max_timestep),
                     max_batches=cfg.max_validation_steps, eval_mode=eval_mode_for(setup.optimizer))
