"""A training run started from the GUI: `python -m trainer train --config_file X` as a child process, followed
through the JSON-lines events file the trainer writes beside the LoRA (trainer.train.events), never by
parsing console text. The console output goes to a log file, whose last lines explain a run that died before
it wrote any event (a config error, a crash at import).

Stop means Ctrl-C: SIGINT on POSIX, CTRL_BREAK_EVENT on Windows (the child runs in its own process group,
and the trainer treats SIGBREAK as Ctrl-C), so the trainer saves the LoRA so far and reports "interrupted".
No gradio, no torch here."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from trainer.config.args import read_config_file
from trainer.errors import ConfigError
from trainer.paths import REPO_ROOT
from trainer.train.events import events_file

STATES = ("idle", "running", "finished", "failed", "interrupted")
MAX_WARNINGS = 20
LOG_TAIL_LINES = 30
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
GRID_CAPTION = "all samples side by side: a row per epoch (or step), a column per prompt: pick the best epoch"
_MARKS = {"finished": "✅", "interrupted": "⏹"}


@dataclass
class RunStatus:
    """What the GUI shows about a run, folded from its events (and its exit code)."""

    state: str = "idle"
    step: int = 0
    total: int | None = None
    epoch: int | None = None
    loss: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    vram_gb: float | None = None
    samples: list[tuple[str, str]] = field(default_factory=list)  # (image path, prompt)
    saved: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    message: str = ""  # the failure reason, the interruption message, or the finished summary
    log_tail: str = ""
    output: str | None = None  # the final LoRA file of a finished run
    num_epochs: int | None = None
    validation_loss: float | None = None
    info: list[str] = field(default_factory=list)  # the run's summary lines (images, steps, attention, ...)
    exit_code: int | None = None
    elapsed_s: float | None = None
    folder: str | None = None  # the output folder, absolute: the trainer's paths are relative to its cwd


class TrainingRun:
    """One training subprocess. `start()`, then `poll()` as often as the GUI likes (it reads only what the
    trainer appended since the last call), `stop()` to end it the Ctrl-C way."""

    def __init__(self, config_path: str | os.PathLike, *, python: str = sys.executable,
                 cwd: str | os.PathLike | None = None, extra_args: Sequence[str] = ()):
        self.cwd = Path(cwd) if cwd is not None else Path.cwd()
        self.config_path = Path(config_path) if Path(config_path).is_absolute() else self.cwd / config_path
        self.python = python
        self.extra_args = list(extra_args)
        self.events_path, self.log_path = _output_files(self.config_path, self.extra_args, self.cwd)
        self.process: subprocess.Popen | None = None
        self.status = RunStatus()
        self._offset = 0  # events before this byte belong to older runs (or are already folded in)
        self._started = 0.0
        self._stop_requested = False
        self._terminal_event = False
        self._reading = threading.Lock()  # the page's timer and a button can poll at once; events fold once

    # ---- control ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self.running:
            raise ConfigError("A training run is already going; stop it first.")
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # an output folder that cannot be made: the trainer's own check says why, in this log
            self.log_path = Path(tempfile.gettempdir()) / self.log_path.name
        self._offset = self.events_path.stat().st_size if self.events_path.is_file() else 0
        self.status = RunStatus(state="running", folder=str(self.events_path.parent.absolute()))
        self._stop_requested = self._terminal_event = False
        command = [self.python, "-m", "trainer", "train", "--config_file", str(self.config_path), *self.extra_args]
        with open(self.log_path, "w", encoding="utf-8") as log:
            log.write(f"$ {subprocess.list2cmdline(command)}\n")
            log.flush()
            self.process = subprocess.Popen(command, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, env=child_env(), **_new_process_group())
        self._started = time.time()

    def stop(self) -> None:
        """Ctrl-C for the child: it saves the LoRA so far (`<name>-step<N>.safetensors`) and ends."""
        if not self.running:
            return
        self._stop_requested = True
        if os.name == "nt":
            self.process.send_signal(signal.CTRL_BREAK_EVENT)
        else:
            self.process.send_signal(signal.SIGINT)

    def kill(self) -> None:
        """End the child at once (nothing is saved); for a run that does not react to stop()."""
        if self.running:
            self._stop_requested = True
            self.process.kill()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self, timeout: float | None = None, interval: float = 0.2) -> RunStatus:
        """poll() until the run ends (or `timeout` seconds pass); returns the last status."""
        deadline = None if timeout is None else time.time() + timeout
        while self.running and (deadline is None or time.time() < deadline):
            time.sleep(interval)
            self.poll()
        return self.poll()

    # ---- following ----------------------------------------------------------------------------------

    def poll(self) -> RunStatus:
        """Fold the events appended since the last call into the status; once the process has ended, settle
        the final state from the events and its exit code."""
        if self.process is None:
            return self.status
        with self._reading:
            exit_code = self.process.poll()  # before reading: every event of an ended process is then on disk
            for event in self._new_events():
                fold_event(self.status, event)
                self._terminal_event |= event.get("kind") in ("finished", "failed", "interrupted")
            self.status.elapsed_s = time.time() - self._started
            self.status.log_tail = read_log_tail(self.log_path)
            if exit_code is not None:
                self._settle(exit_code)
        return self.status

    def _new_events(self) -> list[dict[str, Any]]:
        """Complete lines after the offset; a partly written last line waits for the next call."""
        try:
            with open(self.events_path, "rb") as file:
                if os.fstat(file.fileno()).st_size < self._offset:  # replaced or emptied by the user
                    self._offset = 0
                file.seek(self._offset)
                data = file.read()
        except FileNotFoundError:
            return []
        complete = data.rfind(b"\n") + 1
        self._offset += complete
        return parse_event_lines(data[:complete])

    def _settle(self, exit_code: int) -> None:
        s = self.status
        s.exit_code = exit_code
        s.eta_s = None
        if self._terminal_event and s.state != "running":
            return
        if exit_code == 0:  # e.g. --debug_dataset or --output_config: no "finished" event
            s.state, s.message = "finished", s.message or "The trainer ended without errors."
        elif self._stop_requested:
            s.state = "interrupted"
            s.message = s.message or (f"Ended at step {s.step} before the trainer could save." if s.step else
                                      "Stopped before training began; nothing was saved.")
        else:
            s.state = "failed"
            s.message = error_from_log(s.log_tail) or f"The trainer ended with exit code {exit_code}; see " \
                                                      f"{self.log_path}."


def fold_event(s: RunStatus, event: dict[str, Any]) -> None:
    """One event into the status (kinds and fields as trainer.train.loop / run.py emit them)."""
    kind = event.get("kind")
    if kind == "run_started":
        s.total, s.num_epochs = event.get("total_steps"), event.get("num_epochs")
        s.step = event.get("start_step") or 0
        s.info += [str(line) for line in event.get("summary") or []]
    elif kind == "step":
        s.step, s.total, s.epoch = event.get("step", s.step), event.get("total", s.total), event.get("epoch")
        s.loss, s.it_per_s, s.vram_gb = event.get("loss"), event.get("it_per_s"), event.get("vram_gb")
        remaining = (s.total or 0) - s.step
        s.eta_s = remaining / s.it_per_s if s.it_per_s and s.total else None
    elif kind == "sample":
        s.samples.append((str(event.get("path")), str(event.get("prompt", ""))))
    elif kind == "sample_grid":  # shown first in the gallery, as the newest picture
        s.samples.append((str(event.get("path")), GRID_CAPTION))
    elif kind == "saved":
        s.saved.append(str(event.get("path")))
    elif kind == "warning":
        message = str(event.get("message", ""))
        if message not in s.warnings:
            s.warnings = (s.warnings + [message])[-MAX_WARNINGS:]
    elif kind == "validation":
        s.validation_loss = event.get("loss")
    elif kind == "info":
        s.info.append(str(event.get("message", "")))
    elif kind == "finished":
        s.state, s.output, s.eta_s = "finished", event.get("path"), None
        s.step = event.get("steps", s.step)
        s.message = f"Finished in {_duration(event.get('seconds'))}: {event.get('path')}"
    elif kind == "failed":
        s.state, s.message, s.eta_s = "failed", str(event.get("reason", "")), None
    elif kind == "interrupted":
        s.state, s.eta_s = "interrupted", None
        s.step = event.get("step", s.step)
        s.message = f"Stopped at step {s.step}. {event.get('message', '')}".strip()


def parse_event_lines(data: bytes) -> list[dict[str, Any]]:
    """JSON objects, one a line; a damaged line is skipped rather than stopping the GUI."""
    events = []
    for line in data.splitlines():
        try:
            event = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def read_log_tail(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 16384) -> str:
    """The last lines of the console log, without colour codes."""
    try:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - max_bytes))
            text = file.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    text = _ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(text.splitlines()[-lines:])


def error_from_log(tail: str) -> str:
    """The CLI prints a user error as `error: ...` (possibly over several lines); a crash ends in a traceback
    whose last line says what went wrong. Either way the end of the log holds the reason."""
    lines = [line.rstrip() for line in tail.splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("error:"):
            return "\n".join([lines[i][len("error:"):].strip()] + [line for line in lines[i + 1:] if line])
    meaningful = [line for line in lines if line.strip()]
    return "\n".join(meaningful[-8:])


def status_markdown(status: RunStatus) -> str:
    """A few lines for the GUI: progress, loss, speed, ETA, memory, files saved, warnings, the outcome."""
    s = status
    if s.state == "idle":
        return "Not started."
    lines = []
    if s.total:
        percent = 100 * s.step / s.total if s.total else 0
        epoch = f", epoch {s.epoch}" + (f" of {s.num_epochs}" if s.num_epochs else "") if s.epoch else ""
        lines.append(f"**Step {s.step} / {s.total}** ({percent:.0f}%{epoch})")
    elif s.state == "running":
        lines.append("**Starting...** (loading the model and scanning the images)")
    figures = []
    if s.loss is not None:
        figures.append(f"loss {s.loss:.4f}")
    if s.it_per_s:
        figures.append(f"{s.it_per_s:.2f} it/s")
    if s.eta_s is not None and s.state == "running":
        figures.append(f"ETA {_duration(s.eta_s)}")
    if s.vram_gb:
        figures.append(f"VRAM {s.vram_gb:.1f} GB")
    if s.validation_loss is not None:
        figures.append(f"validation loss {s.validation_loss:.4f}")
    if figures:
        lines.append(" · ".join(figures))
    if s.state != "running":
        first, _, rest = s.message.partition("\n")
        lines.append(f"❌ **Failed:** {first}" if s.state == "failed" else f"{_MARKS.get(s.state, '')} **{first}**")
        if rest:
            lines.append("```\n" + rest + "\n```")
    if s.saved:
        where = f" in `{s.folder}`" if s.folder else ""  # "output/x.safetensors" says not where "output" is
        lines.append(f"Saved{where}: " + ", ".join(f"`{Path(p).name}`" for p in s.saved[-5:]))
    if s.samples:
        lines.append(f"Sample images: {len(s.samples)} (latest `{Path(s.samples[-1][0]).name}`)")
    for warning in s.warnings[-3:]:
        lines.append(f"⚠ {warning}")
    return "\n\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Helpers


def _output_files(config: Path, extra_args: list[str], cwd: Path) -> tuple[Path, Path]:
    """The events file the trainer will append to (`<output_dir>/<output_name>.events.jsonl`, as
    trainer.train.events.events_file names it) and the console log beside it. Read from the TOML without
    checking it: a broken config must still get a log that says what is wrong."""
    try:
        _, values = read_config_file(str(config))
    except ConfigError:
        values = {}
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--output_dir")
    parser.add_argument("--output_name")
    given, _ = parser.parse_known_args(extra_args)
    folder = str(given.output_dir or values.get("output_dir") or "output")
    name = str(given.output_name or values.get("output_name") or "last")
    folder_path = Path(folder) if Path(folder).is_absolute() else cwd / folder
    return events_file(folder_path, name), folder_path / f"{name}.gui.log"


def child_env() -> dict[str, str]:
    """UTF-8 everywhere (Japanese paths in messages on a cp932 Windows), unbuffered output so the log is
    live, and this checkout's `trainer` package first on the path."""
    env = dict(os.environ)
    env.update(PYTHONUTF8="1", PYTHONIOENCODING="utf-8", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("COLUMNS", "120")  # rich wraps a non-terminal at 80 columns otherwise
    return env


def _new_process_group() -> dict[str, Any]:
    """Its own process group: a signal meant for the child reaches it alone, and a Ctrl-C in the console
    the GUI was started from does not kill a run the user did not stop."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}" if minutes else f"{secs} s"
