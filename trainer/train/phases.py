"""The named phases of a run ("caching latents", "generating sample images", ...), so that an error raised
inside one knows where it happened: the out-of-memory advice reads the phase from the exception instead of
from file and function names in its traceback.

    with phase("cache_latents"):
        ...  # an exception leaving this block carries error.trainer_phase == "cache_latents"

The innermost phase wins: a sample image generated during training is "sample", not "train".

The start and the end of each phase are also the safe points where a Ctrl-C held during start-up stops the
run (trainer.interrupts)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from trainer import interrupts

PHASES = ("load", "cache_latents", "cache_text", "train", "sample", "validate")


@contextmanager
def phase(key: str) -> Iterator[None]:
    if key not in PHASES:
        raise ValueError(f"unknown phase {key!r}; one of {PHASES}")
    try:
        interrupts.check()
        yield
        interrupts.check()
    except BaseException as error:
        if getattr(error, "trainer_phase", None) is None:
            try:
                error.trainer_phase = key
            except AttributeError:  # an exception type without a __dict__: it goes on without its phase
                pass
        raise


def phase_of(error: BaseException) -> str | None:
    """The innermost phase the error was raised in, or None when it came from outside every phase."""
    return getattr(error, "trainer_phase", None)
