"""`python -m trainer regimages`: regularisation pictures of the class, drawn by the base model you train on.

    python -m trainer regimages --model C:\\models\\sd15.safetensors --class "woman" --count 200 --out C:\\lora\\reg

writes `C:\\lora\\reg\\1_woman\\reg_0000.png` ... with a caption file each (the class words), which is the layout
`--reg_data_dir C:\\lora\\reg` expects (sd-scripts' `N_classtoken` folders). With `--config my.toml` the model,
the training resolution and the reg folder come from the training config.

Picture i is drawn with seed `--seed + i`, so the folder is the same whether it is made in one go or in
several: a second run skips the pictures that exist (stopped runs resume) and adds what `--count` asks for.
The prompt takes sd-scripts' sample-prompt syntax (`a photo of a woman --n blurry --s 30 --l 7 --w 512`)."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

from trainer.config.args import check_toml_values, parse_resolution, read_config_file
from trainer.errors import ConfigError
from trainer.files import atomic_path, atomic_write_text
from trainer.models.load import load_for_drawing
from trainer.train.sample import SamplePrompt, build_pipeline, draw_picture, parse_prompt_line, quiet_deprecations

log = logging.getLogger(__name__)

NATIVE_SIZE = {"sd1": 512, "sd2": 768, "sdxl": 1024}  # what each family was trained at (SD 2 512-base: 512)
PICTURE = "reg_{:04d}.png"


@dataclass(frozen=True)
class RegPlan:
    model: str
    class_words: str
    folder: Path               # <out>/<repeats>_<class>
    count: int
    prompt: str                # sd-scripts sample-prompt syntax
    resolution: tuple[int, int] | None  # None: the family's native size
    seed: int
    sampler: str
    v2: bool = False
    sdxl: bool = False
    v_parameterization: bool = False

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if not (self.folder / PICTURE.format(i)).is_file()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer regimages", description=__doc__.split("\n")[0])
    parser.add_argument("--config", "--config_file", dest="config", help="a training TOML: model, resolution and "
                        "reg_data_dir are taken from it (the options below win)")
    parser.add_argument("--model", "--pretrained_model_name_or_path", dest="model",
                        help="the base model you train on: .safetensors/.ckpt, diffusers folder, hub id, builtin:")
    parser.add_argument("--class", dest="class_words", required=True, help='the class, e.g. "woman" or "dog"')
    parser.add_argument("--count", type=int, default=200, help="pictures in the folder when done (default 200)")
    parser.add_argument("--out", "--reg_data_dir", dest="out", help="the reg parent folder (gets N_class inside)")
    parser.add_argument("--repeats", type=int, default=1, help="N of the N_class folder name (default 1)")
    parser.add_argument("--prompt", help='default "a photo of a CLASS"; sd-scripts options such as --n, --s, --l')
    parser.add_argument("--resolution", help='"W" or "W,H" (default: the config\'s, else the model\'s native size)')
    parser.add_argument("--seed", type=int, default=0, help="picture i uses seed + i (default 0)")
    parser.add_argument("--sampler", default="euler_a", help="sd-scripts sampler name (default euler_a)")
    parser.add_argument("--v2", action="store_true")
    parser.add_argument("--sdxl", action="store_true")
    parser.add_argument("--v_parameterization", action="store_true")
    return parser


def plan_from_args(argv: list[str]) -> RegPlan:
    args = build_parser().parse_args(argv)
    cfg = _training_config(args.config) if args.config else {}
    model = args.model or cfg.get("pretrained_model_name_or_path")
    out = args.out or cfg.get("reg_data_dir")
    if not model:
        raise ConfigError("regimages: give --model (the base model you train on) or --config with "
                          "pretrained_model_name_or_path.")
    if not out:
        raise ConfigError("regimages: give --out (the reg parent folder, what --reg_data_dir will name) or --config "
                          "with reg_data_dir.")
    if args.count < 1 or args.repeats < 1:
        raise ConfigError("regimages: --count and --repeats must be 1 or more.")
    words = " ".join(args.class_words.split())
    if not words or any(c in words for c in '\\/:*?"<>|'):
        raise ConfigError(f'regimages --class "{args.class_words}": use words only (it names the folder '
                          f'"{args.repeats}_<class>"), e.g. --class "woman".')
    try:
        resolution = parse_resolution(args.resolution) if args.resolution else cfg.get("resolution")
    except ValueError as e:
        raise ConfigError(f"regimages --resolution: {e}") from None
    return RegPlan(model=str(model), class_words=words, folder=Path(out).expanduser() / f"{args.repeats}_{words}",
                   count=args.count, prompt=args.prompt or f"a photo of a {words}", resolution=resolution,
                   seed=args.seed, sampler=args.sampler, v2=args.v2 or bool(cfg.get("v2")),
                   sdxl=args.sdxl or bool(cfg.get("sdxl")),
                   v_parameterization=args.v_parameterization or bool(cfg.get("v_parameterization")))


def _training_config(path: str) -> dict:
    """The training TOML's values (sd-scripts' --config_file: sectioned or flat), checked key by key; the
    dataset itself is not needed to draw its reg pictures."""
    file, values = read_config_file(path)
    converted, problems = check_toml_values(file, values)
    if problems:
        raise ConfigError(problems)
    return converted


def main(argv: list[str]) -> int:
    plan = plan_from_args(argv)
    todo = plan.missing()
    if not todo:
        print(f"{plan.folder}: all {plan.count} pictures are there already; nothing to do.")
        return 0
    models, device = load_for_drawing(plan.model, v2=plan.v2, sdxl=plan.sdxl,
                                      v_parameterization=plan.v_parameterization)
    prompt = _prompt(plan, models.family)
    print(f"drawing {len(todo)} of {plan.count} pictures ({plan.count - len(todo)} there already) at "
          f"{prompt.width}x{prompt.height}, {prompt.sample_steps} steps, into {plan.folder}")
    draw(plan, models, device, todo, prompt)
    print(f"done: {plan.folder} holds {plan.count} pictures; train with --reg_data_dir \"{plan.folder.parent}\"")
    return 0


def _prompt(plan: RegPlan, family: str):
    width, height = plan.resolution or (NATIVE_SIZE[family],) * 2
    return parse_prompt_line(plan.prompt, SamplePrompt("", width=width, height=height))


def draw(plan: RegPlan, models, device, todo: list[int], prompt) -> None:
    """Each missing picture with its own seed, written atomically with its caption; a rich progress bar with
    the ETA."""
    with quiet_deprecations():
        pipe = build_pipeline(models, plan.sampler)
    plan.folder.mkdir(parents=True, exist_ok=True)
    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               "ETA", TimeRemainingColumn())
    started = time.time()
    with Progress(*columns) as progress, torch.no_grad(), quiet_deprecations():
        task = progress.add_task("regimages", total=len(todo))
        for index in todo:
            image = draw_picture(pipe, prompt, plan.seed + index)
            path = plan.folder / PICTURE.format(index)
            atomic_write_text(path.with_suffix(".txt"), plan.class_words)  # the caption first: a picture is complete
            with atomic_path(path) as temp:
                image.save(temp, format="PNG")
            progress.advance(task)
    log.info("drew %d pictures in %.0f s on %s", len(todo), time.time() - started, device)
