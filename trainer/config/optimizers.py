"""The names of optimizers and the `key=value` option lists, as sd-scripts spells them: tables and parsing
only (no torch), so a typo is caught when the arguments are read, before any model loads. trainer.train.optim
builds the optimizers and schedules from these."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

from trainer.errors import ConfigError


@dataclass(frozen=True)
class OptimizerEntry:
    module: str          # where the class lives
    cls: str             # class name
    package: str         # pip package that provides it
    recorded: tuple = ()  # (key, value) sd-scripts adds when the user does not; part of ss_optimizer
    fixed: tuple = ()     # (key, value) always passed and not recorded (SGDNesterov's nesterov=True)


_NESTEROV = dict(recorded=(("momentum", 0.9),), fixed=(("nesterov", True),))
_BNB, _DADAPT, _SF = "bitsandbytes", "dadaptation", "schedulefree"

# sd-scripts' names (case-insensitive) -> classes. Anything else is a dotted `module.Class` or a torch.optim name.
NAMED_OPTIMIZERS = {
    "AdamW": OptimizerEntry("torch.optim", "AdamW", "torch"),
    "AdamW8bit": OptimizerEntry("bitsandbytes.optim", "AdamW8bit", _BNB),
    "PagedAdamW8bit": OptimizerEntry("bitsandbytes.optim", "PagedAdamW8bit", _BNB),
    "PagedAdamW": OptimizerEntry("bitsandbytes.optim", "PagedAdamW", _BNB),
    "PagedAdamW32bit": OptimizerEntry("bitsandbytes.optim", "PagedAdamW32bit", _BNB),
    "SGDNesterov8bit": OptimizerEntry("bitsandbytes.optim", "SGD8bit", _BNB, **_NESTEROV),
    "Lion8bit": OptimizerEntry("bitsandbytes.optim", "Lion8bit", _BNB),
    "PagedLion8bit": OptimizerEntry("bitsandbytes.optim", "PagedLion8bit", _BNB),
    "Lion": OptimizerEntry("lion_pytorch", "Lion", "lion-pytorch"),
    "SGDNesterov": OptimizerEntry("torch.optim", "SGD", "torch", **_NESTEROV),
    "Prodigy": OptimizerEntry("prodigyopt", "Prodigy", "prodigyopt"),
    "DAdaptation": OptimizerEntry("dadaptation.experimental", "DAdaptAdamPreprint", _DADAPT),
    "DAdaptAdamPreprint": OptimizerEntry("dadaptation.experimental", "DAdaptAdamPreprint", _DADAPT),
    "DAdaptAdaGrad": OptimizerEntry("dadaptation", "DAdaptAdaGrad", _DADAPT),
    "DAdaptAdam": OptimizerEntry("dadaptation", "DAdaptAdam", _DADAPT),
    "DAdaptAdan": OptimizerEntry("dadaptation", "DAdaptAdan", _DADAPT),
    "DAdaptAdanIP": OptimizerEntry("dadaptation.experimental", "DAdaptAdanIP", _DADAPT),
    "DAdaptLion": OptimizerEntry("dadaptation", "DAdaptLion", _DADAPT),
    "DAdaptSGD": OptimizerEntry("dadaptation", "DAdaptSGD", _DADAPT),
    "Adafactor": OptimizerEntry("transformers.optimization", "Adafactor", "transformers"),
    "RAdamScheduleFree": OptimizerEntry("schedulefree", "RAdamScheduleFree", _SF),
    "AdamWScheduleFree": OptimizerEntry("schedulefree", "AdamWScheduleFree", _SF),
    "SGDScheduleFree": OptimizerEntry("schedulefree", "SGDScheduleFree", _SF),
}
OPTIMIZERS = {name.lower(): entry for name, entry in NAMED_OPTIMIZERS.items()}
PIP_NAMES = {entry.module.split(".")[0]: entry.package for entry in OPTIMIZERS.values()}


# ---------------------------------------------------------------------------------------------------------------
# key=value arguments


def parse_key_values(items: list[str] | None, option: str, keep_strings: tuple[str, ...] = ()) -> dict:
    """`["weight_decay=0.01", "betas=0.9,0.99"]` -> {"weight_decay": 0.01, "betas": (0.9, 0.99)} (Python
    literals, as sd-scripts' ast.literal_eval). Keys in `keep_strings` may also be given unquoted."""
    parsed: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or "=" in value or not key:
            raise ConfigError(f"{option} '{item}': expected exactly one key=value, e.g. weight_decay=0.01")
        try:
            parsed[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            if key not in keep_strings:
                raise ConfigError(f"{option} {key}={value}: not a Python literal; quote strings, "
                                  f"e.g. {key}='{value}'") from None
            parsed[key] = value.strip()
    return parsed


def parse_optimizer_args(items: list[str] | None) -> dict:
    return parse_key_values(items, "--optimizer_args")


def parse_scheduler_args(items: list[str] | None) -> dict:
    # piecewise_constant's rules ("1:10,0.1:20,0.01") are no Python literal; sd-scripts needs them quoted.
    return parse_key_values(items, "--lr_scheduler_args", keep_strings=("step_rules",))
