"""trainer.train.phases: an error raised inside a phase carries its name, the innermost one."""

from __future__ import annotations

import pytest

from trainer.train.phases import phase, phase_of


def test_the_innermost_phase_names_the_error():
    with pytest.raises(RuntimeError) as caught:
        with phase("train"):
            with phase("sample"):
                raise RuntimeError("out of memory")
    assert phase_of(caught.value) == "sample"


def test_an_error_outside_every_phase_has_none_and_unknown_phases_are_refused():
    assert phase_of(RuntimeError()) is None
    with pytest.raises(ValueError, match="unknown phase"):
        with phase("caching"):
            pass


def test_keyboard_interrupt_keeps_its_phase_too():
    with pytest.raises(KeyboardInterrupt) as caught:
        with phase("load"):
            raise KeyboardInterrupt
    assert phase_of(caught.value) == "load"
