"""Experiment trackers (--logging_dir, --log_with): sd-scripts' TensorBoard tags and run folders, wandb calls,
and a missing package costing one warning instead of the run."""

import logging
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import make_dreambooth_folder
from test_train_run import base_args

from trainer.cli import main
from trainer.config.args import parse_train_args
from trainer.errors import ConfigError
from trainer.train.events import RecordingListener
from trainer.train.loop import StepMeter
from trainer.train.run import run_training
from trainer.train.trackers import run_dir, step_tags, tracker_init_kwargs, tracker_listeners


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def only_run_folder(logging_dir: Path) -> Path:
    runs = list(logging_dir.iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def test_run_folder_is_prefix_and_local_timestamp(tmp_path):
    now = time.mktime((2024, 1, 2, 3, 4, 5, 0, 0, -1))
    assert run_dir(tmp_path / "ログ dir", "my run-", now) == tmp_path / "ログ dir" / "my run-20240102030405"
    assert run_dir("logs", None, now) == Path("logs") / "20240102030405"


def test_lr_tags_keep_sd_scripts_for_else_quirk():
    entry = {"loss": 0.5, "average": 0.4, "lr": [1e-4, 2e-4], "d": None, "max_norm": None}
    tags = step_tags(entry, ["textencoder", "unet"], train_unet_only=False)
    assert tags == {"loss/current": 0.5, "loss/average": 0.4, "lr/textencoder": 1e-4, "lr/unet": 2e-4,
                    "lr/group1": 2e-4}
    unet_only = step_tags({**entry, "lr": [3e-4], "d": [2.0], "max_norm": (1, 0.5, 0.9)}, ["unet"], True)
    assert unet_only == {"loss/current": 0.5, "loss/average": 0.4, "lr/unet": 3e-4, "lr/d*lr/unet": 6e-4,
                         "lr/group0": 3e-4, "lr/d*lr/group0": 6e-4, "max_norm/keys_scaled": 1.0,
                         "max_norm/max_key_norm": 0.9, "norm/avg_key_norm": 0.5}


def test_step_meter_hands_every_step_since_the_last_read():
    meter = StepMeter(10, window=3)
    for step, losses in ((1, (1.0, 2.0)), (2, (3.0, 4.0))):  # two micro-batches per optimizer step
        for loss in losses:
            meter.add(torch.tensor(loss))
        meter.mark(step, 1, [0.1])
    meter.add(torch.tensor(5.0))  # first micro-batch of step 3, not finished
    data = meter.read(2)
    assert data["loss"] == 3.0
    assert [(s["step"], s["loss"], s["average"]) for s in data["steps"]] == [(1, 2.0, 1.5), (2, 4.0, 3.0)]
    meter.add(torch.tensor(6.0))
    meter.mark(3, 2, [0.1])
    assert [(s["step"], s["epoch"], s["average"]) for s in meter.read(3)["steps"]] == [(3, 2, 5.0)]


def test_log_with_tensorboard_needs_logging_dir(tiny_sd1_dir, train_data_dir, tmp_path):
    with pytest.raises(ConfigError, match="--logging_dir"):
        parse_train_args(base_args(tiny_sd1_dir, train_data_dir, tmp_path, "--log_with", "all"))


def test_tracker_config_toml_replaces_wandb_run_name(tmp_path):
    toml_file = tmp_path / "トラッカー.toml"
    toml_file.write_text('[wandb]\nentity = "me"\ntags = ["a"]\n', encoding="utf-8")
    cfg = types.SimpleNamespace(log_tracker_config=None, wandb_run_name="run 1")
    assert tracker_init_kwargs(cfg) == {"wandb": {"name": "run 1"}}
    cfg.log_tracker_config = str(toml_file)
    assert tracker_init_kwargs(cfg) == {"wandb": {"entity": "me", "tags": ["a"]}}
    toml_file.write_text("[wandb\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="log_tracker_config"):
        tracker_init_kwargs(cfg)


def test_tensorboard_logs_sd_scripts_tags_every_step(tiny_sd1_dir, train_data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    logs = tmp_path / "ログ folder"
    assert main(["train", *base_args(tiny_sd1_dir, train_data_dir, tmp_path / "out", "--logging_dir", str(logs),
                                     "--log_prefix", "sks-")]) == 0
    run = only_run_folder(logs)
    assert run.name.startswith("sks-") and len(run.name) == len("sks-") + 14 and run.name[4:].isdigit()
    scalars = read_scalars(run / "network_train")
    assert {"loss/current", "loss/average", "lr/textencoder", "lr/unet", "lr/group1",
            "loss/epoch_average"} == set(scalars)
    assert [step for step, _ in scalars["loss/current"]] == [1, 2, 3, 4]  # every step, not only reported ones
    assert all(value > 0 for _, value in scalars["loss/current"])
    assert [step for step, _ in scalars["loss/epoch_average"]] == [1]
    assert scalars["loss/epoch_average"][0][1] == pytest.approx(scalars["loss/average"][-1][1])
    assert scalars["lr/unet"][0][1] == pytest.approx(1e-3)


def test_tensorboard_unet_only_max_norm_and_validation(tiny_sd1_dir, tmp_path):
    pytest.importorskip("tensorboard")
    data = tmp_path / "学習 data"
    make_dreambooth_folder(data, "1_sks shape", n=4)  # validation_split 0.5: 2 images, batch 1: 2 steps/epoch
    logs = tmp_path / "logs"
    cfg = parse_train_args(base_args(tiny_sd1_dir, data, tmp_path / "out", "--train_batch_size", "1",
                                     "--network_train_unet_only", "--scale_weight_norms", "1.0",
                                     "--validation_split", "0.5", "--validate_every_n_steps", "3",
                                     "--logging_dir", str(logs), "--log_tracker_name", "my tracker",
                                     "--log_config"))
    run_training(cfg, listeners=[])
    folder = only_run_folder(logs) / "my tracker"
    scalars = read_scalars(folder)
    assert "lr/textencoder" not in scalars and {"lr/unet", "lr/group0"} <= set(scalars)
    assert [s for s, _ in scalars["max_norm/keys_scaled"]] == [1, 2, 3, 4] and "norm/avg_key_norm" in scalars
    assert [s for s, _ in scalars["loss/epoch_average"]] == [1, 2]
    assert [s for s, _ in scalars["loss/validation/epoch_average"]] == [1, 2]
    assert [s for s, _ in scalars["loss/validation/epoch_divergence"]] == [1, 2]
    assert [s for s, _ in scalars["loss/validation/step_average"]] == [3]
    assert [p for p in folder.iterdir() if p.is_dir()]  # --log_config: hparams, as accelerate writes them


def test_missing_tensorboard_warns_once_and_trains(tiny_sd1_dir, train_data_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes its import fail
    logs = tmp_path / "logs"
    cfg = parse_train_args(base_args(tiny_sd1_dir, train_data_dir, tmp_path / "out", "--logging_dir", str(logs),
                                     "--max_train_steps", "2"))
    recorder = RecordingListener()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        final = run_training(cfg, listeners=[recorder])
    assert final.exists() and recorder.of("finished")
    warnings = [r.getMessage() for r in caplog.records if "tensorboard" in r.getMessage().lower()]
    assert len(warnings) == 1 and "pip install tensorboard" in warnings[0]
    assert not logs.exists()


class FakeWandb:
    def __init__(self):
        self.calls, self.logged = [], []

    def login(self, key):
        self.calls.append(("login", key))

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return types.SimpleNamespace(log=self.logged.append, finish=lambda: self.calls.append(("finish",)))


def test_wandb_gets_run_name_key_and_steps(tiny_sd1_dir, train_data_dir, tmp_path, monkeypatch):
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setenv("WANDB_DIR", "unchanged")
    cfg = parse_train_args(base_args(tiny_sd1_dir, train_data_dir, tmp_path / "out", "--log_with", "wandb",
                                     "--wandb_api_key", "secret", "--wandb_run_name", "run 1", "--log_config",
                                     "--max_train_steps", "2"))
    run_training(cfg, listeners=[])
    assert wandb.calls[0] == ("login", "secret") and wandb.calls[-1] == ("finish",)
    init = wandb.calls[1][1]
    assert init["project"] == "network_train" and init["name"] == "run 1"
    assert init["config"]["network_dim"] == 4
    assert "wandb_api_key" not in init["config"] and "train_data_dir" not in init["config"]
    steps = [(e["global_step"], e["epoch"]) for e in wandb.logged if "loss/current" in e]
    assert steps == [(1, 1), (2, 1)]
    assert any("loss/epoch_average" in e for e in wandb.logged)


def test_missing_wandb_warns_once(tmp_path, monkeypatch, caplog, tiny_sd1_dir, train_data_dir):
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = parse_train_args(base_args(tiny_sd1_dir, train_data_dir, tmp_path, "--log_with", "wandb"))
    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert tracker_listeners(cfg) == []
    assert [r.getMessage() for r in caplog.records if "pip install wandb" in r.getMessage()] != []
    assert len(caplog.records) == 1
