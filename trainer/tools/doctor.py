"""`python -m trainer doctor`: is this environment ready to train, and if not, what fixes it.

Every check returns `Check`s; the report prints them with OK / NOTE / WARN / FAIL and the fix. Exit code 0
when nothing FAILs (notes and warnings are advice). Heavy libraries are imported inside the checks, so the
doctor still runs, and says to run setup, when torch is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import json
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from trainer.models.families import ARCHITECTURES, architecture_for_config
from trainer.models.tokenizer import find_bpe_file
from trainer.paths import PRESETS_DIR, REPO_ROOT, short_path
from trainer.presets import CARD_SLACK_GB, load_preset, memory_advice, preset_tiers, stated_peak_gb  # noqa: F401
from trainer.tools.setup_env import arch_supported

OK, NOTE, WARN, FAIL = "OK", "NOTE", "WARN", "FAIL"
ESSENTIAL_MODULES = ("diffusers", "transformers", "accelerate", "safetensors", "rich", "toml")
OPTIONAL_MODULES = {
    "xformers": "optional: --xformers attention; PyTorch's SDPA (--sdpa) is used without it",
    "bitsandbytes": "optional: only the 8-bit optimizers (AdamW8bit) need it",
    "gradio": "optional: only the browser GUI (gui.ps1 / gui.sh) needs it; setup installs it",
}
MIN_FREE_GB = 10.0
SETUP_HINT = "run ./setup.sh (Linux) or .\\setup.ps1 (Windows)"


@dataclass(frozen=True)
class Check:
    level: str
    name: str
    detail: str
    fix: str = ""


Importer = Callable[[str], object]


def check_python(version: tuple[int, int] | None = None) -> list[Check]:
    version = version or sys.version_info[:2]
    text = f"{version[0]}.{version[1]} ({sys.executable})"
    if (3, 10) <= version <= (3, 12):
        return [Check(OK, "Python", text)]
    return [Check(FAIL, "Python", text + " is outside 3.10-3.12",
                  f"install Python 3.12, delete .venv and {SETUP_HINT}")]


def check_venv(prefix: str | None = None, base_prefix: str | None = None) -> list[Check]:
    prefix, base_prefix = prefix or sys.prefix, base_prefix or sys.base_prefix
    if prefix == base_prefix:
        return [Check(WARN, "virtual env", f"not in one (Python at {prefix})",
                      "use .venv's python (./train.sh / .\\train.ps1 do), or " + SETUP_HINT)]
    checks = [Check(OK, "virtual env", prefix)]
    stamp = Path(prefix) / "trainer-setup.json"
    try:
        data = json.loads(stamp.read_text(encoding="utf-8"))
        choice = data.get("choice", {})
        checks.append(Check(OK, "setup", f"finished {data.get('finished', '?')}: torch {choice.get('variant', '?')} "
                                         f"({choice.get('reason', '')})"))
    except (OSError, ValueError, AttributeError):
        checks.append(Check(NOTE, "setup", "no record of a finished `trainer setup` in this environment",
                            SETUP_HINT))
    return checks


def check_torch(importer: Importer = importlib.import_module) -> list[Check]:
    try:
        torch = importer("torch")
    except Exception as e:  # ImportError, or a broken install raising anything
        return [Check(FAIL, "torch", f"cannot be imported ({type(e).__name__}: {e})", SETUP_HINT)]
    checks = [Check(OK, "torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none, CPU'})")]
    if not torch.cuda.is_available():
        detail = "not available: training runs on the CPU (fine for the demo, far too slow for real models)"
        fix = "" if torch.version.cuda is None else "check the driver with nvidia-smi, then setup --force"
        if torch.version.cuda is None and shutil.which("nvidia-smi"):
            fix = "an NVIDIA GPU is present but this torch is the CPU build: rerun setup without --cpu"
        return checks + [Check(NOTE if not fix else WARN, "CUDA", detail, fix)]
    arch_list = torch.cuda.get_arch_list()
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        vram = torch.cuda.get_device_properties(i).total_memory / 2**30
        name = f"{torch.cuda.get_device_name(i)}, sm_{major}{minor}, {vram:.1f} GiB VRAM"
        if _arch_ok((major, minor), arch_list):
            checks.append(Check(OK, f"GPU {i}", name))
        else:
            checks.append(Check(FAIL, f"GPU {i}", f"{name}: this torch has no kernels for it ({arch_list})",
                                "update the NVIDIA driver, then setup --force (it picks a newer CUDA build)"))
    return checks


def _arch_ok(cap: tuple[int, int], arch_list: Sequence[str]) -> bool:
    return arch_supported(cap, arch_list)


def check_modules(importer: Importer = importlib.import_module) -> list[Check]:
    checks = []
    for name in ESSENTIAL_MODULES:
        try:
            checks.append(Check(OK, name, _version(importer(name), name)))
        except Exception as e:
            checks.append(Check(FAIL, name, f"cannot be imported ({type(e).__name__}: {e})", SETUP_HINT))
    for name, why in OPTIONAL_MODULES.items():
        try:
            checks.append(Check(OK, name, _version(importer(name), name)))
        except Exception:
            checks.append(Check(NOTE, name, f"not installed ({why})"))
    return checks


def _version(module: object, name: str) -> str:
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
    return str(version)


def check_clip_vocab(find: Callable[[], Path | None] | None = None) -> list[Check]:
    path = (find or find_bpe_file)()
    if path is None:
        return [Check(WARN, "CLIP vocabulary", "not found: single-file checkpoints and the demo cannot build a "
                      "tokenizer offline", "python -m pip install --no-deps clip-anytorch==2.6.0, or " + SETUP_HINT)]
    return [Check(OK, "CLIP vocabulary", str(path))]


def check_paths(paths: dict[str, Path]) -> list[Check]:
    checks = []
    for label, path in paths.items():
        text = str(path)
        quirks = [q for q, present in (("spaces", " " in text), ("non-ASCII characters", not text.isascii()))
                  if present]
        if quirks:
            checks.append(Check(NOTE, label, f"{text} has {' and '.join(quirks)}: fine, supported"))
        else:
            checks.append(Check(OK, label, text))
    return checks


def check_long_paths(system: str | None = None) -> list[Check]:
    """Windows: paths over 260 characters fail unless LongPathsEnabled is set (deep caches, long names)."""
    if (system or platform.system()) != "Windows":
        return []
    try:
        import winreg

        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SYSTEM\CurrentControlSet\Control\FileSystem") as key:
            enabled = winreg.QueryValueEx(key, "LongPathsEnabled")[0] == 1
    except OSError:
        enabled = False
    if enabled:
        return [Check(OK, "long paths", "LongPathsEnabled = 1")]
    return [Check(NOTE, "long paths", "off: keep the trainer and datasets in short folders (under 260 characters)",
                  "optional, as administrator: set HKLM\\SYSTEM\\CurrentControlSet\\Control\\FileSystem "
                  "LongPathsEnabled to 1")]


def check_disk(path: Path, usage: Callable = shutil.disk_usage) -> list[Check]:
    try:
        free_gb = usage(path).free / 2**30
    except OSError as e:
        return [Check(NOTE, "free disk", f"unknown ({e})")]
    if free_gb < MIN_FREE_GB:
        return [Check(WARN, "free disk", f"{free_gb:.1f} GiB free at {path}",
                      f"free at least {MIN_FREE_GB:.0f} GiB: models, latent caches and outputs need room")]
    return [Check(OK, "free disk", f"{free_gb:.1f} GiB free at {path}")]


def check_config(config: str, importer: Importer = importlib.import_module) -> list[Check]:
    """Parse a training TOML the way `train` will; skipped when this build has no parser for it yet."""
    try:
        parse = getattr(importer("trainer.config.args"), "parse_train_args")
    except (ImportError, AttributeError):
        return [Check(NOTE, "config", f"{config}: not checked (this build has no config parser yet)")]
    try:
        parse(["--config_file", config])
    except SystemExit as e:  # argparse reports and exits
        return [Check(FAIL, "config", f"{config}: rejected (exit {e.code})", "read the message above")]
    except Exception as e:
        return [Check(FAIL, "config", f"{config}: {e}", "fix the file as the message says")]
    return [Check(OK, "config", f"{config} parses")]


def check_dataset(config: str, report=None) -> list[Check]:
    """The pre-flight check the GUI's Check button shows (trainer.tools.preflight, with the dataset doctor):
    the base model's path, files the config names, the picture folders and every picture and caption in them,
    the buckets, and the steps. `report`: that check already made (see `dataset_report`)."""
    report = report or dataset_report(config)
    if isinstance(report, Check):
        return [report]
    checks = [Check(FAIL, "pre-flight", problem) for problem in report.problems]  # each message names its fix
    for note in report.notes:
        warning = "Warning: " in note  # a folder's line may end in one
        checks.append(Check(WARN if warning else NOTE, "pre-flight", note.removeprefix("Warning: ")))
    if report.dataset and report.dataset.buckets:
        checks.append(Check(NOTE, "buckets", "; ".join(
            f"{b['resolution']}: {b['pictures']} picture(s) ({b['with_repeats']} with repeats)"
            for b in report.dataset.buckets)))
    if report.dataset and report.dataset.top_tags:
        checks.append(Check(NOTE, "top tags", ", ".join(f"{t} ({n})" for t, n in report.dataset.top_tags)))
    return checks


def dataset_report(config: str):
    """trainer.tools.preflight's CheckReport for `config`, or a Check saying why it could not be made."""
    try:  # lazy: the doctor runs, and says to run setup, before the requirements are installed
        from trainer.tools.preflight import check_config as preflight
    except ImportError as e:
        return Check(NOTE, "pre-flight", f"not checked ({e})", SETUP_HINT)
    return preflight(config, progress=ProgressLine())


class ProgressLine:
    """`checking pictures 400/1000` on stderr, rewritten in place, when many pictures must be decoded (the
    first check of a folder; later ones read the cache)."""

    def __init__(self, quiet_below: int = 200, stream=None) -> None:
        self.quiet_below, self.stream, self.first = quiet_below, stream or sys.stderr, None

    def __call__(self, done: int, total: int) -> None:
        if self.first is None:
            self.first = done
        if total - self.first < self.quiet_below:
            return
        end = "\n" if done == total else ""
        self.stream.write(f"\rchecking pictures {done}/{total}{end}")
        self.stream.flush()


# ---------------------------------------------------------------------------------------------------------------
# Does a training config fit this card?

@dataclass(frozen=True)
class Card:
    name: str
    total_gb: float
    free_gb: float | None = None


def detect_card(importer: Importer = importlib.import_module) -> Card | None:
    """The first NVIDIA GPU's memory: from torch when it sees CUDA, else from nvidia-smi (CPU-only torch)."""
    try:
        torch = importer("torch")
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info(0)
            return Card(torch.cuda.get_device_name(0), total / 2**30, free / 2**30)
    except Exception:  # no torch, or a broken CUDA setup: nvidia-smi may still answer
        pass
    return _card_from_nvidia_smi()


def _card_from_nvidia_smi() -> Card | None:
    import subprocess

    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=15, check=True).stdout
        name, total, free = [part.strip() for part in out.strip().splitlines()[0].split(",")]
        return Card(name, float(total) / 1024, float(free) / 1024)
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def estimate_needs(config: str) -> tuple[float, str] | None:
    """GB a card needs for this config, from trainer.tools.memory's estimate; None without torch/diffusers."""
    try:  # lazy: the doctor runs before torch is installed, and says so
        from trainer.tools.memory import estimate_for_config
    except ImportError:
        return None
    cfg = load_preset(config)
    family = architecture_for_config(cfg)
    estimate = estimate_for_config(cfg, family)
    return estimate.needs_card_gb, (f"estimated peak {max(estimate.total_gb, estimate.caching_gb):.1f} GB for "
                                    f"{family} at {estimate.details['resolution'][0]}x"
                                    f"{estimate.details['resolution'][1]}, batch {estimate.details['batch_size']}")


def check_vram(config: str, detect: Callable[[], Card | None] = detect_card,
               estimate: Callable[[str], tuple[float, str] | None] = estimate_needs,
               presets_dir: Path = PRESETS_DIR) -> list[Check]:
    """Compare what the config needs (the estimator, else the preset's stated peak, which is already the
    figure "on the card", CUDA context included) with the card, and name the preset tier or setting to step down to when it does not fit."""
    try:
        found = estimate(config)
    except Exception as e:  # the estimate is advice: never let it hide the rest of the report
        found, error = None, f"{type(e).__name__}: {e}"
    else:
        error = None
    stated = stated_peak_gb(config)
    if found is not None:
        needs, how = found
    elif stated is not None:
        needs, how = stated, f"the preset states a peak of {stated:g} GB on the card"
    else:
        return [Check(NOTE, "VRAM", f"{config}: no expected peak stated and no estimate"
                                    f"{f' ({error})' if error else ''}")]
    card = detect()
    if card is None:
        return [Check(NOTE, "VRAM", f"no NVIDIA GPU found; {config} needs a card with about {needs:.1f} GB ({how})")]
    detail = f"needs about {needs:.1f} GB ({how}); {card.name} has {card.total_gb:.1f} GB"
    if needs > card.total_gb:
        advice = step_down_advice(config, card.total_gb, presets_dir)
        return [Check(WARN, "VRAM", f"does not fit: {detail}", advice)]
    checks = [Check(OK, "VRAM", f"fits: {detail}")]
    if card.free_gb is not None and needs > card.free_gb:
        checks.append(Check(WARN, "free VRAM", f"only {card.free_gb:.1f} GB free now: other programs hold "
                                               f"{card.total_gb - card.free_gb:.1f} GB",
                            "close GPU programs (browsers with hardware acceleration, games, other UIs) "
                            "before training"))
    return checks


def step_down_advice(config: str | Path, card_gb: float, presets_dir: Path = PRESETS_DIR) -> str:
    """The shipped preset tier that fits `card_gb` and the settings that save the most memory, for this config
    (trainer.presets.memory_advice: the same advice the out-of-memory message gives)."""
    try:
        cfg = load_preset(config)
    except Exception:  # the advice must come even when the config cannot be read here
        prefix = Path(config).stem.lower().split("-")[0]
        fitting = [(gb, p) for gb, p in preset_tiers(prefix, presets_dir) if gb <= card_gb + CARD_SLACK_GB]
        return (f"use {short_path(fitting[-1][1]).as_posix()} (the {fitting[-1][0]} GB tier)" if fitting else
                "lower the resolution (e.g. 448 for SD 1.5) or network_dim")
    family = ARCHITECTURES[architecture_for_config(cfg)].family
    return "; or ".join(memory_advice(cfg, family, "train", card_gb))


def run_checks(args: argparse.Namespace) -> tuple[list[Check], object]:
    """(every check, the pre-flight report of --config or None)."""
    checks = check_python() + check_venv() + check_torch() + check_modules() + check_clip_vocab()
    checks += check_paths({"trainer folder": REPO_ROOT, "current folder": Path.cwd(), "Python env": Path(sys.prefix)})
    checks += check_long_paths() + check_disk(REPO_ROOT)
    found = None
    if args.config:
        config_checks = check_config(args.config)
        checks += config_checks
        if all(c.level == OK for c in config_checks):
            found = dataset_report(args.config)
            checks += check_dataset(args.config, found) + check_vram(args.config)
    return checks, found


def report(checks: Sequence[Check], say: Callable[[str], None] = print) -> int:
    """Print the checks; 0 when none failed."""
    width = max((len(c.name) for c in checks), default=0)
    for c in checks:
        say(f"[{c.level:<4}] {c.name:<{width}}  {c.detail}")
        if c.fix:
            say(f"{'':<{width + 9}}fix: {c.fix}")
    failed = [c for c in checks if c.level == FAIL]
    say(f"\n{len(failed)} problem(s) to fix." if failed else "\nReady to train.")
    return 1 if failed else 0


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer doctor",
                                description="Check Python, torch/CUDA, libraries, paths and disk; say how to fix "
                                            "what is wrong.")
    p.add_argument("--config", help="also check this training TOML: it parses, its pictures and captions (the "
                                    "dataset doctor), and it fits this GPU's memory")
    p.add_argument("--json", action="store_true", help="print the findings as JSON (for the GUI and other programs)")
    args = p.parse_args(list(argv))
    checks, found = run_checks(args)
    if args.json:
        return print_json(checks, found)
    return report(checks)


def print_json(checks: Sequence[Check], found: object) -> int:
    """{"ok", "checks": [{level, name, detail, fix}], "config": the pre-flight report or null}; exit code as
    `report`."""
    failed = any(c.level == FAIL for c in checks)
    data = {"ok": not failed, "checks": [dataclasses.asdict(c) for c in checks],
            "config": found.to_json() if hasattr(found, "to_json") else None}
    sys.stdout.write(json.dumps(data, indent=1) + "\n")  # ASCII escapes: safe on any Windows console code page
    return 1 if failed else 0
