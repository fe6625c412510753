"""`python -m trainer bench --config PRESET`: speed and peak memory of a preset, with nothing downloaded.

The preset's model family is built full-size from the shipped configs with random weights (directly on the
device, in the training dtype), pictures are generated at the preset's resolution, and N optimizer steps run
through the training code itself: trainer.train.build's parts, `compute_loss`, `accelerator.backward`, the
optimizer and scheduler, as `trainer.train.loop.train` calls them. Reported: time to the first step, it/s (the
median step after warm-up), peak allocated and reserved VRAM (CUDA), peak RSS, and the machine.

`--estimate` runs nothing: it prints trainer.tools.memory's estimate, so "does this preset fit my card" can be asked
before a model is downloaded. `--vram_limit 6GB` caps this process's share of a bigger card (torch's
per-process memory fraction) to stand in for a small one. `--table FILE.json ...` turns the JSONs of runs and
estimates (scripts/bench-presets.sh writes them) into the GPU table of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from trainer.errors import ConfigError, UserError
from trainer.files import atomic_write_text
from trainer.models.families import FAMILY_OF, architecture_for_config, build_architecture
from trainer.models.load import models_from_parts
from trainer.presets import DEFAULT_NETWORK_DIM, load_preset, memory_advice
from trainer.tools.bench_table import print_utf8, read_bench_files, table_markdown
from trainer.tools.memory import estimate_for_config
from trainer.train.build import prepare_training
from trainer.train.events import RecordingListener, Reporter
from trainer.train.loop import RunState, apply_max_norm, micro_step
from trainer.train.resolve import weight_dtype_for

log = logging.getLogger(__name__)

GIB = 2**30
CPU_RESOLUTION = 64  # a full-size UNet step on a CPU takes tens of seconds at 512 px
STANDARD_CARDS_GB = (6, 8, 12, 16, 24)


@dataclass
class BenchResult:
    """One benchmark run; every field goes to --json."""

    preset: str
    family: str
    device: str
    resolution: tuple[int, int]
    batch_size: int
    steps: int
    mixed_precision: str
    gradient_checkpointing: bool
    attention: str = "?"
    model_build_s: float = 0.0  # random initialisation; stands in for loading, not comparable to it
    setup_s: float = 0.0  # dataset, latent caching, LoRA network, optimizer
    first_step_s: float = 0.0
    step_times_s: list[float] = field(default_factory=list)
    it_per_s: float | None = None
    peak_allocated_gb: float | None = None
    peak_reserved_gb: float | None = None
    setup_peak_allocated_gb: float | None = None  # before the first step (latent caching)
    peak_rss_gb: float | None = None
    vram_limit_gb: float | None = None
    final_loss: float | None = None
    out_of_memory: bool = False
    error: str | None = None
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def time_to_first_step_s(self) -> float:
        return self.setup_s + self.first_step_s


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a training TOML (e.g. presets/sd15-8gb.toml)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps to run (default 10 on a GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of it/s (default 1)")
    p.add_argument("--resolution", type=str, default=None,
                   help=f'"W" or "W,H" (default: the preset\'s on a GPU, {CPU_RESOLUTION} on CPU)')
    p.add_argument("--batch_size", type=int, default=None, help="override the preset's train_batch_size")
    p.add_argument("--family", choices=sorted(FAMILY_OF), default=None,
                   help="architecture to build (default: the preset's, from --sdxl / --v2 / builtin:tiny-sd1)")
    p.add_argument("--vram_limit", type=str, default=None, help='cap this process\'s VRAM, e.g. "6GB" (CUDA only)')
    p.add_argument("--estimate", action="store_true", help="print the memory estimate only; runs nothing")
    p.add_argument("--json", type=str, default=None, help="also write the result to this JSON file")
    p.add_argument("--table", nargs="+", metavar="FILE", default=None,
                   help="print the markdown table of docs/benchmarks.md from --json files of runs and estimates")
    return p.parse_args(list(argv))


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.table:
        print_utf8(table_markdown(read_bench_files(args.table)))
        return 0
    if not args.config:
        raise ConfigError("--config is required (a training TOML, e.g. presets/sd15-8gb.toml), unless --table is "
                          "given.")
    cfg = load_preset(args.config)
    family = args.family or architecture_for_config(cfg)
    resolution = parse_resolution(args.resolution) if args.resolution else None
    if args.estimate:
        return show_estimate(cfg, family, resolution, args.batch_size, args.json, preset=args.config)
    import torch

    if resolution is None and not torch.cuda.is_available():
        resolution = (CPU_RESOLUTION, CPU_RESOLUTION)
    steps = args.steps or (10 if torch.cuda.is_available() else 3)
    if steps < 1 or args.warmup < 0:
        raise ConfigError("--steps must be at least 1 and --warmup at least 0.")
    result = run_benchmark(cfg, preset=args.config, family=family, steps=steps, warmup=args.warmup,
                           resolution=resolution, batch_size=args.batch_size,
                           vram_limit_gb=parse_size_gb(args.vram_limit) if args.vram_limit else None)
    print_result(result, advice=memory_advice(cfg, FAMILY_OF[family], "train", result.vram_limit_gb))
    if args.json:
        write_json(args.json, result_dict(result))
    return 1 if result.error else 0


def parse_resolution(text: str) -> tuple[int, int]:
    parts = [p.strip() for p in str(text).split(",")]
    try:
        width, height = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except ValueError:
        width = height = 0
    if width <= 0 or height <= 0 or width % 64 or height % 64:
        raise ConfigError(f'--resolution "{text}": expected "W" or "W,H" in pixels, multiples of 64 (e.g. 512 or '
                          f'512,768).')
    return width, height


def parse_size_gb(text: str) -> float:
    """"6GB", "6 GiB", "5.5G", "6144MB", "6" -> GiB (a card sold as 6 GB has 6 GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(g|gb|gib|m|mb|mib)?\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f'--vram_limit "{text}": expected a size such as 6GB, 7.5GB or 6144MB.')
    value, unit = float(match.group(1)), (match.group(2) or "gb").lower()
    return value / 1024 if unit.startswith("m") else value


# ---------------------------------------------------------------------------------------------------------------
# The run


def run_benchmark(cfg, *, preset: str, family: str, steps: int, warmup: int = 1,
                  resolution: tuple[int, int] | None = None, batch_size: int | None = None,
                  vram_limit_gb: float | None = None, work_dir: Path | None = None) -> BenchResult:
    """Build, prepare and run `steps` optimizer steps; failures (OOM included) end up in result.error."""
    import torch

    with _work_folder(work_dir) as folder:
        cfg = bench_config(cfg, family=family, folder=folder, steps=steps, resolution=resolution,
                           batch_size=batch_size)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        result = BenchResult(preset=str(preset), family=family, device=str(device), resolution=tuple(cfg.resolution),
                             batch_size=cfg.train_batch_size, steps=steps, mixed_precision=cfg.mixed_precision,
                             gradient_checkpointing=cfg.gradient_checkpointing, vram_limit_gb=vram_limit_gb,
                             machine=machine_info(device))
        write_pictures(Path(cfg.train_data_dir), cfg.resolution, count=2 * cfg.train_batch_size,
                       caption_extension=cfg.caption_extension)
        try:
            _limit_vram(vram_limit_gb, device)
            _run(cfg, family, device, result, steps, warmup)
        except Exception as e:  # noqa: BLE001 - the JSON must say why a run failed (scripts/bench-presets.sh)
            _record_failure(result, e)
        finally:
            _record_memory(result, device)
    return result


def _record_failure(result: BenchResult, error: Exception) -> None:
    import torch

    first_line = (str(error).strip().splitlines() or [""])[0]
    # cuBLAS/cuDNN report a full card as a RuntimeError ("CUBLAS_STATUS_ALLOC_FAILED", "CUDA error: out of memory")
    if isinstance(error, torch.OutOfMemoryError) or re.search(r"out of memory|ALLOC_FAILED", first_line, re.I):
        result.out_of_memory = True
        result.error = f"out of memory: {first_line}"
        return
    if not isinstance(error, UserError):  # a bug: the log needs the stack to find it
        log.error("bench run failed", exc_info=error)
    result.error = f"{type(error).__name__}: {first_line}"


def _run(cfg, family: str, device, result: BenchResult, steps: int, warmup: int) -> None:
    import torch

    # As resolve.select_mixed_precision decides (which also warns, once, when preparing): no fp16 on a CPU.
    if cfg.mixed_precision == "fp16" and device.type == "cpu":
        result.mixed_precision = "no (fp16 needs a GPU)"
    dtype = weight_dtype_for("no" if device.type == "cpu" and cfg.mixed_precision == "fp16" else cfg.mixed_precision)
    started = time.perf_counter()
    models = build_random_models(family, dtype=dtype, vae_dtype=torch.float32 if cfg.no_half_vae else dtype,
                                 device=device, v_parameterization=cfg.v_parameterization)
    result.model_build_s = time.perf_counter() - started
    _reset_peak(device)
    events = RecordingListener()
    started = time.perf_counter()
    setup = prepare_with_models(cfg, models, Reporter([events]))
    _sync(device)
    result.setup_s = time.perf_counter() - started
    result.attention = _attention_from(events)
    result.setup_peak_allocated_gb = _peak_allocated(device)
    losses: list = []
    result.step_times_s = run_steps(setup, steps, losses)
    result.first_step_s = result.step_times_s[0]
    timed = result.step_times_s[min(warmup, len(result.step_times_s) - 1):]
    result.it_per_s = 1.0 / statistics.median(timed)
    result.final_loss = float(torch.stack(losses).float().mean()) if losses else None


def bench_config(cfg, *, family: str, folder: Path, steps: int, resolution: tuple[int, int] | None,
                 batch_size: int | None):
    """The preset's settings with generated data in `folder`, exactly `steps` steps, nothing saved or sampled."""
    width, height = resolution or cfg.resolution or (512, 512)
    overrides = dict(
        pretrained_model_name_or_path=f"bench:{family}", train_data_dir=str(folder / "img"), reg_data_dir=None,
        dataset_config=None, in_json=None, output_dir=str(folder / "out"), output_name="bench", network_weights=None,
        base_weights=None, dim_from_weights=False,
        vae=None, resolution=(width, height), max_train_steps=steps, max_train_epochs=None,
        min_bucket_reso=min(cfg.min_bucket_reso, width, height),
        max_bucket_reso=max(cfg.max_bucket_reso, width, height), save_every_n_epochs=None,
        save_every_n_steps=None, save_n_epoch_ratio=None, save_state=False, save_state_on_train_end=False,
        resume=None, sample_prompts=None, sample_every_n_steps=None, sample_every_n_epochs=None,
        sample_at_first=False, logging_dir=None, log_with=None, sdxl=FAMILY_OF[family] == "sdxl",
        v2=FAMILY_OF[family] == "sd2", v_parameterization=cfg.v_parameterization or family == "sd2-768-v")
    if batch_size:
        overrides["train_batch_size"] = batch_size
    known = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if k in known})


def write_pictures(folder: Path, size: tuple[int, int], *, count: int, caption_extension: str) -> Path:
    """`count` random-noise PNGs with captions in `folder/1_bench thing` (1 repeat)."""
    import numpy as np
    from PIL import Image

    target = folder / "1_bench thing"
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    width, height = size
    for i in range(count):
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(target / f"{i:03d}.png")
        (target / f"{i:03d}{caption_extension or '.caption'}").write_text("bench thing, noise", encoding="utf-8")
    return target


def build_random_models(family: str, *, dtype, vae_dtype, device, v_parameterization: bool = False):
    """A LoadedModels of the full-size `family` with random weights, created on `device` in `dtype`."""
    import torch

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        parts = build_architecture(family, dtype=dtype, vae_dtype=vae_dtype)
    return models_from_parts(parts, family, v_parameterization=v_parameterization, name=f"bench:{family}")


def prepare_with_models(cfg, models, reporter):
    """trainer.train.build.prepare_training, the training code itself, given the models already in memory:
    precision, attention, freezing, fp8, caches, LoRA, checkpointing, optimizer and accelerate run exactly as
    in a training run."""
    return prepare_training(cfg, reporter, models=models)


def run_steps(setup, steps: int, losses: list | None = None) -> list[float]:
    """`steps` optimizer steps as trainer.train.loop.train makes them (its inner step, minus reporting, saving,
    sampling and validation); seconds per step, data loading included, the device synchronised at each
    step's end so the time is the step's own."""
    acc = setup.accelerator
    setup.network.train()
    run = RunState(setup)
    times: list[float] = []
    batches = _endless(setup)
    while len(times) < steps:
        started = time.perf_counter()
        while True:
            loss = micro_step(setup, next(batches), run)
            if losses is not None:
                losses.append(loss.detach())
            if acc.sync_gradients:
                break
        apply_max_norm(setup)
        _sync(acc.device)
        times.append(time.perf_counter() - started)
    run.latent_nans.check()  # as the loop does at its reports: an fp16 SDXL VAE's NaN latents stop here
    return times


def _endless(setup) -> Iterator[dict]:
    epoch = 0
    while True:
        epoch += 1
        setup.dataset.set_epoch(epoch)
        yield from setup.dataloader


@contextmanager
def _work_folder(work_dir: Path | None) -> Iterator[Path]:
    if work_dir is not None:
        yield Path(work_dir)
        return
    # Windows: a data-loader worker still exiting may hold a file for a moment; leftovers are only pictures.
    with tempfile.TemporaryDirectory(prefix="trainer-bench-", ignore_cleanup_errors=True) as folder:
        yield Path(folder)


def _attention_from(events) -> str:
    for event in events.events:
        match = re.search(r"attention: (\w+)", str(event.data.get("message", "")))
        if match:
            return match.group(1)
    return "?"


# ---------------------------------------------------------------------------------------------------------------
# Memory and machine


def _limit_vram(limit_gb: float | None, device) -> None:
    import torch

    if limit_gb is None:
        return
    if device.type != "cuda":
        log.warning("--vram_limit applies to CUDA GPUs only; ignored on the CPU.")
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if limit_gb * GIB > total:
        raise ConfigError(f"--vram_limit {limit_gb:g} GB is more than this GPU has ({total / GIB:.1f} GB).")
    torch.cuda.set_per_process_memory_fraction(limit_gb * GIB / total, device)


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _peak_allocated(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def _record_memory(result: BenchResult, device) -> None:
    import torch

    if device.type == "cuda":
        result.peak_allocated_gb = torch.cuda.max_memory_allocated(device) / GIB
        result.peak_reserved_gb = torch.cuda.max_memory_reserved(device) / GIB
    result.peak_rss_gb = peak_rss_gb()


def peak_rss_gb() -> float | None:
    """This process's peak resident memory (whole lifetime), or None where the OS does not say."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / GIB if sys.platform == "darwin" else peak * 1024 / GIB  # bytes on macOS, KiB on Linux
    except ImportError:  # Windows
        try:
            import psutil

            return psutil.Process().memory_info().peak_wset / GIB
        except (ImportError, AttributeError):
            return None


def machine_info(device) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cpu": _cpu_name(), "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads()}
    for name in ("diffusers", "xformers"):
        info[name] = _package_version(name)
    if hasattr(os, "getloadavg"):  # a busy CPU slows every step (torch's threads wait for each other)
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / GIB, 2),
                    compute_capability=f"{props.major}.{props.minor}", driver=_nvidia_driver())
    return info


def _package_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
        return out.strip().splitlines()[0] if out.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Output


def result_dict(result: BenchResult) -> dict[str, Any]:
    data = {"kind": "run", **dataclasses.asdict(result)}
    data["time_to_first_step_s"] = result.time_to_first_step_s
    return data


def write_json(path: str, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} GB"


def result_rows(r: BenchResult) -> list[tuple[str, str]]:
    m = r.machine
    device = m.get("gpu") or f"CPU: {m.get('cpu')} ({m.get('cpu_cores')} cores)"
    if m.get("gpu"):
        device += f", {m.get('gpu_memory_gb')} GB, driver {m.get('driver') or '?'}"
    size = "the tiny test model" if r.family == "tiny-sd1" else "full size"
    rows = [("preset", r.preset), ("architecture", f"{r.family} ({size}, random weights)"), ("device", device),
            ("torch / CUDA", f"{m.get('torch')} / {m.get('cuda') or 'none'}"), ("attention", r.attention),
            ("resolution x batch", f"{r.resolution[0]}x{r.resolution[1]} x {r.batch_size}"),
            ("precision / grad. checkpointing", f"{r.mixed_precision} / {'on' if r.gradient_checkpointing else 'off'}")]
    if r.vram_limit_gb:
        rows.append(("VRAM limit", _gb(r.vram_limit_gb)))
    rows += [("model build (random init)", f"{r.model_build_s:.1f} s"),
             ("time to first step", f"{r.time_to_first_step_s:.1f} s (setup {r.setup_s:.1f} s + step "
                                    f"{r.first_step_s:.2f} s)"),
             ("it/s", "-" if r.it_per_s is None else
              f"{r.it_per_s:.3f} (median of {max(1, len(r.step_times_s) - 1)} step(s) of {r.steps})"),
             ("peak VRAM allocated / reserved", f"{_gb(r.peak_allocated_gb)} / {_gb(r.peak_reserved_gb)}"),
             ("peak VRAM before the first step", _gb(r.setup_peak_allocated_gb)),
             ("peak RSS (process)", _gb(r.peak_rss_gb))]
    if r.error:
        rows.append(("FAILED", r.error))
    return rows


def print_result(result: BenchResult, out: Callable[[Any], None] | None = None, advice: list[str] = ()) -> None:
    _print_table("trainer bench", result_rows(result), out)
    if result.out_of_memory:
        steps = " ".join(f"({i}) {step}." for i, step in enumerate(advice, 1))
        _print_text(f"Out of memory. To fit, change these, the biggest saving first: {steps}" if steps else
                    "Out of memory.", out)


def _print_table(title: str, rows: list[tuple[str, str]], out=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    (out or Console(highlight=False).print)(table)


def _print_text(text: str, out=None) -> None:
    (out or print)(text)


# ---------------------------------------------------------------------------------------------------------------
# --estimate


def show_estimate(cfg, family: str, resolution: tuple[int, int] | None, batch_size: int | None,
                  json_path: str | None, out=None, preset: str | None = None) -> int:
    estimate = estimate_for_config(cfg, family, resolution=resolution, batch_size=batch_size)
    _print_table("trainer bench --estimate", estimate_rows(estimate, cfg), out)
    if json_path:
        write_json(json_path, estimate_dict(estimate, preset))
    return 0


def estimate_rows(e, cfg) -> list[tuple[str, str]]:
    d = e.details
    rows = [("architecture", f"{d['family']} (full size, from the shipped configs)"),
            ("resolution x batch", f"{d['resolution'][0]}x{d['resolution'][1]} x {d['batch_size']}"),
            ("precision / grad. checkpointing", f"{d['mixed_precision']} / "
                                                f"{'on' if d['gradient_checkpointing'] else 'off'}"),
            ("LoRA", f"dim {cfg.network_dim or DEFAULT_NETWORK_DIM}, {d['trainable_parameters'] / 1e6:.1f} M "
                     f"trainable; text encoder "
                     f"{'trained' if cfg.train_text_encoder else 'frozen'}; optimizer {cfg.optimizer_type or 'AdamW'}"),
            ("weights + LoRA + gradients", _gb(e.parameters_gb)), ("optimizer states", _gb(e.optimizer_gb)),
            ("activations at the peak", _gb(e.activations_gb)), ("expected peak allocated", _gb(e.total_gb))]
    if e.caching_gb:
        rows.append(("peak while caching latents", _gb(e.caching_gb)))
    rows.append(("card needs about", f"{_gb(e.needs_card_gb)} (+10 % fragmentation, +0.5 GB CUDA context)"))
    rows.append(("fits", ", ".join(f"{c} GB: {'yes' if e.needs_card_gb <= c else 'no'}" for c in STANDARD_CARDS_GB)))
    rows += [("note", note) for note in e.notes]
    return rows


def estimate_dict(e, preset: str | None = None) -> dict[str, Any]:
    # "preset" joins the estimate to the runs of the same preset in --table
    data = {"kind": "estimate", "preset": preset, **dataclasses.asdict(e)}
    data["needs_card_gb"] = e.needs_card_gb
    return data
