"""Optimizers and learning-rate schedules by sd-scripts' names (spec §10.5-10.6)."""

from __future__ import annotations

import ast
import importlib
import logging
from dataclasses import dataclass

from trainer.errors import ConfigError, UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerEntry:
    module: str          # where the class lives
    cls: str             # class name
    package: str         # pip package that provides it
    defaults: tuple = ()  # (key, value) pairs sd-scripts sets when the user does not


# Lower-case sd-scripts names -> classes. Anything else is a dotted `module.Class` or a torch.optim name.
OPTIMIZERS = {
    "adamw": OptimizerEntry("torch.optim", "AdamW", "torch"),
    "adamw8bit": OptimizerEntry("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "pagedadamw8bit": OptimizerEntry("bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes"),
    "pagedadamw": OptimizerEntry("bitsandbytes.optim", "PagedAdamW", "bitsandbytes"),
    "pagedadamw32bit": OptimizerEntry("bitsandbytes.optim", "PagedAdamW32bit", "bitsandbytes"),
    "sgdnesterov8bit": OptimizerEntry("bitsandbytes.optim", "SGD8bit", "bitsandbytes",
                                      (("momentum", 0.9), ("nesterov", True))),
    "lion8bit": OptimizerEntry("bitsandbytes.optim", "Lion8bit", "bitsandbytes"),
    "pagedlion8bit": OptimizerEntry("bitsandbytes.optim", "PagedLion8bit", "bitsandbytes"),
    "lion": OptimizerEntry("lion_pytorch", "Lion", "lion-pytorch"),
    "sgdnesterov": OptimizerEntry("torch.optim", "SGD", "torch", (("momentum", 0.9), ("nesterov", True))),
    "prodigy": OptimizerEntry("prodigyopt", "Prodigy", "prodigyopt"),
    "dadaptation": OptimizerEntry("dadaptation", "DAdaptAdamPreprint", "dadaptation"),
    "dadaptadampreprint": OptimizerEntry("dadaptation", "DAdaptAdamPreprint", "dadaptation"),
    "dadaptadagrad": OptimizerEntry("dadaptation", "DAdaptAdaGrad", "dadaptation"),
    "dadaptadam": OptimizerEntry("dadaptation", "DAdaptAdam", "dadaptation"),
    "dadaptadan": OptimizerEntry("dadaptation", "DAdaptAdan", "dadaptation"),
    "dadaptadanip": OptimizerEntry("dadaptation.experimental", "DAdaptAdanIP", "dadaptation"),
    "dadaptlion": OptimizerEntry("dadaptation", "DAdaptLion", "dadaptation"),
    "dadaptsgd": OptimizerEntry("dadaptation", "DAdaptSGD", "dadaptation"),
    "adafactor": OptimizerEntry("transformers.optimization", "Adafactor", "transformers"),
}
ADAPTIVE = ("prodigy", "dadapt")  # optimizers that find their own step size: lr ~1.0


def parse_optimizer_args(items: list[str] | None) -> dict:
    """`["weight_decay=0.01", "betas=0.9,0.99"]` -> {"weight_decay": 0.01, "betas": (0.9, 0.99)} (Python literals)."""
    parsed = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or "=" in value:
            raise ConfigError(f"--optimizer_args '{item}': expected exactly one key=value, e.g. weight_decay=0.01")
        try:
            parsed[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ConfigError(f"--optimizer_args {key.strip()}={value}: not a Python literal; quote strings, "
                              f"e.g. {key.strip()}='{value}'") from None
    return parsed


def resolve_optimizer_class(optimizer_type: str):
    """The class for an sd-scripts optimizer name, a torch.optim name, or a dotted `module.Class`."""
    name = optimizer_type or "AdamW"
    entry = OPTIMIZERS.get(name.lower())
    if entry is None and "." in name:
        module, _, cls = name.rpartition(".")
        entry = OptimizerEntry(module, cls, module.split(".")[0])
    elif entry is None:
        entry = OptimizerEntry("torch.optim", name, "torch")
    try:
        module = importlib.import_module(entry.module)
    except ImportError:
        raise UserError(f"--optimizer_type {name} needs the '{entry.package}' package, which is not installed.\n"
                        f"Fix: python -m pip install {entry.package}   (or choose --optimizer_type AdamW)") from None
    if not hasattr(module, entry.cls):
        known = ", ".join(sorted({e.cls if e.module != 'torch.optim' else e.cls for e in OPTIMIZERS.values()}))
        raise ConfigError(f"--optimizer_type {name}: no optimizer of that name (known: {known}, or module.Class).")
    return getattr(module, entry.cls), dict(entry.defaults)


def build_optimizer(optimizer_type: str, param_groups: list[dict], learning_rate: float,
                    optimizer_args: list[str] | None):
    """(optimizer, ss_optimizer string) like sd-scripts: `torch.optim.adamw.AdamW(weight_decay=0.1)`."""
    cls, defaults = resolve_optimizer_class(optimizer_type)
    kwargs = {**defaults, **parse_optimizer_args(optimizer_args)}
    name = (optimizer_type or "AdamW").lower()
    if name == "adafactor":
        kwargs.setdefault("relative_step", True)
        kwargs.setdefault("scale_parameter", kwargs["relative_step"])
        kwargs.setdefault("warmup_init", False)
        if kwargs["relative_step"]:
            # Adafactor picks its own step size; sd-scripts drops the group lrs and passes lr=None.
            param_groups = [{k: v for k, v in g.items() if k != "lr"} for g in param_groups]
            learning_rate = None
    if name.startswith(ADAPTIVE) and learning_rate <= 0.1:
        log.warning("%s adapts its own step size and expects --learning_rate around 1.0 (got %s).",
                    optimizer_type, learning_rate)
    optimizer = cls(param_groups, lr=learning_rate, **kwargs)
    described = f"{cls.__module__}.{cls.__name__}"
    if optimizer_args:
        described += "(" + ",".join(optimizer_args) + ")"
    return optimizer, described


def warmup_steps(value: int | float, total_steps: int) -> int:
    """An int is a step count; a float below 1 is a ratio of the total (sd-scripts' int_or_float)."""
    return int(value * total_steps) if isinstance(value, float) and value < 1 else int(value)


def build_scheduler(name: str, optimizer, *, total_steps: int, warmup: int | float = 0, decay: int | float = 0,
                    num_cycles: int = 1, power: float = 1.0, timescale: int | None = None,
                    min_lr_ratio: float | None = None):
    """A torch LR scheduler stepped once per optimizer step."""
    from transformers.optimization import get_scheduler

    warm = warmup_steps(warmup, total_steps)
    if name == "adafactor":
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer, initial_lr=optimizer.param_groups[0].get("initial_lr") or 0.0)
    if name == "constant" and warm:
        raise ConfigError(f"--lr_scheduler constant does not use warmup (--lr_warmup_steps {warmup}); use "
                          "constant_with_warmup, or set --lr_warmup_steps 0.")
    extra: dict = {}
    if name == "cosine_with_restarts":
        extra["num_cycles"] = num_cycles
    elif name == "polynomial":
        extra["power"] = power
    elif name == "inverse_sqrt" and timescale:
        extra["timescale"] = timescale
    elif name == "cosine_with_min_lr":
        extra.update(num_cycles=num_cycles / 2, min_lr_rate=min_lr_ratio or 0.0)
    elif name == "warmup_stable_decay":
        extra.update(num_decay_steps=warmup_steps(decay, total_steps), min_lr_ratio=min_lr_ratio or 0.0)
    if name == "piecewise_constant":
        raise ConfigError("--lr_scheduler piecewise_constant needs --lr_scheduler_args, which is not supported yet.")
    return get_scheduler(name, optimizer, num_warmup_steps=warm, num_training_steps=total_steps,
                         scheduler_specific_kwargs=extra or None)
