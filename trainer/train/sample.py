"""Sample images during training, from sd-scripts prompt files (library/train_util.py's format).

Prompt files: `.txt` (one prompt a line, options after ` --`: n negative, w/h size, d seed, s steps, l CFG scale,
ss sampler), `.toml` (`[prompt]` shared values + `[[prompt.subset]]`), `.json` (a list of objects or lines).
Images go to `<output_dir>/sample/` with sd-scripts' names; the random state is restored afterwards, so
sampling never changes what training does."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from trainer.errors import ConfigError, UserError
from trainer.files import atomic_path
from trainer.train.grid import training_grid
from trainer.train.phases import phase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    sample_steps: int = 30
    scale: float = 7.5
    sample_sampler: str | None = None


# sd-scripts' sampler names -> (diffusers scheduler class, extra config)
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}), "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}), "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}), "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}), "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}), "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}), "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}
_TXT_OPTIONS = {"n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
                "s": ("sample_steps", int), "l": ("scale", float), "ss": ("sample_sampler", str)}
_IGNORED_TXT_OPTIONS = ("g", "cn", "ctr", "rcfg", "fs")  # parsed by sd-scripts, unused for SD/SDXL


def parse_prompt_line(line: str, defaults: SamplePrompt = SamplePrompt("")) -> SamplePrompt:
    """`a cat --n blurry --w 768 --d 42` -> SamplePrompt (size floored to a multiple of 8, at least 64)."""
    parts = re.split(r"\s+--(?=[a-z]+\b)", line.strip())
    values: dict = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        key, _, value = part.partition(" ")
        if key in _IGNORED_TXT_OPTIONS:
            continue
        if key not in _TXT_OPTIONS:
            raise ConfigError(f"sample prompt option --{key} is unknown (known: "
                              f"{', '.join('--' + k for k in _TXT_OPTIONS)}): {line!r}")
        name, kind = _TXT_OPTIONS[key]
        try:
            values[name] = kind(value.strip())
        except ValueError:
            raise ConfigError(f"sample prompt option --{key} needs a {kind.__name__}: {line!r}") from None
    return normalise(replace(defaults, **values))


def normalise(p: SamplePrompt) -> SamplePrompt:
    return replace(p, width=max(64, p.width - p.width % 8), height=max(64, p.height - p.height % 8),
                   sample_steps=min(1000, max(1, p.sample_steps)))


def load_prompts(path: str | Path) -> list[SamplePrompt]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--sample_prompts {path}: no such file. Give a .txt (one prompt a line), .toml or .json "
                          "prompt file.")
    text = file.read_text(encoding="utf-8-sig")
    if file.suffix.lower() == ".toml":
        return _prompts_from_toml(file, text)
    if file.suffix.lower() == ".json":
        items = json.loads(text)
        return [parse_prompt_line(i) if isinstance(i, str) else normalise(_from_dict(file, i)) for i in items]
    return [parse_prompt_line(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _prompts_from_toml(file: Path, text: str) -> list[SamplePrompt]:
    import toml

    table = toml.loads(text).get("prompt", {})
    shared = {k: v for k, v in table.items() if k != "subset"}
    prompts = []
    for subset in table.get("subset", []):
        both = set(shared) & set(subset)
        if both:  # sd-scripts fails here with a duplicate-keyword error; say which key instead
            raise ConfigError(f"{file}: key(s) {', '.join(sorted(both))} appear both in [prompt] and in a "
                              "[[prompt.subset]]; keep one.")
        prompts.append(normalise(_from_dict(file, {**shared, **subset})))
    return prompts


def _from_dict(file: Path, values: dict) -> SamplePrompt:
    aliases = {"negative_prompt": "negative_prompt", "sample_steps": "sample_steps", "steps": "sample_steps",
               "scale": "scale", "cfg_scale": "scale", "guidance_scale": "scale"}
    known = set(SamplePrompt.__dataclass_fields__)
    cleaned = {}
    for key, value in values.items():
        name = aliases.get(key, key)
        if name not in known:
            raise ConfigError(f"{file}: unknown sample prompt key '{key}' (known: {', '.join(sorted(known))})")
        cleaned[name] = value
    if "prompt" not in cleaned:
        raise ConfigError(f"{file}: a sample prompt without 'prompt'")
    return SamplePrompt(**cleaned)


@dataclass(frozen=True)
class SampleSchedule:
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    at_first: bool = False

    def at_step(self, step: int) -> bool:
        """Step sampling applies only when epoch sampling is off (sd-scripts)."""
        return not self.every_n_epochs and bool(self.every_n_steps) and step % self.every_n_steps == 0

    def at_epoch_end(self, epoch: int) -> bool:
        return bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0


def sample_file_name(output_name: str | None, label: str, index: int, seed: int | None) -> str:
    """sd-scripts: `<name>_<e000001 or 000500>_<idx:02d>_<YYYYmmddHHMMSS>[_<seed>].png`."""
    stamp = time.strftime("%Y%m%d%H%M%S")
    return f"{output_name + '_' if output_name else ''}{label}_{index:02d}_{stamp}{'_' + str(seed) if seed is not None else ''}.png"


def make_scheduler(sampler: str, train_scheduler, v_parameterization: bool):
    import diffusers

    if sampler not in SAMPLERS:
        raise ConfigError(f"--sample_sampler {sampler}: unknown (known: {', '.join(SAMPLERS)})")
    class_name, extra = SAMPLERS[sampler]
    config = {k: v for k, v in train_scheduler.config.items() if not k.startswith("_")}
    config.update(extra, prediction_type="v_prediction" if v_parameterization else "epsilon")
    cls = getattr(diffusers, class_name)
    if "clip_sample" in cls.from_config(config).config:
        config["clip_sample"] = True  # sd-scripts forces it on where the scheduler has it
    try:
        return cls.from_config(config)
    except ImportError as e:
        raise UserError(f"--sample_sampler {sampler} needs another package: {e}. Choose another sampler "
                        "(ddim, euler_a, dpmsolver++...).") from None


class Sampler:
    """Generates the sample images with the models being trained (LoRA active) at the scheduled points."""

    def __init__(self, prompts: list[SamplePrompt], schedule: SampleSchedule, *, output_dir: Path,
                 output_name: str | None, default_sampler: str, models, network, clip_skip: int | None,
                 device, autocast, on_image, on_grid=None, eval_mode=contextlib.nullcontext):
        self.prompts = prompts
        self.eval_mode = eval_mode  # schedule-free optimizers: sample with the averaged weights (train.optim)
        self.schedule = schedule
        self.output_dir = output_dir
        self.folder = output_dir / "sample"
        self.output_name = output_name
        self.default_sampler = default_sampler
        self.models = models
        self.network = network
        self.clip_skip = clip_skip
        self.device = device
        self.autocast = autocast
        self.on_image = on_image
        self.on_grid = on_grid

    def at_first(self) -> None:
        if self.schedule.at_first:
            self.generate("e000000" if self.schedule.every_n_epochs else f"{0:06d}")

    def at_step(self, step: int) -> None:
        if self.schedule.at_step(step):
            self.generate(f"{step:06d}")

    def at_epoch_end(self, epoch: int) -> None:
        if self.schedule.at_epoch_end(epoch):
            self.generate(f"e{epoch:06d}")

    def at_end(self) -> None:
        """The run's samples side by side (trainer.train.grid), to pick the best epoch by eye."""
        path = training_grid(self.output_dir, self.output_name, self.prompts)
        if path is not None:
            log.info("sample grid (rows: when sampled, columns: prompts): %s", path)
            if self.on_grid is not None:
                self.on_grid(path)

    def generate(self, label: str) -> None:
        """One image per prompt; the RNG state and the modules' train/eval modes are put back afterwards."""
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        modes = [(m, m.training) for m in (self.models.unet, *self.models.text_encoders, self.network)]
        # Cached latents / text-encoder outputs leave the VAE and text encoders on the CPU: bring them back.
        parked = [(m, next(m.parameters()).device) for m in (self.models.vae, *self.models.text_encoders)]
        try:
            for module, _ in modes:
                module.eval()
            for module, _ in parked:
                module.to(self.device)
            with phase("sample"), torch.no_grad(), self.autocast(), quiet_deprecations(), self.eval_mode():
                for index, prompt in enumerate(self.prompts):
                    self._one(prompt, label, index)
        finally:
            for module, device in parked:
                module.to(device)
            for module, mode in modes:
                module.train(mode)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)

    def _one(self, prompt: SamplePrompt, label: str, index: int) -> None:
        pipe = self._pipeline(prompt.sample_sampler or self.default_sampler)
        seed = prompt.seed if prompt.seed is not None else torch.seed()
        image = draw_picture(pipe, prompt, seed, self.clip_skip)
        path = self.folder / sample_file_name(self.output_name, label, index, prompt.seed)
        with atomic_path(path) as temp:
            image.save(temp, format="PNG")
        self.on_image(path, prompt.prompt)

    def _pipeline(self, sampler: str):
        return build_pipeline(self.models, sampler)


def build_pipeline(models, sampler: str):
    """A diffusers text-to-image pipeline on the loaded models (the LoRA, if attached, stays active), with
    sd-scripts' sampler names; also what `regimages` draws with."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    m = models
    scheduler = make_scheduler(sampler, m.noise_scheduler, m.v_parameterization)
    if m.family == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=m.vae, text_encoder=m.text_encoders[0],
                                         text_encoder_2=m.text_encoders[1], tokenizer=m.tokenizers[0],
                                         tokenizer_2=m.tokenizers[1], unet=m.unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0],
                                       unet=m.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw_picture(pipe, prompt: SamplePrompt, seed: int, clip_skip: int | None = None):
    """One picture of a prompt with its own CPU generator (the same seed draws the same noise on any device);
    sd-scripts' --clip_skip 2 is diffusers' clip_skip=1 (layers skipped after the last)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    extra = {"clip_skip": clip_skip - 1} if clip_skip and clip_skip > 1 else {}
    return pipe(prompt.prompt, negative_prompt=prompt.negative_prompt or None, width=prompt.width,
                height=prompt.height, num_inference_steps=prompt.sample_steps, guidance_scale=prompt.scale,
                generator=generator, **extra).images[0]


@contextlib.contextmanager
def quiet_deprecations():
    """diffusers' config deprecation notes (steps_offset, clip_sample) say nothing a trainer user can act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


class NoSampler:
    """Sampling switched off: every hook does nothing, so the loop needs no `if`."""

    def at_first(self) -> None: ...

    def at_step(self, step: int) -> None: ...

    def at_epoch_end(self, epoch: int) -> None: ...

    def at_end(self) -> None: ...


# ---- built from the config -----------------------------------------------------------------------------


def sample_schedule(cfg: Any) -> SampleSchedule:
    """When to sample: --sample_every_n_steps / --sample_every_n_epochs (0 or less: never), --sample_at_first."""
    def positive(every: int | None) -> int | None:
        return every if (every or 0) > 0 else None

    return SampleSchedule(every_n_steps=positive(cfg.sample_every_n_steps),
                          every_n_epochs=positive(cfg.sample_every_n_epochs), at_first=cfg.sample_at_first)


def load_sample_prompts(cfg: Any) -> list:
    """Read the prompt file before any model loads, so a mistake in it stops the run at once."""
    if not cfg.sample_prompts:
        if sample_schedule(cfg) != SampleSchedule():
            log.warning("Sampling is scheduled but --sample_prompts is not given: no sample images.")
        return []
    return load_prompts(cfg.sample_prompts)


def build_sampler(cfg: Any, prompts: list, models, network, accelerator, reporter: Any, eval_mode=None):
    """A Sampler on the main process when there are prompts and a schedule, else a NoSampler."""
    schedule = sample_schedule(cfg)
    if not prompts or not accelerator.is_main_process or schedule == SampleSchedule():
        return NoSampler()
    return Sampler(prompts, schedule, output_dir=Path(cfg.output_dir or "output"), output_name=cfg.output_name,
                   default_sampler=cfg.sample_sampler, models=models,
                   network=accelerator.unwrap_model(network), clip_skip=cfg.clip_skip,
                   device=accelerator.device, autocast=accelerator.autocast,
                   on_image=lambda path, prompt: reporter.emit("sample", path=str(path), prompt=prompt),
                   on_grid=lambda path: reporter.emit("sample_grid", path=str(path)),
                   **({"eval_mode": eval_mode} if eval_mode else {}))
