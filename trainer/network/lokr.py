"""LoKr (low-rank Kronecker product) modules, saved as sd-scripts' networks/lokr.py and LyCORIS save them.

The base weight [out, in(, k, k)] is split as out = out_l * out_k, in = in_m * in_n (`factorization`), and
delta = kron(w1, w2) * scale, reshaped to the base weight:
  w1  lokr_w1 [out_l, in_m] (full), or lokr_w1_a [out_l, r] @ lokr_w1_b [r, in_m] (LyCORIS decompose_both)
  w2  lokr_w2 [out_k, in_n(, k, k)] (full: rank >= max(out_k, in_n) / 2), or
      lokr_w2_a [out_k, r] @ lokr_w2_b [r, in_n(*k*k)], or, for a kxk conv with use_tucker,
      einsum("i j ..., i p, j r -> p r ...", lokr_t2 [r, r, k, k], lokr_w2_a [r, out_k], lokr_w2_b [r, in_n]).
scale = alpha / rank, except 1 when no factor is low-rank (then alpha is saved as the rank, as sd-scripts does).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from trainer.network.delta import WeightDeltaModule

TUCKER = "i j ..., i p, j r -> p r ..."


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m * n = dimension: the most balanced split with m <= factor (any m when factor < 0); a
    factor that divides the dimension is taken as it is. 320 -> (16, 20), 1280 with factor 8 -> (8, 160)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        other = dimension // candidate
        if candidate + other > m + n or candidate > limit:
            break
        m, n = candidate, other
    return (m, n) if m <= n else (n, m)


class LoKrModule(WeightDeltaModule):
    PARAMETER_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | int | None, *, factor: int = -1,
                 use_tucker: bool = False, decompose_both: bool = False, dropout: float | None = None,
                 layout: Mapping | None = None, **options):
        """`layout` (from a file: `lokr_shapes_from_file`) fixes w1's shape and which factors are full, so a file
        loads whatever `factor` it was trained with."""
        super().__init__(base, rank, alpha, **options)
        self.dropout = dropout  # accepted and unused, as in sd-scripts' LoKr (no neuron dropout)
        kernel = self.kernel_size
        conv_kxk = self.is_conv and kernel != (1, 1)
        if layout is not None:
            out_l, in_m = layout["w1_shape"]
            out_k, in_n = self.out_dim // out_l, self.in_dim // in_m
            full_w1, full_w2, self.tucker = layout["full_w1"], layout["full_w2"], layout["tucker"]
        else:
            in_m, in_n = factorization(self.in_dim, int(factor))
            out_l, out_k = factorization(self.out_dim, int(factor))
            full_w1 = not (decompose_both and rank < max(out_l, in_m) / 2)
            full_w2 = rank >= max(out_k, in_n) / 2
            self.tucker = bool(use_tucker) and conv_kxk and not full_w2
        self.factors = (out_l, out_k, in_m, in_n)
        device = base.weight.device

        def param(*shape):
            return nn.Parameter(torch.empty(*shape, device=device))

        if full_w1:
            self.lokr_w1 = param(out_l, in_m)
            nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        else:
            self.lokr_w1_a, self.lokr_w1_b = param(out_l, rank), param(rank, in_m)
            nn.init.kaiming_uniform_(self.lokr_w1_a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lokr_w1_b, a=math.sqrt(5))
        if full_w2:
            self.lokr_w2 = param(out_k, in_n, *(kernel if conv_kxk else ()))
            nn.init.zeros_(self.lokr_w2)
        elif self.tucker:
            self.lokr_t2 = param(rank, rank, *kernel)
            self.lokr_w2_a, self.lokr_w2_b = param(rank, out_k), param(rank, in_n)
            nn.init.kaiming_uniform_(self.lokr_t2, a=math.sqrt(5))
        else:
            flat_in = in_n * (kernel[0] * kernel[1] if conv_kxk else 1)
            self.lokr_w2_a, self.lokr_w2_b = param(out_k, rank), param(rank, flat_in)
        if not full_w2:
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            nn.init.zeros_(self.lokr_w2_b)
        self.full_factors = full_w1 and full_w2
        if self.full_factors:  # nothing low-rank: sd-scripts stores alpha = rank, so every loader's scale is 1
            self.alpha = torch.tensor(rank, device=device)
            self.scale = 1.0

    def _scale_for_alpha(self, alpha: float) -> float:
        return 1.0 if self.full_factors else alpha / self.rank

    def _delta_from(self, w: Mapping[str, torch.Tensor]) -> torch.Tensor:
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        if "lokr_w2" in w:
            w2 = w["lokr_w2"]
        elif self.tucker:
            w2 = torch.einsum(TUCKER, w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
        else:
            w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
            if self.is_conv and self.kernel_size != (1, 1):
                w2 = w2.reshape(w2.shape[0], -1, *self.kernel_size)
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        return (torch.kron(w1, w2.contiguous()) * self.scale).reshape(self.out_dim, self.in_dim, *self.kernel_size)

    def plus_weights(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters(recurse=False) if name.startswith("lokr_w1")]


def lokr_shapes_from_file(weights_sd: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """{module name: LoKrModule keyword arguments} as a LoKr file stores them: rank, alpha and the layout (w1's
    shape, which factors are full, Tucker) read from the tensors, so no `factor` is needed."""
    specs: dict[str, dict] = {}
    for key in weights_sd:
        name, _, suffix = key.partition(".")
        if suffix not in ("lokr_w1", "lokr_w1_a") or name in specs:
            continue

        def get(part, name=name):
            return weights_sd.get(f"{name}.{part}")

        w1 = get("lokr_w1")
        w1_shape = tuple(w1.shape) if w1 is not None else (get("lokr_w1_a").shape[0], get("lokr_w1_b").shape[1])
        tucker = get("lokr_t2") is not None
        if get("lokr_w2_a") is not None:
            rank = get("lokr_w2_a").shape[0 if tucker else 1]
        elif w1 is None:
            rank = get("lokr_w1_b").shape[0]
        else:
            rank = None  # all factors full: the saved alpha is the rank
        alpha = get("alpha")
        alpha = None if alpha is None else alpha.reshape(()).item()
        if rank is None:
            rank = int(alpha) if alpha else 1
        specs[name] = {"rank": int(rank), "alpha": alpha,
                       "layout": {"w1_shape": tuple(int(d) for d in w1_shape), "full_w1": w1 is not None,
                                  "full_w2": get("lokr_w2") is not None, "tucker": tucker}}
    return specs
