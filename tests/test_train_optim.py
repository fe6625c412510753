"""Optimizers and schedules by sd-scripts names; ss_optimizer strings as sd-scripts writes them."""

import json
import logging
import sys
from types import SimpleNamespace

import pytest
import torch

from trainer.errors import ConfigError, UserError
from trainer.train.optim import (
    build_optimizer,
    build_scheduler,
    eval_mode_for,
    is_schedule_free,
    parse_optimizer_args,
    warmup_steps,
)


def groups(*lrs):
    return [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": lr} for lr in (lrs or (1e-4,))]


def lrs_over(optimizer, scheduler, steps):
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("name, expected", [
    ("", "torch.optim.adamw.AdamW"),
    ("AdamW", "torch.optim.adamw.AdamW"),
    ("adamw", "torch.optim.adamw.AdamW"),
    ("SGDNesterov", "torch.optim.sgd.SGD(momentum=0.9)"),  # sd-scripts adds momentum to the recorded kwargs
    ("Adafactor", "transformers.optimization.Adafactor(relative_step=True)"),
    ("torch.optim.RMSprop", "torch.optim.rmsprop.RMSprop"),
    ("Adam", "torch.optim.adam.Adam"),
])
def test_names_resolve_like_sd_scripts(name, expected):
    _, described = build_optimizer(name, groups(), 1e-4, None)
    assert described == expected


def test_optimizer_args_are_literals_and_recorded():
    optimizer, described = build_optimizer("AdamW", groups(), 1e-4, ["weight_decay=0.1", "betas=0.9,0.99"])
    assert optimizer.defaults["weight_decay"] == 0.1 and optimizer.defaults["betas"] == (0.9, 0.99)
    assert described == "torch.optim.adamw.AdamW(weight_decay=0.1,betas=(0.9, 0.99))"  # sd-scripts' f"{k}={v}"
    with pytest.raises(ConfigError, match="key=value"):
        parse_optimizer_args(["weight_decay"])


def test_optimizer_args_the_class_does_not_take_are_named():
    with pytest.raises(ConfigError, match="weight_decay"):
        build_optimizer("AdamW", groups(), 1e-4, ["weigth_decay=0.1"])


def test_sgd_nesterov_defaults_to_momentum():
    optimizer, _ = build_optimizer("SGDNesterov", groups(), 1e-2, None)
    assert optimizer.defaults["nesterov"] is True and optimizer.defaults["momentum"] == 0.9


# (name, ss_optimizer, module to import) for every optional-package name sd-scripts knows (its test_optimizer.py)
OPTIONAL = [
    ("AdamW8bit", "bitsandbytes.optim.adamw.AdamW8bit", "bitsandbytes"),
    ("PagedAdamW8bit", "bitsandbytes.optim.adamw.PagedAdamW8bit", "bitsandbytes"),
    ("PagedAdamW", "bitsandbytes.optim.adamw.PagedAdamW", "bitsandbytes"),
    ("PagedAdamW32bit", "bitsandbytes.optim.adamw.PagedAdamW32bit", "bitsandbytes"),
    ("SGDNesterov8bit", "bitsandbytes.optim.sgd.SGD8bit(momentum=0.9)", "bitsandbytes"),
    ("Lion8bit", "bitsandbytes.optim.lion.Lion8bit", "bitsandbytes"),
    ("PagedLion8bit", "bitsandbytes.optim.lion.PagedLion8bit", "bitsandbytes"),
    ("Lion", "lion_pytorch.lion_pytorch.Lion", "lion_pytorch"),
    ("Prodigy", "prodigyopt.prodigy.Prodigy", "prodigyopt"),
    ("DAdaptation", "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint", "dadaptation"),
    ("DAdaptAdamPreprint", "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint", "dadaptation"),
    ("DAdaptAdaGrad", "dadaptation.dadapt_adagrad.DAdaptAdaGrad", "dadaptation"),
    ("DAdaptAdam", "dadaptation.dadapt_adam.DAdaptAdam", "dadaptation"),
    ("DAdaptAdan", "dadaptation.dadapt_adan.DAdaptAdan", "dadaptation"),
    ("DAdaptAdanIP", "dadaptation.experimental.dadapt_adan_ip.DAdaptAdanIP", "dadaptation"),
    ("DAdaptLion", "dadaptation.dadapt_lion.DAdaptLion", "dadaptation"),
    ("DAdaptSGD", "dadaptation.dadapt_sgd.DAdaptSGD", "dadaptation"),
    ("RAdamScheduleFree", "schedulefree.radam_schedulefree.RAdamScheduleFree", "schedulefree"),
    ("AdamWScheduleFree", "schedulefree.adamw_schedulefree.AdamWScheduleFree", "schedulefree"),
    ("SGDScheduleFree", "schedulefree.sgd_schedulefree.SGDScheduleFree", "schedulefree"),
]
PIP = {"bitsandbytes": "bitsandbytes", "lion_pytorch": "lion-pytorch", "prodigyopt": "prodigyopt",
       "dadaptation": "dadaptation", "schedulefree": "schedulefree"}


@pytest.mark.parametrize("name, expected, module", OPTIONAL)
def test_optional_package_names_record_sd_scripts_strings(name, expected, module):
    pytest.importorskip(module)
    optimizer, described = build_optimizer(name, groups(1.0), 1.0, None)
    assert described == expected
    assert f"{type(optimizer).__module__}.{type(optimizer).__name__}" == expected.split("(")[0]


def hide_package(monkeypatch, top: str) -> None:
    """Make `top` (and any already imported submodule) fail to import, as if it were not installed."""
    for key in [k for k in sys.modules if k == top or k.startswith(top + ".")]:
        monkeypatch.setitem(sys.modules, key, None)
    monkeypatch.setitem(sys.modules, top, None)


@pytest.mark.parametrize("name, module", sorted({(n, m) for n, _, m in OPTIONAL}))
def test_missing_optional_package_names_the_install_command(monkeypatch, name, module):
    hide_package(monkeypatch, module)
    with pytest.raises(UserError, match=f"pip install {PIP[module]}") as error:
        build_optimizer(name, groups(), 1e-4, None)
    assert f"--optimizer_type {name}" in str(error.value)


def test_dotted_class_from_a_missing_package_names_its_pip_name(monkeypatch):
    hide_package(monkeypatch, "lion_pytorch")
    with pytest.raises(UserError, match="pip install lion-pytorch"):
        build_optimizer("lion_pytorch.Lion", groups(), 1e-4, None)


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(ConfigError, match='no optimizer of that name \\(did you mean "AdamW"\\?\\)'):
        build_optimizer("AdamWW", groups(), 1e-4, None)


def test_adaptive_optimizers_warn_about_low_and_several_lrs(caplog):
    pytest.importorskip("prodigyopt")
    with caplog.at_level(logging.WARNING):
        build_optimizer("Prodigy", groups(1e-4, 1.0), 1e-4, None)
    assert "around 1.0" in caplog.text and "only the first learning rate" in caplog.text


def test_warmup_int_or_ratio():
    assert warmup_steps(10, 1000) == 10
    assert warmup_steps(0.1, 1000) == 100


def test_schedules_follow_their_shape():
    optimizer, _ = build_optimizer("AdamW", groups(), 1e-4, None)
    scheduler = build_scheduler("cosine", optimizer, total_steps=100, warmup=10)
    lrs = lrs_over(optimizer, scheduler, 100)
    assert lrs[0] == 0 and abs(lrs[10] - 1e-4) < 1e-9 and lrs[-1] < 1e-6


def test_constant_with_warmup_is_refused_for_constant():
    optimizer, _ = build_optimizer("AdamW", groups(), 1e-4, None)
    with pytest.raises(ConfigError, match="constant_with_warmup"):
        build_scheduler("constant", optimizer, total_steps=100, warmup=10)


# ---------------------------------------------------------------------------------------------------------------
# --lr_scheduler_args, --lr_scheduler_type, piecewise_constant


def test_scheduler_args_reach_a_named_schedule():
    optimizer, _ = build_optimizer("AdamW", groups(1e-3), 1e-3, None)
    scheduler = build_scheduler("polynomial", optimizer, total_steps=10, scheduler_args=["lr_end=1e-4"])
    assert lrs_over(optimizer, scheduler, 11)[-1] == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match='lr_ned.*did you mean "lr_end"'):
        build_scheduler("polynomial", optimizer, total_steps=10, scheduler_args=["lr_ned=1e-4"])


@pytest.mark.parametrize("type_name", ["StepLR", "torch.optim.lr_scheduler.StepLR"])
def test_lr_scheduler_type_bare_or_dotted(type_name):
    optimizer, _ = build_optimizer("AdamW", groups(1.0), 1.0, None)
    scheduler = build_scheduler("constant", optimizer, total_steps=10, scheduler_type=type_name,
                                scheduler_args=["step_size=2", "gamma=0.5"])
    assert lrs_over(optimizer, scheduler, 6) == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_lr_scheduler_type_mistakes_are_clear():
    optimizer, _ = build_optimizer("AdamW", groups(1.0), 1.0, None)
    with pytest.raises(ConfigError, match='no scheduler class \'StepLRR\' \\(did you mean "StepLR"\\?\\)'):
        build_scheduler("constant", optimizer, total_steps=10, scheduler_type="StepLRR")
    with pytest.raises(ConfigError, match='step_sise.*did you mean "step_size"'):
        build_scheduler("constant", optimizer, total_steps=10, scheduler_type="StepLR",
                        scheduler_args=["step_sise=2"])
    with pytest.raises(UserError, match="pip install nosuchpackage"):
        build_scheduler("constant", optimizer, total_steps=10, scheduler_type="nosuchpackage.Schedule")
    with pytest.raises(ConfigError, match="lr_warmup_steps"):
        build_scheduler("constant", optimizer, total_steps=10, warmup=2, scheduler_type="StepLR",
                        scheduler_args=["step_size=2"])
    with pytest.raises(ConfigError, match="Python literal"):
        build_scheduler("constant", optimizer, total_steps=10, scheduler_type="StepLR", scheduler_args=["gamma=x"])


def test_piecewise_constant_takes_its_rules_from_scheduler_args():
    optimizer, _ = build_optimizer("AdamW", groups(1.0), 1.0, None)
    for rules in ("step_rules=1:2,0.1:4,0.01", "step_rules='1:2,0.1:4,0.01'"):  # unquoted or quoted
        scheduler = build_scheduler("piecewise_constant", optimizer, total_steps=10, scheduler_args=[rules])
        assert lrs_over(optimizer, scheduler, 6) == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(ConfigError, match="needs its rules"):
        build_scheduler("piecewise_constant", optimizer, total_steps=10)
    with pytest.raises(ConfigError, match="multiplier:steps"):
        build_scheduler("piecewise_constant", optimizer, total_steps=10, scheduler_args=["step_rules=1:x,0.1"])


# ---------------------------------------------------------------------------------------------------------------
# Adafactor's relative_step rules, end to end through build_optimizer_and_scheduler


class FakeNetwork:
    def __init__(self):
        self.params = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))]

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        return ([{"params": [self.params[0]], "lr": text_encoder_lr or default_lr},
                 {"params": [self.params[1]], "lr": unet_lr or default_lr}], ["textencoder", "unet"])


def optimizer_config(**overrides):
    values = dict(text_encoder_lr_value=5e-5, unet_lr=1e-4, learning_rate=1e-3, optimizer_type="AdamW",
                  optimizer_args=None, lr_scheduler="cosine", lr_scheduler_type="", lr_scheduler_args=None,
                  lr_warmup_steps=0, lr_decay_steps=0, lr_scheduler_num_cycles=1, lr_scheduler_power=1.0,
                  lr_scheduler_timescale=None, lr_scheduler_min_lr_ratio=None)
    return SimpleNamespace(**{**values, **overrides})


def build_for(**overrides):
    from trainer.train.build import build_optimizer_and_scheduler

    network = FakeNetwork()
    optimizer, scheduler, name, _ = build_optimizer_and_scheduler(
        optimizer_config(**overrides), network, SimpleNamespace(max_train_steps=10), 1)
    return network, optimizer, scheduler, name


def test_adafactor_relative_step_drops_lrs_and_forces_its_schedule(caplog):
    from transformers.optimization import AdafactorSchedule

    with caplog.at_level(logging.WARNING):
        network, optimizer, scheduler, name = build_for(optimizer_type="Adafactor")
    assert name == "transformers.optimization.Adafactor(relative_step=True)"
    assert optimizer.defaults["lr"] is None and optimizer.defaults["relative_step"] is True
    assert isinstance(scheduler, AdafactorSchedule)
    assert "--unet_lr / --text_encoder_lr are ignored" in caplog.text and "adafactor schedule" in caplog.text
    assert scheduler.get_last_lr() == [1e-3, 1e-3]  # --learning_rate only labels the start
    for p in network.params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(optimizer._get_lr(optimizer.param_groups[0],
                                                                         optimizer.state[network.params[0]]))
    with pytest.raises(ConfigError, match="lr_warmup_steps"):
        build_for(optimizer_type="Adafactor", lr_warmup_steps=2)


def test_adafactor_without_relative_step_keeps_group_lrs_and_schedule():
    from transformers.optimization import AdafactorSchedule

    _, optimizer, scheduler, name = build_for(optimizer_type="Adafactor", optimizer_args=[
        "relative_step=False", "scale_parameter=False"], lr_scheduler="constant")
    assert name == "transformers.optimization.Adafactor(relative_step=False,scale_parameter=False)"
    assert [g["lr"] for g in optimizer.param_groups] == [5e-5, 1e-4]
    assert not isinstance(scheduler, AdafactorSchedule)


def test_adafactor_warmup_init_forces_relative_step():
    _, optimizer, _, name = build_for(optimizer_type="Adafactor", optimizer_args=["relative_step=False",
                                                                                    "warmup_init=True"])
    assert optimizer.defaults["relative_step"] is True
    assert name == "transformers.optimization.Adafactor(relative_step=True,warmup_init=True)"


def test_adafactor_schedule_needs_the_adafactor_optimizer():
    with pytest.raises(ConfigError, match="only with --optimizer_type Adafactor"):
        build_for(lr_scheduler="adafactor")


def test_lr_scheduler_type_through_build():
    _, optimizer, scheduler, _ = build_for(lr_scheduler_type="ExponentialLR", lr_scheduler_args=["gamma=0.5"])
    assert isinstance(scheduler, torch.optim.lr_scheduler.ExponentialLR)
    assert lrs_over(optimizer, scheduler, 3) == pytest.approx([5e-5, 2.5e-5, 1.25e-5])


# ---------------------------------------------------------------------------------------------------------------
# Schedule-free optimizers


def test_schedule_free_gets_a_constant_schedule_and_eval_weights_for_saving(caplog):
    pytest.importorskip("schedulefree")
    network, optimizer, scheduler, name = build_for(optimizer_type="AdamWScheduleFree", lr_warmup_steps=3)
    assert name == "schedulefree.adamw_schedulefree.AdamWScheduleFree" and is_schedule_free(optimizer)
    assert "needs no learning-rate schedule" in caplog.text
    assert all(g["train_mode"] for g in optimizer.param_groups)  # built in training mode
    for _ in range(3):
        for p in network.params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == [5e-5, 1e-4]  # constant
    training = [p.detach().clone() for p in network.params]
    with eval_mode_for(optimizer)():
        assert not any(g["train_mode"] for g in optimizer.param_groups)
        assert not torch.allclose(network.params[1], training[1])  # the averaged weights are in place
    assert all(torch.allclose(p, t, atol=1e-6) for p, t in zip(network.params, training))
    optimizer.step()  # still (again) in training mode: schedulefree refuses to step otherwise


def test_other_optimizers_have_no_eval_mode():
    optimizer, _ = build_optimizer("AdamW", groups(), 1e-4, None)
    assert not is_schedule_free(optimizer)
    with eval_mode_for(optimizer)():
        pass


def test_saver_saves_in_eval_mode(tmp_path):
    from trainer.train.checkpoint import SavePolicy, Saver

    modes = []

    class Modes:
        def __enter__(self):
            modes.append("eval")

        def __exit__(self, *exc):
            modes.append("train")

    saver = Saver(SavePolicy(output_dir=tmp_path, output_name="x"), lambda path, meta: modes.append("save"),
                  metadata=lambda step, epoch: {}, on_saved=lambda path: None, eval_mode=Modes)
    saver.final(1, 1)
    assert modes == ["eval", "save", "train"]


# ---------------------------------------------------------------------------------------------------------------
# Arguments and end-to-end runs


def test_argument_checks_before_any_model_loads():
    from trainer.config.args import parse_train_args

    base = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"]
    with pytest.raises(ConfigError, match="does not use --lr_warmup_steps"):
        parse_train_args(base + ["--lr_scheduler_type", "StepLR", "--lr_warmup_steps", "5"])
    with pytest.raises(ConfigError, match="needs its rules"):
        parse_train_args(base + ["--lr_scheduler", "piecewise_constant"])
    with pytest.raises(ConfigError, match="--lr_scheduler_args gamma=x: not a Python literal"):
        parse_train_args(base + ["--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "gamma=x"])
    cfg = parse_train_args(base + ["--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=1"])
    assert cfg.lr_scheduler_type == "StepLR" and cfg.lr_scheduler_args == ["step_size=1"]


def run_cli(tiny_sd1_dir, train_data_dir, out, *extra):
    from test_train_run import base_args

    from trainer.cli import main

    assert main(["train", *base_args(tiny_sd1_dir, train_data_dir, out, *extra)]) == 0
    events = [json.loads(line) for line in (out / "my lora.events.jsonl").read_text(encoding="utf-8").splitlines()]
    return [e for e in events if e["kind"] == "step"]


def test_cli_run_with_lr_scheduler_type(tiny_sd1_dir, train_data_dir, tmp_path):
    steps = run_cli(tiny_sd1_dir, train_data_dir, tmp_path, "--lr_scheduler_type", "StepLR",
                    "--lr_scheduler_args", "step_size=1", "gamma=0.5", "--network_train_unet_only")
    assert steps[-1]["step"] == 4 and steps[-1]["lr"] == pytest.approx([1e-3 * 0.5 ** 4])


def test_cli_run_with_a_schedule_free_optimizer_samples_and_saves_averaged_weights(tiny_sd1_dir, train_data_dir,
                                                                                    tmp_path, monkeypatch):
    schedulefree = pytest.importorskip("schedulefree")
    from trainer.network.lora import LoRANetwork
    from trainer.train.sample import Sampler

    calls = []

    def record(cls, method, label):
        real = getattr(cls, method)

        def wrapper(self, *args, **kwargs):
            calls.append(label)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, wrapper)

    record(schedulefree.RAdamScheduleFree, "eval", "eval")
    record(schedulefree.RAdamScheduleFree, "train", "train")
    record(LoRANetwork, "save_weights", "save")
    monkeypatch.setattr(Sampler, "_one", lambda self, prompt, label, index: calls.append("sample"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks shape --w 64 --h 64 --s 1\n", encoding="utf-8")
    steps = run_cli(tiny_sd1_dir, train_data_dir, tmp_path, "--optimizer_type", "RAdamScheduleFree",
                    "--save_every_n_steps", "2", "--sample_every_n_steps", "2", "--sample_prompts", str(prompts),
                    "--network_train_unet_only")
    assert steps[-1]["step"] == 4  # stepping after the mid-run save and sample needs training mode back
    assert (tmp_path / "my lora-step00000002.safetensors").exists() and (tmp_path / "my lora.safetensors").exists()
    assert calls[0] == "train"  # built in training mode
    # every save and sample happens between eval() and train(): step file, sample at 2, sample at 4, final file
    assert calls[1:] == ["eval", "save", "train", "eval", "sample", "train",
                         "eval", "sample", "train", "eval", "save", "train"]
