"""The console around every command: logging (sd-scripts' --console_log_level / _file / _simple), Ctrl-C for
the GUI's server (training has its own rules: trainer.interrupts), and user mistakes shown as one line
instead of a stack trace.

Torch-free: `setup` and `doctor` use it before torch is installed."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Callable

from trainer.errors import UserError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_guarded(action: Callable[[], int]) -> int:
    """User mistakes become one readable message and exit status 2, never a stack trace."""
    try:
        return action()
    except UserError as error:
        print_error(str(error))
        return 2
    except KeyboardInterrupt as stop:
        print_error(f"Stopped (Ctrl-C){': ' + str(stop) if str(stop) else ''}.")
        return 130


def print_error(message: str) -> None:
    try:
        from rich.console import Console
        from rich.markup import escape

        # soft_wrap: long paths are wrapped by the terminal, not broken by inserted newlines
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    except ImportError:
        print(f"error: {message}", file=sys.stderr)


def setup_logging(level: str | None = None, log_file: str | None = None, simple: bool = False) -> None:
    """Our log records ("trainer.*") as sd-scripts' --console_log_* options say: at `level` (default INFO),
    to `log_file` instead of the console when given (written anew, UTF-8), plainly formatted with `simple`,
    else through rich. The libraries' chatter (diffusers, transformers, accelerate) only when it is an error.
    The progress bar is not a log record: it stays on the console either way."""
    handler: logging.Handler | None = None
    if log_file:
        handler = logging.FileHandler(log_file, mode="w", encoding="utf-8")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    elif not simple:
        try:
            from rich.logging import RichHandler

            handler = RichHandler(show_time=False, show_path=False, markup=False)
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger("trainer")
    for old in root.handlers:
        old.close()
    root.handlers[:] = [handler]
    root.setLevel(level or "INFO")
    root.propagate = False
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


def restore_ctrl_c(signals=signal) -> bool:
    """A program started with Ctrl-C ignored (`nohup ./gui.sh &`) passes that on: the GUI's server must still
    close (and stop its run) on Ctrl-C / SIGINT. Training installs its own handler (trainer.interrupts)."""
    if signals.getsignal(signals.SIGINT) != signals.SIG_IGN:
        return False
    signals.signal(signals.SIGINT, signals.default_int_handler)
    return True

