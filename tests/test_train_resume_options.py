"""--initial_epoch / --initial_step / --skip_until_initial_step (also with --resume), --debug_dataset and
--dataset_class, end to end on the tiny model: where training starts, how many steps it runs, what it sees."""

import json
import logging
import textwrap

import numpy as np
import pytest
from conftest import make_dreambooth_folder
from PIL import Image
from safetensors import safe_open

from trainer.cli import main
from trainer.config.args import parse_train_args
from trainer.errors import ConfigError
from trainer.train.events import RecordingListener
from trainer.train.run import run_training


@pytest.fixture
def data_dir(tmp_path):
    """4 images, 1 repeat: 2 batches of 2 per epoch."""
    parent = tmp_path / "データ" / "train"
    make_dreambooth_folder(parent, "1_sks shape", n=4)
    return parent


def args(model_dir, data_dir, out_dir, *extra):
    return ["--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(data_dir),
            "--output_dir", str(out_dir), "--output_name", "lora", "--resolution", "64", "--caption_extension",
            ".txt", "--network_dim", "2", "--learning_rate", "1e-3", "--max_train_epochs", "3",
            "--train_batch_size", "2", "--seed", "1", "--max_data_loader_n_workers", "0", *extra]


@pytest.fixture
def recorder(monkeypatch):
    """Records (step, epoch) of every optimizer step and the image paths of every trained batch."""
    from trainer.train import loop

    seen = {"steps": [], "batches": []}
    real_report, real_loss = loop.report_step, loop.compute_loss

    def report(reporter, meter, step, epoch, setup):
        seen["steps"].append((step, epoch))
        real_report(reporter, meter, step, epoch, setup)

    def loss(setup, batch, **kwargs):
        seen["batches"].append(list(batch["image_paths"]))
        return real_loss(setup, batch, **kwargs)

    monkeypatch.setattr(loop, "report_step", report)
    monkeypatch.setattr(loop, "compute_loss", loss)
    return seen


def train(argv):
    listener = RecordingListener()
    final = run_training(parse_train_args(argv), listeners=[listener])
    return final, listener


def ss_steps(path):
    with safe_open(str(path), "pt") as f:
        return int(f.metadata()["ss_steps"])


@pytest.fixture
def trainer_log(caplog):
    """Our log lines (the command line stops the "trainer" logger from propagating to pytest's handler)."""
    logger = logging.getLogger("trainer")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture
def no_models(monkeypatch):
    import trainer.models.load

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(trainer.models.load, "load_models", refuse)


# --- where training starts and how long it runs ------------------------------------------------------------

@pytest.mark.parametrize("extra, expected", [
    ([], [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (6, 3)]),
    # sd-scripts: without --skip_until_initial_step only the epoch moves on and the step count restarts at 0
    (["--initial_epoch", "2"], [(1, 2), (2, 2), (3, 3), (4, 3)]),
    (["--initial_step", "3"], [(1, 2), (2, 2), (3, 3), (4, 3)]),
    (["--initial_epoch", "2", "--skip_until_initial_step"], [(3, 2), (4, 2), (5, 3), (6, 3)]),
    (["--initial_step", "3", "--skip_until_initial_step"], [(4, 2), (5, 3), (6, 3)]),
    # the step wins over the epoch
    (["--initial_epoch", "3", "--initial_step", "1", "--skip_until_initial_step"],
     [(2, 1), (3, 2), (4, 2), (5, 3), (6, 3)]),
])
def test_initial_step_and_epoch_set_the_start(tiny_sd1_dir, data_dir, tmp_path, recorder, extra, expected):
    final, listener = train(args(tiny_sd1_dir, data_dir, tmp_path, *extra))
    assert recorder["steps"] == expected
    assert len(recorder["batches"]) == len(expected)  # skipped batches are not even loaded
    assert ss_steps(final) == expected[-1][0]
    started = listener.of("run_started")[0].data
    assert (started["start_step"], started["start_epoch"]) == (expected[0][0] - 1, expected[0][1])


def test_skip_until_initial_step_skips_exactly_the_batches_already_trained(tiny_sd1_dir, data_dir, tmp_path,
                                                                           recorder):
    base = args(tiny_sd1_dir, data_dir, tmp_path / "a", "--train_batch_size", "1", "--max_train_epochs", "2")
    train(base)
    straight = list(recorder["batches"])
    recorder["batches"].clear()
    train([*base, "--output_dir", str(tmp_path / "b"), "--initial_step", "3", "--skip_until_initial_step"])
    assert len(straight) == 8 and recorder["batches"] == straight[3:]


def test_skip_counts_batches_per_step_with_gradient_accumulation(tiny_sd1_dir, data_dir, tmp_path, recorder):
    # 4 batches of 1 per epoch, 2 per optimizer step: step 1 is the first 2 batches of epoch 1
    train(args(tiny_sd1_dir, data_dir, tmp_path, "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
               "--max_train_epochs", "2", "--initial_step", "1", "--skip_until_initial_step"))
    assert recorder["steps"] == [(2, 1), (3, 2), (4, 2)]
    assert len(recorder["batches"]) == 6


def test_resume_takes_the_state_step_unless_initial_options_are_given(tiny_sd1_dir, data_dir, tmp_path, recorder):
    assert main(["train", *args(tiny_sd1_dir, data_dir, tmp_path / "first", "--max_train_epochs", "1",
                                "--save_state")]) == 0
    state = tmp_path / "first" / "lora-state"
    assert json.loads((state / "train_state.json").read_text(encoding="utf-8"))["current_step"] == 2
    for name, extra, expected in [
        ("plain", [], [(1, 2), (2, 2), (3, 3), (4, 3)]),  # sd-scripts: epoch 2, step count from 0
        ("skip", ["--skip_until_initial_step"], [(3, 2), (4, 2), (5, 3), (6, 3)]),
        ("initial", ["--initial_step", "5", "--skip_until_initial_step"], [(6, 3)]),
    ]:
        recorder["steps"].clear()
        _, listener = train(args(tiny_sd1_dir, data_dir, tmp_path / name, "--resume", str(state), *extra))
        assert recorder["steps"] == expected, name
    assert any("state's step 2 is not used" in e.data["message"] for e in listener.of("warning"))


def test_a_start_past_the_end_fails_before_any_model_loads(tiny_sd1_dir, data_dir, tmp_path, no_models, capsys):
    assert main(["train", *args(tiny_sd1_dir, data_dir, tmp_path, "--initial_epoch", "4")]) == 2
    err = capsys.readouterr().err
    assert "start at step 6" in err and "6 in all" in err
    with pytest.raises(ConfigError, match="--initial_epoch counts from 1"):
        parse_train_args(args(tiny_sd1_dir, data_dir, tmp_path, "--initial_epoch", "0"))
    with pytest.raises(ConfigError, match="--initial_step must be 0 or more"):
        parse_train_args(args(tiny_sd1_dir, data_dir, tmp_path, "--initial_step", "-1"))


# --- --debug_dataset ------------------------------------------------------------------------------------------

def test_debug_dataset_writes_the_batches_and_loads_no_model(data_dir, tmp_path, no_models, trainer_log):
    make_dreambooth_folder(tmp_path / "reg", "1_shape", n=2, captions=False)
    out = tmp_path / "出力"
    argv = [a for a in args("unused", data_dir, out) if a not in ("--pretrained_model_name_or_path", "unused")]
    cfg = parse_train_args([*argv, "--debug_dataset", "--flip_aug", "--caption_dropout_rate", "1",
                            "--reg_data_dir", str(tmp_path / "reg"), "--prior_loss_weight", "0.5"])
    listener = RecordingListener()
    folder = run_training(cfg, listeners=[listener])
    batches = [e.data for e in listener.of("debug_batch")]
    assert folder == out / "debug_dataset" and len(batches) == 4  # 4 train + 4 balanced reg images, 2 a batch
    files = sorted(folder.glob("*.png"))
    assert len(files) == 8 and not list(out.glob("*.safetensors"))
    flips = set()
    for batch in batches:
        assert batch["bucket"] == [64, 64] and batch["captions"] == ["", ""]  # processed: dropout applied
        for path, weight, flipped, file in zip(batch["image_paths"], batch["loss_weights"], batch["flipped"],
                                               batch["files"]):
            assert weight == (0.5 if "reg" in path else 1.0)
            source = np.asarray(Image.open(path).convert("RGB"), dtype=int)
            written = np.asarray(Image.open(file), dtype=int)
            assert np.abs(written - (source[:, ::-1] if flipped else source)).max() <= 1
            flips.add(flipped)
    assert flips == {True, False}
    assert "caption:" in trainer_log.text and "bucket 64x64" in trainer_log.text


def test_debug_dataset_from_the_command_line_exits_0(tiny_sd1_dir, data_dir, tmp_path, no_models):
    assert main(["train", *args(tiny_sd1_dir, data_dir, tmp_path, "--debug_dataset")]) == 0
    assert len(list((tmp_path / "debug_dataset").glob("*.png"))) == 4


# --- --dataset_class -------------------------------------------------------------------------------------------

DATASET_MODULE = '''
import torch

class ShapesDataset:
    """Two batches of two 64x64 images; records what the trainer tells it."""
    created_with = None
    epochs = []

    def __init__(self, tokenizer, max_token_length, resolution, debug_dataset):
        type(self).created_with = (tokenizer, max_token_length, resolution, debug_dataset)
        self.num_train_images = 4

    def __len__(self):
        return 2

    def set_current_epoch(self, epoch):
        type(self).epochs.append(epoch)

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(index)
        return {"images": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, "input_ids": None,
                "captions": [f"shape {index} a", f"shape {index} b"], "image_keys": [f"k{index}a", f"k{index}b"],
                "latents": None, "loss_weights": torch.ones(2)}

class NoCaptions(ShapesDataset):
    def __getitem__(self, index):
        return {"images": torch.zeros(1, 3, 64, 64)}
'''


@pytest.fixture
def dataset_module(tmp_path, monkeypatch):
    name = f"user_data_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(DATASET_MODULE), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def custom_args(model_dir, out_dir, dataset_class, *extra):
    return ["--pretrained_model_name_or_path", str(model_dir), "--dataset_class", dataset_class,
            "--output_dir", str(out_dir), "--output_name", "lora", "--resolution", "64", "--network_dim", "2",
            "--max_train_steps", "3", "--seed", "1", "--max_data_loader_n_workers", "0", *extra]


def test_dataset_class_trains_on_the_batches_it_serves(tiny_sd1_dir, tmp_path, dataset_module, recorder):
    final, listener = train(custom_args(tiny_sd1_dir, tmp_path / "out", f"{dataset_module}.ShapesDataset"))
    import importlib

    cls = importlib.import_module(dataset_module).ShapesDataset
    assert cls.created_with == (None, None, (64, 64), False)
    assert recorder["steps"] == [(1, 1), (2, 1), (3, 2)] and cls.epochs == [1, 2]
    assert sorted(map(tuple, recorder["batches"][:2])) == [("k0a", "k0b"), ("k1a", "k1b")]
    assert ss_steps(final) == 3
    assert "images: 4" in listener.of("run_started")[0].data["summary"][0]


def test_dataset_class_with_debug_dataset(tiny_sd1_dir, tmp_path, dataset_module, no_models):
    assert main(["train", *custom_args(tiny_sd1_dir, tmp_path, f"{dataset_module}.ShapesDataset",
                                       "--debug_dataset")]) == 0
    names = sorted(p.name[7:] for p in (tmp_path / "debug_dataset").glob("*.png"))  # without "0001_0_"
    assert names == ["k0a.png", "k0b.png", "k1a.png", "k1b.png"]


@pytest.mark.parametrize("suffix, extra, message", [
    ("NoSuchClass", [], "has no class NoSuchClass"),
    ("NoCaptions", ["--debug_dataset"], "needs \"captions\""),
    ("ShapesDataset", ["--cache_latents"], "--cache_latents cannot be used with --dataset_class"),
])
def test_dataset_class_mistakes_are_explained(tiny_sd1_dir, tmp_path, dataset_module, no_models, capsys, suffix,
                                              extra, message):
    assert main(["train", *custom_args(tiny_sd1_dir, tmp_path, f"{dataset_module}.{suffix}", *extra)]) == 2
    assert message in capsys.readouterr().err


def test_dataset_class_module_that_does_not_import(tiny_sd1_dir, tmp_path, capsys):
    assert main(["train", *custom_args(tiny_sd1_dir, tmp_path, "no_such_module_here.Data")]) == 2
    assert "cannot import no_such_module_here" in capsys.readouterr().err
