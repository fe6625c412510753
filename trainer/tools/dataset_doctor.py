"""The dataset doctor: what is wrong with the pictures and captions a run would train on, with the fix for each,
found without loading a model. `trainer.tools.preflight` resolves the folders exactly as `train` does and hands
each subset's pictures and captions here; the GUI's Check, `doctor --config` and `doctor --config --json` show
the result.

What a finding means for the run decides its level: a PROBLEM stops training (it would crash, or train on
nothing), a WARNING trains but not as the user thinks (a picture trained sideways, a caption cut short), a NOTE
is worth knowing.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from trainer.data.buckets import BucketManager
from trainer.data.captions import count_tags
from trainer.data.config import DatasetSpec, SubsetSpec
from trainer.data.folders import IMAGE_EXTENSIONS, caption_candidates
from trainer.data.pictures import (
    NOTE,
    PROBLEM,
    WARNING,
    LoggedProgress,
    PictureFacts,
    Progress,
    default_cache_file,
    exact_duplicates,
    inspect_pictures,
    name_files,
    near_duplicates,
    picture_findings,
)

logger = logging.getLogger(__name__)

OTHER_PICTURE_EXTENSIONS = {".gif", ".tif", ".tiff", ".heic", ".heif", ".jfif", ".jxl", ".avif", ".psd", ".ico",
                            ".jpe", ".svg", ".dng", ".raw"} - set(IMAGE_EXTENSIONS)
SYSTEM_FILES = {"thumbs.db", "desktop.ini", ".ds_store"}
MOST_CROPPED = 0.2  # a bucket that cuts away more than a fifth of the resized picture
MOST_UPSCALED = 1.5  # a picture blown up more than this is visibly soft
SHOWN_GROUPS = 5


@dataclass(frozen=True)
class Finding:
    level: str
    message: str  # what is wrong and how to fix it
    files: tuple[str, ...] = ()

    def text(self) -> str:
        if not self.files:
            return self.message
        return f"{self.message}: {name_files(self.files)}"

    def to_json(self) -> dict[str, Any]:
        return {"level": self.level, "message": self.message, "files": list(self.files)}


@dataclass(frozen=True)
class SubsetScan:
    """One subset as training reads it: its dataset's settings, its pictures and their captions."""

    dataset: DatasetSpec
    subset: SubsetSpec
    images: list[Path]
    captions: list[str]
    dataset_index: int = 0


@dataclass
class DatasetFindings:
    findings: list[Finding] = field(default_factory=list)
    buckets: list[dict[str, Any]] = field(default_factory=list)  # dataset, resolution, pictures, with_repeats
    top_tags: list[tuple[str, int]] = field(default_factory=list)
    pictures: int = 0

    def add(self, level: str, message: str, files: Sequence[str | Path] = ()) -> None:
        self.findings.append(Finding(level, message, tuple(str(f) for f in files)))

    def to_json(self) -> dict[str, Any]:
        return {"pictures": self.pictures, "findings": [f.to_json() for f in self.findings],
                "buckets": self.buckets, "top_tags": [{"tag": t, "count": n} for t, n in self.top_tags]}

    def tables_markdown(self) -> str:
        parts = []
        if self.buckets:
            parts += ["**Buckets** (the size each picture is trained at):", "",
                      "| dataset | resolution | pictures | with repeats |", "|---|---|---|---|"]
            parts += [f"| {b['dataset']} | {b['resolution']} | {b['pictures']} | {b['with_repeats']} |"
                      for b in self.buckets]
        if self.top_tags:
            parts += ["", "**Most frequent tags** (as ss_tag_frequency records them):", "",
                      ", ".join(f"{tag} ({count})" for tag, count in self.top_tags)]
        return "\n".join(parts)


def examine(scans: Sequence[SubsetScan], *, max_token_length: int | None = None, progress: Progress | None = None,
            cache_file: Path | None = None, tokenizer: Any = None) -> DatasetFindings:
    """Every check on the pictures and captions of `scans`. `tokenizer` (a CLIP tokenizer) counts caption
    tokens; without one the check is skipped with a note."""
    report = DatasetFindings()
    folders = [s for s in scans if s.subset.image_dir and not s.subset.metadata_file]  # (metadata: captions in JSON)
    for folder in dict.fromkeys(Path(s.subset.image_dir) for s in folders):
        check_folder_files(folder, [s for s in folders if Path(s.subset.image_dir) == folder], report)
    for scan in folders:
        check_caption_files(scan, report)
    paths = [p for s in scans for p in s.images]
    facts = inspect_pictures(paths, cache_file=cache_file or default_cache_file(),
                             progress=progress or LoggedProgress())
    report.pictures = len(facts)
    by_path = dict(zip(paths, facts))
    check_pictures(facts, {str(p) for s in scans if s.subset.alpha_mask for p in s.images}, report)
    check_buckets(scans, by_path, report)
    check_duplicates(facts, report)
    check_balance(scans, report)
    check_token_lengths(scans, max_token_length, tokenizer, report)
    report.top_tags = top_tags(scans)
    return report


# ---- layout ----------------------------------------------------------------------------------------------

def check_folder_files(folder: Path, scans: Sequence[SubsetScan], report: DatasetFindings) -> None:
    """Files in a picture folder that training leaves out, and caption files no picture uses."""
    try:
        files = [p for p in folder.iterdir() if p.is_file()]
    except OSError:
        return  # the folder itself is reported by the scan
    hidden = [p for p in files if p.name.startswith(".") and p.name.lower() not in SYSTEM_FILES]
    if hidden:
        report.add(NOTE, f"{folder}: {len(hidden)} hidden file(s) are left out (macOS writes '._name' copies "
                         "beside pictures); delete them if you like", hidden)
    others = [p for p in files if p.suffix.lower() in OTHER_PICTURE_EXTENSIONS]
    if others:
        report.add(WARNING, f"{folder}: {len(others)} picture(s) of a kind training does not read are left out; "
                            f"convert them to PNG or JPEG to use them (read: {', '.join(IMAGE_EXTENSIONS)})", others)
    used = {c for s in scans for image in s.images for c in caption_candidates(image, s.subset.caption_extension)}
    extensions = {s.subset.caption_extension.lower() for s in scans}
    orphans = [p for p in files if p.suffix.lower() in extensions and p not in used and not p.name.startswith(".")]
    if orphans:
        report.add(WARNING, f"{folder}: {len(orphans)} caption file(s) have no picture of the same name, so they "
                            "are not used; rename them to match their picture, or delete them", orphans)


# ---- captions --------------------------------------------------------------------------------------------

def check_caption_files(scan: SubsetScan, report: DatasetFindings) -> None:
    """Every caption file read as training reads it, all problems at once (training stops at the first)."""
    extension = scan.subset.caption_extension
    empty, not_utf8, blank, multiline = [], [], [], []
    for image in scan.images:
        file = next((c for c in caption_candidates(image, extension) if c.is_file()), None)
        if file is None:
            continue
        data = file.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            not_utf8.append(file)
            continue
        lines = [line for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
        if not data:
            empty.append(file)
        elif not lines:
            blank.append(file)
        elif len(lines) > 1 and not scan.subset.enable_wildcard:
            multiline.append(file)
    if empty:
        report.add(PROBLEM, "Caption file(s) are empty, and training stops on them: write a caption in each, or "
                            "delete it (the picture then gets the folder's class tokens)", empty)
    if not_utf8:
        report.add(PROBLEM, "Caption file(s) are not UTF-8 text: open each in an editor and save it as UTF-8 "
                            "(Notepad: Save as, Encoding UTF-8)", not_utf8)
    if blank:
        report.add(WARNING, "Caption file(s) hold only spaces or empty lines: those pictures train with an empty "
                            "caption. Write a caption in each", blank)
    if multiline:
        report.add(NOTE, "Caption file(s) have several lines and only the first is used (enable_wildcard = true "
                         "picks one line at random each time)", multiline)
    if not scan.subset.is_reg and scan.captions and not any(c.strip() for c in scan.captions):
        report.add(WARNING, f"{scan.subset.image_dir}: every caption is empty; the LoRA learns the pictures "
                            "without any word to call them. Add caption files or class tokens")


def check_token_lengths(scans: Sequence[SubsetScan], max_token_length: int | None, tokenizer: Any,
                        report: DatasetFindings) -> None:
    """Captions longer than the text encoder reads are cut: the end of the caption is never learned."""
    if tokenizer is None:
        report.add(NOTE, "Caption lengths were not counted (no CLIP tokenizer here; run setup to install it)")
        return
    limit = max_token_length or 75
    too_long = []
    for scan in scans:
        rules = scan.subset
        for image, caption in zip(scan.images, scan.captions):
            text = f"{rules.caption_prefix or ''}{caption}{rules.caption_suffix or ''}"
            if len(tokenizer(text, add_special_tokens=False).input_ids) > limit:
                too_long.append(image)
    if too_long:
        wider = {75: "max_token_length = 150 (or 225)", 150: "max_token_length = 225"}.get(limit, "shorter captions")
        report.add(WARNING, f"{len(too_long)} caption(s) are longer than {limit} CLIP tokens and are cut there, so "
                            f"their last words are never learned: shorten them, or set {wider}", too_long)


def top_tags(scans: Sequence[SubsetScan], count: int = 15) -> list[tuple[str, int]]:
    frequency: dict[str, dict[str, int]] = {}
    for scan in scans:
        if not scan.subset.is_reg:
            count_tags(frequency, Path(scan.subset.image_dir or "").name, scan.captions)
    total: Counter[str] = Counter()
    for counts in frequency.values():
        total.update(counts)
    return total.most_common(count)


# ---- pictures --------------------------------------------------------------------------------------------

def check_pictures(facts: Sequence[PictureFacts], alpha_masked: set[str], report: DatasetFindings) -> None:
    for level, message, files in picture_findings(facts, alpha_masked):
        report.add(level, message, files)


def check_buckets(scans: Sequence[SubsetScan], facts: dict[Path, PictureFacts], report: DatasetFindings) -> None:
    """The bucket each picture lands in, as `trainer.data.dataset` assigns it, and what that costs it."""
    rows: dict[tuple[int, tuple[int, int]], list[int]] = {}
    cropped, upscaled, too_small = [], [], []
    for scan in scans:
        manager = bucket_manager(scan.dataset)
        for image in scan.images:
            fact = facts.get(image)
            if fact is None or not fact.ok or not fact.width or not fact.height:
                continue
            bucket, resized, _ = manager.select_bucket(fact.width, fact.height)
            if min(bucket) < 8:
                too_small.append(image)
                continue
            row = rows.setdefault((scan.dataset_index, bucket), [0, 0])
            row[0] += 1
            row[1] += scan.subset.num_repeats
            if 1 - (bucket[0] * bucket[1]) / max(1, resized[0] * resized[1]) > MOST_CROPPED:
                cropped.append(image)
            if resized[0] / fact.width > MOST_UPSCALED:
                upscaled.append(image)
    report.buckets = [{"dataset": d, "resolution": f"{w}x{h}", "pictures": n, "with_repeats": r}
                      for (d, (w, h)), (n, r) in sorted(rows.items())]
    if too_small:
        report.add(PROBLEM, "Picture(s) are too small for any bucket with bucket_no_upscale, and training stops on "
                            "them: remove or upscale them", too_small)
    if cropped:
        report.add(WARNING, f"Picture(s) lose more than {MOST_CROPPED:.0%} of their area to the bucket's crop "
                            "(very wide or tall): crop them yourself to keep what matters, or turn on "
                            "enable_bucket / widen min_bucket_reso..max_bucket_reso", cropped)
    if upscaled:
        report.add(WARNING, f"Picture(s) are smaller than their bucket and are blown up more than {MOST_UPSCALED}x, "
                            "which trains blur: use larger pictures, or bucket_no_upscale = true", upscaled)


def bucket_manager(spec: DatasetSpec) -> BucketManager:
    if not spec.enable_bucket:
        return BucketManager.single(spec.resolution)
    return BucketManager(spec.bucket_no_upscale, spec.resolution, spec.min_bucket_reso, spec.max_bucket_reso,
                         spec.bucket_reso_steps)


def check_duplicates(facts: Sequence[PictureFacts], report: DatasetFindings) -> None:
    exact, near = exact_duplicates(facts), near_duplicates(facts)
    for group in exact[:SHOWN_GROUPS]:
        report.add(WARNING, "The same picture is here more than once (identical files), so it counts double: "
                            "keep one", [f.path for f in group])
    for group in near[:SHOWN_GROUPS]:
        report.add(NOTE, "Picture(s) look nearly the same (resized, re-saved or slightly edited copies); more "
                         "varied pictures generalise better", [f.path for f in group])
    hidden = exact[SHOWN_GROUPS:] + near[SHOWN_GROUPS:]
    if hidden:
        report.add(NOTE, f"... and {len(hidden)} more group(s) of identical or similar pictures (all in --json)",
                   [f.path for g in hidden for f in g])


def check_balance(scans: Sequence[SubsetScan], report: DatasetFindings) -> None:
    """Regularisation pictures as sd-scripts uses them: repeated, or cut, to the training pictures' count."""
    for index in sorted({s.dataset_index for s in scans}):
        mine = [s for s in scans if s.dataset_index == index]
        train = sum(len(s.images) * s.subset.num_repeats for s in mine if not s.subset.is_reg)
        reg = sum(len(s.images) * s.subset.num_repeats for s in mine if s.subset.is_reg)
        if not reg or not train:
            continue
        if reg < train:
            report.add(NOTE, f"Regularisation: {reg} reg picture(s) with repeats are repeated to match the {train} "
                             "training pictures with repeats, so each epoch is twice as long")
        elif reg > train:
            report.add(NOTE, f"Regularisation: only {train} of the {reg} reg picture(s) with repeats are used (as "
                             "many as the training pictures with repeats); the rest are never seen")
