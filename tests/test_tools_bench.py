"""trainer.tools.bench: real training steps on random-weight architectures, with speed and memory reported."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.errors import ConfigError
from trainer.presets import load_preset
from trainer.tools import bench

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
    from trainer.console import setup_logging

    setup_logging()  # as `python -m trainer bench` does: run alone, the test would see no log output at all
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

    cfg = dataclasses.replace(load_preset(str(PRESETS / "demo.toml")), gradient_accumulation_steps=2,
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
    cfg = load_preset(str(PRESETS / "sd15-8gb.toml"))
    run = bench.bench_config(cfg, family="sd15", folder=tmp_path, steps=5, resolution=(128, 64), batch_size=None)
    for name in ("train_batch_size", "gradient_checkpointing", "network_dim", "mixed_precision", "optimizer_type",
                 "cache_latents", "learning_rate", "sdpa"):
        assert getattr(run, name) == getattr(cfg, name), name
    assert run.train_data_dir == str(tmp_path / "img") and run.output_dir == str(tmp_path / "out")
    assert run.max_train_steps == 5 and run.max_train_epochs is None and run.save_every_n_epochs is None
    assert run.resolution == (128, 64) and run.min_bucket_reso <= 64 and run.max_bucket_reso >= 128
    assert bench.bench_config(cfg, family="sdxl", folder=tmp_path, steps=1, resolution=None,
                              batch_size=4).train_batch_size == 4


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


# ---------------------------------------------------------------------------------------------------------------
# --table and scripts/bench-presets.sh

REPO = PRESETS.parent


def table_rows(printed: str) -> dict[str, list[str]]:
    """The markdown table's rows by their first cell."""
    rows = [line.strip("|").split(" | ") for line in printed.splitlines() if line.startswith("| ")]
    return {row[0].strip(): [cell.strip() for cell in row] for row in rows[1:]}


def run_json(**fields) -> dict:
    """What `bench --json` writes for a run, with the fields a CUDA run fills in."""
    result = bench.BenchResult(preset="presets/sd15-6gb.toml", family="sd15", device="cuda", resolution=(512, 512),
                               batch_size=1, steps=20, mixed_precision="fp16", gradient_checkpointing=True,
                               attention="sdpa", setup_s=3.0, first_step_s=0.5, it_per_s=7.25,
                               machine={"gpu": "NVIDIA H100 80GB HBM3", "driver": "580.159.04", "torch": "2.11.0",
                                        "cuda": "13.0"})
    return {**bench.result_dict(dataclasses.replace(result, **fields)), "kind": "run"}


def write(path: Path, data: dict) -> str:
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def test_table_of_real_cpu_runs_joins_the_estimate_of_the_same_preset(tmp_path, capsys, one_thread):
    preset = fast_copy(PRESETS / "sd15-6gb.toml", tmp_path)
    files = [str(tmp_path / name) for name in ("run.json", "capped.json", "estimate.json")]
    common = ["--config", str(preset), "--family", "tiny-sd1", "--steps", "2"]
    assert bench.main([*common, "--json", files[0]]) == 0
    assert bench.main([*common, "--vram_limit", "6GB", "--json", files[1]]) == 0
    assert bench.main([*common, "--estimate", "--json", files[2]]) == 0
    capsys.readouterr()
    assert bench.main(["--table", *reversed(files)]) == 0
    printed = capsys.readouterr().out
    assert "| preset | GPU / driver | torch / CUDA | attention | resolution x batch | it/s | time to first step | " \
           "peak allocated | peak reserved | estimate (peak) | fits its card (≤ size - 0.5 GB) |" in printed
    run, estimate = (json.loads(Path(f).read_text(encoding="utf-8")) for f in (files[0], files[2]))
    rows = table_rows(printed)
    assert list(rows) == ["sd15-6gb copy", "sd15-6gb copy, capped at 6 GB"]  # uncapped first
    row = rows["sd15-6gb copy"]
    assert row[1].startswith("CPU: ") and row[2] == f"{torch.__version__} / none" and row[3] == "sdpa"
    assert row[4] == "64 x 1" and row[5] == f"{run['it_per_s']:.2f}"
    assert row[6] == f"{run['time_to_first_step_s']:.1f} s" and row[7] == row[8] == "-"
    assert row[9] == f"{max(estimate['total_gb'], estimate['caching_gb']):.2f}" != "-"
    assert row[10] == "? (no CUDA: a CPU run)"
    assert rows["sd15-6gb copy, capped at 6 GB"][9] == row[9]
    assert "- sd15-6gb copy: no CUDA run without an error" in printed  # no comment made up from a CPU run


def test_table_of_cuda_runs_says_whether_each_fits_its_card_and_suggests_the_preset_comment(tmp_path, capsys):
    files = [
        write(tmp_path / "a.json", run_json(preset="presets/sdxl-8gb.toml", peak_allocated_gb=6.4,
                                            peak_reserved_gb=7.7, resolution=(1024, 1024))),
        write(tmp_path / "b.json", run_json(preset="presets/sdxl-8gb.toml", vram_limit_gb=8.0, out_of_memory=True,
                                            error="out of memory: Tried to allocate 20.00 MiB",
                                            peak_allocated_gb=7.9, peak_reserved_gb=7.95, it_per_s=None)),
        write(tmp_path / "c.json", run_json(preset="presets\\sd15-12gb.toml", peak_allocated_gb=7.1,
                                            peak_reserved_gb=8.0, batch_size=4)),
        write(tmp_path / "d.json", run_json(peak_allocated_gb=2.31, peak_reserved_gb=2.62)),
        write(tmp_path / "e.json", run_json(preset="presets/sd2-8gb.toml", error="RuntimeError: bad | thing\nmore",
                                            it_per_s=None)),
        # an estimate written before "preset" was in the file: named by its file
        write(tmp_path / "estimate-sdxl-8gb.json", {"parameters_gb": 5.1, "total_gb": 6.01, "caching_gb": 2.82}),
    ]
    assert bench.main(["--table", *files]) == 0
    printed = capsys.readouterr().out
    rows = table_rows(printed)
    assert list(rows) == ["sd15-6gb", "sd15-12gb", "sd2-8gb", "sdxl-8gb", "sdxl-8gb, capped at 8 GB"]
    assert rows["sd15-6gb"][1:3] == ["NVIDIA H100 80GB HBM3 / 580.159.04", "2.11.0 / 13.0"]
    assert rows["sd15-6gb"][5:11] == ["7.25", "3.5 s", "2.31", "2.62", "-", "yes (3.12 of 6 GB)"]
    assert rows["sd15-12gb"][4] == "512 x 4" and rows["sd15-12gb"][10] == "yes (8.50 of 12 GB)"
    assert rows["sdxl-8gb"][9] == "6.01" and rows["sdxl-8gb"][10] == "**no** (8.20 of 8 GB)"
    capped = rows["sdxl-8gb, capped at 8 GB"]
    assert capped[5] == "**out of memory**" and capped[10].startswith("**no**: out of memory: Tried to allocate")
    assert rows["sd2-8gb"][5] == "**error**" and rows["sd2-8gb"][10] == r"? (failed: RuntimeError: bad \| thing more)"
    assert "# Expected peak VRAM: about 3.1 GB on the card (2.3 GB allocated by training, 512 px, batch 1)" in printed
    assert "#   python -m trainer bench --config presets/sd15-6gb.toml   (on NVIDIA H100 80GB HBM3" in printed
    assert "about 8.2 GB on the card (6.4 GB allocated by training, 1024 px, batch 1)" in printed  # uncapped run
    assert "- sd2-8gb: no CUDA run without an error" in printed


def test_a_failing_run_still_writes_its_json(tmp_path, monkeypatch, capsys):
    preset = fast_copy(PRESETS / "sd15-6gb.toml", tmp_path)
    out = tmp_path / "failed.json"
    failures = iter([RuntimeError("CUDA error: out of memory\nmore"), ValueError("broken thing")])

    def failing_run(*args, **kwargs):
        raise next(failures)

    monkeypatch.setattr(bench, "_run", failing_run)
    args = ["--config", str(preset), "--family", "tiny-sd1", "--json", str(out)]
    assert bench.main(args) == 1
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["out_of_memory"] is True and data["error"] == "out of memory: CUDA error: out of memory"
    assert bench.main(args) == 1
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["out_of_memory"] is False and data["error"] == "ValueError: broken thing"
    assert "FAILED" in capsys.readouterr().out


def test_table_and_config_arguments_are_user_errors(tmp_path):
    with pytest.raises(ConfigError, match="--config is required"):
        bench.main([])
    (tmp_path / "x.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="not a bench result"):
        bench.main(["--table", str(tmp_path / "x.json")])
    with pytest.raises(ConfigError, match="cannot read it as JSON"):
        bench.main(["--table", str(tmp_path / "missing.json")])


def test_bench_presets_script_is_bash_with_lf_and_parses():
    script = REPO / "scripts" / "bench-presets.sh"
    data = script.read_bytes()
    assert b"\r" not in data and data.startswith(b"#!/usr/bin/env bash\n") and b"set -euo pipefail" in data
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_bench_presets_script_measures_each_preset_and_writes_the_table(tmp_path):
    """End to end on a CPU with the tiny model: a good preset (in a folder with a space) and a broken one,
    whose failures must not stop the rest and still appear in the table."""
    folder = tmp_path / "my presets"
    folder.mkdir()
    good = fast_copy(PRESETS / "sd15-6gb.toml", folder).rename(folder / "sd15-6gb.toml")
    bad = folder / "bad-8gb.toml"
    bad.write_text("not_an_argument = 1\n", encoding="utf-8")
    out = tmp_path / "結果 out"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "BENCH_ARGS": "--family tiny-sd1 --steps 1"}
    done = subprocess.run(["bash", "scripts/bench-presets.sh", str(out), str(good), str(bad)], cwd=REPO, env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr  # the bad preset failed, the rest still ran
    names = ("sd15-6gb", "sd15-6gb-capped", "sd15-6gb-estimate", "bad-8gb", "bad-8gb-capped", "bad-8gb-estimate")
    for name in names:
        assert (out / f"{name}.json").is_file() and (out / f"{name}.log").is_file(), name
    good_run = json.loads((out / "sd15-6gb-capped.json").read_text(encoding="utf-8"))
    assert good_run["error"] is None and good_run["vram_limit_gb"] == 6 and good_run["steps"] == 1
    table = (out / "table.md").read_text(encoding="utf-8")
    assert table in done.stdout
    rows = table_rows(table)
    assert list(rows) == ["bad-8gb", "bad-8gb, capped at 8 GB", "sd15-6gb", "sd15-6gb, capped at 6 GB"]
    assert rows["sd15-6gb"][4] == "64 x 1" and rows["sd15-6gb"][9] != "-"  # the estimate joined in
    assert rows["bad-8gb"][5] == "**error**" and "not_an_argument" in rows["bad-8gb"][10]
    assert rows["bad-8gb"][9] == "error"  # its estimate failed too
