"""The dataset doctor (trainer.tools.dataset_doctor, through the pre-flight check that `doctor --config` and the
GUI's Check run): every planted problem is found and named with its fix, and a clean dataset gets no alarm."""

from __future__ import annotations

import json

import numpy as np
from conftest import make_tiny_tokenizer
from PIL import Image
from test_data_pictures import cut_short, distinct_picture

from trainer.data.config import DatasetSpec, SubsetSpec
from trainer.gui import form as F
from trainer.tools import dataset_doctor as D
from trainer.tools import doctor
from trainer.tools.preflight import check_config


def settings(tmp_path, train_dir, **values):
    base = {"pretrained_model_name_or_path": "builtin:tiny-sd1", "resolution": "64", "caption_extension": ".txt",
            "output_dir": str(tmp_path / "out"), "output_name": "lora", "max_train_epochs": 1,
            "train_data_dir": str(train_dir), "enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128,
            "bucket_reso_steps": 32}
    return F.write_config(tmp_path / "settings.toml", {**base, **values})


def clean_folder(folder, n: int = 6, first_seed: int = 0):
    for i in range(n):
        distinct_picture(folder / f"img_{i}.png", first_seed + i, size=(64, 64))
        (folder / f"img_{i}.txt").write_text(f"sks cat, picture {i}", encoding="utf-8")
    return folder


def warnings_of(report):
    return [n for n in report.notes if n.startswith("Warning: ")]


def test_a_clean_dataset_is_ready_without_warnings(tmp_path):
    train = tmp_path / "img"
    clean_folder(train / "10_sks cat")
    report = check_config(settings(tmp_path, train), trigger="sks")
    assert report.ok, report.problems
    assert warnings_of(report) == []
    assert report.dataset.pictures == 6
    assert report.dataset.buckets == [{"dataset": 0, "resolution": "64x64", "pictures": 6, "with_repeats": 60}]
    assert ("sks cat", 6) in report.dataset.top_tags
    assert "| 0 | 64x64 | 6 | 60 |" in report.to_markdown()


def test_every_planted_problem_is_found_and_named(tmp_path):
    train = tmp_path / "my pictures"
    folder = clean_folder(train / "10_sks cat")
    cut_short(distinct_picture(folder / "cut.png", 20, size=(256, 256)))
    (folder / "zero.png").write_bytes(b"")
    (folder / "orphan.txt").write_text("a caption without its picture", encoding="utf-8")
    distinct_picture(folder / "empty caption.png", 21, size=(64, 64))
    (folder / "empty caption.txt").write_bytes(b"")
    distinct_picture(folder / "latin1.png", 22, size=(64, 64))
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    exif = Image.Exif()
    exif[0x0112] = 6
    distinct_picture(folder / "phone.jpg", 23, size=(64, 48)).unlink()
    Image.fromarray(np.random.default_rng(23).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
        folder / "phone.jpg", exif=exif)
    distinct_picture(folder / "alpha.png", 24, size=(64, 64), mode="RGBA")
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(folder / "sixteen.png")
    distinct_picture(folder / "print.jpg", 25, size=(64, 64), mode="CMYK")
    distinct_picture(folder / "tiny.png", 26, size=(16, 16))
    distinct_picture(folder / "banner.png", 27, size=(640, 64))
    (folder / "copy.png").write_bytes((folder / "img_0.png").read_bytes())
    Image.new("RGB", (8, 8)).save(folder / "anim.gif")
    (folder / "._img_0.png").write_bytes(b"\x00\x05\x16\x07 macOS metadata")
    (train / "unnumbered").mkdir()
    distinct_picture(train / "unnumbered" / "x.png", 28)

    report = check_config(settings(tmp_path, train), trigger="sks")
    problems, notes = "\n".join(report.problems), "\n".join(report.notes)
    assert "2 picture(s) cannot be decoded" in problems and "cut.png" in problems and "zero.png" in problems
    assert "empty (0 bytes)" in problems and "decoded to the end" in problems
    assert "empty caption.txt" in problems and "latin1.txt" in problems and "UTF-8" in problems
    expected_warnings = {
        "orphan.txt": "no picture of the same name",
        "phone.jpg": "stored sideways",
        "alpha.png": "transparency",
        "sixteen.png": "16-bit",
        "print.jpg": "CMYK",
        "tiny.png": "blown up",
        "banner.png": "lose more than 20%",
        "copy.png": "identical files",
        "anim.gif": "convert them to PNG or JPEG",
        "unnumbered": "'<repeats>_' prefix",
    }
    for name, words in expected_warnings.items():
        assert any(name in w and words in w for w in warnings_of(report)), (name, words, notes)
    assert "._img_0.png" in notes and "hidden" in notes  # left out, and not reported as a broken picture
    assert "._img_0.png" not in problems
    assert not report.ok


def test_caption_files_read_as_training_reads_them(tmp_path):
    train = tmp_path / "img"
    folder = clean_folder(train / "5_sks cat", n=3)
    (folder / "img_0.txt").write_text("   \n\n", encoding="utf-8")
    (folder / "img_1.txt").write_text("sks cat, first line\nsecond line", encoding="utf-8")
    report = check_config(settings(tmp_path, train))
    assert any("only spaces" in w and "img_0.txt" in w for w in warnings_of(report))
    assert any("only the first is used" in n and "img_1.txt" in n for n in report.notes)


def test_captions_longer_than_the_token_limit_are_named(tmp_path):
    folder = clean_folder(tmp_path / "10_sks", n=2)
    images = sorted(folder.glob("*.png"))
    long_caption = "x " * 80  # the test tokenizer has no merges: 160 byte tokens
    scan = D.SubsetScan(DatasetSpec(resolution=(64, 64)), SubsetSpec(image_dir=str(folder), num_repeats=10,
                                                                     caption_extension=".txt"),
                        images, ["sks, short", long_caption])
    found = D.examine([scan], max_token_length=None, tokenizer=make_tiny_tokenizer())
    cut = [f for f in found.findings if "CLIP tokens" in f.message]
    assert len(cut) == 1 and cut[0].files == (str(images[1]),) and "max_token_length = 150" in cut[0].message
    found = D.examine([scan], max_token_length=225, tokenizer=make_tiny_tokenizer())
    assert not any("CLIP tokens" in f.message for f in found.findings)


def test_reg_balance_is_said_as_sd_scripts_applies_it(tmp_path):
    train, reg = tmp_path / "img", tmp_path / "reg"
    clean_folder(train / "2_sks cat", n=3)
    clean_folder(reg / "1_cat", n=10, first_seed=50)
    report = check_config(settings(tmp_path, train, reg_data_dir=str(reg)))
    assert any("only 6 of the 10 reg picture(s)" in n for n in report.notes)


def test_doctor_json_carries_the_findings_and_tables(tmp_path, capsys):
    train = tmp_path / "画像 フォルダ"
    folder = clean_folder(train / "10_sks cat")
    (folder / "orphan.txt").write_text("x", encoding="utf-8")
    assert doctor.main(["--config", str(settings(tmp_path, train)), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    dataset = data["config"]["dataset"]
    assert data["ok"] and dataset["pictures"] == 6 and dataset["buckets"][0]["resolution"] == "64x64"
    orphan = [f for f in dataset["findings"] if "no picture of the same name" in f["message"]]
    assert orphan[0]["level"] == "warning" and orphan[0]["files"] == [str(folder / "orphan.txt")]
