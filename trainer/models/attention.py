"""Choose the attention implementation once, before training, and say what was chosen.

sd-scripts' order is kept: --mem_eff_attn > --xformers > --sdpa > default. Two deliberate differences:

- --xformers without a usable xformers (not installed, no CUDA GPU - it has no CPU kernel - or built for
  another torch) is not fatal as in sd-scripts (`ImportError("No xformers")`): one warning names the reason and
  PyTorch's scaled_dot_product_attention (SDPA) is used, which on PyTorch 2 is about as fast and as frugal.
- The default is SDPA, not sd-scripts' naive attention: the naive path materialises the full attention matrix
  and is slower and hungrier; SDPA gives the same results within float tolerance.

--mem_eff_attn in sd-scripts is a pure-PyTorch flash-attention (chunked, O(n) memory) for GPUs without
xformers. PyTorch's SDPA already dispatches to a memory-efficient / flash kernel on CUDA, so it is used for
--mem_eff_attn as well; diffusers' sliced attention would save less memory and run slower.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def select_attention(unet, vae, *, xformers: bool = False, sdpa: bool = False, mem_eff_attn: bool = False) -> str:
    """Set the attention processors of the UNet (and VAE) and return the backend used: "xformers" or "sdpa"
    ("default" only on a PyTorch without SDPA)."""
    models = [m for m in (unet, vae) if m is not None]
    if mem_eff_attn:
        logger.info("--mem_eff_attn: using PyTorch SDPA, whose memory-efficient kernel replaces sd-scripts' "
                    "pure-PyTorch flash attention.")
        return _use_sdpa(models)
    if xformers:
        reason = _xformers_problem()
        if reason is None:
            try:
                for model in models:
                    model.enable_xformers_memory_efficient_attention()
                return "xformers"
            except Exception as e:  # e.g. a wheel built for another torch/CUDA
                reason = f"enabling it failed ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
        logger.warning("--xformers was requested but %s; using PyTorch SDPA attention instead (about as fast and "
                       "memory-efficient on PyTorch 2). Remove --xformers (or add --sdpa) to silence this.", reason)
    return _use_sdpa(models)


def _xformers_problem() -> str | None:
    """Why xformers cannot be used here, or None when it can."""
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return "xformers is not installed (run setup again; it installs xformers where a wheel matches your torch)"
    except Exception as e:  # a broken install raises other errors at import time
        return f"xformers could not be imported ({type(e).__name__}: {e})"
    import torch

    if not torch.cuda.is_available():
        return "there is no CUDA GPU (xformers has no CPU kernel)"
    return None


def _use_sdpa(models: list) -> str:
    import torch

    if not hasattr(torch.nn.functional, "scaled_dot_product_attention"):  # PyTorch < 2.0
        from diffusers.models.attention_processor import AttnProcessor

        for model in models:
            model.set_attn_processor(AttnProcessor())
        return "default"
    from diffusers.models.attention_processor import AttnProcessor2_0

    for model in models:
        model.set_attn_processor(AttnProcessor2_0())
    return "sdpa"
