"""Ctrl-C (and Windows' Ctrl-Break, which the GUI's Stop sends) at any moment of a training run.

Python raises KeyboardInterrupt wherever the main thread happens to be. During start-up that can be inside
the import of a C extension (numpy then refuses a second import: "cannot load module more than once per
process"), inside a C++ callback (torch aborts: "terminate called after throwing pybind11::error_already_set"),
or inside a library that swallows it and trains on. During a save it can cut the file that would have kept
the steps. So the training command routes both signals here:

- `install(notice)` at the start of the command: presses are *held* (counted, one line printed) until
  `check()` is called at a safe point (the start and end of each phase, each cached batch) or until
  `begin_training()`, which releases the hold and raises KeyboardInterrupt if anyone pressed meanwhile.
- While training, a press raises KeyboardInterrupt at once (the loop saves the LoRA so far), except inside
  `with held(notice):` - an optimizer step, a file being written - where it is raised when the block ends.

Without `install` (a library user, a test calling the loop) nothing changes: Python's own handler raises."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGBREAK") if hasattr(signal, name))

STARTUP_NOTICE = "Ctrl-C: stopping at the next safe point of start-up (nothing has been trained yet)."


class _Presses:
    def __init__(self) -> None:
        self.count = 0            # presses since install
        self.holds: list[str | None] = []  # notices of the holds now open, innermost last
        self.previous: dict[int, object] | None = None  # handlers to put back; None: not installed


_state = _Presses()


def install(notice: str | None = STARTUP_NOTICE) -> bool:
    """Route Ctrl-C/Ctrl-Break here and hold them until `begin_training` (see the module's docstring).
    Returns False where signals cannot be set (not the main thread): Python's behaviour then stays."""
    try:
        previous = {sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS}
    except ValueError:  # signal only works in the main thread
        return False
    if _state.previous is None:
        _state.previous = previous
    _state.count, _state.holds = 0, [notice]
    return True


def uninstall() -> None:
    """Put the handlers back as they were before `install` (a test runs many commands in one process)."""
    if _state.previous is not None:
        for sig, handler in _state.previous.items():
            signal.signal(sig, handler)
    _state.previous, _state.holds = None, []


def installed() -> bool:
    return _state.previous is not None


def pressed() -> bool:
    return _state.count > 0


def check(reason: str = "before the first step: nothing was trained, nothing saved") -> None:
    """A safe point: raise KeyboardInterrupt if Ctrl-C was pressed (and held) since `install`."""
    if _state.count:
        raise KeyboardInterrupt(reason)


def begin_training() -> None:
    """The loop starts: release the start-up hold. A press held until now stops the run here, before any
    step, whatever swallowed its KeyboardInterrupt on the way."""
    if _state.previous is not None and _state.holds:
        _state.holds.pop(0)
    check()


@contextmanager
def held(notice: str | None = None, *, then_raise: bool = True) -> Iterator[None]:
    """Ctrl-C inside the block waits for its end (one line says so), then raises KeyboardInterrupt (unless
    `then_raise` is False: the run is stopping already). For work that must not be cut: an optimizer step
    (weights half-updated), a file being written."""
    before = _state.count
    _state.holds.append(notice)
    try:
        yield
    finally:
        _state.holds.pop()
    if then_raise and _state.count > before and not _state.holds:
        raise KeyboardInterrupt


def _on_signal(signum, frame) -> None:
    _state.count += 1
    if not _state.holds:
        raise KeyboardInterrupt
    notice = _state.holds[-1]
    if notice:  # said again at each press: the wait is on purpose, the program has not hung
        # os.write, not print: the main thread may be inside a write to stderr right now
        os.write(2, f"\n{notice}\n".encode("utf-8", "replace"))
