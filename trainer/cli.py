"""`python -m trainer <command>`: the one entry point. Heavy libraries are imported only by the commands
that need them, so `setup` and `doctor` work before torch is installed."""

from __future__ import annotations

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
  caption  write a caption file beside each picture: WD14 tags (--model wd14) or a BLIP sentence (--model blip)
  regimages  draw regularisation pictures of a class with your base model into an N_class folder (--class, --count)
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


def cmd_merge(argv: list[str]) -> int:
    setup_logging()
    from trainer.tools import merge  # lazy: see cmd_train

    return merge.main(argv)


def cmd_caption(argv: list[str]) -> int:
    setup_logging()
    from trainer.tools import caption  # lazy: see cmd_train

    return caption.main(argv)


def cmd_regimages(argv: list[str]) -> int:
    setup_logging()
    quiet_libraries()
    from trainer.tools import regimages  # lazy: see cmd_train

    return regimages.main(argv)


def cmd_bench(argv: list[str]) -> int:
    setup_logging()
    from trainer.tools import bench  # lazy: see cmd_train

    return bench.main(argv)


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
    "train": cmd_train, "gui": cmd_gui, "demo": cmd_demo, "merge": cmd_merge, "caption": cmd_caption, "regimages": cmd_regimages,
    "bench": cmd_bench,
    "setup": cmd_setup, "doctor": cmd_doctor, "args": cmd_args}
