"""Watch for the Windows VRAM spill: when VRAM runs out, the NVIDIA driver on Windows quietly moves memory to
shared system RAM ("CUDA - Sysmem Fallback Policy"), and training goes on 10-100x slower instead of stopping.

`SpillWatch` is fed each micro-step's duration and, now and then, the peak memory; it warns once, when the
peak comes within 5% of the card's memory or when the recent median step time jumps past 3x the median of
the first steps after warm-up. Only the step itself is timed (forward, backward, optimizer), so data loading
and the sampling/validation/saving pauses never count; without a GPU sync the CPU can run at most a launch
queue ahead of the GPU, so in steady state a step's wall time follows the GPU's."""

from __future__ import annotations

import statistics
import time
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator

from trainer.presets import memory_advice

POLICY = ('On Windows the NVIDIA driver then moves memory into shared system RAM ("CUDA - Sysmem Fallback '
          'Policy" in the NVIDIA Control Panel, under Manage 3D settings), which makes training 10-100x slower '
          'instead of stopping it; set it to "Prefer No Sysmem Fallback" to get an out-of-memory error instead.')


class SpillWatch:
    """Warns once (through `warn`) about memory near the card's size or a sudden step-time jump."""

    def __init__(self, warn: Callable[[str], None], advice: list[str], *, total_gb: float | None,
                 memory_gb: Callable[[], float] | None = None, warmup: int = 5, baseline: int = 10,
                 window: int = 10, jump: float = 3.0, near: float = 0.95, memory_every: int = 10,
                 clock: Callable[[], float] = time.perf_counter, enabled: bool = True):
        self.warn, self.advice, self.total_gb, self.memory_gb = warn, advice, total_gb, memory_gb
        self.warmup, self.jump, self.near, self.memory_every, self.clock = warmup, jump, near, memory_every, clock
        self.baseline: list[float] = []
        self.baseline_size = baseline
        self.recent: deque[float] = deque(maxlen=window)
        self.steps = 0
        self.done = not enabled  # after its one warning (or when off) it only returns

    @contextmanager
    def timing(self) -> Iterator[None]:
        """Wraps one micro-step in the loop. Not timed when the step raises."""
        if self.done:
            yield
            return
        start = self.clock()
        yield
        self.add_step(self.clock() - start)

    def add_step(self, seconds: float) -> None:
        if self.done:
            return
        self.steps += 1
        if self.memory_gb is not None and self.steps % self.memory_every == 1 % self.memory_every:
            self.check_memory(self.memory_gb())  # right after the first step, then every `memory_every`
        if self.done or self.steps <= self.warmup:
            return
        if len(self.baseline) < self.baseline_size:
            self.baseline.append(seconds)
            return
        self.recent.append(seconds)
        if len(self.recent) == self.recent.maxlen:
            before, now = statistics.median(self.baseline), statistics.median(self.recent)
            if before > 0 and now > self.jump * before:
                self._warn(f"Training steps became {now / before:.0f}x slower ({now:.2f} s per step, "
                           f"{before:.2f} s at the start). Unless another program is using the GPU, the "
                           f"card's memory is probably full. " + POLICY)

    def check_memory(self, used_gb: float | None) -> None:
        if self.done or used_gb is None or not self.total_gb:
            return
        if used_gb >= self.near * self.total_gb:
            self._warn(f"GPU memory use reached {used_gb:.1f} GB of the card's {self.total_gb:.1f} GB. " + POLICY)

    def _warn(self, message: str) -> None:
        self.done = True
        steps = "; ".join(self.advice)
        self.warn(message + (f" To need less memory, change (biggest saving first): {steps}." if steps else ""))


NO_WATCH = SpillWatch(lambda message: None, [], total_gb=None, enabled=False)


def spill_watch(cfg, setup, reporter) -> SpillWatch:
    """The watch for a run: on a CUDA device only (the CPU neither spills nor has a card size)."""
    import torch

    device = setup.accelerator.device
    if device.type != "cuda":
        return NO_WATCH
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory / 2**30

    def memory_gb() -> float:
        # host-side queries, no device sync: our peak, or the whole card's use when other programs add to it
        free, card = torch.cuda.mem_get_info(index)
        return max(torch.cuda.max_memory_reserved(index), card - free) / 2**30

    advice = memory_advice(cfg, getattr(setup.models, "family", "sd1"), "train", total)
    return SpillWatch(lambda message: reporter.emit("warning", message=message, reason="vram_spill"),
                      advice, total_gb=total, memory_gb=memory_gb)
