"""trainer.interrupts: Ctrl-C / Ctrl-Break are held during start-up and inside a file write or an optimizer
step, and stop the run at a safe point instead: one line, exit 130, the steps so far kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer import interrupts

ROOT = Path(__file__).resolve().parents[1]


def press_ctrl_c() -> None:
    """What the console does on Ctrl-C; Python runs the handler at the next bytecode of the main thread."""
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)


@pytest.fixture(autouse=True)
def python_default_sigint():
    """Python's own Ctrl-C behaviour, whatever this process inherited: a shell's background job starts with
    SIGINT ignored, and Python then never installs its KeyboardInterrupt handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def installed():
    assert interrupts.install()
    yield
    interrupts.uninstall()


def test_without_install_python_raises_as_usual():
    assert not interrupts.installed()
    with pytest.raises(KeyboardInterrupt):
        press_ctrl_c()
    interrupts.check()  # nothing was counted: a library caller sees no difference


def test_a_press_during_start_up_waits_for_the_next_safe_point(installed, capfd):
    press_ctrl_c()  # nothing raised here: this may be the middle of an import
    assert interrupts.pressed()
    assert "stopping at the next safe point" in capfd.readouterr().err
    with pytest.raises(KeyboardInterrupt, match="nothing was trained"):
        interrupts.check()


def test_begin_training_stops_a_run_that_was_asked_to_stop_during_start_up(installed):
    press_ctrl_c()
    with pytest.raises(KeyboardInterrupt):
        interrupts.begin_training()


def test_after_begin_training_a_press_raises_at_once(installed):
    interrupts.begin_training()
    with pytest.raises(KeyboardInterrupt):
        press_ctrl_c()


def test_a_press_inside_held_waits_for_the_block_and_then_raises(installed, capfd):
    interrupts.begin_training()
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.held("writing a file: please wait"):
            press_ctrl_c()
            finished.append("the rest of the write")
    assert finished == ["the rest of the write"]
    assert "writing a file: please wait" in capfd.readouterr().err


def test_held_without_raising_when_the_run_is_stopping_already(installed):
    interrupts.begin_training()
    with interrupts.held("the last save", then_raise=False):
        press_ctrl_c()
        press_ctrl_c()
    assert interrupts.pressed()


def test_a_hold_inside_the_start_up_hold_leaves_the_stop_to_the_safe_point(installed):
    with interrupts.held("caching"):
        press_ctrl_c()
    with pytest.raises(KeyboardInterrupt):  # not raised by the inner block: the start-up hold decides
        interrupts.check()


def test_uninstall_puts_the_previous_handler_back():
    before = signal.getsignal(signal.SIGINT)
    interrupts.install()
    assert signal.getsignal(signal.SIGINT) is not before
    interrupts.uninstall()
    assert signal.getsignal(signal.SIGINT) is before and not interrupts.installed()


# --- the whole command, as a user presses Ctrl-C ---------------------------------------------------------

def start_demo(cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer", "train", "--config_file",
                             str(ROOT / "presets" / "demo.toml"), "--max_train_epochs", "1"],
                            cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace")


@pytest.mark.parametrize("after", ["imports", "first-line"])
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path, after):
    """Before, a press in start-up could be swallowed (the run trained to the end), end in an ImportError
    traceback, or abort torch; it now stops at the next safe point, whatever was running."""
    proc = start_demo(tmp_path)
    if after == "imports":
        time.sleep(0.8)  # inside the imports of torch/diffusers
    else:
        proc.stdout.readline()  # the first log line: the dataset is read, the model is next
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in out + err and "terminate called" not in err
    assert "Stopped (Ctrl-C)" in err
    assert not (tmp_path / "output" / "demo-lora.safetensors").exists()
    assert not list((tmp_path / "output").glob("*.tmp*")) if (tmp_path / "output").exists() else True


def test_ctrl_c_twice_while_the_interrupted_save_writes_still_saves(tiny_sd1_dir, train_data_dir, tmp_path,
                                                                      monkeypatch, capfd):
    """The second press used to cut the save: no file, and no word that the steps were lost."""
    from trainer.cli import main
    from trainer.network import lora as lora_module
    from trainer.train import loop

    real_loss, calls = loop.compute_loss, []

    def stop_in_step_3(setup, batch, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            press_ctrl_c()
        return real_loss(setup, batch, **kwargs)

    real_save = lora_module.LoRANetwork.save_weights

    def save_with_a_second_press(self, *args, **kwargs):
        press_ctrl_c()  # while the LoRA so far is being written
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(loop, "compute_loss", stop_in_step_3)
    monkeypatch.setattr(lora_module.LoRANetwork, "save_weights", save_with_a_second_press)
    out = tmp_path / "out"
    code = main(["train", "--pretrained_model_name_or_path", str(tiny_sd1_dir), "--train_data_dir",
                 str(train_data_dir), "--output_dir", str(out), "--output_name", "two", "--resolution", "64",
                 "--network_module", "networks.lora", "--max_train_steps", "6", "--seed", "1",
                 "--max_data_loader_n_workers", "0", "--save_state"])
    assert code == 130
    assert (out / "two-step00000002.safetensors").is_file() and (out / "two-step00000002-state").is_dir()
    assert "still being written" in capfd.readouterr().err
    assert not list(out.glob("*.tmp*"))
