"""trainer.bench: real training steps on random-weight architectures, with speed and memory reported."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from trainer import bench
from trainer.errors import ConfigError

PRESETS = Path(__file__).resolve().parents[1] / "presets"


@pytest.fixture
def one_thread():
    """On a shared 2-core machine torch's two threads wait for each other at every operation (a tiny step then
    takes seconds): these tests measure with one thread, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fast_copy(preset: Path, folder: Path) -> Path:
    """The preset without data-loader worker processes (their start-up would dominate a 2-step test)."""
    text = preset.read_text(encoding="utf-8")
    text = text.replace("max_data_loader_n_workers = 2", "max_data_loader_n_workers = 0")
    text = text.replace("max_data_loader_n_workers = 1", "max_data_loader_n_workers = 0")
    target = folder / f"{preset.stem} copy.toml"
    target.write_text(text, encoding="utf-8")
    return target


def test_cpu_bench_runs_real_steps_of_a_preset_and_writes_json(tmp_path, capsys, one_thread):
    preset = fast_copy(PRESETS / "sd15-6gb.toml", tmp_path)
    out = tmp_path / "結果 bench.json"
    code = bench.main(["--config", str(preset), "--family", "tiny-sd1", "--steps", "3", "--vram_limit", "6GB",
                       "--json", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "it/s" in printed and "time to first step" in printed and "peak RSS" in printed
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["steps"] == 3 and len(result["step_times_s"]) == 3 and result["it_per_s"] > 0
    assert result["resolution"] == [64, 64] and result["batch_size"] == 1 and result["family"] == "tiny-sd1"
    assert result["gradient_checkpointing"] is True and result["attention"] == "sdpa"  # the preset's settings
    assert result["time_to_first_step_s"] >= result["first_step_s"] > 0
    assert result["peak_allocated_gb"] is None and result["peak_rss_gb"] > 0  # no CUDA here
    assert result["final_loss"] is not None and result["error"] is None
    assert result["machine"]["torch"] == torch.__version__ and result["machine"]["torch_threads"] == 1
    assert "vram_limit applies to CUDA GPUs only" in captured.out + captured.err  # said, not silently ignored


def test_run_steps_counts_optimizer_steps_with_gradient_accumulation(tmp_path, one_thread):
    from trainer.train.events import Reporter

    cfg = dataclasses.replace(bench.load_preset(str(PRESETS / "demo.toml")), gradient_accumulation_steps=2,
                              max_data_loader_n_workers=0)
    cfg = bench.bench_config(cfg, family="tiny-sd1", folder=tmp_path, steps=2, resolution=(64, 64), batch_size=1)
    bench.write_pictures(Path(cfg.train_data_dir), (64, 64), count=2, caption_extension=cfg.caption_extension)
    models = bench.build_random_models("tiny-sd1", dtype=torch.float32, vae_dtype=torch.float32, device="cpu")
    setup = bench.prepare_with_models(cfg, models, Reporter())
    losses: list = []
    times = bench.run_steps(setup, 2, losses)
    assert len(times) == 2 and len(losses) == 4  # 2 optimizer steps of 2 micro-batches each
    steps_taken = {int(state["step"]) for state in setup.optimizer.state.values()}
    assert steps_taken == {2}


def test_bench_config_keeps_the_preset_settings_and_replaces_data_output_and_length(tmp_path):
    cfg = bench.load_preset(str(PRESETS / "sd15-8gb.toml"))
    run = bench.bench_config(cfg, family="sd15", folder=tmp_path, steps=5, resolution=(128, 64), batch_size=None)
    for name in ("train_batch_size", "gradient_checkpointing", "network_dim", "mixed_precision", "optimizer_type",
                 "cache_latents", "learning_rate", "sdpa"):
        assert getattr(run, name) == getattr(cfg, name), name
    assert run.train_data_dir == str(tmp_path / "img") and run.output_dir == str(tmp_path / "out")
    assert run.max_train_steps == 5 and run.max_train_epochs is None and run.save_every_n_epochs is None
    assert run.resolution == (128, 64) and run.min_bucket_reso <= 64 and run.max_bucket_reso >= 128
    assert bench.bench_config(cfg, family="sdxl", folder=tmp_path, steps=1, resolution=None,
                              batch_size=4).train_batch_size == 4


def test_family_comes_from_the_config():
    cfg = bench.load_preset(str(PRESETS / "sd15-6gb.toml"))
    assert bench.family_for_config(cfg) == "sd15"
    assert bench.family_for_config(bench.load_preset(str(PRESETS / "demo.toml"))) == "tiny-sd1"
    assert bench.family_for_config(dataclasses.replace(cfg, sdxl=True)) == "sdxl"
    assert bench.family_for_config(dataclasses.replace(cfg, v2=True, v_parameterization=True)) == "sd2-768-v"
    assert bench.family_for_config(dataclasses.replace(cfg, v2=True)) == "sd2-512"


def test_full_size_sd15_is_built_for_the_bench_without_memory_on_the_meta_device():
    models = bench.build_random_models("sd15", dtype=torch.float16, vae_dtype=torch.float32, device="meta")
    assert sum(p.numel() for p in models.unet.parameters()) == 859_520_964
    assert {p.dtype for p in models.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in models.vae.parameters()} == {torch.float32}  # --no_half_vae
    assert models.family == "sd1" and models.latent_scale == 0.18215 and len(models.tokenizers) == 1
    assert models.unet.device.type == "meta"


def test_estimate_prints_without_running_anything(tmp_path, capsys):
    out = tmp_path / "estimate.json"
    assert bench.main(["--config", str(PRESETS / "demo.toml"), "--estimate", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "expected peak allocated" in printed and "card needs about" in printed and "8 GB: yes" in printed
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["total_gb"] == pytest.approx(data["parameters_gb"] + data["optimizer_gb"] + data["activations_gb"])
    assert data["needs_card_gb"] > data["total_gb"] and data["details"]["family"] == "tiny-sd1"


def test_bad_arguments_are_user_errors(tmp_path):
    assert bench.parse_size_gb("6GB") == 6 and bench.parse_size_gb("7.5 GiB") == 7.5
    assert bench.parse_size_gb("6144MB") == 6
    assert bench.parse_resolution("512") == (512, 512) and bench.parse_resolution("512,768") == (512, 768)
    for bad in ("six", "0GB"):
        with pytest.raises(ConfigError, match="vram_limit"):
            bench.parse_size_gb(bad)
    for bad in ("500", "512x512", "0"):
        with pytest.raises(ConfigError, match="multiples of 64"):
            bench.parse_resolution(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        bench.main(["--config", str(tmp_path / "missing.toml")])
