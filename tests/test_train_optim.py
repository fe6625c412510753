"""Optimizers and schedules by sd-scripts names; ss_optimizer strings as sd-scripts writes them."""

import pytest
import torch

from trainer.errors import ConfigError, UserError
from trainer.train.optim import build_optimizer, build_scheduler, parse_optimizer_args, warmup_steps


def groups():
    return [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 1e-4}]


@pytest.mark.parametrize("name, expected", [
    ("", "torch.optim.adamw.AdamW"),
    ("AdamW", "torch.optim.adamw.AdamW"),
    ("adamw", "torch.optim.adamw.AdamW"),
    ("SGDNesterov", "torch.optim.sgd.SGD"),
    ("Adafactor", "transformers.optimization.Adafactor"),
    ("torch.optim.RMSprop", "torch.optim.rmsprop.RMSprop"),
    ("Adam", "torch.optim.adam.Adam"),
])
def test_names_resolve_like_sd_scripts(name, expected):
    _, described = build_optimizer(name, groups(), 1e-4, None)
    assert described == expected


def test_optimizer_args_are_literals_and_recorded():
    optimizer, described = build_optimizer("AdamW", groups(), 1e-4, ["weight_decay=0.1", "betas=0.9,0.99"])
    assert optimizer.defaults["weight_decay"] == 0.1 and optimizer.defaults["betas"] == (0.9, 0.99)
    assert described == "torch.optim.adamw.AdamW(weight_decay=0.1,betas=0.9,0.99)"
    with pytest.raises(ConfigError, match="key=value"):
        parse_optimizer_args(["weight_decay"])


def test_sgd_nesterov_defaults_to_momentum():
    optimizer, _ = build_optimizer("SGDNesterov", groups(), 1e-2, None)
    assert optimizer.defaults["nesterov"] is True and optimizer.defaults["momentum"] == 0.9


def test_missing_optional_package_names_the_install_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        build_optimizer("AdamW8bit", groups(), 1e-4, None)


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(ConfigError, match="no optimizer of that name"):
        build_optimizer("AdamWW", groups(), 1e-4, None)


def test_warmup_int_or_ratio():
    assert warmup_steps(10, 1000) == 10
    assert warmup_steps(0.1, 1000) == 100


def test_schedules_follow_their_shape():
    optimizer, _ = build_optimizer("AdamW", groups(), 1e-4, None)
    scheduler = build_scheduler("cosine", optimizer, total_steps=100, warmup=10)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0 and abs(lrs[10] - 1e-4) < 1e-9 and lrs[-1] < 1e-6


def test_constant_with_warmup_is_refused_for_constant():
    optimizer, _ = build_optimizer("AdamW", groups(), 1e-4, None)
    with pytest.raises(ConfigError, match="constant_with_warmup"):
        build_scheduler("constant", optimizer, total_steps=100, warmup=10)
