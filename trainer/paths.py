"""Where the trainer folder's own files are: the one place that knows the repository layout."""

from __future__ import annotations

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
