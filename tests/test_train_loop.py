"""The training loop's per-step path: no value is read back from the device between reports (each read would make
the CPU wait for the GPU), and what is read late still stops the run in time, naming the right step."""

import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import NanVae, make_image
from torch.overrides import TorchFunctionMode

from trainer.config.args import parse_train_args
from trainer.errors import UserError
from trainer.train import loop
from trainer.train.build import prepare_training
from trainer.train.events import RecordingListener, Reporter
from trainer.train.loop import StepMeter
from trainer.train.run import run_training
from trainer.train.step import LatentNaNs, NonFiniteLoss, batch_latents

# Tensor methods that copy a value to the host; on a GPU each one waits for every queued kernel.
READS_BACK = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__format__", "__repr__", "cpu",
              "numpy", "nonzero", "masked_select", "unique"}
# CPU tensors by design, on a GPU too: the optimizers' step counters, the DataLoader's shuffling generator.
CPU_BY_DESIGN = (str(Path("torch", "optim")), str(Path("torch", "utils", "data")))


class DeviceReads(TorchFunctionMode):
    """Records where tensor values are read back to Python (file:line of the caller), except while paused.
    torch.cuda.set_sync_debug_mode finds the same on a GPU, but only there; this works on the CPU."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []
        self.paused = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        boolean_mask = name == "__getitem__" and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool
        if not self.paused and (name in READS_BACK or boolean_mask):
            caller = sys._getframe(1)
            where = f"{caller.f_code.co_filename}:{caller.f_lineno}"
            if not any(part in caller.f_code.co_filename for part in CPU_BY_DESIGN):
                self.found.append(f"{name} at {where}")
        return func(*args, **(kwargs or {}))

    def allow(self, function):
        """`function` with reads allowed while it runs (the loop's report-time reads, saving)."""
        def allowed(*args, **kwargs):
            self.paused += 1
            try:
                return function(*args, **kwargs)
            finally:
                self.paused -= 1
        return allowed


def args(model_dir, data_dir, out_dir, *extra):
    return ["--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(data_dir),
            "--output_dir", str(out_dir), "--output_name", "lora", "--resolution", "64", "--caption_extension",
            ".txt", "--network_dim", "4", "--learning_rate", "1e-3", "--max_train_steps", "6",
            "--train_batch_size", "1", "--seed", "1", "--max_data_loader_n_workers", "0", *extra]


# Every per-step feature that could be written with a sync: noise offset with a random strength, pyramid noise,
# input perturbation, Min-SNR, Huber loss, --scale_weight_norms, rank and neuron dropout, gradient accumulation,
# clipping, and latents encoded by the VAE at every step (NaN check).
FEATURES = ("--noise_offset", "0.05", "--noise_offset_random_strength", "--adaptive_noise_scale", "0.01",
            "--multires_noise_iterations", "3", "--ip_noise_gamma", "0.1", "--ip_noise_gamma_random_strength",
            "--min_snr_gamma", "5", "--loss_type", "huber", "--huber_schedule", "snr", "--scale_weight_norms", "1",
            "--network_dropout", "0.1", "--network_args", "rank_dropout=0.1", "--gradient_accumulation_steps", "2",
            "--max_grad_norm", "1")


def train_watched(cfg, monkeypatch) -> tuple[DeviceReads, RecordingListener]:
    events = RecordingListener()
    reporter = Reporter([events])
    setup = prepare_training(cfg, reporter)
    reads = DeviceReads()
    monkeypatch.setattr(StepMeter, "check", reads.allow(StepMeter.check))
    setup.saver.final = reads.allow(setup.saver.final)
    with reads:
        loop.train(setup, reporter)
    return reads, events


def test_steps_read_nothing_back_from_the_device_between_reports(tiny_sd1_dir, train_data_dir, tmp_path,
                                                                  monkeypatch):
    cfg = parse_train_args(args(tiny_sd1_dir, train_data_dir, tmp_path / "out", *FEATURES))
    reads, events = train_watched(cfg, monkeypatch)
    assert reads.found == []
    steps = [entry for event in events.of("step") for entry in event.data["steps"]]
    assert [entry["step"] for entry in steps] == list(range(1, 7))  # every step still reaches the trackers
    scaled, mean_norm, max_norm = steps[-1]["max_norm"]  # read at report time, as python numbers
    assert isinstance(scaled, int) and 0 < mean_norm <= max_norm


def test_the_check_would_catch_a_read_added_to_a_step(tiny_sd1_dir, train_data_dir, tmp_path, monkeypatch):
    real = loop.compute_loss

    def logs_its_loss(setup, batch, **kwargs):
        loss = real(setup, batch, **kwargs)
        logging.getLogger("test").debug("loss %.3f", float(loss.detach()))  # the kind of line that stalls a GPU
        return loss

    monkeypatch.setattr(loop, "compute_loss", logs_its_loss)
    cfg = parse_train_args(args(tiny_sd1_dir, train_data_dir, tmp_path / "out", "--max_train_steps", "2"))
    reads, _ = train_watched(cfg, monkeypatch)
    assert len(reads.found) == 2 and all("__float__ at " in f and "test_train_loop.py" in f for f in reads.found)


def test_a_nan_loss_stops_the_run_naming_its_step_before_a_file_is_written(tiny_sd1_dir, train_data_dir,
                                                                              tmp_path, monkeypatch):
    real, calls = loop.compute_loss, []

    def nan_from_step_3(setup, batch, **kwargs):
        calls.append(1)
        loss = real(setup, batch, **kwargs)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(loop, "compute_loss", nan_from_step_3)
    monkeypatch.setattr(StepMeter, "due", lambda self, step: step == self.total_steps)  # no report before the end
    out = tmp_path / "out"
    cfg = parse_train_args(args(tiny_sd1_dir, train_data_dir, out, "--save_every_n_steps", "2"))
    with pytest.raises(UserError, match=r"the loss became nan at step 3\b"):
        run_training(cfg, listeners=[])
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["lora-step00000002.safetensors"]


def test_ctrl_c_after_a_nan_not_read_yet_writes_no_file(tiny_sd1_dir, train_data_dir, tmp_path, monkeypatch):
    """Fast steps: the NaN of step 3 is still on the device when Ctrl-C (or the GUI's Stop) comes in step 5;
    the interrupted save must not write the broken weights."""
    real, calls = loop.compute_loss, []

    def nan_then_ctrl_c(setup, batch, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        loss = real(setup, batch, **kwargs)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(loop, "compute_loss", nan_then_ctrl_c)
    monkeypatch.setattr(StepMeter, "due", lambda self, step: step == self.total_steps)  # no read before Ctrl-C
    out = tmp_path / "out"
    recorder = RecordingListener()
    cfg = parse_train_args(args(tiny_sd1_dir, train_data_dir, out))
    with pytest.raises(UserError, match=r"the loss became nan at step 3\b.*files saved before it are fine"):
        run_training(cfg, listeners=[recorder])
    assert not list(out.glob("*.safetensors")) and not recorder.of("interrupted") and recorder.of("failed")


def test_weights_that_went_non_finite_with_a_finite_loss_are_not_written(tiny_sd1_dir, train_data_dir, tmp_path,
                                                                          monkeypatch):
    real_step, steps = loop.micro_step, []

    def poison_after_step_2(setup, batch, run=None):
        loss = real_step(setup, batch, run)
        steps.append(1)
        if len(steps) == 2:  # e.g. inf gradients in bf16: the loss was fine, the update was not
            with torch.no_grad():
                next(iter(setup.network.parameters())).fill_(float("inf"))
        return loss

    monkeypatch.setattr(loop, "micro_step", poison_after_step_2)
    out = tmp_path / "out"
    cfg = parse_train_args(args(tiny_sd1_dir, train_data_dir, out, "--max_train_steps", "4",
                                "--save_every_n_steps", "1"))
    with pytest.raises(UserError, match=r"LoRA weights became non-finite by step 2\b"):
        run_training(cfg, listeners=[])
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["lora-step00000001.safetensors"]


def test_step_meter_reads_once_keeps_values_for_the_report_and_names_the_nan_step():
    meter = StepMeter(10, refresh_seconds=1e9, window=2)
    for step, loss in ((1, 1.0), (2, 3.0)):
        meter.add(torch.tensor(loss))
        meter.mark(step, 1, [0.1], max_norm=torch.tensor([1.0, 0.5, 0.75]))
    meter.check(2)  # e.g. before a save: the values are read, not lost
    assert meter.losses == [] and meter.values == [1.0, 3.0]
    data = meter.read(2)
    assert data["loss"] == 2.0
    assert [(s["step"], s["loss"], s["average"], s["max_norm"]) for s in data["steps"]] == [
        (1, 1.0, 1.0, (1, 0.5, 0.75)), (2, 3.0, 2.0, (1, 0.5, 0.75))]
    meter.add(torch.tensor(float("inf")))
    meter.mark(3, 1, [0.1])
    meter.add(torch.tensor(float("nan")))  # step 4, not marked yet
    with pytest.raises(NonFiniteLoss, match="became inf at step 3"):
        meter.check(4)


def test_nan_latents_are_zeroed_at_once_and_reported_once_per_run_when_checked(caplog):
    batch = {"latents": None, "images": torch.zeros(1, 3, 64, 64), "image_paths": ["a.png"]}
    with caplog.at_level(logging.WARNING, logger="trainer"):
        for run in range(2):
            nans = LatentNaNs()
            for _step in range(3):
                latents = batch_latents(batch, NanVae(torch.float32), 0.18, "cpu", torch.float32, nans=nans)
                assert torch.count_nonzero(latents) == 0
            assert caplog.text.count("NaN latents") == run  # nothing said (nothing read) before the check
            nans.check()
            assert caplog.text.count("NaN latents") == run + 1  # once per run, not per batch or per process


def test_nan_latents_from_an_fp16_sdxl_vae_stop_at_the_check():
    batch = {"latents": None, "images": torch.zeros(1, 3, 64, 64), "image_paths": ["b.png"]}
    nans = LatentNaNs()
    batch_latents(batch, NanVae(torch.float16), 0.13025, "cpu", torch.float32, family="sdxl", nans=nans)
    with pytest.raises(UserError, match="--no_half_vae"):
        nans.check()


def test_the_save_check_agrees_across_processes_except_when_they_stop_apart():
    from types import SimpleNamespace

    reduced = []

    class TwoProcesses:
        num_processes = 2

        def reduce(self, value, reduction):
            reduced.append(reduction)
            return value * 0.5  # the other process reported a non-finite loss or weights

    weight = torch.nn.Parameter(torch.ones(2))
    setup = SimpleNamespace(accelerator=TwoProcesses(), network=torch.nn.ParameterList([weight]))
    run = loop.RunState(setup)
    with pytest.raises(NonFiniteLoss, match="another process"):
        loop.check_finite(setup, StepMeter(4), run, 2)  # this process is fine, and stops with the other
    run.stopping = True  # Ctrl-C / out of memory: the other process may be anywhere, so no collective
    loop.check_finite(setup, StepMeter(4), run, 3)
    assert reduced == ["mean"]


def test_with_several_processes_a_refresh_keeps_the_nan_for_the_next_save_check():
    meter = StepMeter(10, refresh_seconds=0.0)
    meter.stop_at_read = False  # several processes: one of them must not stop alone at a console refresh
    meter.add(torch.tensor(1.0))
    meter.mark(1, 1, [0.1])
    meter.add(torch.tensor(float("nan")))
    meter.mark(2, 1, [0.1])
    assert math.isnan(meter.read(2)["loss"])  # shown as nan, and the run goes on ...
    meter.add(torch.tensor(1.0))
    with pytest.raises(NonFiniteLoss, match="nan at step 2"):  # ... until the save check, which all reach
        meter.check(3)


def test_a_picture_that_decodes_only_partly_stops_the_run_before_the_model_loads(tiny_sd1_dir, train_data_dir,
                                                                                    tmp_path, monkeypatch):
    """Its header is fine, so the size scan passes; the start-up decode of every picture finds it."""
    from trainer.errors import DatasetError
    from trainer.train import build

    picture = train_data_dir / "10_sks shape" / "img_1.png"
    make_image(picture, size=(256, 256), seed=7)
    data = picture.read_bytes()
    picture.write_bytes(data[:len(data) // 2])
    monkeypatch.setattr(build, "load_models", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = parse_train_args(args(tiny_sd1_dir, train_data_dir, tmp_path / "out"))
    with pytest.raises(DatasetError, match="1 picture\\(s\\) cannot be decoded") as caught:
        run_training(cfg, listeners=[])
    assert str(picture) in str(caught.value) and "decoded to the end" in str(caught.value)


def test_a_picture_unreadable_mid_run_keeps_the_steps_so_far(tiny_sd1_dir, train_data_dir, tmp_path, monkeypatch):
    """A picture that cannot be read when its batch comes (replaced or damaged after the start-up check) stops
    the run there; the steps before it used to be thrown away (Ctrl-C kept them)."""
    from trainer.data import dataset as dataset_module
    from trainer.errors import DatasetError

    real, calls = dataset_module.load_image, []

    def breaks_on_the_fifth(path, **kwargs):
        calls.append(path)
        if len(calls) == 5:  # accelerate reads one batch ahead: this is step 4's
            raise DatasetError(f"Cannot read image {path} (image file is truncated).")
        return real(path, **kwargs)

    monkeypatch.setattr(dataset_module, "load_image", breaks_on_the_fifth)
    out = tmp_path / "out"
    cfg = parse_train_args(args(tiny_sd1_dir, train_data_dir, out, "--save_state"))
    with pytest.raises(DatasetError, match=r"truncated[\s\S]*The 3 step\(s\) trained before it are saved") as e:
        run_training(cfg, listeners=[])
    assert "--resume" in str(e.value) and "-step00000003-state" in str(e.value)
    assert (out / "lora-step00000003.safetensors").is_file() and (out / "lora-step00000003-state").is_dir()
