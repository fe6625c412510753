"""What each training picture really is, read once: does it decode to its last byte, its stored size and pixel
mode, its EXIF rotation, and two fingerprints (the bytes' digest for exact copies, a difference hash for near
ones).

Reading a header is not enough: a picture cut short by a failed copy has a valid header, passes the size scan,
and stops training only when its batch comes, many steps in. So `train` decodes every picture before any model
loads (`verify_pictures`), and the dataset doctor reports the rest. The facts are cached per user, keyed by
path, byte size and modification time, so the second run on the same folder reads nothing but the cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from trainer.errors import DatasetError
from trainer.files import atomic_write_text
from trainer.paths import user_cache_dir

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # raise it when PictureFacts or the hash change: older caches are then ignored
HASH_SIDE = 16  # a 16x16 difference hash: 256 bits
NEAR_DUPLICATE_BITS = 20  # at most this many of the 256 bits differ: the same picture resized, re-encoded, retouched
NEAR_DUPLICATE_COLOUR = 24  # and no quarter's mean colour differs by more (of 255) in any channel
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
Progress = Callable[[int, int], None]  # (done, total)
PROBLEM, WARNING, NOTE = "problem", "warning", "note"  # stops the run / trains, but not as the user thinks / FYI
Finding = tuple[str, str, list[str]]  # (level, message with its fix, files)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
ROTATIONS = {2: "mirrored", 3: "upside down", 4: "mirrored upside down", 5: "sideways and mirrored",
             6: "sideways", 7: "sideways and mirrored", 8: "sideways"}


@dataclass(frozen=True)
class PictureFacts:
    """One picture as training will read it. `width`/`height` are the stored pixels (what the bucket sees);
    `orientation` is the EXIF tag (1: upright, 6/8: a phone photo stored sideways, shown rotated by viewers);
    `error` says why it cannot be decoded (then the other facts are what could be read)."""

    path: str
    width: int = 0
    height: int = 0
    mode: str = ""
    has_alpha: bool = False
    orientation: int = 1
    error: str | None = None
    digest: str | None = None  # sha1 of the file's bytes
    dhash: int | None = None  # 256-bit difference hash of the decoded pixels (shapes, not colours)
    colours: str | None = None  # the mean colour of each quarter, hex RGB x 4 (the hash is blind to colour)

    @property
    def ok(self) -> bool:
        return self.error is None


def inspect_picture(path: str | Path) -> PictureFacts:
    """Read and fully decode one picture (never raises for a bad file: the reason is in `error`)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        return PictureFacts(str(path), error=f"cannot be read ({error.strerror or error})")
    if not data:
        return PictureFacts(str(path), error="the file is empty (0 bytes)")
    digest = hashlib.sha1(data).hexdigest()
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return PictureFacts(str(path), digest=digest, error="not a picture Pillow can open (a damaged header, or "
                                                            "another kind of file under a picture's name)")
    facts = dict(path=str(path), width=image.width, height=image.height, mode=image.mode, digest=digest,
                 has_alpha=image.mode in ALPHA_MODES or "transparency" in image.info,
                 orientation=_orientation(image))
    try:
        image.load()  # every byte decoded: a truncated file fails here, as it would in its batch
        return PictureFacts(**facts, dhash=_difference_hash(image), colours=_quarter_colours(image))
    except (OSError, ValueError, SyntaxError, MemoryError) as error:
        return PictureFacts(**facts, error=f"cannot be decoded to the end ({error})")


def _orientation(image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1) or 1)  # 0x0112: the EXIF Orientation tag
    except Exception:  # a broken EXIF block: the pixels still decode, and nothing rotates them
        return 1


def _difference_hash(image) -> int:
    """Each bit: is this pixel brighter than its right neighbour, on a 17x16 grey thumbnail. Survives resizing
    and re-encoding (a few bits change); two unrelated photos differ in about half of the 256 bits."""
    from PIL import Image

    grey = image.convert("L").resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.BOX)
    pixels = grey.tobytes()
    bits = 0
    for row in range(HASH_SIDE):
        for col in range(HASH_SIDE):
            left, right = pixels[row * (HASH_SIDE + 1) + col], pixels[row * (HASH_SIDE + 1) + col + 1]
            bits = (bits << 1) | (left > right)
    return bits


def _quarter_colours(image) -> str:
    from PIL import Image

    return image.convert("RGB").resize((2, 2), Image.Resampling.BOX).tobytes().hex()


def _same_colours(a: str | None, b: str | None, tolerance: int = NEAR_DUPLICATE_COLOUR) -> bool:
    if not a or not b:
        return True  # nothing to tell them apart by
    return max(abs(x - y) for x, y in zip(bytes.fromhex(a), bytes.fromhex(b))) <= tolerance


# ---- many pictures, cached ------------------------------------------------------------------------------

class PictureCache:
    """Facts already read, keyed by the resolved path and valid while the file's size and mtime are unchanged.
    A cache that cannot be read or written is ignored: it only saves time."""

    def __init__(self, file: Path | None) -> None:
        self.file = file
        self.entries: dict[str, dict] = self._read() if file else {}
        self.changed = False

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data.get("pictures", {}) if data.get("version") == CACHE_VERSION else {}

    def get(self, path: Path) -> PictureFacts | None:
        entry = self.entries.get(_key(path))
        stamp = _stamp(path)
        if entry is None or stamp is None or entry.get("stamp") != stamp:
            return None
        return PictureFacts(**{**entry["facts"], "path": str(path)})

    def put(self, path: Path, facts: PictureFacts) -> None:
        stamp = _stamp(path)
        if stamp is not None:
            self.entries[_key(path)] = {"stamp": stamp, "facts": asdict(facts)}
            self.changed = True

    def save(self) -> None:
        if not (self.file and self.changed):
            return
        try:
            atomic_write_text(self.file, json.dumps({"version": CACHE_VERSION, "pictures": self.entries}))
        except OSError as error:
            logger.debug("picture check cache not written (%s): %s", self.file, error)


def _key(path: Path) -> str:
    return os.path.normcase(str(Path(path).resolve()))


def _stamp(path: Path) -> list[int] | None:
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def default_cache_file() -> Path:
    return user_cache_dir() / "picture-checks.json"


def inspect_pictures(paths: Iterable[str | Path], *, cache_file: Path | None = None,
                     progress: Progress | None = None, workers: int | None = None) -> list[PictureFacts]:
    """Facts for every picture, in the order given: from the cache where the file is unchanged, else decoded
    on a few threads (Pillow's decoders release the GIL). `progress(done, total)` is called as they finish."""
    paths = [Path(p) for p in paths]
    cache = PictureCache(cache_file)
    found: dict[int, PictureFacts] = {}
    todo = []
    for index, path in enumerate(paths):
        cached = cache.get(path)
        if cached is None:
            todo.append(index)
        else:
            found[index] = cached
    done = len(found)
    if progress and paths:
        progress(done, len(paths))
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for index, facts in zip(todo, pool.map(lambda i: inspect_picture(paths[i]), todo)):
            found[index] = facts
            if facts.ok:  # a bad file is read again next time: the user may have replaced it with the same stamp
                cache.put(paths[index], facts)
            done += 1
            if progress:
                progress(done, len(paths))
    cache.save()
    return [found[i] for i in range(len(paths))]


class LoggedProgress:
    """A line when many pictures must be decoded (the first run on a folder), then one every quarter."""

    def __init__(self, quiet_below: int = 200) -> None:
        self.quiet_below, self.start, self.next_mark = quiet_below, 0, None

    def __call__(self, done: int, total: int) -> None:
        if self.next_mark is None:
            self.start, self.next_mark = done, done + max(1, (total - done) // 4)
            if total - done >= self.quiet_below:
                logger.info("checking %d pictures (decoded once; later runs read a cache)", total - done)
            return
        if total - self.start >= self.quiet_below and done >= self.next_mark:
            logger.info("checked %d of %d pictures", done, total)
            self.next_mark += max(1, (total - self.start) // 4)


def verify_pictures(paths: Iterable[str | Path], *, cache_file: Path | None = None,
                    progress: Progress | None = None) -> list[PictureFacts]:
    """`inspect_pictures`, and a DatasetError naming every picture that cannot be decoded: training would stop
    at the first of them, steps in, so the run stops now instead, before a model loads."""
    facts = inspect_pictures(paths, cache_file=cache_file, progress=progress)
    bad = [f for f in facts if not f.ok]
    if bad:
        raise DatasetError(undecodable_message(bad))
    return facts


def name_files(files: Sequence[str | Path], shown: int = 5) -> str:
    """`10_sks dog/img1.png, 10_sks dog/img2.png and 3 more`: the folder says which subset."""
    paths = [Path(f) for f in files]
    names = ", ".join(f"{p.parent.name}/{p.name}" if p.parent.name else p.name for p in paths[:shown])
    return names + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def undecodable_message(bad: list[PictureFacts]) -> str:
    shown = "\n".join(f"  {f.path}: {f.error}" for f in bad[:20])
    more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
    return (f"{len(bad)} picture(s) cannot be decoded, and training would stop when their batch comes:\n{shown}{more}\n"
            "Delete them, or open each in an image editor and re-save it (PNG or JPEG); a file cut short by a "
            "copy or download must be copied again.")


def picture_findings(facts: Sequence[PictureFacts], alpha_masked: set[str] = frozenset()) -> list[Finding]:
    """What the pictures themselves get wrong, each with its fix: the dataset doctor reports them all, `train`
    logs the warnings. `alpha_masked`: the pictures of alpha_mask subsets, whose transparency is used."""
    good = [f for f in facts if f.ok]
    found: list[Finding] = []
    bad = [f for f in facts if not f.ok]
    if bad:
        found.append((PROBLEM, undecodable_message(bad), [f.path for f in bad]))
    by_rotation: dict[str, list[str]] = {}
    for f in good:
        if f.orientation in ROTATIONS:
            by_rotation.setdefault(ROTATIONS[f.orientation], []).append(f.path)
    for how, files in by_rotation.items():
        found.append((WARNING, f"Picture(s) are stored {how}: viewers turn them by their EXIF tag, training (like "
                               "sd-scripts) does not, so it learns them that way. Rotate the pixels and save (most "
                               "editors do this on 'rotate' + save), or delete them", files))
    checks = [
        (WARNING, lambda f: f.mode in SIXTEEN_BIT_MODES,
         "16-bit or float greyscale picture(s): converting them to RGB clips every value above 255, so they train "
         "as nearly white pictures. Save them as 8-bit PNG or JPEG"),
        (WARNING, lambda f: f.mode == "CMYK",
         "CMYK picture(s) (print colours) are converted to RGB without a colour profile, so their colours can "
         "shift. Save them as RGB"),
        (WARNING, lambda f: f.has_alpha and f.path not in alpha_masked,
         "Picture(s) with transparency: training drops the alpha channel, so transparent parts become whatever "
         "colour is stored under them (often black). Put them on a background, or set alpha_mask = true to train "
         "on the opaque part only"),
        (NOTE, lambda f: f.mode in ("P", "1") and not f.has_alpha,
         "Palette or 1-bit picture(s) are converted to RGB (fine, if they look right)"),
    ]
    for level, applies, message in checks:
        files = [f.path for f in good if applies(f)]
        if files:
            found.append((level, message, files))
    return found


def exact_duplicates(facts: Iterable[PictureFacts]) -> list[list[PictureFacts]]:
    """Groups of two or more files with identical bytes."""
    groups: dict[str, list[PictureFacts]] = {}
    for f in facts:
        if f.digest:
            groups.setdefault(f.digest, []).append(f)
    return [g for g in groups.values() if len(g) > 1]


def near_duplicates(facts: Iterable[PictureFacts], max_bits: int = NEAR_DUPLICATE_BITS) -> list[list[PictureFacts]]:
    """Groups of different files whose difference hashes are within `max_bits` (exact copies excluded: they
    are their own finding). Pairwise, which is fine for the few thousand pictures of a LoRA dataset."""
    unique: dict[str, PictureFacts] = {}
    for f in facts:
        if f.dhash is not None and f.digest not in unique:
            unique[f.digest] = f
    items = list(unique.values())
    parent = list(range(len(items)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, a in enumerate(items):
        for j in range(i + 1, len(items)):
            b = items[j]
            if (a.dhash ^ b.dhash).bit_count() <= max_bits and _same_colours(a.colours, b.colours):
                parent[root(j)] = root(i)
    groups: dict[int, list[PictureFacts]] = {}
    for i, f in enumerate(items):
        groups.setdefault(root(i), []).append(f)
    return [g for g in groups.values() if len(g) > 1]
