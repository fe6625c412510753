"""`python -m trainer compare`: the epochs of a run (or any LoRA files) side by side, to pick the best by eye.

    python -m trainer compare --model C:\\models\\sd15.safetensors --loras C:\\lora\\output --prompts prompts.txt
    python -m trainer compare --model ... --loras output\\mychar.safetensors --strengths 0.4,0.6,0.8,1.0

draws every prompt with every file (a folder means its `.safetensors` files, epochs in order, the final file
last) at every strength, and writes one picture: a row per file and strength (first a row without any LoRA,
unless --no_base_row), a column per prompt, labelled. Each prompt keeps its seed across rows (its `--d`, else
--seed + its number), so a row differs from the next only by the LoRA, as `<lora:name:0.8>` tests in A1111 do.
The prompts take sd-scripts' sample-prompt syntax (a .txt/.toml/.json prompt file, or --prompt)."""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import replace
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

from trainer.errors import ConfigError
from trainer.models.load import load_for_drawing
from trainer.network.lora import LoRANetwork, read_weights_file
from trainer.train.grid import GridRow, column_label, draw_grid, save_grid
from trainer.train.sample import (
    SamplePrompt,
    build_pipeline,
    draw_picture,
    load_prompts,
    parse_prompt_line,
    quiet_deprecations,
)

log = logging.getLogger(__name__)

_EPOCH_SUFFIX = re.compile(r"^(?P<stem>.*)-(?P<number>\d{6})$")  # sd-scripts' <name>-000004.safetensors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer compare", description=__doc__.split("\n")[0])
    parser.add_argument("--model", "--pretrained_model_name_or_path", dest="model", required=True,
                        help="the base model the LoRAs were trained on (.safetensors/.ckpt, diffusers folder, hub id)")
    parser.add_argument("--loras", nargs="+", required=True, help="LoRA files, or folders of them (a run's output)")
    parser.add_argument("--prompts", help="sd-scripts prompt file (.txt: one prompt a line, options after --)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (again for more); with --prompts too")
    parser.add_argument("--strengths", default="1.0", help='LoRA strengths, comma-separated, e.g. "0.4,0.6,0.8,1.0"')
    parser.add_argument("--seed", type=int, default=1, help="seed of prompt i is seed + i unless it has --d")
    parser.add_argument("--sampler", default="euler_a", help="sd-scripts sampler name (ddim, euler_a, dpmsolver++...)")
    parser.add_argument("--steps", type=int, help="sampling steps of prompts without --s (default 30)")
    parser.add_argument("--width", type=int, help="picture width of prompts without --w (default 512)")
    parser.add_argument("--height", type=int, help="picture height of prompts without --h (default 512)")
    parser.add_argument("--out", help="the grid picture to write (default: compare_grid.png beside the LoRAs; an "
                        "existing one is kept and the new one numbered)")
    parser.add_argument("--no_base_row", action="store_true", help="leave out the row without any LoRA")
    parser.add_argument("--v2", action="store_true")
    parser.add_argument("--sdxl", action="store_true")
    parser.add_argument("--v_parameterization", action="store_true")
    return parser


def lora_files(specs: list[str]) -> list[Path]:
    """Files as given; a folder's .safetensors files with the epochs in order and the final file last."""
    files: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            found = sorted(path.glob("*.safetensors"), key=epoch_order)
            if not found:
                raise ConfigError(f"--loras {spec}: the folder holds no .safetensors files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"--loras {spec}: no such file or folder. Check the path.")
    return files


def epoch_order(path: Path) -> tuple[str, int]:
    """`name-000004` sorts by its epoch number; `name` (the final file) after all of its epochs."""
    match = _EPOCH_SUFFIX.match(path.stem)
    return (match["stem"], int(match["number"])) if match else (path.stem, 1 << 30)


def parse_strengths(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f'--strengths "{text}": give numbers separated by commas, e.g. "0.4,0.6,0.8,1.0"') from None
    if not values:
        raise ConfigError("--strengths is empty: give at least one number, e.g. 1.0")
    return values


def comparison_prompts(args: argparse.Namespace) -> list[SamplePrompt]:
    """The prompt file's and --prompt's prompts; options missing from a prompt come from --steps/--width/
    --height, and a prompt without a seed gets --seed + its number (the same in every row)."""
    base = SamplePrompt("")
    defaults = SamplePrompt("", sample_steps=args.steps or base.sample_steps, width=args.width or base.width,
                            height=args.height or base.height)
    prompts = [_with_defaults(p, defaults, args) for p in load_prompts(args.prompts)] if args.prompts else []
    prompts += [parse_prompt_line(text, defaults) for text in args.prompt]
    if not prompts:
        raise ConfigError("compare needs prompts: --prompts FILE (sd-scripts' prompt file) or --prompt \"...\"")
    return [p if p.seed is not None else replace(p, seed=args.seed + i) for i, p in enumerate(prompts)]


def _with_defaults(prompt: SamplePrompt, defaults: SamplePrompt, args: argparse.Namespace) -> SamplePrompt:
    given = {"sample_steps": args.steps, "width": args.width, "height": args.height}
    base = SamplePrompt("")  # a field still at the prompt file's default takes the command line's value
    return replace(prompt, **{k: getattr(defaults, k) for k, v in given.items()
                              if v is not None and getattr(prompt, k) == getattr(base, k)})


def default_output(files: list[Path]) -> Path:
    """compare_grid.png beside the first LoRA; never over an existing picture (compare_grid-2.png, ...)."""
    folder = files[0].parent
    candidate, number = folder / "compare_grid.png", 2
    while candidate.exists():
        candidate, number = folder / f"compare_grid-{number}.png", number + 1
    return candidate


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    files = lora_files(args.loras)
    strengths = parse_strengths(args.strengths)
    prompts = comparison_prompts(args)
    out = Path(args.out).expanduser() if args.out else default_output(files)
    rows = [(None, 0.0)] * (not args.no_base_row) + [(f, s) for f in files for s in strengths]
    print(f"drawing {len(prompts)} prompt(s) x {len(rows)} row(s) = {len(prompts) * len(rows)} pictures")
    models, device = load_for_drawing(args.model, v2=args.v2, sdxl=args.sdxl,
                                      v_parameterization=args.v_parameterization)
    grid_rows = draw_rows(models, device, rows, prompts, args.sampler, multi_strength=len(strengths) > 1)
    columns = [column_label(p.prompt, p.seed) for p in prompts]
    save_grid(draw_grid(grid_rows, columns, title=f"{Path(args.model).name}: rows = LoRA file and strength, "
                                                     "columns = prompts"), out)
    print(f"wrote {out}")
    return 0


def draw_rows(models, device, rows: list[tuple[Path | None, float]], prompts: list[SamplePrompt], sampler: str,
              *, multi_strength: bool) -> list[GridRow]:
    """Each row's pictures; a file's LoRA is attached once for all of its strengths and detached after."""
    with quiet_deprecations():
        pipe = build_pipeline(models, sampler)
    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               "ETA", TimeRemainingColumn())
    result: list[GridRow] = []
    network, attached = None, None
    with Progress(*columns) as progress, torch.no_grad(), quiet_deprecations():
        task = progress.add_task("compare", total=len(rows) * len(prompts))
        try:
            for file, strength in rows:
                if file != attached:
                    if network is not None:
                        network.remove()
                    network = _attach(models, file, device) if file is not None else None
                    attached = file
                if network is not None:
                    network.set_multiplier(strength)
                cells = []
                for prompt in prompts:
                    cells.append(draw_picture(pipe, prompt, prompt.seed))
                    progress.advance(task)
                label = "no LoRA" if file is None else file.stem + (f" x{strength:g}" if multi_strength else "")
                result.append(GridRow(label, cells))
        finally:
            if network is not None:
                network.remove()
    return result


def _attach(models, file: Path, device) -> LoRANetwork:
    network = LoRANetwork.from_weights(models.text_encoders, models.unet, read_weights_file(file),
                                       sdxl=models.family == "sdxl", source=str(file))
    network.to(device=device, dtype=next(models.unet.parameters()).dtype)
    network.apply_to()
    network.eval()
    return network
