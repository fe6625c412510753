"""`python -m trainer regimages`: class pictures drawn by the base model into the N_class folder sd-scripts reads,
resumable, and usable as --reg_data_dir as they are."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from trainer.cli import main
from trainer.errors import ConfigError
from trainer.tools import regimages

FAST = ["--model", "builtin:tiny-sd1", "--prompt", "a photo of a shape --s 2 --l 1", "--resolution", "64"]


def test_draws_the_class_folder_with_a_caption_per_picture(tmp_path):
    out = tmp_path / "正則化 reg"
    assert main(["regimages", *FAST, "--class", "shape", "--count", "3", "--out", str(out)]) == 0
    folder = out / "1_shape"
    pictures = sorted(folder.glob("*.png"))
    assert [p.name for p in pictures] == ["reg_0000.png", "reg_0001.png", "reg_0002.png"]
    assert all(Image.open(p).size == (64, 64) for p in pictures)
    assert all(p.with_suffix(".txt").read_text(encoding="utf-8") == "shape" for p in pictures)
    assert not list(folder.glob("*.tmp-*"))


def test_a_second_run_adds_only_what_is_missing_and_draws_the_same_pictures(tmp_path):
    """Picture i has seed + i: made in two goes (as after a stop) the folder equals one made in one go."""
    assert main(["regimages", *FAST, "--class", "shape", "--count", "2", "--out", str(tmp_path / "a")]) == 0
    first = (tmp_path / "a" / "1_shape" / "reg_0000.png").stat().st_mtime_ns
    assert main(["regimages", *FAST, "--class", "shape", "--count", "4", "--out", str(tmp_path / "a")]) == 0
    assert main(["regimages", *FAST, "--class", "shape", "--count", "4", "--out", str(tmp_path / "b")]) == 0
    a, b = tmp_path / "a" / "1_shape", tmp_path / "b" / "1_shape"
    assert (a / "reg_0000.png").stat().st_mtime_ns == first  # kept, not drawn again
    for i in range(4):
        assert (a / f"reg_{i:04d}.png").read_bytes() == (b / f"reg_{i:04d}.png").read_bytes()


def test_a_full_folder_loads_no_model(tmp_path, monkeypatch, capsys):
    assert main(["regimages", *FAST, "--class", "shape", "--count", "1", "--out", str(tmp_path)]) == 0
    monkeypatch.setattr(regimages, "load_for_drawing", lambda *a, **k: pytest.fail("nothing to draw"))
    assert main(["regimages", *FAST, "--class", "shape", "--count", "1", "--out", str(tmp_path)]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_model_resolution_and_folder_come_from_a_training_config(tmp_path):
    config = tmp_path / "my.toml"
    config.write_text(f'pretrained_model_name_or_path = "builtin:tiny-sd1"\nresolution = "64,96"\n'
                      f'reg_data_dir = {str(tmp_path / "reg")!r}\n', encoding="utf-8")
    plan = regimages.plan_from_args(["--config", str(config), "--class", "woman", "--repeats", "2"])
    assert plan.model == "builtin:tiny-sd1" and plan.resolution == (64, 96)
    assert plan.folder == tmp_path / "reg" / "2_woman" and plan.prompt == "a photo of a woman"


@pytest.mark.parametrize("args, named", [
    (["--class", "shape", "--out", "x"], "--model"),
    (["--model", "builtin:tiny-sd1", "--class", "shape"], "--out"),
    (["--model", "builtin:tiny-sd1", "--class", "a/b", "--out", "x"], "words only"),
    (["--model", "builtin:tiny-sd1", "--class", "shape", "--out", "x", "--resolution", "abc"], "'W,H'"),
])
def test_mistakes_name_the_option(args, named):
    with pytest.raises(ConfigError, match=named):
        regimages.plan_from_args(args)


def test_the_pictures_train_as_reg_data_dir(tmp_path, train_data_dir):
    out = tmp_path / "reg"
    assert main(["regimages", *FAST, "--class", "sks shape", "--count", "2", "--out", str(out)]) == 0
    code = main(["train", "--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir",
                 str(train_data_dir), "--reg_data_dir", str(out), "--output_dir", str(tmp_path / "o"),
                 "--resolution", "64", "--caption_extension", ".txt", "--max_train_steps", "1",
                 "--max_data_loader_n_workers", "0"])
    assert code == 0 and Path(tmp_path / "o" / "last.safetensors").is_file()
