"""Where the trainer folder's own files are: the one place that knows the repository layout."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]  # the folder holding trainer/, presets/, docs/, setup.ps1
PRESETS_DIR = REPO_ROOT / "presets"
DOCS_DIR = REPO_ROOT / "docs"
MODEL_CONFIGS_DIR = REPO_ROOT / "trainer" / "models" / "configs"  # shipped configs: no download to build a model


def short_path(path: Path) -> Path:
    """A path inside the trainer folder relative to it (presets/sd15-6gb.toml), any other as it is."""
    try:
        return Path(path).resolve().relative_to(REPO_ROOT)
    except ValueError:
        return Path(path)


def user_cache_dir() -> Path:
    """Where the trainer keeps what it can always rebuild (the picture checks): TRAINER_CACHE_DIR when set,
    else %LOCALAPPDATA%\\trainer on Windows and $XDG_CACHE_HOME/trainer (~/.cache/trainer) elsewhere."""
    if os.environ.get("TRAINER_CACHE_DIR"):
        return Path(os.environ["TRAINER_CACHE_DIR"])
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "trainer"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainer"
