"""--full_fp16: the LoRA's weights, gradients and optimizer state in fp16 (needs --mixed_precision fp16).

Plain `--mixed_precision fp16` keeps the trainable weights in fp32 and lets autocast run the maths in fp16; a
GradScaler multiplies the loss so that small fp16 gradients do not flush to zero, and divides ("unscales") the
gradients again before clipping and the optimizer step. torch's GradScaler refuses fp16 gradients ("Attempting
to unscale FP16 gradients"), because AMP assumes fp32 master weights.

Why no fp32 master copy: fp32 master weights with their fp32 optimizer state and fp16 compute is exactly what
plain --mixed_precision fp16 already is (autocast casts the fp32 LoRA weights per matmul), so a master copy would
make --full_fp16 save nothing. The user asks for fp16 weights to save that memory, so, as sd-scripts does, the
scaler is allowed to unscale fp16 gradients in place. Unlike sd-scripts this patches only this run's scaler (the
instance, not torch's class), and the unscale still checks every gradient for inf/NaN, so an overflowing step is
skipped and the scale lowered as usual.

The other half of making it work: torch's Adam/AdamW do their maths in the parameters' dtype, and in fp16 their
eps (1e-8) rounds to 0 and squared gradients below ~6e-8 vanish, so the first step divides 0 by 0 (lora_down's
gradient is exactly 0 while lora_up starts at 0) and every weight becomes NaN (sd-scripts users meet this as
"full_fp16 gives loss=nan", kohya-ss/sd-scripts#430, #2116). Their fused implementation computes in fp32 inside
the kernel and stores fp16, the same update otherwise, so it is chosen unless the user picked an implementation.
bitsandbytes' 8-bit optimizers (the usual partner of --full_fp16) and Adafactor compute in fp32 themselves.
"""

from __future__ import annotations

import logging

from trainer.train.optim import parse_optimizer_args, resolve_optimizer_class

log = logging.getLogger(__name__)


def resolve_full_fp16(requested: bool, mixed_precision: str) -> bool:
    """Whether the LoRA is trained in fp16. The config check (trainer.config.args) already demands
    --mixed_precision fp16; a mismatch here means fp16 fell back to fp32 (no CUDA GPU), and so does the LoRA."""
    if requested and mixed_precision != "fp16":
        log.warning("--full_fp16 needs fp16 autocast on a CUDA GPU; on the CPU the LoRA weights stay fp32, like "
                    "the rest of the training.")
        return False
    return requested


def allow_fp16_unscale(scaler) -> None:
    """Let this GradScaler unscale fp16 gradients (see the module docstring for why). None (no scaler) is fine."""
    if scaler is None:
        return
    unscale_grads = scaler._unscale_grads_  # the bound method: torch's own unscale and inf/NaN check

    def unscale_fp16_too(optimizer, inv_scale, found_inf, allow_fp16=False):
        return unscale_grads(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_fp16_too


def fp16_optimizer_args(optimizer_type: str | None, optimizer_args: list[str] | None) -> list[str]:
    """--optimizer_args for fp16 weights: torch Adam/AdamW get `fused=True` (fp32 maths inside the kernel)
    unless the user chose `fused` or `foreach` themselves."""
    import torch

    args = list(optimizer_args or [])
    cls, _ = resolve_optimizer_class(optimizer_type or "AdamW")
    if not issubclass(cls, torch.optim.Adam):  # AdamW derives from Adam
        return args
    chosen = parse_optimizer_args(args)
    if "fused" in chosen or "foreach" in chosen:
        if not chosen.get("fused"):
            log.warning("--full_fp16 with %s(%s): this implementation computes in fp16, where eps=1e-8 is 0, and "
                        "tends to give NaN weights; leave out fused/foreach (fused=True is then used).",
                        cls.__name__, ", ".join(f"{k}={v}" for k, v in chosen.items()))
        return args
    log.info("--full_fp16: using the fused %s, which computes in fp32 and stores fp16.", cls.__name__)
    return args + ["fused=True"]
