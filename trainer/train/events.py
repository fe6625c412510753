"""Progress as events. The loop never prints: it emits small events (run started, step, saved, warning,
finished, failed) to listeners. The rich console bar is one listener; a JSON-lines file in the output
folder is another, so the GUI or a user's script can follow a run without parsing console text."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


def events_file(output_dir: str | Path | None, output_name: str | None) -> Path:
    """`<output_dir>/<output_name>.events.jsonl`: where a run appends its events, and where the pre-flight
    reads the speed the last run measured."""
    return Path(output_dir or "output") / f"{output_name or 'last'}.events.jsonl"


@dataclass(frozen=True)
class Event:
    kind: str  # "run_started" | "step" | "validation" | "saved" | "warning" | "finished" | "failed" |
    #            "interrupted" | "info"
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)


class Listener(Protocol):
    def handle(self, event: Event) -> None: ...

    def close(self) -> None: ...


class Reporter:
    """Fans events out to listeners. `emit("step", step=3, loss=0.1)`."""

    def __init__(self, listeners: list[Listener] | None = None):
        self.listeners = list(listeners or [])

    def emit(self, kind: str, **data: Any) -> None:
        event = Event(kind, data)
        for listener in self.listeners:
            listener.handle(event)

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()


class RecordingListener:
    """Keeps every event in memory (tests, and anything that wants the run's history)."""

    def __init__(self):
        self.events: list[Event] = []

    def handle(self, event: Event) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]


class JsonlListener:
    """One JSON object per line: {"time", "kind", ...data}. Flushed per event so readers see it live."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def handle(self, event: Event) -> None:
        self._file.write(json.dumps({"time": round(event.time, 3), "kind": event.kind, **event.data},
                                    ensure_ascii=False, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ConsoleListener:
    """A rich progress bar: step/total, loss, it/s, ETA and (on CUDA) VRAM; saves and warnings as lines."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console()
        self.progress = None
        self.task = None

    def handle(self, event: Event) -> None:
        handler = getattr(self, f"on_{event.kind}", None)
        if handler:
            handler(event.data)

    def on_run_started(self, d: dict) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        for line in d.get("summary", []):
            self.console.print(line)
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]}"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[vram]}"), console=self.console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task("training", total=d["total_steps"], loss="-", speed="", vram="")

    def on_step(self, d: dict) -> None:
        if self.progress is None:
            return
        fields = {"loss": f"{d['loss']:.4f}" if d.get("loss") is not None else "-",
                  "speed": f"{d['it_per_s']:.2f} it/s" if d.get("it_per_s") else "",
                  "vram": f"VRAM {d['vram_gb']:.1f} GB" if d.get("vram_gb") else ""}
        self.progress.update(self.task, completed=d["step"], description=f"epoch {d['epoch']}", **fields)

    def on_validation(self, d: dict) -> None:
        divergence = f", {d['divergence']:+.4f} from training" if d.get("divergence") is not None else ""
        self.console.print(f"validation loss at step {d['step']} (epoch {d['epoch']}): {d['loss']:.4f}{divergence}")

    def on_saved(self, d: dict) -> None:
        self.console.print(f"saved {d['path']}")

    def on_warning(self, d: dict) -> None:
        if d.get("source") is None:  # warnings from loggers are already on the console via logging
            self.console.print(f"[yellow]warning:[/] {d['message']}")

    def on_info(self, d: dict) -> None:
        self.console.print(d["message"])

    def on_interrupted(self, d: dict) -> None:
        self._stop()
        self.console.print(f"[yellow]Interrupted at step {d['step']}.[/] " + d.get("message", ""))

    def on_finished(self, d: dict) -> None:
        self._stop()
        self.console.print(f"[green]Done[/] in {d['seconds']:.0f} s: {d['path']}")

    def on_failed(self, d: dict) -> None:
        self._stop()  # the reason itself is printed once, by the command line's error handler

    def _stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def close(self) -> None:
        self._stop()
