"""`python -m trainer caption DIR`: a caption file beside each picture, made by a model.

    python -m trainer caption "D:\\lora\\img\\10_mychar woman" --trigger mychar
    python -m trainer caption D:\\lora\\photos --model blip --beam_search --num_beams 3

`--model wd14` (default) writes Danbooru tags for anime and illustrations (SmilingWolf's WD14 taggers, with
the options of sd-scripts' tag_images_by_wd14_tagger.py); `--model blip` writes a sentence for photos (BLIP,
with the options of sd-scripts' make_captions.py), `--model florence2` a longer one (Florence-2, `--task`).
The model is downloaded once from the Hugging Face hub and used offline afterwards; `--model_dir` names a
folder holding it instead.

A picture that has a caption already keeps it: `--overwrite` replaces it, `--append_tags` adds the new tags
that it lacks. Files are written atomically; at the end the command says how many were written, skipped
and failed (by name)."""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

from trainer.data.folders import IMAGE_EXTENSIONS, list_images, parse_repeats_folder
from trainer.errors import ConfigError
from trainer.files import atomic_write_text
from trainer.tools import caption_sentences, caption_wd14
from trainer.tools.caption_models import model_folder, open_rgb

log = logging.getLogger(__name__)

MODELS = {"wd14": caption_wd14.DEFAULT_REPO,
          **{name: model.default_repo for name, model in caption_sentences.MODELS.items()}}


@dataclass(frozen=True)
class Captioner:
    run: Callable[[Sequence], list[list[str]]]  # pictures -> each one's caption parts (tags, or one sentence)
    batch_size: int                             # a tagger with a fixed batch size has its own


@dataclass(frozen=True)
class CaptionJob:
    folder: Path
    model: str                 # a key of MODELS
    repo_id: str
    model_dir: str | None
    force_download: bool
    extension: str             # --caption_extension, with its dot
    separator: str             # --caption_separator
    recursive: bool
    batch_size: int
    trigger: str
    overwrite: bool
    append: bool               # --append_tags
    show_frequency: bool       # --frequency_tags
    remove_underscore: bool
    tag_rules: caption_wd14.TagRules
    sentence_rules: caption_sentences.SentenceRules


@dataclass
class Outcome:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)   # a caption was there and is kept
    failed: list[tuple[Path, str]] = field(default_factory=list)
    tags: Counter = field(default_factory=Counter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer caption", description=__doc__.split("\n")[0])
    parser.add_argument("train_data_dir", metavar="DIR", help="the folder of pictures (an N_name folder, or its "
                        "parent with --recursive)")
    parser.add_argument("--model", choices=list(MODELS), default="wd14",
                        help="wd14: Danbooru tags (anime, illustration; default); blip: a sentence (photos); "
                        "florence2: a longer sentence (photos)")
    parser.add_argument("--repo_id", help="the model on the Hugging Face hub (default: "
                        + ", ".join(f"{repo} for {name}" for name, repo in MODELS.items())
                        + "; any SmilingWolf wd-*-tagger v2/v3 repo works for wd14)")
    parser.add_argument("--model_dir", help="a folder holding the model instead of the hub's cache (sd-scripts' "
                        "layout <model_dir>/<owner>_<name> is found too); missing files are downloaded into it")
    parser.add_argument("--force_download", action="store_true", help="download the model again")
    parser.add_argument("--caption_extension", "--caption_extention", dest="caption_extension", default=".txt",
                        help="extension of the caption files (default .txt; train with the same "
                        "--caption_extension)")
    parser.add_argument("--caption_separator", default=", ", help='between tags (default ", ")')
    parser.add_argument("--recursive", action="store_true", help="also caption the pictures in subfolders")
    parser.add_argument("--batch_size", type=int, default=1, help="pictures per model call (default 1)")
    parser.add_argument("--trigger", default="", help="a word put first in every caption (your trigger word)")
    parser.add_argument("--overwrite", action="store_true", help="replace captions that are there already "
                        "(default: keep them and say so)")
    parser.add_argument("--append_tags", action="store_true", help="add the new tags to captions that are there "
                        "already, after their own")
    _add_tagger_options(parser.add_argument_group("wd14 (sd-scripts' tag_images_by_wd14_tagger.py options)"))
    _add_sentence_options(parser.add_argument_group("blip and florence2 (sd-scripts' make_captions.py options)"))
    return parser


def _add_tagger_options(group) -> None:
    group.add_argument("--thresh", type=float, default=0.35, help="score a tag needs (default 0.35)")
    group.add_argument("--general_threshold", type=float, help="for general tags (default --thresh)")
    group.add_argument("--character_threshold", type=float, help="for character tags (default --thresh; above 1: "
                       "none)")
    group.add_argument("--remove_underscore", action="store_true", help="long_hair -> long hair")
    group.add_argument("--undesired_tags", default="", help='tags never written, e.g. "solo,simple background"')
    group.add_argument("--always_first_tags", help='tags put first when found, in this order, e.g. "1girl,1boy"')
    group.add_argument("--character_tags_first", action="store_true", help="character tags before general tags")
    group.add_argument("--use_rating_tags", action="store_true", help="the likeliest rating tag first")
    group.add_argument("--use_rating_tags_as_last_tag", action="store_true", help="the likeliest rating tag last")
    group.add_argument("--frequency_tags", action="store_true", help="print how often each tag was written")
    group.add_argument("--onnx", action="store_true", help="accepted for sd-scripts commands: always ONNX here")


def _add_sentence_options(group) -> None:
    group.add_argument("--beam_search", action="store_true", help="beam search (default: nucleus sampling)")
    group.add_argument("--num_beams", type=int, default=1, help="beams of --beam_search (default 1)")
    group.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling's top_p (default 0.9)")
    group.add_argument("--max_length", type=int, default=75, help="most tokens in a caption (default 75)")
    group.add_argument("--min_length", type=int, default=5, help="fewest tokens in a caption (default 5)")
    group.add_argument("--seed", type=int, default=42, help="seed of the sampling (default 42)")
    group.add_argument("--task", default="DETAILED_CAPTION", type=lambda t: f"<{t.strip('<> ').upper()}>",
                       choices=caption_sentences.FLORENCE_TASKS, help="florence2's prompt: CAPTION (short), "
                       "DETAILED_CAPTION (default) or MORE_DETAILED_CAPTION (a paragraph)")


def job_from_args(argv: Sequence[str]) -> CaptionJob:
    values = vars(build_parser().parse_args(list(argv)))
    _check_values(values)
    separator = values["caption_separator"]
    extension = values["caption_extension"].strip()
    rating = "first" if values["use_rating_tags"] else "last" if values["use_rating_tags_as_last_tag"] else ""
    tag_rules = caption_wd14.TagRules(
        general_threshold=_or(values["general_threshold"], values["thresh"]),
        character_threshold=_or(values["character_threshold"], values["thresh"]),
        undesired=frozenset(_split(values["undesired_tags"], separator)),
        first=tuple(_split(values["always_first_tags"] or "", separator)),
        character_first=values["character_tags_first"], rating=rating)
    sentence_rules = caption_sentences.SentenceRules(
        beam_search=values["beam_search"], num_beams=values["num_beams"], top_p=values["top_p"],
        max_length=values["max_length"], min_length=values["min_length"], sampling_seed=values["seed"],
        task=values["task"])
    return CaptionJob(
        folder=Path(values["train_data_dir"]).expanduser(), model=values["model"],
        repo_id=values["repo_id"] or MODELS[values["model"]], model_dir=values["model_dir"],
        force_download=values["force_download"], extension=extension if extension.startswith(".") else f".{extension}",
        separator=separator, recursive=values["recursive"], batch_size=values["batch_size"],
        trigger=values["trigger"].strip(), overwrite=values["overwrite"], append=values["append_tags"],
        show_frequency=values["frequency_tags"], remove_underscore=values["remove_underscore"],
        tag_rules=tag_rules, sentence_rules=sentence_rules)


def _check_values(values: dict) -> None:
    problems = []
    folder = Path(values["train_data_dir"]).expanduser()
    if not folder.is_dir():
        problems.append(f"caption {folder}: no such folder (quote a path with spaces in it).")
    if values["overwrite"] and values["append_tags"]:
        problems.append("caption: --overwrite replaces captions, --append_tags adds to them: give one of the two.")
    if values["batch_size"] < 1 or values["num_beams"] < 1:
        problems.append("caption: --batch_size and --num_beams must be 1 or more.")
    if values["min_length"] > values["max_length"]:
        problems.append(f"caption: --min_length {values['min_length']} is above --max_length {values['max_length']}.")
    if not values["caption_extension"].strip(". "):
        problems.append("caption --caption_extension: give an extension such as .txt.")
    if values["repo_id"] and values["repo_id"].count("/") != 1:
        problems.append(f"caption --repo_id {values['repo_id']}: give owner/name of a Hugging Face model, e.g. "
                        f"{MODELS['wd14']} (models in a subfolder of a repo are not supported).")
    if problems:
        raise ConfigError(problems)


def _or(value, default):
    return default if value is None else value


def _split(text: str, separator: str) -> list[str]:
    """sd-scripts splits tag lists on the separator without its spaces (", " -> ",") and strips each tag."""
    return [tag.strip() for tag in text.split(separator.strip() or separator) if tag.strip()]


def find_pictures(folder: Path, recursive: bool) -> list[Path]:
    """The pictures to caption, sorted; hidden files and folders are left out."""
    if not recursive:
        pictures = [p for p in list_images(folder) if not p.name.startswith(".")]
    else:
        pictures = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                          and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not pictures:
        raise ConfigError(_no_pictures(folder, recursive))
    return pictures


def _no_pictures(folder: Path, recursive: bool) -> str:
    message = f"caption {folder}: no pictures ({', '.join(IMAGE_EXTENSIONS)}) in it"
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if recursive or not subfolders:
        return message + "."
    named = [name for name in subfolders if parse_repeats_folder(name)]
    example = (named or subfolders)[0]
    return (f"{message}, only in its folders ({', '.join(subfolders[:5])}{', ...' if len(subfolders) > 5 else ''}). "
            f"Add --recursive to caption them all, or name one: \"{folder / example}\".")


def main(argv: Sequence[str]) -> int:
    job = job_from_args(argv)
    pictures = find_pictures(job.folder, job.recursive)
    outcome = Outcome()
    todo = plan(job, pictures, outcome)
    if todo:
        caption_all(job, todo, load_captioner(job), outcome)
    report(job, len(pictures), outcome)
    return 1 if outcome.failed else 0


def caption_path(picture: Path, job: CaptionJob) -> Path:
    return picture.with_suffix(job.extension)


def existing_caption(path: Path) -> str:
    """The caption in the file, "" when there is none or it holds only blanks (nothing a user wrote is lost
    by filling it)."""
    if not path.is_file():
        return ""
    return path.read_text(encoding="utf-8-sig").strip()


def plan(job: CaptionJob, pictures: Sequence[Path], outcome: Outcome) -> list[Path]:
    """The pictures to caption now; those whose caption stays are counted as skipped (no model is loaded when
    nothing is left to do)."""
    todo = []
    for picture in pictures:
        try:
            has_caption = bool(existing_caption(caption_path(picture, job)))
        except (OSError, UnicodeDecodeError) as e:
            outcome.failed.append((picture, f"its caption file cannot be read as UTF-8 text ({e})"))
            continue
        if has_caption and not (job.overwrite or job.append):
            outcome.skipped.append(picture)
        else:
            todo.append(picture)
    return todo


def load_captioner(job: CaptionJob) -> Captioner:
    """The model --model names, from --model_dir or the hub's cache (downloaded there the first time)."""
    if job.model == "wd14":
        caption_wd14.require_onnxruntime()  # before a download of hundreds of MB it could not use
        folder = model_folder(job.repo_id, caption_wd14.FILES, job.model_dir, job.force_download)
        tagger = caption_wd14.Tagger(folder, job.tag_rules, job.remove_underscore, job.batch_size)
        return Captioner(tagger.tags, tagger.batch_size)
    model = caption_sentences.MODELS[job.model]
    folder = model_folder(job.repo_id, model.files, job.model_dir, job.force_download, model.patterns)
    captioner = caption_sentences.SentenceCaptioner(model, folder, job.sentence_rules)
    return Captioner(lambda images: [[sentence] for sentence in captioner.sentences(images)], job.batch_size)


def compose(parts: Sequence[str], job: CaptionJob, existing: str = "") -> str:
    """The caption text: with --append_tags the existing tags first, then the new ones they lack; the
    trigger word first of all."""
    parts = [p for p in parts if p]
    if job.append and existing:
        old = _split(existing, job.separator)
        parts = old + [p for p in parts if p not in old]
    if job.trigger:
        parts = [job.trigger] + [p for p in parts if p != job.trigger]
    return job.separator.join(parts)


def caption_all(job: CaptionJob, todo: Sequence[Path], captioner: Captioner, outcome: Outcome) -> None:
    """Batch by batch with a progress bar; a picture that cannot be read is named in the report and the
    others go on."""
    batch_size = captioner.batch_size
    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               "ETA", TimeRemainingColumn())
    with Progress(*columns) as progress:
        task = progress.add_task(f"caption ({job.model})", total=len(todo))
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            images, readable = [], []
            for picture in batch:
                try:
                    images.append(open_rgb(picture))
                    readable.append(picture)
                except Exception as e:  # Pillow raises many kinds for truncated / unknown files
                    outcome.failed.append((picture, f"cannot be read as a picture ({type(e).__name__}: {e})"))
            for picture, parts in zip(readable, captioner.run(images) if images else []):
                _write(job, picture, parts, outcome)
            progress.advance(task, len(batch))


def _write(job: CaptionJob, picture: Path, parts: Sequence[str], outcome: Outcome) -> None:
    path = caption_path(picture, job)
    text = compose(parts, job, existing_caption(path) if job.append else "")
    atomic_write_text(path, text + "\n")
    outcome.written.append(picture)
    outcome.tags.update(p for p in parts if p)


def report(job: CaptionJob, total: int, outcome: Outcome) -> None:
    def name(picture: Path) -> str:
        return picture.relative_to(job.folder).as_posix()

    print(f"caption {job.folder}: {total} pictures; {len(outcome.written)} captions written "
          f"({job.extension}), {len(outcome.skipped)} skipped, {len(outcome.failed)} failed")
    if outcome.skipped:
        shown = ", ".join(name(p) for p in outcome.skipped[:10]) + (", ..." if len(outcome.skipped) > 10 else "")
        print(f"  skipped (they have a caption, kept as it is; --overwrite replaces, --append_tags adds): {shown}")
    for picture, why in outcome.failed:
        print(f"  failed: {name(picture)}: {why}")
    if job.show_frequency and outcome.tags:
        print("tag frequency: " + ", ".join(f"{tag}: {n}" for tag, n in outcome.tags.most_common()))
    if outcome.written and job.extension != ".caption":
        print(f"train with --caption_extension {job.extension} (sd-scripts' default is .caption)")
