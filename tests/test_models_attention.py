"""Attention backend choice: sd-scripts' priority, SDPA as the default, and a single clear warning when
--xformers cannot be used (not installed, or no CUDA GPU)."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from trainer.models.attention import select_attention


@pytest.fixture
def parts(tiny_sd1):
    return tiny_sd1["unet"], tiny_sd1["vae"]


def processor_names(*models) -> set[str]:
    return {type(p).__name__ for m in models for p in m.attn_processors.values()}


def warnings_from(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "trainer.models.attention" and r.levelno >= logging.WARNING]


def test_default_is_sdpa_without_warnings(parts, caplog):
    with caplog.at_level(logging.INFO):
        assert select_attention(*parts, xformers=False, sdpa=False, mem_eff_attn=False) == "sdpa"
    assert processor_names(*parts) == {"AttnProcessor2_0"}
    assert warnings_from(caplog) == []


def test_xformers_not_installed_falls_back_with_one_warning(parts, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # makes `import xformers.ops` raise ImportError
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    with caplog.at_level(logging.INFO):
        assert select_attention(*parts, xformers=True, sdpa=False, mem_eff_attn=False) == "sdpa"
    (message,) = warnings_from(caplog)
    assert "not installed" in message and "SDPA" in message
    assert processor_names(*parts) == {"AttnProcessor2_0"}


def test_xformers_without_cuda_falls_back_with_one_warning(parts, caplog, monkeypatch):
    fake = types.ModuleType("xformers")
    fake.ops = types.ModuleType("xformers.ops")
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake.ops)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO):
        assert select_attention(*parts, xformers=True, sdpa=True, mem_eff_attn=False) == "sdpa"
    (message,) = warnings_from(caplog)
    assert "CUDA" in message and "SDPA" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine with xformers this would pick xformers")
def test_xformers_on_this_cpu_machine_falls_back(parts, caplog):
    with caplog.at_level(logging.INFO):
        assert select_attention(*parts, xformers=True, sdpa=False, mem_eff_attn=False) == "sdpa"
    assert len(warnings_from(caplog)) == 1


def test_mem_eff_attn_wins_over_xformers(parts, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)
    with caplog.at_level(logging.INFO):
        assert select_attention(*parts, xformers=True, sdpa=False, mem_eff_attn=True) == "sdpa"
    assert warnings_from(caplog) == []  # xformers was never considered


def test_sdpa_gives_the_same_output_as_plain_attention(parts):
    from diffusers.models.attention_processor import AttnProcessor

    unet, _ = parts
    torch.manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    unet.set_attn_processor(AttnProcessor())
    with torch.no_grad():
        plain = unet(x, t, ctx).sample
        select_attention(unet, None, xformers=False, sdpa=True, mem_eff_attn=False)
        fast = unet(x, t, ctx).sample
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
