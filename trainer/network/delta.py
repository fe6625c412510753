"""The common part of network modules whose update is a whole weight delta built from small factors (LoHa, LoKr):
`base(x) + layer(x, delta_weight) * multiplier`, added by a forward hook on the base layer, as LoRAModule does.

A subclass creates its parameters, says how they make the delta (`_delta`, in the parameters' dtype and with
autograd), and which of them LoRA+ trains faster (`plus_weights`). Attaching, dropouts, merging and the
file's alpha are handled here, with the semantics of sd-scripts' networks/loha.py and networks/lokr.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HookedModule(nn.Module):
    """A network module that adds its output to one base layer's output through a forward hook on that layer,
    so the base model's code and modules stay as they are. A subclass provides `_add_output`."""

    def __init__(self, base: nn.Module):
        super().__init__()
        # A plain attribute, not a child module: the base layer must never appear in our state_dict.
        object.__setattr__(self, "base_layer", base)
        self._hook = None

    def attach(self) -> None:
        """Start adding this module's output to the base layer's output."""
        if self._hook is None:
            self._hook = self.base_layer.register_forward_hook(self._add_output, with_kwargs=True)

    def remove(self) -> None:
        """Stop adding it; the base layer behaves exactly as before `attach`."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @property
    def attached(self) -> bool:
        return self._hook is not None

    def _add_output(self, base, args, kwargs, output):
        raise NotImplementedError


class WeightDeltaModule(HookedModule):
    """One Linear or Conv2d with a trainable weight delta. `alpha` is a 0-dim buffer saved next to the factors."""

    PARAMETER_NAMES: tuple[str, ...] = ()  # every tensor name a file may hold for one module, alpha excluded

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | int | None, *,
                 rank_dropout: float | None = None, module_dropout: float | None = None,
                 multiplier: float = 1.0, name: str = ""):
        super().__init__(base)
        if rank < 1:
            raise ValueError(f"network rank must be at least 1, got {rank}")
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{type(self).__name__} needs an nn.Linear or nn.Conv2d, got {type(base).__name__}")
        self.is_conv = isinstance(base, nn.Conv2d)
        self.out_dim, self.in_dim = base.weight.shape[:2]
        self.kernel_size = tuple(base.weight.shape[2:])
        self.rank = rank
        if alpha is None or alpha == 0:
            alpha = rank
        # As in sd-scripts: torch.tensor keeps the Python type, so an int alpha (CLI default 1) is saved as int64.
        self.register_buffer("alpha", torch.tensor(alpha, device=base.weight.device))
        self.scale = float(alpha) / rank
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.multiplier = multiplier
        self.lora_name = name

    # -- what a subclass provides -----------------------------------------------------------------

    def _delta_from(self, w: dict[str, torch.Tensor]) -> torch.Tensor:
        """The delta in the base weight's shape, times `self.scale`, from this module's tensors by name."""
        raise NotImplementedError

    def _delta(self) -> torch.Tensor:
        """The delta in the parameters' dtype, differentiable (the training path)."""
        return self._delta_from(dict(self.named_parameters(recurse=False)))

    def plus_weights(self) -> list[nn.Parameter]:
        """The parameters LoRA+ trains at lr x ratio (sd-scripts' `_is_plus_param`)."""
        raise NotImplementedError

    def trainable_weights(self) -> list[nn.Parameter]:
        return list(self.parameters())

    # -- attaching -------------------------------------------------------------------------------

    def _add_output(self, base, args, kwargs, output):
        if self.multiplier == 0:
            return None
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return None
        update = self.delta_output(args[0] if args else kwargs["input"])
        return output + update.to(output.dtype)

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        """`layer(x, delta) * multiplier`; in training, rank dropout drops whole output rows of the delta
        (sd-scripts' LoHa/LoKr rank dropout) and rescales by 1 / (1 - p)."""
        delta = self._delta()
        factor = self.multiplier
        if self.training and self.rank_dropout:
            keep = (torch.rand(delta.shape[0], device=delta.device) > self.rank_dropout).to(delta.dtype)
            delta = delta * keep.view(-1, *([1] * (delta.dim() - 1)))
            factor = factor / (1.0 - self.rank_dropout)
        if x.dtype != delta.dtype:
            x = x.to(delta.dtype)
        if self.is_conv:
            base = self.base_layer
            out = F.conv2d(x, delta, stride=base.stride, padding=base.padding, dilation=base.dilation,
                           groups=base.groups)
        else:
            out = F.linear(x, delta)
        return out * factor

    # -- weights ---------------------------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """scale x the delta in the base layer's weight shape, in fp32 (the merge and max-norm path)."""
        return self._delta_from({name: p.float() for name, p in self.named_parameters(recurse=False)})

    def merge_into_base(self, multiplier: float = 1.0) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            delta = self.delta_weight().to(weight.device).reshape(weight.shape)
            merged = (weight.float() + multiplier * delta).to(weight.dtype)
            if not torch.isfinite(merged.float()).all():
                raise ValueError(f"merging {self.lora_name or '?'} would put NaN or infinite values into "
                                 f"the base weights ({weight.dtype}); the network weights are unusable")
            weight.copy_(merged)
        self.remove()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The file's alpha keeps its own type (an int64 buffer would truncate 0.5 to 0); the scale follows it.
        key = prefix + "alpha"
        if key in state_dict:
            loaded = state_dict[key]
            if loaded.numel() == 1 and loaded.device.type != "meta":
                value = loaded.reshape(()).item()
                self.alpha = torch.tensor(value, device=self.alpha.device)
                state_dict[key] = self.alpha
                self.scale = self._scale_for_alpha(float(value))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _scale_for_alpha(self, alpha: float) -> float:
        return alpha / self.rank
