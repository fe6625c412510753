"""`python -m trainer bench --table FILE.json ...`: the JSONs of bench runs and estimates (what
scripts/bench-presets.sh writes) -> the GPU table of docs/benchmarks.md and each preset's "Expected peak VRAM"
comment, so measured numbers reach the docs without copying them by hand."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from trainer.errors import ConfigError
from trainer.presets import CUDA_OVERHEAD_GB


@dataclass
class PresetRuns:
    """Everything the JSONs say about one preset: its runs (uncapped first) and its estimate."""

    name: str  # the TOML's stem: "sd15-6gb"
    runs: list[dict[str, Any]] = field(default_factory=list)
    estimate: dict[str, Any] | None = None

    @property
    def card_gb(self) -> float | None:
        """The card size the preset is for, from its name (sd15-6gb -> 6): the tier is the promise to check."""
        sizes = re.findall(r"(\d+(?:\.\d+)?)\s*gb", self.name, re.IGNORECASE)
        return float(sizes[-1]) if sizes else None


def read_bench_files(paths: Sequence[str]) -> list[PresetRuns]:
    """Groups the JSONs by preset; presets in family order, then by card size (sd15-6gb before sd15-12gb)."""
    presets: dict[str, PresetRuns] = {}
    for path in paths:
        data = _read_json(path)
        name = preset_name(data.get("preset"), path)
        entry = presets.setdefault(name, PresetRuns(name))
        if json_kind(data) == "estimate":
            entry.estimate = data
        else:
            entry.runs.append(data)
    for entry in presets.values():
        entry.runs.sort(key=lambda run: run.get("vram_limit_gb") or 0.0)  # the uncapped run (None) first
    return sorted(presets.values(), key=lambda e: (re.sub(r"\d+(\.\d+)?\s*gb", "", e.name, flags=re.I),
                                                   e.card_gb or 0.0, e.name))


def _read_json(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f'--table "{path}": cannot read it as JSON ({e}). Fix: give the files that '
                          f"`bench --json` or scripts/bench-presets.sh wrote.") from None
    if not isinstance(data, dict) or not ("preset" in data or "total_gb" in data):
        raise ConfigError(f'--table "{path}" is not a bench result. Fix: give the files that `bench --json` or '
                          f"scripts/bench-presets.sh wrote.")
    return data


def json_kind(data: dict[str, Any]) -> str:
    """"run" or "estimate"; JSONs written before "kind" existed are told apart by their fields."""
    return data.get("kind") or ("estimate" if "total_gb" in data else "run")


def preset_name(preset: Any, path: str) -> str:
    """The preset's TOML stem; an estimate JSON without "preset" is named by its file (estimate-sd15-6gb.json)."""
    if preset:
        return Path(str(preset).replace("\\", "/")).stem  # a Windows path read on Linux too
    stem = Path(path).stem
    return re.sub(r"^(estimate|bench)-|-(estimate|capped)$", "", stem)


def table_markdown(entries: list[PresetRuns]) -> str:
    """The table (one row per run; a capped run is its own row under its preset's), then the presets' comments."""
    header = ["preset", "GPU / driver", "torch / CUDA", "attention", "resolution x batch", "it/s",
              "time to first step", "peak allocated", "peak reserved", "estimate (peak)",
              f"fits its card (≤ size - {CUDA_OVERHEAD_GB:g} GB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in entries:
        for run in entry.runs or [{}]:  # a preset with only an estimate still gets its row
            lines.append("| " + " | ".join(_cell(c) for c in table_row(entry, run, CUDA_OVERHEAD_GB)) + " |")
    lines += ["", f"GB = GiB. Peak allocated / reserved: torch.cuda.max_memory_allocated / max_memory_reserved; "
                  f'"fits" adds {CUDA_OVERHEAD_GB:g} GB of CUDA context to peak reserved. A capped row ran with '
                  f"--vram_limit set to the card's size.", ""]
    return "\n".join(lines + preset_comments(entries, CUDA_OVERHEAD_GB))


def table_row(entry: PresetRuns, run: dict[str, Any], context_gb: float) -> list[str]:
    m = run.get("machine") or {}
    limit = run.get("vram_limit_gb")
    failed = "**out of memory**" if run.get("out_of_memory") else "**error**" if run.get("error") else None
    return [entry.name + (f", capped at {limit:g} GB" if limit else ""), _device_cell(m),
            f"{m.get('torch', '?')} / {m.get('cuda') or 'none'}" if m else "?", run.get("attention", "?"),
            _size_cell(run), failed or _number(run.get("it_per_s")),
            _number(run.get("time_to_first_step_s"), " s", digits=1), _number(run.get("peak_allocated_gb")),
            _number(run.get("peak_reserved_gb")), _estimate_cell(entry.estimate),
            fits_cell(run, entry.card_gb, context_gb)]


def fits_cell(run: dict[str, Any], card_gb: float | None, context_gb: float) -> str:
    """Does the run fit the card its preset is named for: peak reserved + the CUDA context <= the card."""
    if not run:
        return "? (not run)"
    if run.get("out_of_memory"):
        return f"**no**: {run.get('error') or 'out of memory'}"
    if run.get("error"):
        return f"? (failed: {run['error']})"
    if card_gb is None:
        return "? (no card size in the preset's name)"
    if run.get("peak_reserved_gb") is None:
        return "? (no CUDA: a CPU run)"
    needs = run["peak_reserved_gb"] + context_gb
    return f"{'yes' if needs <= card_gb else '**no**'} ({needs:.2f} of {card_gb:g} GB)"


def _device_cell(m: dict[str, Any]) -> str:
    if m.get("gpu"):
        return f"{m['gpu']} / {m.get('driver') or '?'}"
    return f"CPU: {m.get('cpu')} ({m.get('cpu_cores')} cores) / -" if m else "?"


def _size_cell(run: dict[str, Any]) -> str:
    resolution, batch = run.get("resolution"), run.get("batch_size", "?")
    if not resolution:
        return "?"
    width, height = resolution
    return f"{width} x {batch}" if width == height else f"{width}x{height} x {batch}"


def _estimate_cell(estimate: dict[str, Any] | None) -> str:
    if not estimate:
        return "-"
    if estimate.get("error"):
        return "error"
    return _number(max(estimate.get("total_gb") or 0.0, estimate.get("caching_gb") or 0.0))


def _number(value: float | None, unit: str = "", digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _cell(text: str) -> str:
    # an error message may hold "|" or newlines, which would break the markdown table
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= 160 else text[:157] + "..."


def preset_comments(entries: list[PresetRuns], context_gb: float) -> list[str]:
    """The "Expected peak VRAM" comment each preset should carry: the measured peak reserved + the context."""
    lines = ["Expected peak VRAM comments for the presets (replace the three comment lines that start with "
             '"# Expected peak VRAM"):', ""]
    for entry in entries:
        run = _measured_run(entry)
        if run is None:
            lines += [f"- {entry.name}: no CUDA run without an error; the comment stays as it is.", ""]
            continue
        lines += [f"presets/{entry.name}.toml:", "```", *expected_vram_comment(entry.name, run, context_gb), "```",
                  ""]
    return lines


def _measured_run(entry: PresetRuns) -> dict[str, Any] | None:
    # The uncapped run first: a cap makes the allocator release its cache, which lowers peak reserved.
    usable = [r for r in entry.runs if r.get("peak_reserved_gb") is not None and not r.get("error")]
    return usable[0] if usable else None


def expected_vram_comment(name: str, run: dict[str, Any], context_gb: float) -> list[str]:
    m = run.get("machine") or {}
    width, height = run.get("resolution") or (0, 0)
    size = f"{width} px" if width == height else f"{width}x{height} px"
    reserved, allocated = run["peak_reserved_gb"], run.get("peak_allocated_gb") or 0.0
    return [f"# Expected peak VRAM: about {reserved + context_gb:.1f} GB on the card ({allocated:.1f} GB allocated by "
            f"training, {size}, batch {run.get('batch_size')}), measured by",
            f"#   python -m trainer bench --config presets/{name}.toml   (on {m.get('gpu', '?')}, torch "
            f"{m.get('torch', '?')}:",
            f"#   peak reserved {reserved:.2f} GB + {context_gb:g} GB CUDA context; docs/benchmarks.md has the table)."]


def print_utf8(text: str) -> None:
    """Prints `text`; redirected to a file (table.md) it is UTF-8 even where the locale's encoding is not."""
    stream = sys.stdout
    if hasattr(stream, "reconfigure") and not stream.isatty():  # a console shows "≤" by itself (Windows too)
        stream.reconfigure(encoding="utf-8")
    print(text)
