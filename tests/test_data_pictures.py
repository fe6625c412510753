"""trainer.data.pictures: every picture decoded once and described (size, mode, EXIF rotation, fingerprints),
cached by path, size and mtime; the check `train` runs before any model loads."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from trainer.data import pictures as P
from trainer.errors import DatasetError


def distinct_picture(path, seed: int, size=(96, 64), mode: str = "RGB"):
    """Random blocks: unrelated pictures, as far from each other as two photos."""
    blocks = np.random.default_rng(seed).integers(0, 255, (8, 12, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST).convert(mode).save(path)
    return path


def cut_short(path, keep: float = 0.6):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_a_picture_cut_short_has_a_valid_header_but_does_not_decode(tmp_path, suffix):
    path = cut_short(distinct_picture(tmp_path / f"a{suffix}", 0, size=(256, 256)))
    with Image.open(path) as image:
        assert image.size == (256, 256)  # what the header-only size scan sees: it passes
    facts = P.inspect_picture(path)
    assert not facts.ok and "decoded to the end" in facts.error and (facts.width, facts.height) == (256, 256)


def test_good_empty_and_foreign_files(tmp_path):
    good = P.inspect_picture(distinct_picture(tmp_path / "good.png", 1))
    assert good.ok and (good.width, good.height, good.mode) == (96, 64, "RGB") and good.dhash is not None
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty (0 bytes)" in P.inspect_picture(tmp_path / "empty.png").error
    (tmp_path / "text.jpg").write_text("not a picture", encoding="utf-8")
    assert "not a picture" in P.inspect_picture(tmp_path / "text.jpg").error


def test_modes_alpha_and_exif_orientation(tmp_path):
    assert P.inspect_picture(make_image(tmp_path / "a.png", mode="RGBA")).has_alpha
    palette = Image.new("P", (8, 8))
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png")
    assert P.inspect_picture(tmp_path / "p.png").has_alpha
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "16.png")
    assert P.inspect_picture(tmp_path / "16.png").mode.startswith("I")
    Image.new("CMYK", (8, 8)).save(tmp_path / "c.jpg")
    assert P.inspect_picture(tmp_path / "c.jpg").mode == "CMYK"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown upright by viewers
    Image.new("RGB", (16, 8)).save(tmp_path / "phone.jpg", exif=exif)
    facts = P.inspect_picture(tmp_path / "phone.jpg")
    assert facts.orientation == 6 and (facts.width, facts.height) == (16, 8)


def test_duplicates_exact_and_near_but_not_unrelated(tmp_path):
    originals = [distinct_picture(tmp_path / f"{i}.png", i) for i in range(6)]
    (tmp_path / "copy.png").write_bytes(originals[0].read_bytes())
    Image.open(originals[1]).resize((300, 200)).save(tmp_path / "bigger.jpg", quality=80)
    facts = P.inspect_pictures(sorted(tmp_path.iterdir()))
    exact = [{os.path.basename(f.path) for f in g} for g in P.exact_duplicates(facts)]
    near = [{os.path.basename(f.path) for f in g} for g in P.near_duplicates(facts)]
    assert exact == [{"0.png", "copy.png"}]
    assert near == [{"1.png", "bigger.jpg"}]  # the exact copy is not reported again


def test_the_same_shape_in_another_colour_is_not_a_near_duplicate(tmp_path):
    shape = np.zeros((64, 64, 3), np.uint8)
    shape[16:48, 16:48] = (220, 30, 30)
    Image.fromarray(shape).save(tmp_path / "red.png")
    shape[16:48, 16:48] = (30, 30, 220)
    Image.fromarray(shape).save(tmp_path / "blue.png")
    Image.fromarray(shape).resize((128, 128)).save(tmp_path / "blue big.png")
    near = [{os.path.basename(f.path) for f in g} for g in P.near_duplicates(P.inspect_pictures(
        sorted(tmp_path.iterdir())))]
    assert near == [{"blue.png", "blue big.png"}]


def test_the_cache_reads_each_unchanged_picture_once(tmp_path, monkeypatch):
    paths = [distinct_picture(tmp_path / "pics" / f"{i}.png", i) for i in range(3)]
    broken = cut_short(distinct_picture(tmp_path / "pics" / "broken.png", 9, size=(256, 256)))
    cache = tmp_path / "cache.json"
    decoded = []
    real = P.inspect_picture
    monkeypatch.setattr(P, "inspect_picture", lambda p: decoded.append(p.name) or real(p))
    first = P.inspect_pictures(paths + [broken], cache_file=cache)
    assert len(decoded) == 4 and not first[3].ok
    decoded.clear()
    again = P.inspect_pictures(paths + [broken], cache_file=cache)
    assert decoded == ["broken.png"] and again[:3] == first[:3]  # a bad file is looked at again: it may be fixed
    distinct_picture(paths[1], 5, size=(50, 50))
    os.utime(paths[1], ns=(1, 1))  # a changed file with another stamp
    decoded.clear()
    changed = P.inspect_pictures(paths, cache_file=cache)
    assert decoded == ["1.png"] and changed[1].width == 50


def test_an_unreadable_cache_is_ignored(tmp_path):
    cache = tmp_path / "cache.json"
    cache.write_text("{not json", encoding="utf-8")
    assert P.inspect_pictures([distinct_picture(tmp_path / "a.png", 0)], cache_file=cache)[0].ok


def test_verify_names_every_bad_picture(tmp_path):
    good = distinct_picture(tmp_path / "good.png", 0)
    bad = [cut_short(distinct_picture(tmp_path / f"写真 {i}.png", i, size=(256, 256))) for i in range(2)]
    with pytest.raises(DatasetError) as caught:
        P.verify_pictures([good, *bad])
    message = str(caught.value)
    assert "2 picture(s) cannot be decoded" in message and all(str(p) in message for p in bad)
    assert "re-save" in message and str(good) not in message


def test_progress_is_reported_up_to_the_total(tmp_path):
    paths = [distinct_picture(tmp_path / f"{i}.png", i) for i in range(4)]
    seen = []
    P.inspect_pictures(paths, progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 4) and seen[-1] == (4, 4)
