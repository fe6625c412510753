"""trainer.console: logging as sd-scripts' --console_log_* options say, Ctrl-C / Ctrl-Break, one-line errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from trainer import console
from trainer.cli import main
from trainer.errors import ConfigError

PRESETS = Path(__file__).resolve().parents[1] / "presets"


@pytest.fixture(autouse=True)
def default_logging():
    yield
    console.setup_logging()


def test_log_level_and_plain_format(capsys):
    console.setup_logging("WARNING", simple=True)
    log = logging.getLogger("trainer.something")
    log.info("not shown")
    log.warning("shown plainly")
    err = capsys.readouterr().err
    assert "not shown" not in err and "WARNING: shown plainly" in err


def test_log_file_takes_the_records_instead_of_the_console(tmp_path, capsys):
    target = tmp_path / "ログ folder" / "run.log"
    target.parent.mkdir()
    console.setup_logging("DEBUG", log_file=str(target))
    logging.getLogger("trainer.x").debug("a debug line with ü")
    assert "a debug line with ü" in target.read_text(encoding="utf-8")
    assert "a debug line" not in capsys.readouterr().err
    console.setup_logging(log_file=str(target))  # a second run starts the file anew, as sd-scripts does
    assert target.read_text(encoding="utf-8") == ""


def test_train_honours_the_console_log_arguments(tmp_path, monkeypatch):
    import trainer.train.run as run

    log_file = tmp_path / "train.log"

    def fake_training(cfg):
        logging.getLogger("trainer.train.fake").warning("a warning from training")
        logging.getLogger("trainer.train.fake").info("an info line")
        return True

    monkeypatch.setattr(run, "run_training", fake_training)
    assert main(["train", "--config_file", str(PRESETS / "demo.toml"), "--console_log_file", str(log_file),
                 "--console_log_level", "WARNING"]) == 0
    text = log_file.read_text(encoding="utf-8")
    assert "a warning from training" in text and "an info line" not in text


def test_a_user_error_is_one_line_and_exit_2(capsys):
    def fails():
        raise ConfigError("--resolution abc: expected W or W,H")

    assert console.run_guarded(fails) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "--resolution abc" in err and "Traceback" not in err


def test_an_ignored_ctrl_c_is_restored_so_stop_still_saves():
    import signal

    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        assert console.restore_ctrl_c() is True
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert console.restore_ctrl_c() is False  # a working handler is left alone
    finally:
        signal.signal(signal.SIGINT, previous)


