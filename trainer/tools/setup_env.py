"""The Python half of setup: NVIDIA driver -> torch build, then pip, then a check that it all imports.

`setup.sh` / `setup.ps1` make `.venv` and run `python -m trainer setup [--dev] [--cpu] [--force]` with the
venv's interpreter. This module runs before torch exists, so it imports only the standard library at
module level. External commands go through injectable runners (`Context`) so tests can fake nvidia-smi,
pip and the network.

Choosing the torch build (torch is pinned to TORCH_VERSION everywhere):

| build | CUDA | driver Linux | driver Windows | GPU archs with kernels (compute capability) |
|-------|------|--------------|----------------|---------------------------------------------|
| cu130 | 13.0 | >= 580.65.06 | >= 580.88      | 7.5 (Turing, GTX 16xx/RTX 20xx) .. 12.x (RTX 50xx) |
| cu128 | 12.8 | >= 570.26    | >= 570.65      | 7.0 (Volta) .. 12.x (RTX 50xx)              |
| cu126 | 12.6 | >= 525.60.13 | >= 528.33      | 5.0 (Maxwell) .. 9.0; not Blackwell          |
| cpu   | -    | -            | -              | no NVIDIA GPU, driver too old, `--cpu`       |

The newest build whose driver minimum is met and that has kernels for every GPU wins. cu126's minimum is
CUDA 12's minor-version-compatibility floor: the wheel carries its own CUDA runtime and native kernels, so
a 525+ driver runs it. Blackwell (sm_120, RTX 50xx) has kernels only from cu128 on; Pascal (GTX 10xx,
sm_61) only in cu126. CUDA 13 dropped Maxwell, Pascal and Volta.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from trainer.files import atomic_write_text
from trainer.paths import REPO_ROOT

TORCH_VERSION = "2.13.0"
PYTORCH_INDEX = "https://download.pytorch.org/whl"
INDEX_PROBE_TIMEOUT_S = 5.0
# Ships OpenAI's CLIP BPE vocabulary (trainer/models/tokenizer.py); it declares torchvision, hence --no-deps.
CLIP_VOCAB_PACKAGE = "clip-anytorch==2.6.0"
# xformers wheels that match a torch release (environment-notes.md): 0.0.35+ are abi3 and need torch>=2.10;
# older ones pin torch exactly. Always installed with --only-binary so pip never tries a source build.
XFORMERS_FOR_TORCH = {
    "2.6": "xformers==0.0.29.post3", "2.7": "xformers==0.0.31.post1", "2.8": "xformers==0.0.32.post2",
    "2.9": "xformers==0.0.33.post2", "2.10": "xformers>=0.0.34", "2.11": "xformers>=0.0.35",
    "2.12": "xformers>=0.0.35", "2.13": "xformers>=0.0.35",
}
# 0.45+ has Windows and Linux wheels with CUDA 11.8-13.x libraries; only useful with a CUDA torch here.
BITSANDBYTES_SPEC = "bitsandbytes>=0.45"
BITSANDBYTES_SYSTEMS = ("Linux", "Windows")
# The browser GUI (gui.ps1 / gui.sh). Optional: training never imports it. The app is written against 6.x.
GRADIO_SPEC = "gradio>=6.0,<7"
GRADIO_FIX = ("Optional: training works without it; only the GUI (gui.ps1 / gui.sh) needs it. To install it: "
              f'.venv\\Scripts\\python -m pip install "{GRADIO_SPEC}" (Linux: .venv/bin/python -m pip install '
              f'"{GRADIO_SPEC}"), or run setup again with -Force / --force.')
REQUIRED_MODULES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "rich", "toml")
REQUIRED_DISTS = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "rich", "toml",
                  "clip-anytorch")
DEV_DISTS = ("pytest", "peft", "tree-sitter", "tree-sitter-powershell", "gradio")
STAMP_NAME = "trainer-setup.json"
CONSTRAINTS_NAME = "trainer-constraints.txt"
STAMP_SCHEMA = 1


# ---------------------------------------------------------------------------------------------------
# GPUs and the torch build


@dataclass(frozen=True)
class GPU:
    name: str
    driver_version: str
    compute_cap: tuple[int, int] | None  # (12, 0) for sm_120; None when the driver cannot say
    memory_mib: int | None

    @property
    def sm(self) -> str:
        return f"sm_{self.compute_cap[0]}{self.compute_cap[1]}" if self.compute_cap else "sm_?"


@dataclass(frozen=True)
class CudaBuild:
    variant: str
    cuda: str
    min_driver_linux: str
    min_driver_windows: str
    archs: tuple[str, ...]  # native kernels, as torch.cuda.get_arch_list() names them (no PTX counted on)


CUDA_BUILDS = (  # newest first; see the table in the module docstring
    CudaBuild("cu130", "13.0", "580.65.06", "580.88",
              ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_110", "sm_120")),
    CudaBuild("cu128", "12.8", "570.26", "570.65",
              ("sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")),
    CudaBuild("cu126", "12.6", "525.60.13", "528.33",
              ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")),
)


@dataclass(frozen=True)
class TorchChoice:
    version: str
    index_url: str | None  # None: plain PyPI (macOS)
    variant: str  # "cpu", "cu126", "cu128", "cu130"
    xformers: str | None  # a pip requirement, or None (CPU build, or no wheel matches this torch)
    reason: str
    bitsandbytes: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def is_cuda(self) -> bool:
        return self.variant != "cpu"

    @property
    def torch_requirement(self) -> str:
        """Pin the local build tag too, so pip replaces e.g. an installed +cpu torch with +cu128."""
        return f"torch=={self.version}+{self.variant}" if self.index_url else f"torch=={self.version}"


def parse_version(text: str) -> tuple[int, ...] | None:
    """'570.86.16' -> (570, 86, 16); None when it is not a dotted number."""
    try:
        return tuple(int(part) for part in text.strip().split("."))
    except ValueError:
        return None


def arch_supported(cap: tuple[int, int] | None, arch_list: Sequence[str]) -> bool:
    """Whether a build with these archs runs on a GPU of compute capability `cap`.

    A native `sm_XY` kernel runs on the same major version with an equal or higher minor (sm_86 on an
    sm_89 card); PTX (`compute_XY`) is compiled by the driver for any card at or above XY.
    """
    if cap is None:
        return True  # the driver could not tell; the import check after install decides
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit() or len(digits) < 2:
            continue
        major, minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and major == cap[0] and minor <= cap[1]:
            return True
        if kind == "compute" and (major, minor) <= cap:
            return True
    return False


def _driver_minimum(build: CudaBuild, system: str) -> str:
    return build.min_driver_windows if system == "Windows" else build.min_driver_linux


def _gpu_notes(gpus: Sequence[GPU]) -> list[str]:
    notes = []
    for gpu in gpus:
        name = gpu.name.upper()
        if "GTX 16" in name:
            notes.append(f"{gpu.name}: fp16 on GTX 16xx cards can give NaN losses or black samples; "
                         "if it does, train with --mixed_precision no.")
        elif "GTX 10" in name or (gpu.compute_cap and gpu.compute_cap[0] == 6):
            notes.append(f"{gpu.name}: Pascal has no tensor cores and no bf16; use --mixed_precision fp16, "
                         "expect slow steps, and prefer SD1.5 presets.")
        if gpu.memory_mib is not None and gpu.memory_mib < 6000:
            notes.append(f"{gpu.name}: {gpu.memory_mib} MiB of VRAM is below the 6 GB the smallest presets need.")
    return notes


def _cpu(reason: str, notes: Sequence[str] = ()) -> TorchChoice:
    return TorchChoice(TORCH_VERSION, f"{PYTORCH_INDEX}/cpu", "cpu", None, reason, None, tuple(notes))


def choose_torch(gpus: Sequence[GPU], driver_version: str | None, force_cpu: bool, *,
                 system: str = "Linux") -> TorchChoice:
    """Pick the torch build for these GPUs and driver (pure; `system` is platform.system())."""
    if system == "Darwin":
        return TorchChoice(TORCH_VERSION, None, "cpu", None, "macOS: there are no CUDA builds; PyPI's torch")
    if force_cpu:
        return _cpu("--cpu was given")
    if not gpus:
        return _cpu("no NVIDIA GPU found (nvidia-smi is missing or failed)")
    notes = _gpu_notes(gpus)
    driver = parse_version(driver_version or "")
    if driver is None:
        return _cpu(f"could not read the NVIDIA driver version ({driver_version!r}); run nvidia-smi to check "
                    "the driver", notes)
    allowed = [b for b in CUDA_BUILDS if driver >= parse_version(_driver_minimum(b, system))]
    if not allowed:
        oldest = CUDA_BUILDS[-1]
        return _cpu(f"NVIDIA driver {driver_version} is older than {_driver_minimum(oldest, system)}, the "
                    f"minimum for any CUDA build of torch {TORCH_VERSION}; update the driver (570 or newer "
                    "recommended) and run setup again", notes)
    # Train on the card with the most memory; prefer a build that also covers every other card.
    target = max(gpus, key=lambda g: g.memory_mib or 0)
    build = next((b for b in allowed if all(arch_supported(g.compute_cap, b.archs) for g in gpus)), None)
    if build is None:
        build = next((b for b in allowed if arch_supported(target.compute_cap, b.archs)), None)
        if build is not None:
            left_out = [g.name for g in gpus if not arch_supported(g.compute_cap, build.archs)]
            notes.append(f"{build.variant} has no kernels for {', '.join(left_out)}; "
                         "train on the other card (CUDA_VISIBLE_DEVICES).")
    if build is None:
        return _cpu(_no_build_reason(target, allowed, system, driver_version), notes)
    reason = f"{target.name} ({target.sm}), driver {driver_version} -> CUDA {build.cuda}"
    newer = CUDA_BUILDS[:CUDA_BUILDS.index(build)]
    if newer and newer[-1] not in allowed:
        reason += f" ({newer[-1].variant} needs driver >= {_driver_minimum(newer[-1], system)})"
    return TorchChoice(TORCH_VERSION, f"{PYTORCH_INDEX}/{build.variant}", build.variant,
                       XFORMERS_FOR_TORCH.get(_minor(TORCH_VERSION)), reason,
                       BITSANDBYTES_SPEC if system in BITSANDBYTES_SYSTEMS else None, tuple(notes))


def _no_build_reason(gpu: GPU, allowed: Sequence[CudaBuild], system: str, driver_version: str) -> str:
    """Why no allowed build runs on `gpu`: the card is newer than the driver allows, or too old."""
    for build in reversed(CUDA_BUILDS):  # the oldest build with kernels for it needs the oldest driver
        if build not in allowed and arch_supported(gpu.compute_cap, build.archs):
            return (f"{gpu.name} ({gpu.sm}) needs torch's {build.variant} build, which needs NVIDIA driver >= "
                    f"{_driver_minimum(build, system)} (you have {driver_version}); update the driver and "
                    "run setup again")
    return f"{gpu.name} ({gpu.sm}) is older than any CUDA build of torch {TORCH_VERSION} supports"


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


# ---------------------------------------------------------------------------------------------------
# Reading nvidia-smi

Capture = Callable[[Sequence[str]], "tuple[int, str]"]  # run, return (exit code, stdout)
Run = Callable[[Sequence[str]], int]  # run with output streaming to the console
NVIDIA_SMI_QUERY = ("--query-gpu=name,driver_version,compute_cap,memory.total", "--format=csv,noheader")
# Drivers older than ~510 do not know compute_cap; asking without it still tells us the driver is too old.
NVIDIA_SMI_QUERY_OLD = ("--query-gpu=name,driver_version,memory.total", "--format=csv,noheader")


def parse_nvidia_smi(text: str, *, with_cap: bool = True) -> list[GPU]:
    """Rows of `nvidia-smi --query-gpu=... --format=csv,noheader` -> GPUs (unreadable rows are skipped)."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.rsplit(",", 3 if with_cap else 2)]
        if len(parts) != (4 if with_cap else 3) or not parts[0]:
            continue
        name, driver = parts[0], parts[1]
        if parse_version(driver) is None:
            continue
        cap = None
        if with_cap:
            cap_version = parse_version(parts[2])
            cap = (cap_version[0], cap_version[1]) if cap_version and len(cap_version) == 2 else None
        memory = parts[-1].split()[0] if parts[-1] else ""
        gpus.append(GPU(name, driver, cap, int(memory) if memory.isdigit() else None))
    return gpus


def nvidia_smi_path(system: str) -> str | None:
    found = shutil.which("nvidia-smi")
    if found or system != "Windows":
        return found
    legacy = Path(os.environ.get("ProgramFiles", r"C:\Program Files")) / "NVIDIA Corporation/NVSMI/nvidia-smi.exe"
    return str(legacy) if legacy.is_file() else None


def detect_gpus(capture: Capture, smi: str | None) -> list[GPU]:
    """The NVIDIA GPUs nvidia-smi reports; [] when it is missing or fails."""
    if smi is None:
        return []
    for query, with_cap in ((NVIDIA_SMI_QUERY, True), (NVIDIA_SMI_QUERY_OLD, False)):
        code, out = capture([smi, *query])
        if code == 0:
            gpus = parse_nvidia_smi(out, with_cap=with_cap)
            if gpus:
                return gpus
    return []


# ---------------------------------------------------------------------------------------------------
# The install plan


@dataclass(frozen=True)
class Step:
    name: str
    cmd: tuple[str, ...]
    required: bool
    fix: str  # what to do when it fails


def pip(python: str, *args: str) -> tuple[str, ...]:
    return (python, "-m", "pip", "install", "--disable-pip-version-check", *args)


def torch_step(choice: TorchChoice, python: str, use_index: bool) -> Step:
    if use_index and choice.index_url:
        cmd = pip(python, choice.torch_requirement, "--index-url", choice.index_url)
    else:  # PyPI (or the local wheels pip's own config points at)
        cmd = pip(python, f"torch=={choice.version}")
    return Step("torch", cmd, True,
                "Check the internet connection (or proxy: set HTTPS_PROXY) and free disk space (a CUDA torch "
                "needs about 5 GB), then run setup again. To install the CPU build instead: setup --cpu.")


def plan_steps(choice: TorchChoice, *, python: str, repo_root: Path, constraints: Path, dev: bool,
               use_index: bool) -> list[Step]:
    """Every pip call, in order: torch first, so nothing later can pull another torch from PyPI."""
    reqs = ["-r", str(repo_root / "requirements.txt")]
    if dev:
        reqs += ["-r", str(repo_root / "requirements-dev.txt")]
    steps = [
        torch_step(choice, python, use_index),
        Step("requirements", pip(python, *reqs, "-c", str(constraints)), True,
             "Read the pip error above (a network error: retry; 'No matching distribution': your Python "
             "version is outside 3.10-3.12), then run setup again."),
        Step("CLIP vocabulary", pip(python, "--no-deps", CLIP_VOCAB_PACKAGE), True,
             "Check the internet connection and run setup again."),
    ]
    # Wheels only: a source build of one of its dependencies would need a compiler most PCs do not have.
    steps.append(Step("gradio", pip(python, "--only-binary=:all:", GRADIO_SPEC, "-c", str(constraints)), False,
                      GRADIO_FIX))
    index = ["--extra-index-url", choice.index_url] if use_index and choice.index_url else []
    if choice.xformers:
        steps.append(Step("xformers", pip(python, "--only-binary=:all:", choice.xformers, "-c", str(constraints),
                                          *index), False,
                          "Optional: training uses PyTorch's SDPA attention instead (--sdpa)."))
    if choice.bitsandbytes:
        steps.append(Step("bitsandbytes", pip(python, "--only-binary=:all:", choice.bitsandbytes, "-c",
                                              str(constraints)), False,
                          "Optional: only the 8-bit optimizers (AdamW8bit) need it; use AdamW instead."))
    return steps


def constraints_text(choice: TorchChoice, use_index: bool) -> str:
    pin = choice.torch_requirement if use_index and choice.index_url else f"torch=={choice.version}"
    return f"# Written by `python -m trainer setup`: every pip call keeps the torch it installed.\n{pin}\n"


def probe_index(url: str, timeout: float = INDEX_PROBE_TIMEOUT_S) -> bool:
    """Whether the PyTorch wheel index answers within `timeout` seconds.

    A thread bounds the whole probe, DNS included (urllib's timeout does not cover name lookup), so an
    unreachable index costs at most a few seconds instead of a hanging pip.
    """
    result: list[bool] = []

    def attempt() -> None:
        try:
            request = urllib.request.Request(url.rstrip("/") + "/torch/", method="HEAD")
            with urllib.request.urlopen(request, timeout=timeout) as response:
                result.append(response.status < 400)
        except Exception:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


# ---------------------------------------------------------------------------------------------------
# The idempotency stamp


def setup_hash(repo_root: Path, choice: TorchChoice, *, dev: bool) -> str:
    """What decides the install: the requirements files, the chosen build and the flags."""
    h = hashlib.sha256(f"schema={STAMP_SCHEMA}\npython={sys.version_info[:2]}\n".encode())
    names = ["requirements.txt"] + (["requirements-dev.txt"] if dev else [])
    for name in names:
        path = repo_root / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"<missing>") + b"\0")
    # The build, not its wording: a driver update that keeps the same build changes nothing.
    build = (choice.version, choice.index_url, choice.variant, choice.xformers, choice.bitsandbytes)
    h.update(json.dumps(build).encode())
    h.update(f"gui={GRADIO_SPEC}".encode())  # a venv set up before the GUI existed gets it on the next run
    h.update(f"dev={dev}".encode())
    return h.hexdigest()


def read_stamp(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_stamp(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_dists(dev: bool, version_of: Callable[[str], str | None]) -> list[str]:
    """Distributions a finished setup has that are missing now (someone uninstalled something)."""
    wanted = REQUIRED_DISTS + (DEV_DISTS if dev else ())
    missing = [d for d in wanted if version_of(d) is None]
    torch = version_of("torch")
    if torch is not None and not torch.startswith(TORCH_VERSION):
        missing.append(f"torch=={TORCH_VERSION} (found {torch})")
    return missing


# ---------------------------------------------------------------------------------------------------
# Checking the result

VERIFY_MARKER = "TRAINER_VERIFY "
VERIFY_SCRIPT = r"""
import importlib, importlib.metadata, json
out = {"modules": {}, "errors": {}, "optional": {}}
for name in %(required)r:
    try:
        importlib.import_module(name)
        out["modules"][name] = importlib.metadata.version(name)
    except Exception as e:
        out["errors"][name] = "%%s: %%s" %% (type(e).__name__, e)
for name in ("xformers", "bitsandbytes", "gradio"):
    try:
        importlib.import_module(name)
        out["optional"][name] = importlib.metadata.version(name)
    except Exception as e:
        out["optional"][name] = None
try:
    import torch
    out["cuda"] = bool(torch.cuda.is_available())
    out["torch_cuda"] = torch.version.cuda
    if out["cuda"]:
        out["arch_list"] = torch.cuda.get_arch_list()
        out["devices"] = [[torch.cuda.get_device_name(i), list(torch.cuda.get_device_capability(i))]
                          for i in range(torch.cuda.device_count())]
except Exception as e:
    out["cuda_error"] = "%%s: %%s" %% (type(e).__name__, e)
print(%(marker)r + json.dumps(out))
""" % {"required": REQUIRED_MODULES, "marker": VERIFY_MARKER}


def parse_verify_output(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith(VERIFY_MARKER):
            try:
                return json.loads(line[len(VERIFY_MARKER):])
            except ValueError:
                return None
    return None


def judge_verification(report: dict, choice: TorchChoice, *, used_index: bool) -> tuple[list[str], list[str]]:
    """(problems that fail setup, warnings) for the import report of the fresh venv."""
    problems = [f"{name} does not import: {err}" for name, err in report.get("errors", {}).items()]
    warnings = []
    if choice.is_cuda and "torch" in report.get("modules", {}):
        if not report.get("cuda"):
            if not used_index:
                problems.append("the installed torch cannot use the GPU: the PyTorch index was unreachable, and "
                                "the torch from PyPI has no CUDA build for this system. Fix: make "
                                f"{choice.index_url} reachable (proxy: HTTPS_PROXY) and run setup again, or "
                                "accept CPU training: setup --cpu")
            else:
                problems.append(f"torch {choice.variant} is installed but CUDA is not available "
                                f"({report.get('cuda_error') or 'torch.cuda.is_available() is False'}). Fix: check "
                                "the driver with nvidia-smi (reboot after a driver update), then setup --force")
        for name, cap in report.get("devices", []):
            if not arch_supported(tuple(cap), report.get("arch_list", [])):
                problems.append(f"{name} (sm_{cap[0]}{cap[1]}) is not in this torch's archs "
                                f"{report.get('arch_list')}: 'no kernel image' errors would follow. Fix: update "
                                "the NVIDIA driver, then setup --force")
    for name in ("xformers", "bitsandbytes"):
        spec = getattr(choice, name)
        if spec and not report.get("optional", {}).get(name):
            warnings.append(f"{name} was not installed or does not import; training works without it")
    if not report.get("optional", {}).get("gradio"):
        warnings.append(f"gradio was not installed or does not import. {GRADIO_FIX}")
    return problems, warnings


# ---------------------------------------------------------------------------------------------------
# Running it


def default_run(cmd: Sequence[str]) -> int:
    """Run with output streaming straight to the console (pip's progress bars included)."""
    try:
        return subprocess.run(list(cmd)).returncode
    except OSError as e:
        print(f"  could not start {cmd[0]}: {e}", flush=True)
        return 127


def default_capture(cmd: Sequence[str]) -> tuple[int, str]:
    # A wedged driver can hang nvidia-smi; the import check can be slow the first time (antivirus scans).
    timeout = 30 if Path(cmd[0]).name.lower().startswith("nvidia-smi") else 900
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, encoding="utf-8", errors="replace",
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 127, str(e)
    if done.returncode != 0 and done.stderr:
        return done.returncode, done.stdout + done.stderr
    return done.returncode, done.stdout


@dataclass
class Context:
    """Everything setup touches outside itself; tests replace the callables."""
    run: Run = default_run
    capture: Capture = default_capture
    probe: Callable[[str], bool] = probe_index
    version_of: Callable[[str], str | None] = installed_version
    python: str = sys.executable
    venv_dir: Path = field(default_factory=lambda: Path(sys.prefix))
    repo_root: Path = field(default_factory=lambda: REPO_ROOT)
    system: str = field(default_factory=platform.system)
    in_venv: bool = field(default_factory=lambda: sys.prefix != sys.base_prefix)
    smi: str | None = "auto"
    out: Callable[[str], None] = field(default=lambda text: print(text, flush=True))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer setup",
                                description="Install torch for this PC's GPU and the trainer's requirements "
                                            "into the running virtual environment (setup.sh / setup.ps1 call this).")
    p.add_argument("--dev", action="store_true", help="also install the test dependencies")
    p.add_argument("--cpu", action="store_true", help="install the CPU build of torch even with an NVIDIA GPU")
    p.add_argument("--force", action="store_true", help="reinstall even when nothing changed")
    p.add_argument("--dry-run", action="store_true", help="show what would be installed, install nothing")
    return p.parse_args(list(argv))


def main(argv: Sequence[str], ctx: Context | None = None) -> int:
    args = parse_args(argv)
    ctx = ctx or Context()
    try:
        return run_setup(args, ctx)
    except KeyboardInterrupt:
        ctx.out("\nSetup interrupted. Run it again to finish; nothing is recorded as installed.")
        return 130


def run_setup(args: argparse.Namespace, ctx: Context) -> int:
    say = ctx.out
    say(f"trainer setup: Python {platform.python_version()} at {ctx.python}")
    if not ctx.in_venv:
        say("ERROR: this Python is not a virtual environment, and setup installs only into one.\n"
            "Fix: run ./setup.sh (Linux) or .\\setup.ps1 (Windows); they create .venv and call this.")
        return 1
    smi = nvidia_smi_path(ctx.system) if ctx.smi == "auto" else ctx.smi
    gpus = detect_gpus(ctx.capture, smi)
    for i, gpu in enumerate(gpus):
        say(f"  GPU {i}: {gpu.name}, {gpu.sm}, {gpu.memory_mib or '?'} MiB, driver {gpu.driver_version}")
    choice = choose_torch(gpus, gpus[0].driver_version if gpus else None, args.cpu, system=ctx.system)
    say(f"  torch {choice.version} build: {choice.variant} ({choice.reason})")
    for note in choice.notes:
        say(f"  note: {note}")
    stamp_path = ctx.venv_dir / STAMP_NAME
    previous = read_stamp(stamp_path)
    dev = bool(args.dev or previous.get("dev"))  # dev extras, once installed, stay part of the target
    key = setup_hash(ctx.repo_root, choice, dev=dev)
    if args.dry_run:
        return dry_run(choice, ctx, dev)
    if not args.force and previous.get("hash") == key and not missing_dists(dev, ctx.version_of):
        say(f"Nothing changed since the last setup ({previous.get('finished', '?')}): nothing to install. "
            "(--force reinstalls.)")
        print_summary(previous, say)
        return 0
    return install(choice, ctx, dev=dev, key=key, gpus=gpus)


def dry_run(choice: TorchChoice, ctx: Context, dev: bool) -> int:
    constraints = ctx.venv_dir / CONSTRAINTS_NAME
    for step in plan_steps(choice, python=ctx.python, repo_root=ctx.repo_root, constraints=constraints, dev=dev,
                           use_index=True):
        ctx.out(f"  would run ({'required' if step.required else 'optional'}): {' '.join(step.cmd)}")
    return 0


def install(choice: TorchChoice, ctx: Context, *, dev: bool, key: str, gpus: list[GPU]) -> int:
    say = ctx.out
    stamp_path = ctx.venv_dir / STAMP_NAME
    stamp_path.unlink(missing_ok=True)  # a failed run must not look finished
    use_index = False
    if choice.index_url:
        say(f"Checking that {choice.index_url} answers (up to {INDEX_PROBE_TIMEOUT_S:.0f} s)...")
        use_index = ctx.probe(choice.index_url)
        if not use_index:
            say(f"  The PyTorch index cannot be reached: falling back to plain `pip install "
                f"torch=={choice.version}` (PyPI, or the local wheels pip is configured with).")
    constraints = ctx.venv_dir / CONSTRAINTS_NAME
    constraints.write_text(constraints_text(choice, use_index), encoding="utf-8")
    warnings = []
    for step in plan_steps(choice, python=ctx.python, repo_root=ctx.repo_root, constraints=constraints, dev=dev,
                           use_index=use_index):
        say(f"\n== {step.name}: {' '.join(step.cmd[1:])}")
        code = ctx.run(step.cmd)
        if code != 0 and step.required:
            say(f"\nSETUP FAILED at step '{step.name}' (pip exit code {code}).\nNext: {step.fix}")
            return 1
        if code != 0:
            warnings.append(f"{step.name} did not install (exit code {code}). {step.fix}")
            say(f"  WARNING: {warnings[-1]}")
    return verify_and_record(choice, ctx, dev=dev, key=key, gpus=gpus, used_index=use_index, warnings=warnings)


def verify_and_record(choice: TorchChoice, ctx: Context, *, dev: bool, key: str, gpus: list[GPU],
                      used_index: bool, warnings: list[str]) -> int:
    say = ctx.out
    say("\n== checking that everything imports (torch, diffusers, transformers, ...)")
    code, text = ctx.capture([ctx.python, "-c", VERIFY_SCRIPT])
    report = parse_verify_output(text)
    if report is None:
        say(f"SETUP FAILED: the import check did not run (exit code {code}):\n{text.strip()[-2000:]}\n"
            "Next: run setup again with --force.")
        return 1
    problems, more_warnings = judge_verification(report, choice, used_index=used_index)
    for warning in more_warnings:
        say(f"  WARNING: {warning}")
    if problems:
        say("\nSETUP FAILED: the environment does not work yet:\n" + "\n".join(f"  - {p}" for p in problems))
        return 1
    stamp = {
        "schema": STAMP_SCHEMA, "hash": key, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(), "dev": dev, "choice": dataclasses.asdict(choice),
        "torch_source": choice.index_url if used_index else "pypi (PyTorch index unreachable)",
        "gpus": [dataclasses.asdict(g) for g in gpus], "modules": report.get("modules", {}),
        "optional": report.get("optional", {}), "cuda": bool(report.get("cuda")),
        "warnings": warnings + more_warnings,
    }
    write_stamp(ctx.venv_dir / STAMP_NAME, stamp)
    say("\nSetup finished.")
    print_summary(stamp, say)
    say("\n== python -m trainer doctor")
    code = ctx.run([ctx.python, "-m", "trainer", "doctor"])
    if code != 0:
        say("The doctor found a problem (above); training may not work until it is fixed.")
    return code


def print_summary(stamp: dict, say: Callable[[str], None]) -> None:
    choice = stamp.get("choice", {})
    modules, optional = stamp.get("modules", {}), stamp.get("optional", {})
    say(f"  Python        {stamp.get('python', '?')}")
    say(f"  torch         {modules.get('torch', '?')} ({choice.get('variant', '?')}: {choice.get('reason', '')})")
    say(f"  CUDA usable   {'yes' if stamp.get('cuda') else 'no'}")
    for name in ("diffusers", "transformers", "accelerate"):
        say(f"  {name:<13} {modules.get(name, '?')}")
    for name in ("xformers", "bitsandbytes"):
        say(f"  {name:<13} {optional.get(name) or 'not installed (optional)'}")
    say(f"  gradio        {optional.get('gradio') or 'not installed (only the GUI needs it)'}")
    say(f"  dev extras    {'yes' if stamp.get('dev') else 'no'}")
    say("Next: ./train.sh --config_file presets/demo.toml   (Windows: .\\train.ps1 -Config presets\\demo.toml)\n"
        "Or in the browser: ./gui.sh   (Windows: .\\gui.ps1)\n"
        "Check the environment any time: python -m trainer doctor")
