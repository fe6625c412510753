"""Optimizers and learning-rate schedules by sd-scripts' names (library/train_util.py's get_optimizer).

`build_optimizer` returns the optimizer and the `ss_optimizer` string sd-scripts records: `<module>.<Class>`
plus `(k=v,...)` of the keyword arguments it passes (the --optimizer_args, and the values sd-scripts adds itself,
e.g. SGDNesterov's momentum=0.9 or Adafactor's relative_step=True). `build_scheduler` follows sd-scripts'
get_scheduler_fix, including --lr_scheduler_type / --lr_scheduler_args.

Schedule-free optimizers (RAdamScheduleFree...) keep two sets of weights: the ones gradients are taken at
("train") and their running average ("eval"), which is what should be sampled from and saved. They get a
constant schedule, and `eval_mode_for` gives the context that puts the averaged weights in the model."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
from typing import Any, Callable, ContextManager

from trainer.config.optimizers import (  # noqa: F401  (re-exported: the optimizer names and option parsers)
    NAMED_OPTIMIZERS,
    OPTIMIZERS,
    PIP_NAMES,
    OptimizerEntry,
    parse_key_values,
    parse_optimizer_args,
    parse_scheduler_args,
)
from trainer.errors import ConfigError, UserError, did_you_mean

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Optimizers


def _import(module_name: str, option: str, package: str):
    try:
        return importlib.import_module(module_name)
    except ImportError:
        raise UserError(f"{option} needs the '{package}' package, which is not installed.\n"
                        f"Fix: python -m pip install {package}   (or choose --optimizer_type AdamW)") from None


def resolve_optimizer_class(optimizer_type: str):
    """(class, OptimizerEntry) for an sd-scripts optimizer name, a torch.optim name, or a dotted `module.Class`."""
    name = optimizer_type or "AdamW"
    entry = OPTIMIZERS.get(name.lower())
    if entry is None and "." in name:
        module, _, cls = name.rpartition(".")
        top = module.split(".")[0]
        entry = OptimizerEntry(module, cls, PIP_NAMES.get(top, top))
    elif entry is None:
        entry = OptimizerEntry("torch.optim", name, "torch")
    module = _import(entry.module, f"--optimizer_type {name}", entry.package)
    cls = getattr(module, entry.cls, None)
    if not isinstance(cls, type):
        import torch.optim

        known = list(NAMED_OPTIMIZERS) + [n for n, c in vars(torch.optim).items()
                                          if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)]
        raise ConfigError(f"--optimizer_type {name}: no optimizer of that name{did_you_mean(name, known)}. Use one "
                          f"of sd-scripts' names ({', '.join(NAMED_OPTIMIZERS)}), a torch.optim class, or "
                          "module.Class.")
    return cls, entry


def build_optimizer(optimizer_type: str, param_groups: list[dict], learning_rate: float | None,
                    optimizer_args: list[str] | None):
    """(optimizer, ss_optimizer string) like sd-scripts: `torch.optim.adamw.AdamW(weight_decay=0.1)`."""
    name = optimizer_type or "AdamW"
    cls, entry = resolve_optimizer_class(name)
    kwargs = parse_optimizer_args(optimizer_args)
    for key, value in entry.recorded:
        if key not in kwargs:
            kwargs[key] = value
    lr = learning_rate
    if name.lower() == "adafactor":
        param_groups, lr = _adafactor_rules(kwargs, param_groups, learning_rate)
    elif name.lower().startswith("dadapt") or name.lower() == "prodigy":
        _warn_adaptive_lr(name, param_groups, learning_rate)
    try:
        optimizer = cls(param_groups, lr=lr, **{**dict(entry.fixed), **kwargs})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--optimizer_type {name} --optimizer_args {' '.join(optimizer_args or [])}: {e}. "
                          f"{cls.__name__} takes: {_parameters(cls)}.") from None
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()  # schedule-free optimizers start in training mode (sd-scripts does the same)
    described = f"{cls.__module__}.{cls.__name__}"
    if kwargs:
        described += "(" + ",".join(f"{k}={v}" for k, v in kwargs.items()) + ")"
    return optimizer, described


def _adafactor_rules(kwargs: dict, param_groups: list[dict], learning_rate: float | None):
    """sd-scripts: relative_step defaults to True (and warmup_init forces it); then Adafactor picks its own
    step size, so lr is None, the groups lose their lrs, and the `adafactor` schedule is used."""
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        log.info("Adafactor: warmup_init=True needs relative_step, which is set to True.")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        return param_groups, learning_rate
    log.warning("Adafactor with relative_step=True sets its own learning rate: --learning_rate (%s) is only the "
                "schedule's starting value and --unet_lr / --text_encoder_lr are ignored. Pass "
                "--optimizer_args relative_step=False scale_parameter=False warmup_init=False to use them.",
                learning_rate)
    return [{k: v for k, v in g.items() if k != "lr"} for g in param_groups], None


def _warn_adaptive_lr(name: str, param_groups: list[dict], learning_rate: float | None) -> None:
    lrs = [g.get("lr", learning_rate) for g in param_groups] or [learning_rate]
    if lrs[0] is not None and lrs[0] <= 0.1:
        log.warning("%s adapts its own step size and expects a learning rate around 1.0 (got %s).", name, lrs[0])
    if len(set(lrs)) > 1:
        log.warning("%s: only the first learning rate (%s) takes effect; the other groups' (%s) are ignored.",
                    name, lrs[0], ", ".join(str(lr) for lr in lrs[1:]))


def _parameters(factory) -> str:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return "(unknown)"
    return ", ".join(p for p in params if p not in ("self", "params", "optimizer")) or "(nothing)"


def is_schedule_free(optimizer) -> bool:
    """RAdamScheduleFree / AdamWScheduleFree / SGDScheduleFree (also wrapped by accelerate)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    kind = f"{type(inner).__module__}.{type(inner).__name__}".lower()
    return "schedulefree" in kind and callable(getattr(inner, "eval", None)) and callable(getattr(inner, "train", None))


def eval_mode_for(optimizer) -> Callable[[], ContextManager]:
    """A context-manager factory: inside it a schedule-free optimizer's averaged weights are in the model
    (optimizer.eval()); on leaving, the training weights are back (optimizer.train()). sd-scripts switches
    like this around sampling and saving. For any other optimizer it does nothing."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not is_schedule_free(inner):
        return contextlib.nullcontext

    @contextlib.contextmanager
    def eval_mode():
        inner.eval()
        try:
            yield
        finally:
            inner.train()

    return eval_mode


# ---------------------------------------------------------------------------------------------------------------
# Schedules


def warmup_steps(value: int | float, total_steps: int) -> int:
    """An int is a step count; a float below 1 is a ratio of the total (sd-scripts' int_or_float)."""
    return int(value * total_steps) if isinstance(value, float) and value < 1 else int(value)


def build_scheduler(name: str, optimizer, *, total_steps: int, warmup: int | float = 0, decay: int | float = 0,
                    num_cycles: int = 1, power: float = 1.0, timescale: int | None = None,
                    min_lr_ratio: float | None = None, scheduler_type: str = "",
                    scheduler_args: list[str] | None = None, initial_lr: float | None = 0.0):
    """A torch LR scheduler stepped once per optimizer step. --lr_scheduler_args go to every schedule as extra
    keyword arguments, as in sd-scripts."""
    warm = warmup_steps(warmup, total_steps)
    if is_schedule_free(optimizer):
        return _schedule_free_constant(optimizer, name, warm, scheduler_type)
    kwargs = parse_scheduler_args(scheduler_args)
    if scheduler_type:
        _refuse_warmup(f"--lr_scheduler_type {scheduler_type}", warmup, warm)
        return custom_scheduler(scheduler_type, optimizer, kwargs)
    if name == "adafactor":
        return _adafactor_schedule(optimizer, warmup, warm, initial_lr)
    if name == "piecewise_constant":
        return piecewise_constant(optimizer, kwargs, warm)
    if name == "constant" and warm:
        raise ConfigError(f"--lr_scheduler constant does not use warmup (--lr_warmup_steps {warmup}); use "
                          "constant_with_warmup, or set --lr_warmup_steps 0.")
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    try:
        factory = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    except ValueError:
        raise ConfigError(f"--lr_scheduler {name}: unknown schedule{did_you_mean(name, [t.value for t in SchedulerType])}"
                          ".") from None
    decay_steps = warmup_steps(decay, total_steps)
    ours = _standard_kwargs(name, warm, total_steps, decay_steps, num_cycles, power, timescale, min_lr_ratio, kwargs)
    return _call_scheduler(factory, optimizer, {**ours, **kwargs}, f"--lr_scheduler {name}")


def _standard_kwargs(name: str, warm: int, total: int, decay: int, num_cycles: int, power: float,
                     timescale: int | None, min_lr_ratio: float | None, user: dict) -> dict:
    """The arguments sd-scripts' get_scheduler_fix gives each transformers schedule."""
    if name == "constant":
        return {}
    kwargs: dict[str, Any] = {"num_warmup_steps": warm}
    if name == "constant_with_warmup":
        return kwargs
    if name == "inverse_sqrt":
        return {**kwargs, "timescale": timescale}
    if name == "warmup_stable_decay":
        return {**kwargs, "num_stable_steps": total - warm - decay, "num_decay_steps": decay,
                "num_cycles": num_cycles / 2, "min_lr_ratio": min_lr_ratio or 0.0}
    kwargs["num_training_steps"] = total
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = num_cycles
    elif name == "polynomial":
        kwargs["power"] = power
    elif name == "cosine_with_min_lr":
        kwargs["num_cycles"] = num_cycles / 2
        if min_lr_ratio is not None or "min_lr" not in user:  # transformers takes one of min_lr / min_lr_rate
            kwargs["min_lr_rate"] = min_lr_ratio or 0.0
    return kwargs


def _call_scheduler(factory, optimizer, kwargs: dict, label: str):
    """factory(optimizer, **kwargs); a keyword it does not take is named with the ones it does."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if params and not open_ended:
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            raise ConfigError(f"{label}: --lr_scheduler_args {', '.join(unknown)} is not an argument of this "
                              f"schedule{did_you_mean(unknown[0], params)}; it takes: {_parameters(factory)}.")
    try:
        return factory(optimizer, **kwargs)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"{label} with --lr_scheduler_args {kwargs}: {e}. It takes: {_parameters(factory)}.") from None


def _refuse_warmup(label: str, warmup, warm: int) -> None:
    if warm:
        raise ConfigError(f"{label} does not use --lr_warmup_steps ({warmup}), as in sd-scripts; set "
                          "--lr_warmup_steps 0 (or build the warmup into the schedule's own arguments).")


def custom_scheduler(type_name: str, optimizer, kwargs: dict):
    """--lr_scheduler_type: `module.Class`, or a bare name from torch.optim.lr_scheduler, called as
    Class(optimizer, **lr_scheduler_args)."""
    import torch.optim.lr_scheduler as torch_schedulers

    label = f"--lr_scheduler_type {type_name}"
    if "." in type_name:
        module_name, _, cls_name = type_name.rpartition(".")
        top = module_name.split(".")[0]
        module = _import(module_name, label, PIP_NAMES.get(top, top))
    else:
        module, cls_name = torch_schedulers, type_name
    cls = getattr(module, cls_name, None)
    if not callable(cls):
        known = [n for n, c in vars(torch_schedulers).items() if isinstance(c, type)
                 and issubclass(c, torch_schedulers.LRScheduler) and not n.startswith("_")]
        raise ConfigError(f"{label}: {module.__name__} has no scheduler class '{cls_name}'"
                          f"{did_you_mean(cls_name, known)}. A bare name is looked up in torch.optim.lr_scheduler "
                          f"({', '.join(sorted(known))}); anything else needs its module: module.Class.")
    log.info("Learning-rate schedule: %s(%s)", type_name, ", ".join(f"{k}={v!r}" for k, v in kwargs.items()))
    return _call_scheduler(cls, optimizer, kwargs, label)


def piecewise_constant(optimizer, kwargs: dict, warm: int):
    """diffusers' piecewise_constant: step_rules "1:10,0.1:20,0.01" = x1 for steps < 10, x0.1 for steps < 20,
    then x0.01."""
    from diffusers.optimization import get_piecewise_constant_schedule

    if "step_rules" not in kwargs:
        raise ConfigError("--lr_scheduler piecewise_constant needs its rules: --lr_scheduler_args "
                          "\"step_rules=1:10,0.1:20,0.01\" (lr x1 until step 10, x0.1 until step 20, then x0.01).")
    rules = str(kwargs["step_rules"])
    try:
        *pairs, last = rules.split(",")
        for pair in pairs:
            multiplier, steps = pair.split(":")
            float(multiplier), int(steps)
        float(last)
    except ValueError:
        raise ConfigError(f"--lr_scheduler_args step_rules={rules}: expected multiplier:steps pairs and a final "
                          "multiplier, e.g. step_rules=1:10,0.1:20,0.01") from None
    if warm:
        log.warning("--lr_warmup_steps is not used by --lr_scheduler piecewise_constant (as in sd-scripts); put "
                    "a low first multiplier in step_rules instead.")
    return _call_scheduler(get_piecewise_constant_schedule, optimizer, {**kwargs, "step_rules": rules},
                           "--lr_scheduler piecewise_constant")


def _adafactor_schedule(optimizer, warmup, warm: int, initial_lr: float | None):
    from transformers.optimization import Adafactor, AdafactorSchedule

    if not isinstance(getattr(optimizer, "optimizer", optimizer), Adafactor):
        raise ConfigError("--lr_scheduler adafactor works only with --optimizer_type Adafactor; choose another "
                          "schedule (constant, cosine...).")
    _refuse_warmup("The adafactor schedule (used with Adafactor's relative_step)", warmup, warm)
    return AdafactorSchedule(optimizer, initial_lr=initial_lr or 0.0)


def _schedule_free_constant(optimizer, name: str, warm: int, scheduler_type: str):
    """Schedule-free optimizers need no schedule: a constant one (sd-scripts uses a dummy) keeps the loop and
    the logged lr the same as for any optimizer."""
    from transformers.optimization import get_constant_schedule

    if warm or scheduler_type or name not in ("constant", ""):
        log.warning("%s needs no learning-rate schedule: --lr_scheduler / --lr_scheduler_type / --lr_warmup_steps "
                    "are not used (as in sd-scripts). For a warmup pass --optimizer_args warmup_steps=N.",
                    type(getattr(optimizer, "optimizer", optimizer)).__name__)
    return get_constant_schedule(optimizer)
