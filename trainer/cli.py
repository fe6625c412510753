"""`python -m trainer <command>`: the one entry point. Heavy libraries are imported only by the commands
that need them, so `setup` and `doctor` work before torch is installed."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Callable, Sequence

from trainer.errors import UserError

USAGE = """usage: python -m trainer <command> [arguments]

commands:
  train    train a LoRA; takes sd-scripts' train_network.py arguments (--config_file, --dataset_config, ...)
  gui      open the trainer's page in the browser: presets, settings, start/stop, progress (--port, --no_browser)
  demo     train the built-in demo (tiny model, generated images) to check that everything works
  merge    merge LoRA files into a base model and save one .safetensors checkpoint (A1111 layout)
  bench    speed and peak VRAM of a preset on its full-size model with random weights (--estimate: no run)
  setup    install torch and the requirements for this machine (run by setup.ps1 / setup.sh)
  doctor   check the environment (Python, torch, GPU, packages) and say what to fix
  args     write the table of sd-scripts arguments and their status here (docs/compatibility.md)

`python -m trainer train --help` lists every training argument."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 1
    command, rest = argv[0], argv[1:]
    handler = COMMANDS.get(command)
    if handler is None:
        print(f"unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
        return 2
    return run_guarded(lambda: handler(rest))


def run_guarded(action: Callable[[], int]) -> int:
    """User mistakes become one readable message and exit status 2, never a stack trace."""
    try:
        return action()
    except UserError as error:
        _print_error(str(error))
        return 2
    except KeyboardInterrupt:
        _print_error("Stopped (Ctrl-C).")
        return 130


def _print_error(message: str) -> None:
    try:
        from rich.console import Console

        from rich.markup import escape

        # soft_wrap: long paths are wrapped by the terminal, not broken by inserted newlines
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    except ImportError:
        print(f"error: {message}", file=sys.stderr)


def cmd_train(argv: list[str]) -> int:
    setup_logging()
    from trainer.config.args import parse_train_args, write_output_config

    cfg = parse_train_args(argv)
    if cfg.output_config:
        print(f"wrote {write_output_config(cfg)}")
        return 0
    stop_on_ctrl_break()
    restore_ctrl_c()
    quiet_libraries()
    from trainer.train.run import run_training

    return 0 if run_training(cfg) else 1


def stop_on_ctrl_break(signals=signal) -> bool:
    """On Windows, make Ctrl-Break stop training the way Ctrl-C does (the LoRA so far is saved).

    The GUI stops a run with CTRL_BREAK_EVENT: Windows cannot send Ctrl-C to one child process group, and
    Python's default for Ctrl-Break is to exit at once without saving. Returns whether it was installed
    (never elsewhere: POSIX has no SIGBREAK, and the GUI sends SIGINT there)."""
    if not hasattr(signals, "SIGBREAK"):
        return False
    signals.signal(signals.SIGBREAK, _raise_keyboard_interrupt)
    return True


def restore_ctrl_c(signals=signal) -> bool:
    """A program started with Ctrl-C ignored (`nohup ./gui.sh &`) passes that on to its children, and the
    GUI's Stop (SIGINT on Linux) would then be lost: training must still stop and save on it."""
    if signals.getsignal(signals.SIGINT) != signals.SIG_IGN:
        return False
    signals.signal(signals.SIGINT, signals.default_int_handler)
    return True


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def cmd_gui(argv: list[str]) -> int:
    from trainer.gui import app

    return app.main(argv)


def cmd_demo(argv: list[str]) -> int:
    from trainer.demo import DEMO_PRESET

    return cmd_train(["--config_file", str(DEMO_PRESET), *argv])


def cmd_merge(argv: list[str]) -> int:
    setup_logging()
    from trainer import merge

    return merge.main(argv)


def cmd_bench(argv: list[str]) -> int:
    setup_logging()
    from trainer import bench

    return bench.main(argv)


def cmd_setup(argv: list[str]) -> int:
    from trainer import setup_env

    return setup_env.main(argv)


def cmd_doctor(argv: list[str]) -> int:
    from trainer import doctor

    return doctor.main(argv)


def cmd_args(argv: list[str]) -> int:
    from trainer.config.compat import main as compat_main

    return compat_main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": cmd_train, "gui": cmd_gui, "demo": cmd_demo, "merge": cmd_merge, "bench": cmd_bench,
    "setup": cmd_setup, "doctor": cmd_doctor, "args": cmd_args}


def setup_logging(level: str | None = None, log_file: str | None = None) -> None:
    """Our warnings through rich; the libraries' chatter (diffusers, transformers) only when it is an error."""
    try:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_time=False, show_path=False, markup=False)
    except ImportError:
        handler = logging.StreamHandler()
    root = logging.getLogger("trainer")
    root.handlers[:] = [handler]
    root.setLevel(level or "INFO")
    root.propagate = False
    if log_file:
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file_handler)
    for noisy in ("diffusers", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def quiet_libraries() -> None:
    """The libraries' own progress bars ("Loading weights") would garble ours."""
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    # Their notes (e.g. "CLIPImageProcessor requires torchvision") are about parts a trainer never uses.
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
