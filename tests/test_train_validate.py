"""Validation (sd-scripts' --validation_split and friends): the held-out images, a loss that is the same every
time and leaves training untouched, its cadence, its cap, and where the numbers end up."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from conftest import make_dreambooth_folder
from safetensors.torch import load_file
from test_sdxl import sdxl_args

from trainer.cli import main
from trainer.config.args import parse_train_args
from trainer.data.config import DatasetSpec, SubsetSpec
from trainer.data.dataset import build_train_dataset, split_train_val
from trainer.train.events import ConsoleListener, Event, RecordingListener, Reporter
from trainer.train.run import run_training
from trainer.train.validate import validation_loss, validation_timesteps


def base_args(model_dir, data_dir, out_dir, *extra):
    return ["--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(data_dir),
            "--output_dir", str(out_dir), "--output_name", "val lora", "--resolution", "64",
            "--caption_extension", ".txt", "--network_module", "networks.lora", "--network_dim", "4",
            "--learning_rate", "1e-3", "--train_batch_size", "1", "--seed", "1",
            "--max_data_loader_n_workers", "0", *extra]


@pytest.fixture
def small_data(tmp_path):
    """4 images, 1 repeat: with --validation_split 0.5, 2 train (2 steps per epoch) and 2 validation images."""
    parent = tmp_path / "学習 data"
    make_dreambooth_folder(parent, "1_sks shape", n=4)
    return parent


def subset(folder, repeats=1, **values) -> SubsetSpec:
    return SubsetSpec(image_dir=str(folder), num_repeats=repeats, caption_extension=".txt", **values)


# --- the split --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("count, split, sizes", [(10, 0.25, (8, 2)), (7, 0.3, (5, 2)), (3, 0.5, (2, 2)),
                                                 (4, 0.1, (4, 0)), (2, 1.0, (0, 2))])
def test_split_keeps_ceil_for_training_and_round_for_validation(count, split, sizes):
    train, validation = split_train_val(count, split, seed=1234)
    assert (len(train), len(validation)) == sizes
    assert set(train) | set(validation) == set(range(count))  # nothing lost (n=3, 0.5 shares one, as sd-scripts)
    assert split_train_val(count, split, seed=1234) == (train, validation)
    if count >= 7:
        assert split_train_val(count, split, seed=99) != (train, validation)


def test_validation_dataset_is_held_out_images_once_without_augmentation(tmp_path):
    train = make_dreambooth_folder(tmp_path / "train", "5_sks", n=7, size=(32, 32))
    for caption in train.glob("*.txt"):
        caption.write_text("sks, red, round, shape", encoding="utf-8")
    reg = make_dreambooth_folder(tmp_path / "reg", "1_dog", n=4, size=(32, 32))
    spec = DatasetSpec(batch_size=2, resolution=(32, 32), validation_split=0.3, validation_seed=3, subsets=(
        subset(train, 5, flip_aug=True, shuffle_caption=True, caption_dropout_rate=0.5,
               caption_dropout_every_n_epochs=1),
        subset(reg, 1, is_reg=True, class_tokens="dog")))
    data = build_train_dataset([spec], seed=0)
    validation = data.validation_dataset()
    train_paths = {r.path for r in data.records if not r.is_reg}
    held = {r.path for r in validation.records}
    assert (len(train_paths), len(held), data.num_validation_images) == (5, 2, 2)
    assert not held & train_paths and all(r.path.parent == train for r in validation.records)  # reg never held out
    assert sum(r.is_reg for r in data.records) == 4 and data.num_train_images == 25
    assert len(validation) == 1  # 2 images, no repeats, batch size 2
    first = validation[0]
    assert first["captions"] == ["sks, red, round, shape"] * 2 and first["flipped"] == [False, False]
    assert torch.equal(validation[0]["images"], first["images"])
    assert build_train_dataset([DatasetSpec(resolution=(32, 32), subsets=(subset(train),))],
                               seed=0).validation_dataset() is None


# --- the loss ---------------------------------------------------------------------------------------------

def test_fixed_timesteps_follow_min_and_max_timestep():
    assert validation_timesteps(None, None) == [200, 400, 600, 800]
    assert validation_timesteps(100, 900) == [260, 420, 580, 740]


def test_validation_loss_is_repeatable_and_leaves_random_state_alone(tiny_sd1_dir, small_data, tmp_path):
    from trainer.train.build import prepare_training

    cfg = parse_train_args(base_args(tiny_sd1_dir, small_data, tmp_path, "--validation_split", "0.5",
                                     "--network_dropout", "0.5", "--max_train_steps", "2"))
    setup = prepare_training(cfg, Reporter())
    validation = setup.dataset.validation_dataset()
    batches = [validation[i] for i in range(len(validation))]
    setup.network.train()
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    first = validation_loss(setup, batches, seed=7)
    after = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == (after[0].tolist(), *after[1:])
    assert validation_loss(setup, batches, seed=7) == first  # network dropout is off in eval mode
    assert validation_loss(setup, batches, seed=8) != first
    assert validation_loss(setup, batches[:1], seed=7) != first
    assert setup.network.training
    assert setup.validator.num_batches == 2


def test_max_validation_steps_caps_the_batches(tiny_sd1_dir, small_data, tmp_path):
    from trainer.train.build import prepare_training

    cfg = parse_train_args(base_args(tiny_sd1_dir, small_data, tmp_path, "--validation_split", "0.5",
                                     "--max_validation_steps", "1", "--validation_seed", "3", "--max_train_steps", "2"))
    setup = prepare_training(cfg, Reporter())
    validation = setup.dataset.validation_dataset()
    assert len(validation) == 2 and setup.validator.num_batches == 1
    loss = setup.validator.validate("epoch", 0, 1, lambda: None)
    assert loss == validation_loss(setup, [validation[0]], seed=3)


def test_cached_latents_cover_the_validation_images(tiny_sd1_dir, small_data, tmp_path):
    from trainer.train.build import prepare_training

    cfg = parse_train_args(base_args(tiny_sd1_dir, small_data, tmp_path, "--validation_split", "0.5",
                                     "--cache_latents", "--max_train_steps", "2"))
    setup = prepare_training(cfg, Reporter())
    validation = setup.dataset.validation_dataset()
    assert all(r.latents is not None for r in validation.records)
    assert validation[0]["images"] is None and validation[0]["latents"] is not None


# --- in a run ---------------------------------------------------------------------------------------------

def test_validating_does_not_change_what_is_trained(tiny_sd1_dir, small_data, tmp_path):
    common = ("--validation_split", "0.5", "--max_train_epochs", "2", "--network_dropout", "0.3")
    with_validation = run_training(parse_train_args(base_args(
        tiny_sd1_dir, small_data, tmp_path / "a", *common, "--validate_every_n_steps", "1")), listeners=[])
    without = run_training(parse_train_args(base_args(
        tiny_sd1_dir, small_data, tmp_path / "b", *common, "--max_validation_steps", "0")), listeners=[])
    a, b = load_file(str(with_validation)), load_file(str(without))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cadence_steps_and_epochs(tiny_sd1_dir, small_data, tmp_path):
    recorder = RecordingListener()
    cfg = parse_train_args(base_args(tiny_sd1_dir, small_data, tmp_path, "--validation_split", "0.5",
                                     "--max_train_epochs", "3", "--validate_every_n_steps", "4",
                                     "--validate_every_n_epochs", "2"))
    run_training(cfg, listeners=[recorder])
    events = [e.data for e in recorder.of("validation")]
    assert [(e["cadence"], e["step"], e["epoch"]) for e in events] == [("step", 4, 2), ("epoch", 4, 2),
                                                                    ("epoch", 6, 3)]  # the last epoch always
    assert all(e["loss"] > 0 and isinstance(e["divergence"], float) for e in events)
    assert events[0]["loss"] == events[1]["loss"]  # same weights, same images, same noise


def test_every_epoch_by_default_into_the_events_file_and_metadata(tiny_sd1_dir, small_data, tmp_path):
    out = tmp_path / "out"
    code = main(["train", *base_args(tiny_sd1_dir, small_data, out, "--validation_split", "0.5",
                                     "--max_train_epochs", "2")])
    assert code == 0
    lines = (out / "val lora.events.jsonl").read_text(encoding="utf-8").splitlines()
    events = [e for e in map(json.loads, lines) if e["kind"] == "validation"]
    assert [(e["cadence"], e["epoch"], e["step"]) for e in events] == [("epoch", 1, 2), ("epoch", 2, 4)]
    assert all({"loss", "divergence", "time"} <= e.keys() for e in events)
    from safetensors import safe_open

    with safe_open(str(out / "val lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_validation_images"] == "2" and meta["ss_validation_split"] == "0.5"


def test_no_split_means_no_validation(tiny_sd1_dir, small_data, tmp_path):
    recorder = RecordingListener()
    run_training(parse_train_args(base_args(tiny_sd1_dir, small_data, tmp_path, "--max_train_steps", "1",
                                            "--validate_every_n_steps", "1")), listeners=[recorder])
    assert not recorder.of("validation") and recorder.of("finished")


def test_console_prints_one_line_per_validation():
    from rich.console import Console

    buffer = io.StringIO()
    listener = ConsoleListener(Console(file=buffer, width=120))
    listener.handle(Event("validation", {"cadence": "step", "step": 40, "epoch": 2, "loss": 0.12345,
                                         "divergence": 0.01}))
    listener.handle(Event("validation", {"cadence": "epoch", "step": 50, "epoch": 2, "loss": 0.2, "divergence": None}))
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 2 and "0.1235" in lines[0] and "step 40" in lines[0] and "+0.0100" in lines[0]


def test_sdxl_cached_text_encoder_outputs_cover_the_validation_images(tiny_sdxl_dir, small_data, tmp_path):
    recorder = RecordingListener()
    cfg = parse_train_args(sdxl_args(tiny_sdxl_dir, small_data, tmp_path / "out", "--cache_text_encoder_outputs",
                                     "--validation_split", "0.5", "--train_batch_size", "1"))
    run_training(cfg, listeners=[recorder])
    assert [e.data["epoch"] for e in recorder.of("validation")] == [1]
