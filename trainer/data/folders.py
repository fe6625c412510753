"""DreamBooth-style folders (`<repeats>_<class tokens>`), image listing and caption files, as sd-scripts reads them.

Every mistake users commonly make with folders (issues #1294, #2076: pointing at `10_name` instead of its
parent, forgetting the `N_` prefix) ends in a DatasetError that names the paths and shows the layout.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from trainer.errors import DatasetError

logger = logging.getLogger(__name__)


def _image_extensions() -> tuple[str, ...]:
    extensions = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
    try:  # sd-scripts adds .avif when the installed Pillow can read it
        from PIL import features

        if features.check("avif"):
            extensions += (".avif",)
    except Exception:  # no usable Pillow: the image readers will report it
        pass
    return extensions


IMAGE_EXTENSIONS: tuple[str, ...] = _image_extensions()

LAYOUT_EXAMPLE = (
    "Expected layout:\n"
    "  train_data_dir/            <- pass this folder as --train_data_dir\n"
    "    10_sks dog/              <- '<repeats>_<class tokens>': each image is used 10 times per epoch\n"
    "      img1.png  img1.txt\n"
    "    5_my_char/\n"
    "      ...")


def list_images(directory: str | Path) -> list[Path]:
    """Image files directly inside `directory` (no recursion), any letter case, sorted by name. Hidden files
    are left out, as sd-scripts' glob leaves them: macOS writes `._name.png` metadata beside every copied picture."""
    directory = Path(directory)
    files = [p for p in directory.iterdir()
             if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()]
    return sorted(files, key=lambda p: p.name)


def parse_repeats_folder(name: str) -> tuple[int, str] | None:
    """`10_sks dog` -> (10, "sks dog"); `5_my_char` -> (5, "my_char"); None without a leading number.

    As in sd-scripts: split on `_`, the first part is the repeat count, the rest joined back with `_`.
    """
    first, _, rest = name.partition("_")
    try:
        repeats = int(first)
    except ValueError:
        return None
    return repeats, rest


def find_dreambooth_subsets(parent: Path, is_reg: bool) -> list[dict]:
    """Subset tables for the `N_tokens` folders directly inside `parent` (no recursion, as in sd-scripts).

    Each is {"image_dir", "num_repeats", "is_reg", "class_tokens"}. Raises DatasetError when the folder
    is missing, empty, is itself a folder of images, or has no usable `N_tokens` subfolder.
    """
    parent = Path(parent)
    option = "--reg_data_dir" if is_reg else "--train_data_dir"
    if not parent.exists():
        raise DatasetError(f"{option}: folder not found: {parent}. Check the path (quote it if it has spaces).")
    if not parent.is_dir():
        raise DatasetError(f"{option}: {parent} is a file; pass the folder that contains the '10_name' folders.")
    loose_images = list_images(parent)
    subfolders = sorted((p for p in parent.iterdir() if p.is_dir()), key=lambda p: p.name)
    subsets, unnumbered = [], []
    for folder in subfolders:
        parsed = parse_repeats_folder(folder.name)
        if parsed is None:
            unnumbered.append(folder.name)
        elif parsed[0] < 1:
            logger.warning("%s: skipping folder '%s': its repeat count %d is less than 1", option, folder, parsed[0])
        else:
            subsets.append({"image_dir": str(folder), "num_repeats": parsed[0], "is_reg": is_reg,
                            "class_tokens": parsed[1]})
    if loose_images and not subsets:
        raise DatasetError(_pointed_at_images_message(option, parent, len(loose_images)))
    if not subsets:
        found = f"Its subfolders ({', '.join(unnumbered)}) have no repeat count." if unnumbered else \
            "It has no subfolders."
        raise DatasetError(f"{option}: no usable image folder in {parent}. {found} Folder names must start "
                           f"with the number of repeats and '_', such as '10_sks dog'.\n{LAYOUT_EXAMPLE}")
    if unnumbered:
        logger.warning("%s: ignoring %d folder(s) without a '<repeats>_' prefix in %s: %s (rename e.g. "
                       "'%s' to '10_%s')", option, len(unnumbered), parent, ", ".join(unnumbered),
                       unnumbered[0], unnumbered[0])
    if loose_images:
        logger.warning("%s: %d image(s) directly in %s are ignored; only images inside the '<repeats>_<tokens>' "
                       "folders are used", option, len(loose_images), parent)
    return subsets


def _pointed_at_images_message(option: str, folder: Path, count: int) -> str:
    if parse_repeats_folder(folder.name) is not None:
        return (f"{option} points at a folder of images: {folder} ({count} image(s)). It must be the PARENT of "
                f"folders such as '{folder.name}'. Use {option} \"{folder.parent}\" instead.\n{LAYOUT_EXAMPLE}")
    return (f"{option} points at a folder of images: {folder} ({count} image(s)), but images must sit in "
            f"subfolders named '<repeats>_<class tokens>'. Move them into e.g. \"{folder / ('10_' + folder.name)}\" "
            f"and keep {option} \"{folder}\".\n{LAYOUT_EXAMPLE}")


def caption_candidates(image_path: Path, caption_extension: str) -> list[Path]:
    """`<stem><ext>`, then for face-crop names `name_cx_cy_w_h` also `name<ext>` (sd-scripts' order)."""
    image_path = Path(image_path)
    candidates = [image_path.with_name(image_path.stem + caption_extension)]
    tokens = image_path.stem.split("_")
    if len(tokens) >= 5:
        candidates.append(image_path.with_name("_".join(tokens[:-4]) + caption_extension))
    return candidates


def read_caption(image_path: str | Path, caption_extension: str, *, enable_wildcard: bool = False) -> str | None:
    """The caption for an image from its caption file, or None when there is none.

    UTF-8 (a BOM is fine). Without wildcards only the first line is used; with them, all non-empty lines
    joined by newlines. An empty file is a DatasetError, as sd-scripts asserts.
    """
    for candidate in caption_candidates(Path(image_path), caption_extension):
        if not candidate.is_file():
            continue
        try:
            text = candidate.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise DatasetError(f"Caption file is not UTF-8 (byte {error.start}): {candidate}. "
                               "Open it in an editor and save it as UTF-8.") from None
        if text == "":
            raise DatasetError(f"Caption file is empty: {candidate}. Write a caption in it or delete it.")
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if enable_wildcard:
            return "\n".join(line.strip() for line in lines if line.strip())
        return lines[0].strip()
    return None


def read_folder_captions(images: list[Path], caption_extension: str, class_tokens: str | None,
                         enable_wildcard: bool, folder: str | Path) -> list[str]:
    """Captions for `images`: the caption file, else `class_tokens`, else "" (with one warning per folder)."""
    captions, missing = [], []
    for image in images:
        caption = read_caption(image, caption_extension, enable_wildcard=enable_wildcard)
        if caption is None:
            missing.append(image.name)
            caption = class_tokens if class_tokens is not None else ""
        captions.append(caption)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        fallback = f'the class tokens "{class_tokens}"' if class_tokens else "an empty caption"
        logger.warning("%d of %d images in %s have no '%s' caption file; using %s for them: %s%s",
                       len(missing), len(images), folder, caption_extension, fallback, shown,
                       _other_extension_hint(images, caption_extension))
    return captions


def _other_extension_hint(images: list[Path], caption_extension: str) -> str:
    """The default extension is `.caption` while GUIs write `.txt`: point at the files that are there."""
    for other in (".txt", ".caption"):
        if other != caption_extension and any(image.with_suffix(other).is_file() for image in images):
            return f" (there are '{other}' files: pass --caption_extension {other})"
    return ""


def balance_reg_images(reg: list, num_train_images: int) -> list:
    """sd-scripts' balancing: register reg images (cycling, +1 repeat per later pass) until they match the train count.

    `reg` holds objects with a `num_repeats` attribute (the folder's repeats); the registered ones are
    returned and their num_repeats updated in place. Reg images beyond that count are left out (with a
    warning), as in sd-scripts.
    """
    if not reg:
        logger.info("no regularization images")
        return []
    registered: list = []
    total, first_pass = 0, True
    while total < num_train_images:
        for record in reg:
            if first_pass:
                registered.append(record)
                total += record.num_repeats
            else:
                record.num_repeats += 1
                total += 1
            if total >= num_train_images:
                break
        first_pass = False
    if len(registered) < len(reg):
        logger.warning("%d of %d regularization images are not used: there are more reg images than training "
                       "images with repeats (%d)", len(reg) - len(registered), len(reg), num_train_images)
    return registered


def read_image_size(path: Path) -> tuple[int, int]:
    """(W, H) from the image header only; a damaged file is a DatasetError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise DatasetError(f"Cannot read image {path} ({error}). The file is damaged or not an image: delete it "
                           "or open and re-save it (PNG or JPEG).") from None


# --- fine-tuning metadata (--in_json / metadata_file) ----------------------------------------------------

def read_finetune_metadata(metadata_file: str, image_dir: str | None, caption_separator: str,
                           enable_wildcard: bool) -> tuple[list[tuple[Path, str, tuple | None]], list[str]]:
    """([(image path, caption, (W,H) or None)], tags) from {key: {caption, tags, image_size}} JSON or JSON lines.

    Caption = caption + caption_separator + tags (with wildcards, tags go onto every caption line).
    """
    metadata = _load_metadata_file(Path(metadata_file))
    entries, tags_list, missing = [], [], []
    for key in sorted(metadata, key=len, reverse=True):  # sd-scripts' order (longest key first)
        meta = metadata[key]
        path = _finetune_image_path(key, metadata_file, image_dir)
        if path is None:
            missing.append(key)
            continue
        caption, tags = meta.get("caption") or "", meta.get("tags")
        if tags:
            if enable_wildcard:
                tags = tags.replace("\n", caption_separator)
                caption = "\n".join(f"{line}{caption_separator}{tags}" for line in caption.split("\n") if line.strip())
            else:
                caption = caption + caption_separator + tags if caption else tags
            tags_list.append(tags)
        size = tuple(meta["image_size"]) if meta.get("image_size") else None
        entries.append((path, caption, size))
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DatasetError(f"{metadata_file}: {len(missing)} image(s) listed there were not found "
                           f"(relative names are looked up in image_dir {image_dir}): {shown}")
    return entries, tags_list


def _load_metadata_file(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"metadata_file not found: {path}. Check metadata_file / --in_json.")
    try:
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix.lower() == ".jsonl":
            metadata = {}
            for line in filter(str.strip, text.splitlines()):
                item = json.loads(line)
                metadata[item["image_path"]] = item
            return metadata
        return json.loads(text)
    except (ValueError, KeyError, TypeError) as error:
        raise DatasetError(f"{path}: cannot read the metadata ({error}). It must be JSON "
                           "{\"image\": {\"caption\": ...}} or JSON lines with image_path.") from None


def _finetune_image_path(key: str, metadata_file: str, image_dir: str | None) -> Path | None:
    path = Path(key)
    if not path.is_absolute():
        if image_dir is None:
            raise DatasetError(f"{metadata_file}: image '{key}' is a relative path, so image_dir (or "
                               "--train_data_dir) must be given.")
        path = Path(image_dir) / key
    if path.is_file():
        return path
    for extension in IMAGE_EXTENSIONS:  # old metadata files list names without extension
        candidate = path.with_name(path.name + extension)
        if candidate.is_file():
            return candidate
    return None
