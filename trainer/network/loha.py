"""LoHa (low-rank Hadamard product, FedPara) modules, saved as sd-scripts' networks/loha.py and LyCORIS save them.

delta = ((w1_a @ w1_b) * (w2_a @ w2_b)) * alpha / rank, reshaped to the base weight. Shapes per layer:
  Linear / 1x1 conv       hada_w1_a, hada_w2_a [out, r]; hada_w1_b, hada_w2_b [r, in]
  kxk conv (flat)         hada_w1_a, hada_w2_a [out, r]; hada_w1_b, hada_w2_b [r, in*k*k]
  kxk conv, use_tucker    hada_t1, hada_t2 [r, r, k, k]; hada_w1_a, hada_w2_a [r, out]; hada_w1_b, hada_w2_b [r, in]
    with each factor rebuilt as einsum("i j ..., j r, i p -> p r ...", t, w_b, w_a).
Initialisation as sd-scripts: the product starts at 0 because one `a` factor is zero.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from trainer.network.delta import WeightDeltaModule

TUCKER = "i j ..., j r, i p -> p r ..."


def tucker_rebuild(t: torch.Tensor, w_b: torch.Tensor, w_a: torch.Tensor) -> torch.Tensor:
    """[out, in, k, k] from a Tucker core t [r, r, k, k], w_b [r, in] and w_a [r, out] (LyCORIS' LoHa layout)."""
    return torch.einsum(TUCKER, t, w_b, w_a)


class LoHaModule(WeightDeltaModule):
    PARAMETER_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | int | None, *,
                 use_tucker: bool = False, dropout: float | None = None, **options):
        super().__init__(base, rank, alpha, **options)
        self.dropout = dropout  # accepted and unused, as in sd-scripts' LoHa (no neuron dropout)
        device = base.weight.device
        kernel = self.kernel_size
        self.tucker = bool(use_tucker) and self.is_conv and kernel != (1, 1)

        def param(*shape):
            return nn.Parameter(torch.empty(*shape, device=device))

        if self.tucker:
            self.hada_t1, self.hada_t2 = param(rank, rank, *kernel), param(rank, rank, *kernel)
            self.hada_w1_a, self.hada_w1_b = param(rank, self.out_dim), param(rank, self.in_dim)
            self.hada_w2_a, self.hada_w2_b = param(rank, self.out_dim), param(rank, self.in_dim)
            for t in (self.hada_t1, self.hada_t2, self.hada_w2_a):
                nn.init.normal_(t, std=0.1)
            nn.init.zeros_(self.hada_w1_a)
        else:
            flat_in = self.in_dim * (kernel[0] * kernel[1] if kernel else 1)
            self.hada_w1_a, self.hada_w1_b = param(self.out_dim, rank), param(rank, flat_in)
            self.hada_w2_a, self.hada_w2_b = param(self.out_dim, rank), param(rank, flat_in)
            nn.init.normal_(self.hada_w1_a, std=0.1)
            nn.init.zeros_(self.hada_w2_a)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w2_b, std=1.0)

    def _delta_from(self, w: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.tucker:
            first = tucker_rebuild(w["hada_t1"], w["hada_w1_b"], w["hada_w1_a"])
            second = tucker_rebuild(w["hada_t2"], w["hada_w2_b"], w["hada_w2_a"])
        else:
            first, second = w["hada_w1_a"] @ w["hada_w1_b"], w["hada_w2_a"] @ w["hada_w2_b"]
        return (first * second * self.scale).reshape(self.out_dim, self.in_dim, *self.kernel_size)

    def plus_weights(self) -> list[nn.Parameter]:
        return [self.hada_w2_a]


def loha_shapes_from_file(weights_sd: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """{module name: LoHaModule keyword arguments (rank, alpha, use_tucker)} as a LoHa file stores them."""
    specs: dict[str, dict] = {}
    for key, tensor in weights_sd.items():
        name, _, suffix = key.partition(".")
        if suffix != "hada_w1_b":
            continue
        alpha = weights_sd.get(f"{name}.alpha")
        specs[name] = {"rank": int(tensor.shape[0]), "alpha": None if alpha is None else alpha.reshape(()).item(),
                       "use_tucker": f"{name}.hada_t1" in weights_sd}
    return specs
