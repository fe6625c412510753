"""Writing files so that no crash or Ctrl-C ever leaves a half-written file under its final name."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on failure removed.

    The temporary name keeps the real extension last-but-one (`name.safetensors.tmp-XXXX`) so that
    nothing that globs for `*.safetensors` picks it up.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield temp
        _use_default_permissions(temp)
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text to `path` through a temporary file and a rename."""
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")


def _use_default_permissions(path: Path) -> None:
    """Some writers (safetensors) create files readable by their owner only; give them the usual mode."""
    mask = os.umask(0)
    os.umask(mask)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~mask)


def strip_path(text: str) -> str:
    """Windows "Copy as path" puts quotes around a path; a pasted path often ends in a space."""
    text = text.strip()
    return text[1:-1].strip() if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'" else text
