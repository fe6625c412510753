"""Where the captioning models come from, and the picture as they see it.

A model is downloaded once from the Hugging Face hub into its standard cache (with the hub's progress bar)
and read from there afterwards without asking the network; `--model_dir` names a folder instead (as in
sd-scripts, the files may sit in it or in its `<owner>_<name>` subfolder; missing ones are downloaded there).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from PIL import Image

from trainer.errors import ConfigError

log = logging.getLogger(__name__)


def model_folder(repo_id: str, files: Sequence[str], model_dir: str | None = None, force_download: bool = False,
                 patterns: Sequence[str] = ()) -> Path:
    """The folder holding `files` of `repo_id`: the given `model_dir`, else the hub cache (downloading only
    when they are not there yet, or again with `force_download`). `patterns` (e.g. "*.json") names the other
    files to fetch with them: the small ones whose names differ from model to model."""
    wanted = [*files, *patterns]
    if model_dir:
        given = Path(model_dir).expanduser()
        for folder in (given, given / repo_id.replace("/", "_")):
            if not force_download and _holds(folder, files):
                return folder
        target = given / repo_id.replace("/", "_")
        log.info("downloading %s from the Hugging Face hub into %s", repo_id, target)
        return _checked(_download(repo_id, wanted, force_download, local_dir=target), repo_id, files)
    if not force_download:
        cached = _cached(repo_id, wanted)
        if cached is not None and _holds(cached, files):
            return cached
    log.info("downloading %s from the Hugging Face hub (once: later runs use the copy in its cache)", repo_id)
    return _checked(_download(repo_id, wanted, force_download), repo_id, files)


def _holds(folder: Path, files: Sequence[str]) -> bool:
    return all((folder / name).is_file() for name in files)


def _checked(folder: Path, repo_id: str, files: Sequence[str]) -> Path:
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"{repo_id} on the Hugging Face hub has no {', '.join(missing)}: is --repo_id a model "
                          "of the kind --model names?")
    return folder


def _cached(repo_id: str, patterns: Sequence[str]) -> Path | None:
    """The cache's copy when there is one; no network."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=list(patterns), local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def _download(repo_id: str, patterns: Sequence[str], force: bool, local_dir: Path | None = None) -> Path:
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=list(patterns), force_download=force,
                                                      local_dir=local_dir))
    except Exception as e:  # offline, a wrong repo id, no access: one message with the way out
        detail = str(e).splitlines()[0] if str(e) else "no detail"
        raise ConfigError(
            f"could not download {repo_id} from the Hugging Face hub ({type(e).__name__}: {detail}). Check the "
            f"connection and --repo_id, or download {', '.join(patterns)} from https://huggingface.co/{repo_id} "
            "into a folder and pass --model_dir FOLDER.") from None


def open_rgb(path: Path) -> Image.Image:
    """The picture in RGB; a transparent one on white (as sd-scripts' WD14 tagger does), so a cut-out
    subject is not seen against black."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("RGBA", "LA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return image.convert("RGB")
