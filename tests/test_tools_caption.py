"""`python -m trainer caption`: WD14 tags and BLIP sentences written beside the pictures, through the same
loading code users run (a model folder, or the hub's cache), on tiny models built here; the hub is faked.

The tagger is a 3-node ONNX graph: the mean of each input channel (BGR, 0-255) times a weight per tag, then
a sigmoid, so a plain red or blue picture gets the scores planned below."""

from __future__ import annotations

import math
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from trainer.errors import ConfigError
from trainer.tools import caption, caption_wd14
from trainer.tools.caption_models import open_rgb

onnx = pytest.importorskip("onnx", reason="the tiny tagger is built with onnx: pip install onnx")
pytest.importorskip("onnxruntime", reason="WD14 tagging runs on onnxruntime: pip install onnxruntime")

# (name, category, score for a red picture, score for a blue one); categories 9 rating, 0 general, 4 character
TAGS = [
    ("general", "9", 0.10, 0.70), ("sensitive", "9", 0.80, 0.10), ("questionable", "9", 0.05, 0.05),
    ("explicit", "9", 0.01, 0.01),
    ("long_hair", "0", 0.90, 0.10), ("red_background", "0", 0.50, 0.02), ("^_^", "0", 0.60, 0.02),
    ("solo", "0", 0.30, 0.30), ("1girl", "0", 0.70, 0.10), ("blue_sky", "0", 0.02, 0.95),
    ("hatsune_miku_(vocaloid)", "4", 0.40, 0.02), ("bob", "4", 0.20, 0.60),
]
RED_DEFAULT = "long_hair, red_background, ^_^, 1girl, hatsune_miku_(vocaloid)"
SIZE = 8


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def write_tagger(folder, batch: int | str = "N", scores=TAGS):
    """model.onnx + selected_tags.csv as SmilingWolf's repos hold them."""
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    weights = np.zeros((3, len(scores)), np.float32)
    weights[2] = [logit(red) for _, _, red, _ in scores]   # BGR: red is the last channel
    weights[0] = [logit(blue) for _, _, _, blue in scores]
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input_1:0"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("Mul", ["mean", "scale"], ["unit"]),
         helper.make_node("MatMul", ["unit", "weights"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"])],
        "tiny_tagger",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, [batch, SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, len(scores)])],
        [numpy_helper.from_array(np.array([1 / 255], np.float32), "scale"),
         numpy_helper.from_array(weights, "weights")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    rows = ["tag_id,name,category,count"] + [f"{i},{name},{cat},100" for i, (name, cat, _, _) in enumerate(scores)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def tagger_dir(tmp_path):
    return write_tagger(tmp_path / "tagger")


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Nothing here may reach the network: a hub call that a test did not fake fails it."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected hub call: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


def pictures(folder, **colours):
    """name=(r, g, b): plain 8x8 PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rgb in colours.items():
        Image.new("RGB", (SIZE, SIZE), rgb).save(folder / f"{name}.png")
    return folder


def run(folder, model_dir, *options) -> int:
    return caption.main([str(folder), "--model_dir", str(model_dir), *options])


def text(path) -> str:
    return path.read_text(encoding="utf-8")


RED, BLUE = (255, 0, 0), (0, 0, 255)


def test_tags_above_the_thresholds_in_the_tags_file_order(tmp_path, tagger_dir, capsys):
    folder = pictures(tmp_path / "img", a=RED, b=BLUE)
    assert run(folder, tagger_dir) == 0
    assert text(folder / "a.txt") == RED_DEFAULT + "\n"
    assert text(folder / "b.txt") == "blue_sky, bob\n"  # solo (0.30) is under --thresh 0.35; ratings not asked
    out = capsys.readouterr().out
    assert "2 captions written (.txt), 0 skipped, 0 failed" in out
    assert "--caption_extension .txt" in out
    assert not list(folder.glob("*.tmp-*"))


@pytest.mark.parametrize("options, expected", [
    (["--general_threshold", "0.65"], "long_hair, 1girl, hatsune_miku_(vocaloid)"),
    (["--character_threshold", "0.5"], "long_hair, red_background, ^_^, 1girl"),
    (["--thresh", "0.25"], "long_hair, red_background, ^_^, solo, 1girl, hatsune_miku_(vocaloid)"),
    (["--remove_underscore"], "long hair, red background, ^_^, 1girl, hatsune miku (vocaloid)"),
    (["--remove_underscore", "--undesired_tags", "red background,^_^"], "long hair, 1girl, hatsune miku (vocaloid)"),
    (["--always_first_tags", "1girl, hatsune_miku_(vocaloid),1boy"],
     "1girl, hatsune_miku_(vocaloid), long_hair, red_background, ^_^"),
    (["--character_tags_first"], "hatsune_miku_(vocaloid), long_hair, red_background, ^_^, 1girl"),
    (["--use_rating_tags"], "sensitive, " + RED_DEFAULT),
    (["--use_rating_tags_as_last_tag"], RED_DEFAULT + ", sensitive"),
    (["--caption_separator", " | ", "--undesired_tags", "^_^|long_hair"],
     "red_background | 1girl | hatsune_miku_(vocaloid)"),
    (["--trigger", "mychar", "--always_first_tags", "1girl"], "mychar, 1girl, " + RED_DEFAULT.replace(", 1girl", "")),
])
def test_tag_options_as_in_sd_scripts(tmp_path, tagger_dir, options, expected):
    folder = pictures(tmp_path / "img", a=RED)
    assert run(folder, tagger_dir, *options) == 0
    assert text(folder / "a.txt") == expected + "\n"


def test_the_caption_a_user_wrote_is_kept_unless_told(tmp_path, tagger_dir, capsys):
    folder = pictures(tmp_path / "img", mine=RED, empty=RED, new=RED)
    (folder / "mine.txt").write_text("mychar, my own words\n", encoding="utf-8")
    (folder / "empty.txt").write_text(" \n", encoding="utf-8")  # nothing written there: filled
    assert run(folder, tagger_dir, "--trigger", "mychar") == 0
    assert text(folder / "mine.txt") == "mychar, my own words\n"
    assert text(folder / "empty.txt") == text(folder / "new.txt") == f"mychar, {RED_DEFAULT}\n"
    out = capsys.readouterr().out
    assert "2 captions written (.txt), 1 skipped, 0 failed" in out and "mine.png" in out

    assert run(folder, tagger_dir, "--append_tags", "--trigger", "mychar") == 0
    assert text(folder / "mine.txt") == f"mychar, my own words, {RED_DEFAULT}\n"
    (folder / "mine.txt").write_text("long_hair, smile", encoding="utf-8")
    assert run(folder, tagger_dir, "--append_tags", "--trigger", "mychar") == 0
    assert text(folder / "mine.txt") == ("mychar, long_hair, smile, red_background, ^_^, 1girl, "
                                         "hatsune_miku_(vocaloid)\n")

    assert run(folder, tagger_dir, "--overwrite") == 0
    assert text(folder / "mine.txt") == RED_DEFAULT + "\n"


def test_nothing_to_do_loads_no_model(tmp_path, capsys):
    folder = pictures(tmp_path / "img", a=RED)
    (folder / "a.caption").write_text("kept", encoding="utf-8")
    empty_model_dir = tmp_path / "nothing-here"  # loading would download into it (and the hub is refused)
    assert run(folder, empty_model_dir, "--caption_extension", "caption") == 0
    assert text(folder / "a.caption") == "kept"
    assert "0 captions written (.caption), 1 skipped" in capsys.readouterr().out


def test_an_unreadable_picture_is_named_and_the_others_are_captioned(tmp_path, tagger_dir, capsys):
    folder = pictures(tmp_path / "img", a=RED, c=BLUE)
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert run(folder, tagger_dir, "--batch_size", "3") == 1
    assert (folder / "a.txt").is_file() and (folder / "c.txt").is_file() and not (folder / "b.txt").exists()
    out = capsys.readouterr().out
    assert "2 captions written (.txt), 0 skipped, 1 failed" in out and "failed: b.png: cannot be read" in out


def test_a_model_with_a_fixed_batch_size_takes_every_picture(tmp_path):
    model_dir = write_tagger(tmp_path / "fixed", batch=2)
    folder = pictures(tmp_path / "img", a=RED, b=BLUE, c=RED)
    assert run(folder, model_dir, "--batch_size", "1") == 0
    assert [text(folder / f"{n}.txt") for n in "abc"] == [RED_DEFAULT + "\n", "blue_sky, bob\n", RED_DEFAULT + "\n"]


def test_the_parent_folder_needs_recursive(tmp_path, tagger_dir):
    parent = tmp_path / "img"
    pictures(parent / "10_mychar woman", a=RED)
    pictures(parent / ".hidden", b=RED)
    with pytest.raises(ConfigError, match="--recursive") as error:
        run(parent, tagger_dir)
    assert "10_mychar woman" in str(error.value)
    assert run(parent, tagger_dir, "--recursive") == 0
    assert text(parent / "10_mychar woman" / "a.txt") == RED_DEFAULT + "\n"
    assert not (parent / ".hidden" / "b.txt").exists()


def test_sd_scripts_layout_of_the_model_dir_is_found(tmp_path):
    models = tmp_path / "wd14_tagger_model"  # sd-scripts: <model_dir>/<owner>_<name>
    write_tagger(models / "SmilingWolf_wd-vit-tagger-v3")
    folder = pictures(tmp_path / "img", a=RED)
    assert run(folder, models, "--repo_id", "SmilingWolf/wd-vit-tagger-v3", "--onnx") == 0
    assert text(folder / "a.txt") == RED_DEFAULT + "\n"


def test_preprocessing_pads_white_squares_in_bgr(tmp_path):
    image = Image.new("RGB", (4, 2), (255, 0, 0))
    pixels = caption_wd14.preprocess(image, 4)
    assert pixels.shape == (4, 4, 3) and pixels.dtype == np.float32
    assert pixels[0].tolist() == [[255.0] * 3] * 4 and pixels[3].tolist() == [[255.0] * 3] * 4  # white pad rows
    assert pixels[1:3].reshape(-1, 3).tolist() == [[0.0, 0.0, 255.0]] * 8  # red is B=0, G=0, R=255
    Image.new("RGBA", (2, 2), (0, 0, 0, 0)).save(tmp_path / "cut-out.png")  # transparent: seen on white
    assert caption_wd14.preprocess(open_rgb(tmp_path / "cut-out.png"), 2).min() == 255.0


def test_missing_onnxruntime_is_one_message_with_the_pip_command(tmp_path, tagger_dir, monkeypatch, capsys):
    from trainer.cli import main as cli_main

    folder = pictures(tmp_path / "img", a=RED)
    assert cli_main(["caption", str(folder), "--model_dir", str(tagger_dir)]) == 0  # the console command
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if it were not installed
    assert cli_main(["caption", str(folder), "--model_dir", str(tagger_dir), "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert "pip install onnxruntime" in error and "Traceback" not in error


def test_bad_files_in_the_model_dir_are_named(tmp_path, tagger_dir):
    folder = pictures(tmp_path / "img", a=RED)
    (tagger_dir / "selected_tags.csv").write_text("id,tag\n1,a\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="selected_tags.csv"):
        run(folder, tagger_dir)
    write_tagger(tagger_dir, scores=TAGS[:5])
    shutil.copy(write_tagger(tmp_path / "other").joinpath("model.onnx"), tagger_dir / "model.onnx")
    with pytest.raises(ConfigError, match="different models"):
        run(folder, tagger_dir)


class FakeHub:
    """snapshot_download as the hub's cache behaves: local_files_only finds only what was downloaded."""

    def __init__(self, source, cache):
        self.source, self.cache, self.downloads = source, cache, []

    def __call__(self, repo_id, allow_patterns=None, local_files_only=False, force_download=False, local_dir=None,
                 **kwargs):
        from huggingface_hub.errors import LocalEntryNotFoundError

        folder = local_dir or self.cache / repo_id.replace("/", "--")
        if local_files_only:
            if not folder.is_dir():
                raise LocalEntryNotFoundError("not in the cache")
            return str(folder)
        self.downloads.append((repo_id, tuple(allow_patterns), force_download))
        shutil.copytree(self.source, folder, dirs_exist_ok=True)
        return str(folder)


def test_the_hub_model_is_downloaded_once_then_used_offline(tmp_path, tagger_dir, monkeypatch):
    import huggingface_hub

    hub = FakeHub(tagger_dir, tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    folder = pictures(tmp_path / "img", a=RED)
    assert caption.main([str(folder)]) == 0
    assert hub.downloads == [(caption_wd14.DEFAULT_REPO, ("model.onnx", "selected_tags.csv"), False)]
    assert caption.main([str(folder), "--overwrite", "--repo_id", caption_wd14.DEFAULT_REPO]) == 0
    assert len(hub.downloads) == 1  # the second run read the cache
    assert caption.main([str(folder), "--overwrite", "--force_download"]) == 0
    assert hub.downloads[-1][2] is True
    assert text(folder / "a.txt") == RED_DEFAULT + "\n"


def test_a_hub_failure_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(repo_id, local_files_only=False, **kwargs):
        from huggingface_hub.errors import LocalEntryNotFoundError

        raise LocalEntryNotFoundError("not cached") if local_files_only else OSError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    folder = pictures(tmp_path / "img", a=RED)
    with pytest.raises(ConfigError, match="--model_dir") as error:
        caption.main([str(folder)])
    assert "Network is unreachable" in str(error.value) and "huggingface.co/SmilingWolf" in str(error.value)
