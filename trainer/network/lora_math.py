"""The linear algebra of kohya LoRA modules, shared by `resize_lora`, `extract_lora` and `merge_lora`: the delta
weight of one module, its singular values, a best-rank-k split back into (lora_down, lora_up), and sd-scripts'
dynamic rank rules (networks/resize_lora.py: sv_ratio, sv_fro, sv_cumulative). Pure torch, no files.

Shapes as sd-scripts saves them: Linear down [r, in], up [out, r]; Conv2d down [r, in, kh, kw], up [out, r, 1, 1].
The delta is `up.flatten(1) @ down.flatten(1) * alpha / r` in the base weight's shape. All maths is fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A module whose largest singular value is at most this is a zero matrix; sd-scripts keeps rank 1 for it.
MIN_SV = 1e-6
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


def lora_scale(rank: int, alpha: float | torch.Tensor | None) -> float:
    """alpha / rank, computed in fp32 as sd-scripts does (its alpha is a float32 tensor); no alpha means 1."""
    if alpha is None:
        return 1.0
    return float(torch.as_tensor(alpha, dtype=torch.float32) / rank)


def lora_delta(down: torch.Tensor, up: torch.Tensor, alpha: float | torch.Tensor | None = None) -> torch.Tensor:
    """The weight change of one module: [out, in] for Linear, [out, in, kh, kw] for Conv2d (1x1 or kxk)."""
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise ValueError(f"lora_up has {up.shape[1]} columns but lora_down has {rank} rows")
    product = up.float().flatten(1) @ down.float().flatten(1)
    return product.reshape(up.shape[0], *down.shape[1:]) * lora_scale(rank, alpha)


def product_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, Vh) of `up.flatten(1) @ down.flatten(1)` without forming it: QR of both factors, then the
    SVD of the small r x r core. Same singular values as the dense SVD (the rest are zero) at a fraction of the
    time for a 1280 x 5120 layer, which matters on a CPU."""
    up_q, up_r = torch.linalg.qr(up.float().flatten(1))
    down_q, down_r = torch.linalg.qr(down.float().flatten(1).T)
    u, s, vh = torch.linalg.svd(up_r @ down_r.T, full_matrices=False)
    return up_q @ u, s, vh @ down_q.T


def matrix_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a dense weight (or delta) flattened to [out, in * kh * kw], in fp32."""
    return torch.linalg.svd(weight.float().flatten(1), full_matrices=False)


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile's default (linear interpolation) by sorting: torch.quantile refuses more than 2**24 values,
    which a rank-128 SDXL layer can exceed."""
    ordered = values.flatten().float().sort().values
    position = q * (ordered.numel() - 1)
    low = int(position)
    high = min(low + 1, ordered.numel() - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int,
             clamp_quantile: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(down [k, n], up [out, k]) of the best rank-k approximation: up = U_k diag(S_k), down = Vh_k, as sd-scripts
    splits it. With `clamp_quantile` below 1, both are clamped to +-(that quantile of their joined values), as
    sd-scripts' extract and svd-merge do to cut outliers; None or 1 and above keep them exact."""
    rank = min(rank, s.numel())
    up = u[:, :rank] * s[:rank]
    down = vh[:rank]
    if clamp_quantile is not None and clamp_quantile < 1:
        high = quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    return down, up


def module_shaped(down: torch.Tensor, up: torch.Tensor, weight_shape: tuple[int, ...] | torch.Size):
    """(down, up) from `truncate` in the shapes a module of a base weight of `weight_shape` is saved in."""
    rank = down.shape[0]
    if len(weight_shape) == 4:
        return down.reshape(rank, *weight_shape[1:]).contiguous(), up.reshape(up.shape[0], rank, 1, 1).contiguous()
    return down.contiguous(), up.contiguous()


def best_rank_split(delta: torch.Tensor, rank: int, clamp_quantile: float | None = None):
    """(down, up) whose product is the best rank-`rank` approximation of a dense `delta` (alpha = rank, scale 1).
    The rank is capped by the layer's in and out channels, as sd-scripts caps it."""
    rank = min(rank, delta.shape[0], delta.shape[1])
    down, up = truncate(*matrix_svd(delta), rank, clamp_quantile)
    return module_shaped(down, up, delta.shape)


# -- dynamic rank (sd-scripts' networks/resize_lora.py) ------------------------------------------------------


def _padded(s: torch.Tensor, full_length: int | None) -> torch.Tensor:
    """The singular values of the full layer: a product SVD gives only r of them, the others are zero."""
    if full_length is None or full_length <= s.numel():
        return s
    return torch.cat([s, s.new_zeros(full_length - s.numel())])


def _clamped_index(index: int, length: int) -> int:
    return max(1, min(index, length - 1))


def index_sv_ratio(s: torch.Tensor, target: float) -> int:
    """How many singular values exceed the largest / target (at least 1, at most len - 1)."""
    return _clamped_index(int((s > s[0] / target).sum()), s.numel())


def index_sv_cumulative(s: torch.Tensor, target: float) -> int:
    """1 + where the cumulative sum of singular values first reaches `target` of the total."""
    cumulative = torch.cumsum(s, dim=0) / float(s.sum())
    found = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=cumulative.dtype)))
    return _clamped_index(found + 1, s.numel())


def index_sv_fro(s: torch.Tensor, target: float) -> int:
    """1 + where the retained Frobenius norm first reaches `target` of the whole (compared squared)."""
    squared = s.pow(2)
    cumulative = torch.cumsum(squared, dim=0) / float(squared.sum())
    found = int(torch.searchsorted(cumulative, torch.tensor([target ** 2], dtype=cumulative.dtype)))
    return _clamped_index(found + 1, s.numel())


_INDEX = {"sv_ratio": index_sv_ratio, "sv_cumulative": index_sv_cumulative, "sv_fro": index_sv_fro}


def choose_rank(s: torch.Tensor, max_rank: int, method: str | None = None, param: float | None = None,
                full_length: int | None = None) -> int:
    """The new rank sd-scripts' `rank_resize` picks: `max_rank` without a method, else the method's index + 1
    (sd-scripts keeps one value past the index), capped by `max_rank`; a zero matrix gets rank 1.
    `s` is sorted descending; `full_length` is min(out, in * kh * kw) when `s` holds only the non-zero values."""
    s = _padded(s.float(), full_length)
    if method is None:
        rank = max_rank
    elif method in _INDEX:
        rank = _INDEX[method](s, float(param)) + 1
    else:
        raise ValueError(f"unknown dynamic method {method!r}; use one of {', '.join(DYNAMIC_METHODS)}")
    if float(s[0]) <= MIN_SV:
        return 1
    return min(rank, max_rank)


@dataclass(frozen=True)
class Retained:
    """How much of a module a rank keeps, as sd-scripts' --verbose prints it."""

    sum_retained: float  # sum of kept singular values / sum of all
    fro_retained: float  # Frobenius norm kept / whole
    max_ratio: float  # largest / smallest kept singular value


def retained(s: torch.Tensor, rank: int) -> Retained:
    s = s.float().abs()
    squared = s.pow(2)
    return Retained(float(s[:rank].sum() / s.sum()), float(squared[:rank].sum().sqrt() / squared.sum().sqrt()),
                    float(s[0] / s[rank - 1]))
