"""Comparison grids: one picture with a row per epoch (or step, or LoRA strength) and a column per sample
prompt, labelled, so a user picks the best epoch by eye instead of opening dozens of files.

A training run with sample prompts writes `<output_dir>/<output_name>_samples_grid.png` at its end from the
sample folder (sd-scripts' file names: `<name>_<e000004 or 000500>_<idx:02d>_<YYYYmmddHHMMSS>[_<seed>].png`);
`python -m trainer compare` draws the same layout from a folder of epoch files."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from trainer.files import atomic_path

LABEL_HEIGHT = 22  # per text line of a column header
ROW_LABEL_WIDTH = 150
MIN_CELL, MAX_CELL = 160, 384  # picture width in the grid: room for the labels, a size a browser shows
HEADER_LINES = 3
BACKGROUND, INK, MISSING = (255, 255, 255), (20, 20, 20), (230, 230, 230)
_SAMPLE_NAME = re.compile(r"^(?:(?P<name>.*)_)?(?P<label>e\d{6}|\d{6})_(?P<index>\d{2})_(?P<stamp>\d{14})"
                          r"(?:_(?P<seed>-?\d+))?\.png$")


@dataclass(frozen=True)
class GridRow:
    label: str
    cells: Sequence[Path | Image.Image | None]  # one per column; None: no picture for that column


def row_label(label: str) -> str:
    """A sample label as a person reads it: e000004 -> "epoch 4", 000500 -> "step 500", 0 -> before training."""
    if label.startswith("e"):
        number = int(label[1:])
        return f"epoch {number}" if number else "before training"
    return f"step {int(label)}" if int(label) else "before training"


def training_samples(folder: Path, output_name: str | None) -> dict[str, dict[int, Path]]:
    """The sample folder of a run: label -> prompt index -> picture. A label sampled twice (a resumed run)
    keeps its newest picture; pictures of another output name in the same folder are left out."""
    found: dict[str, dict[int, tuple[str, Path]]] = {}
    for path in sorted(Path(folder).glob("*.png")):
        match = _SAMPLE_NAME.match(path.name)
        if not match or (match["name"] or None) != (output_name or None):
            continue
        cells = found.setdefault(match["label"], {})
        index = int(match["index"])
        if index not in cells or cells[index][0] < match["stamp"]:
            cells[index] = (match["stamp"], path)
    ordered = sorted(found, key=lambda label: (label.startswith("e"), int(label.lstrip("e"))))
    return {label: {i: p for i, (_, p) in sorted(found[label].items())} for label in ordered}


def column_label(prompt: str, seed: int | None) -> str:
    """A column's header: the prompt (cut to three lines when drawn) and its seed."""
    return " ".join(prompt.split()) + (f"  (seed {seed})" if seed is not None else "")


def draw_grid(rows: Sequence[GridRow], columns: Sequence[str], title: str = "") -> Image.Image:
    """Rows of pictures under column headers, each row labelled on its left; a missing cell is grey.
    Pictures are scaled to one cell size between MIN_CELL and MAX_CELL wide, so tiny samples still leave
    room for their labels and big ones keep the grid a size a browser shows."""
    if not rows or not columns:
        raise ValueError("a grid needs at least one row and one column")
    first = next((_open(c) for row in rows for c in row.cells if c is not None), None)
    width, height = first.size if first is not None else (MAX_CELL, MAX_CELL)
    scale = min(max(width, MIN_CELL), MAX_CELL) / width
    width, height = round(width * scale), round(height * scale)
    font = _font(14)
    headers = [_wrap(text, font, width - 8, HEADER_LINES) for text in columns]
    top = LABEL_HEIGHT * (max(len(h) for h in headers) + (1 if title else 0))
    size = (max(ROW_LABEL_WIDTH + width * len(columns), round(font.getlength(title)) + 12),
            top + height * len(rows))
    grid = Image.new("RGB", size, BACKGROUND)
    pen = ImageDraw.Draw(grid)
    if title:
        pen.text((6, 4), title, fill=INK, font=font)
    for c, lines in enumerate(headers):
        for i, line in enumerate(reversed(lines)):  # bottom-aligned on the pictures
            pen.text((ROW_LABEL_WIDTH + c * width + 4, top - LABEL_HEIGHT * (i + 1) + 4), line, fill=INK, font=font)
    for r, row in enumerate(rows):
        y = top + r * height
        lines = _wrap(row.label, font, ROW_LABEL_WIDTH - 10, 4)
        for i, line in enumerate(lines):
            pen.text((6, y + (height - LABEL_HEIGHT * len(lines)) // 2 + LABEL_HEIGHT * i), line, fill=INK,
                     font=font)
        for c in range(len(columns)):
            cell = row.cells[c] if c < len(row.cells) else None
            box = (ROW_LABEL_WIDTH + c * width, y)
            if cell is None:
                pen.rectangle((*box, box[0] + width - 1, y + height - 1), fill=MISSING)
            else:
                grid.paste(_open(cell).convert("RGB").resize((width, height), Image.Resampling.LANCZOS), box)
    return grid


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Words into lines no wider than `width` pixels; what does not fit in `max_lines` ends in "…"."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " …"
    for i, line in enumerate(lines):  # one word wider than the cell
        while font.getlength(line) > width and len(line) > 2:
            line = line[:-2] + "…"
        lines[i] = line
    return lines or [""]


def save_grid(image: Image.Image, path: Path) -> Path:
    with atomic_path(path) as temp:
        image.save(temp, format="PNG")
    return path


def training_grid(output_dir: Path, output_name: str | None, prompts: Sequence) -> Path | None:
    """The end-of-run grid from the run's sample folder; None when it holds no samples of this run."""
    samples = training_samples(output_dir / "sample", output_name)
    if not samples:
        return None
    columns = [column_label(p.prompt, p.seed) for p in prompts]
    count = max(len(columns), *(max(cells) + 1 for cells in samples.values()))
    columns += [f"prompt {i + 1}" for i in range(len(columns), count)]
    rows = [GridRow(row_label(label), [cells.get(i) for i in range(count)]) for label, cells in samples.items()]
    title = f"{output_name or 'samples'}: rows = when sampled, columns = prompts"
    return save_grid(draw_grid(rows, columns, title), output_dir / f"{output_name or 'samples'}_samples_grid.png")


def _open(cell: Path | Image.Image) -> Image.Image:
    if isinstance(cell, Image.Image):
        return cell
    with Image.open(cell) as image:
        image.load()
        return image


def _font(size: int):
    """Pillow's own scalable font (no font file needed on any OS); very old Pillow: its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()
