"""`python -m trainer <command>`: the one entry point. Heavy libraries are imported only by the commands
that need them, so `setup` and `doctor` work before torch is installed."""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Sequence

from trainer import interrupts
from trainer.console import quiet_libraries, run_guarded, setup_logging

USAGE = """usage: python -m trainer <command> [arguments]

commands:
  train    train a LoRA; takes sd-scripts' train_network.py arguments (--config_file, --dataset_config, ...)
  gui      open the trainer's page in the browser: presets, settings, start/stop, progress (--port, --no_browser)
  demo     train the built-in demo (tiny model, generated images) to check that everything works
  merge    merge LoRA files into a base model and save one .safetensors checkpoint (A1111 layout)
  extract_lora  the difference of a fine-tuned and its original model as a LoRA (--model_org, --model_tuned)
  merge_lora  several LoRA files into one LoRA (--models, --ratios, --save_to; --new_rank: SVD as svd_merge_lora.py)
  resize_lora  a LoRA at a lower rank by SVD (--model, --save_to, --new_rank; sd-scripts' resize_lora.py)
  check_lora  say whether ComfyUI, A1111/Forge and diffusers apply every key of a LoRA file, and check its tensors
  show_metadata  print a .safetensors file's metadata (ss_*, modelspec.*), long values summarised (--full, --json)
  caption  write a caption file beside each picture: WD14 tags (--model wd14), or a sentence (--model blip|florence2)
  regimages  draw regularisation pictures of a class with your base model into an N_class folder (--class, --count)
  compare  a run's epoch files (or any LoRAs) side by side in one labelled grid: rows files x strengths, columns prompts
  bench    speed and peak VRAM of a preset on its full-size model with random weights (--estimate: no run)
  setup    install torch and the requirements for this machine (run by setup.ps1 / setup.sh)
  doctor   check the environment (Python, torch, GPU, packages) and say what to fix
  args     write the table of sd-scripts arguments and their status here (docs/compatibility.md)

`python -m trainer train --help` lists every training argument."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 1
    command, rest = argv[0], argv[1:]
    handler = COMMANDS.get(command)
    if handler is None:
        print(f"unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
        return 2
    return run_guarded(lambda: handler(rest))


def cmd_train(argv: list[str]) -> int:
    # First of all: Ctrl-C/Ctrl-Break (the GUI's Stop) are held until a safe point, so a press during the
    # imports below or the model load is one line and exit 130, never a traceback, an abort or a run that
    # trains on; from the first step on they save the LoRA so far (trainer.interrupts).
    interrupts.install()
    try:
        setup_logging()
        # lazy: each command imports what it needs, so `setup` and `doctor` start before torch is installed
        from trainer.config.args import parse_train_args, write_output_config

        cfg = parse_train_args(argv)
        setup_logging(cfg.console_log_level, cfg.console_log_file, cfg.console_log_simple)
        if cfg.output_config:
            print(f"wrote {write_output_config(cfg)}")
            return 0
        quiet_libraries()
        from trainer.train.run import run_training  # lazy: see cmd_train

        interrupts.check()
        return 0 if run_training(cfg) else 1
    finally:
        interrupts.uninstall()


def cmd_gui(argv: list[str]) -> int:
    from trainer.gui import app  # lazy: see cmd_train

    return app.main(argv)


def cmd_demo(argv: list[str]) -> int:
    from trainer.demo import DEMO_PRESET  # lazy: see cmd_train

    return cmd_train(["--config_file", str(DEMO_PRESET), *argv])


def tool_command(module: str, *, loads_models: bool = False, entry: str = "main") -> Callable[[list[str]], int]:
    """A command whose work is `trainer.tools.<module>.<entry>(argv)`, imported only when it runs (see
    cmd_train). `loads_models`: quiet diffusers' and transformers' own progress bars, which would garble ours."""
    def run(argv: list[str]) -> int:
        setup_logging()
        if loads_models:
            quiet_libraries()
        return getattr(importlib.import_module(f"trainer.tools.{module}"), entry)(argv)
    return run


def cmd_setup(argv: list[str]) -> int:
    from trainer.tools import setup_env  # lazy: see cmd_train

    return setup_env.main(argv)


def cmd_doctor(argv: list[str]) -> int:
    from trainer.tools import doctor  # lazy: see cmd_train

    return doctor.main(argv)


def cmd_args(argv: list[str]) -> int:
    from trainer.tools.compat import main as compat_main  # lazy: see cmd_train

    return compat_main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": cmd_train,
    "gui": cmd_gui,
    "demo": cmd_demo,
    "merge": tool_command("merge"),
    "extract_lora": tool_command("extract_lora", loads_models=True),
    "merge_lora": tool_command("merge_lora"),
    "resize_lora": tool_command("resize_lora"),
    "caption": tool_command("caption", loads_models=True),
    "regimages": tool_command("regimages", loads_models=True),
    "compare": tool_command("compare", loads_models=True),
    "check_lora": tool_command("check_lora", loads_models=True),
    "show_metadata": tool_command("check_lora", entry="show_metadata_main"),
    "bench": tool_command("bench"),
    "setup": cmd_setup,
    "doctor": cmd_doctor,
    "args": cmd_args,
}
