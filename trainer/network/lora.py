"""LoRA (and LoCon for 3x3 convs) on a diffusers UNet and transformers CLIP text encoders, saved in
kohya's format (the names, shapes and metadata of sd-scripts' networks/lora.py).

A `LoRAModule` keeps a plain reference to its base layer and adds its output through a forward hook:
no module's `forward` is replaced and no module in the model is swapped, so removing the hooks gives
back the untouched model. `LoRANetwork` holds the modules as children named by kohya name, so its
`state_dict()` is the file format: `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import blocks
from trainer.config.args import network_module_type
from trainer.config.blocks import BlockDims, block_index
from trainer.errors import ModelLoadError
from trainer.files import atomic_path
from trainer.network.delta import HookedModule, WeightDeltaModule
from trainer.network.keys import (
    UNET_PREFIX,
    LoraTarget,
    expected_attention_targets,
    find_lora_targets,
    kohya_name,
    text_encoder_prefixes,
)
from trainer.network.loha import LoHaModule, loha_shapes_from_file
from trainer.network.lokr import LoKrModule, lokr_shapes_from_file
from trainer.network.metadata import sshs_hashes

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
TE_LAYERS_PER_CLIP_BLOCK = 6  # q, k, v, out projections + fc1, fc2 of each CLIP layer


class NetworkWeightsError(ModelLoadError):
    """A LoRA weights file that cannot be used with this network (unknown keys, other shapes, unreadable)."""


class LoRAModule(HookedModule):
    """The low-rank update of one Linear or Conv2d: `base(x) + up(down(x)) * multiplier * alpha / rank`.

    Shapes as sd-scripts saves them: Linear down [r, in], up [out, r]; Conv2d down [r, in, kh, kw] with the base's
    stride and padding, up [out, r, 1, 1]. `alpha` is a 0-dim buffer.
    """

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | int | None, *,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, multiplier: float = 1.0, name: str = ""):
        super().__init__(base)
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        device = base.weight.device
        if isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=device)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=device)
        elif isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       bias=False, device=device)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, 1, bias=False, device=device)
        else:
            raise TypeError(f"LoRA needs an nn.Linear or nn.Conv2d, got {type(base).__name__}")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        if alpha is None or alpha == 0:
            alpha = rank
        # As in sd-scripts: torch.tensor keeps the Python type, so an int alpha (CLI default 1) is saved as int64.
        self.register_buffer("alpha", torch.tensor(alpha, device=device))
        self.rank = rank
        self.scale = float(alpha) / rank
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.multiplier = multiplier
        self.lora_name = name

    # -- attaching (HookedModule) -----------------------------------------------------------------

    def _add_output(self, base, args, kwargs, output):
        # Runs for every hooked layer in every forward pass, so it avoids work it does not need: the LoRA
        # layers are called through `forward` (not nn.Module.__call__, whose hook bookkeeping costs as much as
        # a small kernel launch), and the scale is applied by the add itself (one kernel, no temporary).
        if self.multiplier == 0:
            return None
        # Module dropout skips the whole branch for this call (training only, like sd-scripts). A CPU draw: no GPU sync.
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return None
        update, scale = self._branch(args[0] if args else kwargs["input"])
        if update.dtype != output.dtype:
            update = update.to(output.dtype)
        return torch.add(output, update, alpha=scale)

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """`up(down(x)) * multiplier * scale`, with neuron and rank dropout in training mode."""
        update, scale = self._branch(x)
        return update * scale

    def _branch(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(up(down(x)), the factor it is to be multiplied by), with neuron and rank dropout in training mode."""
        down, up = self.lora_down, self.lora_up
        if x.dtype != down.weight.dtype:
            x = x.to(down.weight.dtype)
        hidden = down.forward(x)
        scale = self.scale
        if self.training and self.dropout:
            hidden = F.dropout(hidden, p=self.dropout)
        if self.training and self.rank_dropout:
            # One keep/drop draw per sample and rank, broadcast over tokens ([B, L, r]) or pixels ([B, r, H, W]).
            keep = (torch.rand(hidden.shape[0], self.rank, device=hidden.device) > self.rank_dropout)
            keep = keep.to(hidden.dtype)
            if hidden.dim() == 3:
                keep = keep[:, None, :]
            elif hidden.dim() == 4:
                keep = keep[:, :, None, None]
            hidden = hidden * keep
            scale = scale / (1.0 - self.rank_dropout)
        return up.forward(hidden), self.multiplier * scale

    # -- weights ---------------------------------------------------------------------------------

    PARAMETER_NAMES = ("lora_down.weight", "lora_up.weight")

    def trainable_weights(self) -> list[nn.Parameter]:
        return [self.lora_down.weight, self.lora_up.weight]

    def plus_weights(self) -> list[nn.Parameter]:
        """LoRA+ trains lora_up at lr x ratio."""
        return [self.lora_up.weight]

    def delta_weight(self) -> torch.Tensor:
        """scale * up @ down in the base layer's weight shape, computed in fp32 (fp16/bf16 matmuls on
        CPU are slow or missing, and fp32 keeps the merge exact to the last bit that fits)."""
        down = self.lora_down.weight.float()
        up = self.lora_up.weight.float()
        if down.dim() == 2:
            return (up @ down) * self.scale
        # A 1x1 up conv after a kxk down conv is one kxk conv with weight sum_r up[o, r] * down[r, i].
        out_channels = up.shape[0]
        return (up.flatten(1) @ down.flatten(1)).reshape(out_channels, *down.shape[1:]) * self.scale

    def merge_into_base(self, multiplier: float = 1.0) -> None:
        """Add multiplier * delta into the base weight (then stop the hook, or the LoRA would count twice)."""
        weight = self.base_layer.weight
        with torch.no_grad():
            merged = (weight.float() + multiplier * self.delta_weight().to(weight.device)).to(weight.dtype)
            # Checked in fp32: isfinite has no float8 kernel (--fp8_base), and a float8 overflow reads back as NaN.
            if not torch.isfinite(merged.float()).all():
                raise ValueError(f"merging LoRA {self.lora_name or '?'} would put NaN or infinite values into "
                                 f"the base weights ({weight.dtype}); the LoRA weights are unusable")
            weight.copy_(merged)
        self.remove()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Take the file's alpha with its own type (int64 or float) instead of copying it into ours: an
        # int64 buffer would truncate a float alpha such as 0.5 to 0. Then recompute the scale.
        key = prefix + "alpha"
        if key in state_dict:
            loaded = state_dict[key]
            if loaded.numel() == 1 and loaded.device.type != "meta":
                value = loaded.reshape(()).item()
                self.alpha = torch.tensor(value, device=self.alpha.device)
                state_dict[key] = self.alpha
                self.scale = float(value) / self.rank
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors, .ckpt or .pt LoRA file, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise NetworkWeightsError(f"LoRA weights file not found: {path}. Check the path (--network_weights).")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any reader failure means the same thing to the user
        raise NetworkWeightsError(f"cannot read LoRA weights file {path}: {error}. Is it a complete "
                                  ".safetensors/.ckpt file?") from error


def _split_key(key: str) -> tuple[str, str]:
    """`name.lora_up.weight` -> (`name`, `lora_up.weight`); suffixes we do not know come back unchanged."""
    name, _, suffix = key.partition(".")
    return name, suffix


NETWORK_MODULE_TYPES = {"lora": LoRAModule, "loha": LoHaModule, "lokr": LoKrModule}
NetworkModule = LoRAModule | WeightDeltaModule
# A key suffix that tells a file's network type: LoRA / LoCon, LoHa, LoKr.
_TYPE_MARKERS = (("lora_down.weight", "lora"), ("hada_w1_b", "loha"), ("lokr_w1", "lokr"), ("lokr_w1_a", "lokr"))


def network_type_of(weights_sd: Mapping[str, torch.Tensor]) -> str | None:
    """"lora", "loha" or "lokr": the module type of a kohya/LyCORIS-format file (None when it is none of them)."""
    suffixes = {_split_key(key)[1] for key in weights_sd}
    return next((kind for marker, kind in _TYPE_MARKERS if marker in suffixes), None)


def _file_module_dims(weights_sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, float | int]]:
    """{lora name: (rank, alpha)} as stored in a file; alpha keeps its int/float type, rank if absent."""
    dims: dict[str, tuple[int, float | int]] = {}
    for key, tensor in weights_sd.items():
        name, suffix = _split_key(key)
        if suffix == "lora_down.weight":
            alpha_tensor = weights_sd.get(f"{name}.alpha")
            alpha = alpha_tensor.reshape(()).item() if alpha_tensor is not None else None
            dims[name] = (int(tensor.shape[0]), alpha)
    return dims


def sdxl_diffusers_name_aliases(unet: nn.Module) -> dict[str, str]:
    """{diffusers-style SDXL LoRA name: SGM-style name}: some tools save SDXL LoRAs with
    `lora_unet_down_blocks_...` names; sd-scripts' create_network_from_weights converts them, and so do we."""
    targets = find_lora_targets(unet, prefix=UNET_PREFIX, is_text_encoder=False, include_conv=True, sdxl=True)
    return {kohya_name(UNET_PREFIX, t.path): t.name for t in targets}


def _short_list(items: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _differs_only_by_1x1(a: torch.Size, b: torch.Size) -> bool:
    """[r, in] vs [r, in, 1, 1]: SD2 proj_in/proj_out are Linear in diffusers models and 1x1 convs in
    single-file checkpoints (sd-scripts saves either shape); the weights are the same numbers."""
    return tuple(a) + (1, 1) == tuple(b) or tuple(b) + (1, 1) == tuple(a)


class LoRANetwork(nn.Module):
    """All LoRA modules of one model, named and saved as sd-scripts' `networks.lora` does.

    `text_encoders` is [te] for SD1.x/SD2.x and [te1, te2] for SDXL (`sdxl=True`, which also gives the
    UNet SGM-style names). `conv_rank` turns on LoCon: 3x3 convs get `conv_rank`/`conv_alpha`, Linear and
    1x1 layers always use `rank`/`alpha`. Parts that are not trained get no modules at all, so they are
    not saved. `module_dims` ({name: (rank, alpha)}, as read from a file) creates exactly those modules.
    `block_dims` (sd-scripts' block mode, trainer.config.blocks) gives the UNet's ranks per block instead of
    `rank`/`conv_rank`; a block of rank 0 gets no modules. The text encoders keep `rank`/`alpha`.
    """

    def __init__(self, text_encoders: Sequence[nn.Module], unet: nn.Module, *, sdxl: bool = False, rank: int = 4,
                 alpha: float | int | None = 1, conv_rank: int | None = None, conv_alpha: float | int | None = None,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, train_unet: bool = True, train_text_encoder: bool = True,
                 multiplier: float = 1.0, module_dims: Mapping[str, tuple | dict] | None = None,
                 block_dims: BlockDims | None = None, module_type: str = "lora",
                 module_options: Mapping[str, object] | None = None):
        super().__init__()
        if module_type not in NETWORK_MODULE_TYPES:
            raise ValueError(f"unknown network module type {module_type!r}; known: {', '.join(NETWORK_MODULE_TYPES)}")
        self.module_type = module_type
        self._module_class = NETWORK_MODULE_TYPES[module_type]
        self.sdxl = sdxl
        self.multiplier = multiplier
        self.train_unet = train_unet
        self.train_text_encoder = train_text_encoder
        self.block_lr_weights: list[float] | None = None
        self.loraplus_ratios: tuple[float | None, float | None, float | None] = (None, None, None)
        if conv_rank and conv_alpha is None:
            conv_alpha = 1.0  # sd-scripts' default once conv_dim is given

        def dims_for(target: LoraTarget):
            if module_dims is not None:
                return module_dims.get(target.name)
            if block_dims is not None and target.name.startswith(UNET_PREFIX):
                return block_dims.for_layer(self._block_of(target.name), target.kind == "conv3x3")
            if target.kind == "conv3x3":
                return (conv_rank, conv_alpha) if conv_rank else None
            return (rank, alpha)

        options = dict(dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout,
                       multiplier=multiplier, **(module_options or {}))
        self._te_names: list[str] = []
        self._unet_names: list[str] = []
        self._sdxl_aliases: dict[str, str] = {}
        if train_text_encoder:
            prefixes = text_encoder_prefixes(len(text_encoders), sdxl)
            for index, (text_encoder, prefix) in enumerate(zip(text_encoders, prefixes)):
                targets = find_lora_targets(text_encoder, prefix=prefix, is_text_encoder=True, include_conv=False)
                if module_dims is None:
                    _check_text_encoder_targets(targets, text_encoder, index)
                self._te_names += self._add_modules(targets, dims_for, options)
        if train_unet:
            include_conv = bool(conv_rank) or module_dims is not None
            if block_dims is not None:
                include_conv = block_dims.uses_conv
            targets = find_lora_targets(unet, prefix=UNET_PREFIX, is_text_encoder=False,
                                        include_conv=include_conv, sdxl=sdxl)
            if module_dims is None:
                _check_unet_targets(targets, unet, include_conv)
            self._unet_names = self._add_modules(targets, dims_for, options)
            if block_dims is not None and len(self._unet_names) < len(targets):
                logger.info("%d UNet LoRA modules not created: their block's rank or lr weight is 0.",
                            len(targets) - len(self._unet_names))
            if sdxl:
                self._sdxl_aliases = {kohya_name(UNET_PREFIX, t.path): t.name for t in targets
                                      if t.name in self._modules}
        if module_dims is not None:
            unknown = sorted(set(module_dims) - set(self._modules))
            if unknown:
                raise NetworkWeightsError(f"{len(unknown)} LoRA modules in the weights match no layer of this "
                                          f"model: {_short_list(unknown)}. Is the file for another base model "
                                          "(SD1.x / SD2.x / SDXL)?")
        if not self._modules:
            raise ValueError("this LoRA network has no modules: train_unet and train_text_encoder are both off, "
                             "or every block has rank / lr weight 0")

    def _block_of(self, name: str) -> int:
        index = block_index(name, self.sdxl)
        if index < 0:
            raise ValueError(f"{name} belongs to no UNet block of sd-scripts' numbering; block-wise options need "
                             "a diffusers UNet2DConditionModel")
        return index

    def _add_modules(self, targets: list[LoraTarget], dims_for, options: dict) -> list[str]:
        names = []
        for target in targets:
            dims = dims_for(target)
            if dims is None:
                continue
            # (rank, alpha) from the arguments or a LoRA file; a dict of keyword arguments from a LoHa/LoKr file
            shape = dict(dims) if isinstance(dims, Mapping) else {"rank": dims[0], "alpha": dims[1]}
            module = self._module_class(target.module, name=target.name, **{**options, **shape})
            self.add_module(target.name, module)
            names.append(target.name)
        return names

    @classmethod
    def from_weights(cls, text_encoders: Sequence[nn.Module], unet: nn.Module,
                     weights_sd: Mapping[str, torch.Tensor], *, sdxl: bool = False,
                     multiplier: float = 1.0, source: str = "LoRA weights") -> LoRANetwork:
        """A network with exactly the modules, ranks and alphas of a file's state dict, weights loaded."""
        if sdxl:
            weights_sd, _ = _rename_keys(weights_sd, sdxl_diffusers_name_aliases(unet))
        module_type = network_type_of(weights_sd)
        if module_type is None:
            raise NetworkWeightsError(f"{source} has no `.lora_down.weight`, `.hada_w1_b` or `.lokr_w1` keys; it is "
                                      "not a kohya-format LoRA / LoCon or a LyCORIS LoHa / LoKr file.")
        dims = {"lora": _file_module_dims, "loha": loha_shapes_from_file,
                "lokr": lokr_shapes_from_file}[module_type](weights_sd)
        network = cls(text_encoders, unet, sdxl=sdxl, multiplier=multiplier, module_dims=dims, module_type=module_type,
                      train_text_encoder=any(n.startswith("lora_te") for n in dims),
                      train_unet=any(n.startswith(UNET_PREFIX) for n in dims))
        network.load_weights_dict(weights_sd, source=source)
        return network

    # -- hooks ----------------------------------------------------------------------------------

    def lora_modules(self) -> list[NetworkModule]:
        return [m for m in self.children() if isinstance(m, (LoRAModule, WeightDeltaModule))]

    def module_names(self) -> list[str]:
        """The kohya names of all modules, text encoders first, in the order they are saved."""
        return list(self._te_names + self._unet_names)

    def apply_to(self, text_encoders=None, unet=None, apply_text_encoder: bool | None = None,
                 apply_unet: bool | None = None) -> None:
        """Attach every module's hook. The optional arguments follow sd-scripts' plugin call
        `apply_to(te, unet, train_te, train_unet)`: a part passed as False loses its modules."""
        if apply_text_encoder is False:
            self._drop(self._te_names)
            self._te_names, self.train_text_encoder = [], False
        if apply_unet is False:
            self._drop(self._unet_names)
            self._unet_names, self.train_unet = [], False
        for module in self.lora_modules():
            module.attach()

    def _drop(self, names: Iterable[str]) -> None:
        for name in names:
            self._modules[name].remove()
            del self._modules[name]

    def remove(self) -> None:
        """Detach every hook: the models compute exactly what they computed before `apply_to`."""
        for module in self.lora_modules():
            module.remove()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for module in self.lora_modules():
            module.multiplier = multiplier

    def merge_to_base(self, multiplier: float = 1.0) -> None:
        """Add every module's update into its base weight and detach the hooks (for inference/export)."""
        for module in self.lora_modules():
            if not all(torch.isfinite(w).all() for w in module.trainable_weights()):
                raise ValueError(f"LoRA {module.lora_name} holds NaN or infinite weights; nothing was merged")
        for module in self.lora_modules():
            module.merge_into_base(multiplier)

    # -- training -------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The network weights: lora_down/lora_up, hada_*, lokr_* (alpha is a buffer, never trained)."""
        return [p for m in self.lora_modules() for p in m.trainable_weights()]

    def set_block_lr_weight(self, weights: Sequence[float] | None) -> None:
        """One lr weight per UNet block (trainer.config.blocks.block_lr_weights); the UNet lr is multiplied by
        the weight of each module's block, one param group per block (sd-scripts' `set_block_lr_weight`)."""
        self.block_lr_weights = list(weights) if weights is not None else None

    def set_loraplus_lr_ratio(self, ratio: float | None, unet_ratio: float | None = None,
                              text_encoder_ratio: float | None = None) -> None:
        """LoRA+: lora_up weights train at lr x ratio, in their own group; a part's own ratio wins."""
        self.loraplus_ratios = (ratio, unet_ratio, text_encoder_ratio)

    def prepare_optimizer_params(self, text_encoder_lr: float | None, unet_lr: float | None,
                                 default_lr: float) -> tuple[list[dict], list[str]]:
        """Param groups as sd-scripts' networks/lora.py makes them: lr = the part's lr, or default_lr when it is None;
        a group whose lr comes out 0 or None is left out (so `--text_encoder_lr 0` freezes the TE LoRA).
        With block lr weights the UNet gets one group per block (`unet_block<i>`, lr x the block's weight);
        with LoRA+ each group's lora_up weights move to a `... plus` group at lr x ratio."""
        for parameter in self.trainable_parameters():
            parameter.requires_grad_(True)
        ratio, unet_ratio, te_ratio = self.loraplus_ratios
        parts = [("textencoder", self._te_names, default_lr if text_encoder_lr is None else text_encoder_lr,
                  te_ratio or ratio)]
        unet_lr = default_lr if unet_lr is None else unet_lr
        if self.block_lr_weights is None:
            parts.append(("unet", self._unet_names, unet_lr, unet_ratio or ratio))
        else:
            by_block: dict[int, list[str]] = {}
            for name in self._unet_names:
                by_block.setdefault(self._block_of(name), []).append(name)
            parts += [(f"unet_block{index}", names, unet_lr * self.block_lr_weights[index], unet_ratio or ratio)
                      for index, names in by_block.items()]
        groups, descriptions = [], []
        for description, names, lr, plus_ratio in parts:
            modules = [self._modules[n] for n in names]
            if plus_ratio:
                plus = [p for m in modules for p in m.plus_weights()]
                plus_ids = {id(p) for p in plus}
                split = [([p for m in modules for p in m.trainable_weights() if id(p) not in plus_ids], lr, description),
                         (plus, lr * plus_ratio, f"{description} plus")]
            else:
                split = [([p for m in modules for p in m.trainable_weights()], lr, description)]
            for params, group_lr, group_description in split:
                if params and group_lr:
                    groups.append({"params": params, "lr": group_lr})
                    descriptions.append(group_description)
        return groups, descriptions

    def apply_max_norm_regularization(self, max_norm: float, device=None) -> tuple[int, float, float]:
        """Scale down every module whose update norm exceeds `max_norm` (--scale_weight_norms, sd-scripts' max-norm).
        Returns (modules scaled, mean norm, max norm) after scaling. `device` is accepted for sd-scripts'
        call signature; the work happens where the weights are."""
        keys_scaled, mean_norm, top_norm = self.max_norm_regularization(max_norm).tolist()
        return int(keys_scaled), mean_norm, top_norm

    def max_norm_regularization(self, max_norm: float) -> torch.Tensor:
        """`apply_max_norm_regularization` without reading anything back: [modules scaled, mean norm, max norm]
        as one float32 tensor where the weights are, so that a training step need not wait for the GPU."""
        modules = self.lora_modules()
        if self.module_type != "lora":
            raise ValueError(f"--scale_weight_norms works on LoRA / LoCon only, not on {self.module_type}")
        with torch.no_grad():
            norms = torch.stack([m.delta_weight().norm() for m in modules])
            # The lower clamp only keeps a zero norm from dividing by zero; ratio is 1 unless norm > max.
            ratios = (max_norm / norms.clamp(min=max_norm / 2)).clamp(max=1.0)
            factors = ratios.sqrt()
            for module, factor in zip(modules, factors):
                module.lora_down.weight.mul_(factor.to(module.lora_down.weight.dtype))
                module.lora_up.weight.mul_(factor.to(module.lora_up.weight.dtype))
            scaled = norms * ratios
            return torch.stack([(ratios < 1).sum().float(), scaled.mean(), scaled.max()])

    # Hooks train_network.py calls on any --network_module, so a loop written for network modules works unchanged.
    def get_trainable_params(self) -> list[nn.Parameter]:
        return self.trainable_parameters()

    def prepare_grad_etc(self, text_encoder=None, unet=None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder=None, unet=None) -> None:
        self.train()

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the LoRA branch is recomputed with its base layer by the model's own checkpointing."""

    # -- files ----------------------------------------------------------------------------------

    def save_weights(self, path: str | Path, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, object] | None = None) -> None:
        """Write the LoRA file. .safetensors gets all-string metadata plus sshs_model_hash /
        sshs_legacy_hash (as sd-scripts adds them); .ckpt/.pt is a torch.save of the state dict, no metadata.
        `dtype` (--save_precision) casts every tensor, alpha included. The file appears complete or not at all."""
        path = Path(path)
        state = {key: value.detach().to(device="cpu", dtype=dtype or value.dtype).contiguous()
                 for key, value in self.state_dict().items()}
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            text_metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
            text_metadata["sshs_model_hash"], text_metadata["sshs_legacy_hash"] = sshs_hashes(state, text_metadata)
            with atomic_path(path) as temp:
                save_file(state, str(temp), metadata=text_metadata)
        else:
            with atomic_path(path) as temp:
                torch.save(state, temp)

    def load_weights(self, path: str | Path) -> dict:
        """Load a LoRA file of ours or sd-scripts' (int64 or float alpha, fp32/fp16/bf16) into these modules.
        Returns {"loaded": modules loaded, "missing": our modules the file lacks, "skipped": modules of a
        part this network does not train, "renamed": SDXL keys converted from diffusers-style names}."""
        return self.load_weights_dict(read_weights_file(path), source=str(path))

    def load_weights_dict(self, weights_sd: Mapping[str, torch.Tensor], source: str = "LoRA weights") -> dict:
        """`load_weights` for a state dict already in memory."""
        weights_sd, renamed = _rename_keys(weights_sd, self._sdxl_aliases)
        own = self.state_dict()
        unknown, skipped = [], set()
        for key in weights_sd:
            name, suffix = _split_key(key)
            if key in own:
                continue
            if suffix in self._module_class.PARAMETER_NAMES + ("alpha",) and self._is_untrained_part(name):
                skipped.add(name)
            else:
                unknown.append(key)
        if unknown:
            raise NetworkWeightsError(
                f"{source}: {len(unknown)} keys match no LoRA module of this network: {_short_list(sorted(unknown))}. "
                "The file may be for another base model (SD1.x / SD2.x / SDXL) or from another network type "
                "(e.g. LyCORIS); use it with the model and --network_module it was trained with.")
        to_load = self._matching_tensors(weights_sd, own, source)
        loaded = {_split_key(key)[0] for key in to_load}
        self.load_state_dict(to_load, strict=False)
        return {"loaded": len(loaded), "missing": [n for n in self.module_names() if n not in loaded],
                "skipped": sorted(skipped), "renamed": renamed}

    def _is_untrained_part(self, name: str) -> bool:
        if name.startswith(UNET_PREFIX):
            return not self.train_unet
        return name.startswith("lora_te") and not self.train_text_encoder

    def _matching_tensors(self, weights_sd, own, source: str) -> dict[str, torch.Tensor]:
        to_load, problems = {}, []
        for key, tensor in weights_sd.items():
            if key not in own:
                continue
            expected = own[key].shape
            if tensor.shape != expected:
                if not _differs_only_by_1x1(tensor.shape, expected):
                    problems.append(f"{key}: file {list(tensor.shape)}, this network {list(expected)}")
                    continue
                tensor = tensor.reshape(expected)
            to_load[key] = tensor
        names = {_split_key(key)[0] for key in to_load}
        for key in sorted(own):
            name, suffix = _split_key(key)
            if name in names and suffix != "alpha" and key not in to_load:
                problems.append(f"{key}: missing from the file while other keys of {name} are there")
        if problems:
            raise NetworkWeightsError(f"{source} does not fit this network (another network_dim or conv_dim?):\n"
                                      + "\n".join(f"- {p}" for p in problems[:12])
                                      + (f"\n- ... ({len(problems) - 12} more)" if len(problems) > 12 else ""))
        return to_load


def network_from_args(text_encoders: Sequence[nn.Module], unet: nn.Module, options: Mapping[str, str], *,
                      sdxl: bool = False, rank: int = 4, alpha: float | int | None = 1, dropout: float | None = None,
                      multiplier: float = 1.0, train_unet: bool = True, train_text_encoder: bool = True,
                      network_module: str = "networks.lora") -> LoRANetwork:
    """The network sd-scripts' `create_network` builds from --network_args strings (checked beforehand by
    trainer.config.args.parse_network_args): conv_dim/conv_alpha, rank/module dropout, block-wise ranks,
    block lr weights and LoRA+ ratios (the keys networks/lora.py reads). networks.loha / networks.lokr (and
    lycoris.kohya's algo=loha|lokr) build LoHa / LoKr modules on the same layers, with their own options."""
    module_type = network_module_type(network_module, options)
    if network_module == "lycoris.kohya":
        _note_lycoris_layers(options)
        if dropout is None:  # LyCORIS spells neuron dropout as a network arg
            dropout = blocks.float_option(options, "dropout")
    if module_type != "lora":
        return _delta_network_from_args(text_encoders, unet, options, module_type, sdxl=sdxl, rank=rank,
                                        alpha=alpha, dropout=dropout, multiplier=multiplier, train_unet=train_unet,
                                        train_text_encoder=train_text_encoder)
    conv_rank = int(options["conv_dim"]) if options.get("conv_dim") not in (None, "None") else None
    conv_alpha = blocks.float_option(options, "conv_alpha") if conv_rank else None
    lr_weights = blocks.block_lr_weights(options, sdxl)
    dims = blocks.block_dims(options, sdxl, rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha,
                             lr_weights=lr_weights)
    network = LoRANetwork(text_encoders, unet, sdxl=sdxl, rank=rank, alpha=alpha, conv_rank=conv_rank,
                          conv_alpha=conv_alpha, dropout=dropout,
                          rank_dropout=blocks.float_option(options, "rank_dropout"),
                          module_dropout=blocks.float_option(options, "module_dropout"), train_unet=train_unet,
                          train_text_encoder=train_text_encoder, multiplier=multiplier, block_dims=dims)
    network.set_block_lr_weight(lr_weights)
    network.set_loraplus_lr_ratio(*blocks.loraplus_ratios(options))
    return network


def _note_lycoris_layers(options: Mapping[str, str]) -> None:
    logger.warning(
        "lycoris.kohya algo=%s is trained as this trainer's native %s on the layers sd-scripts' networks.lora uses "
        "(CLIP attention/MLP, UNet transformer blocks; ResNets, down- and upsamplers with conv_dim), under the "
        "kohya key names A1111 and ComfyUI read. LyCORIS' preset=full would also train conv_in, conv_out and the "
        "time embedding; those layers are left out.", options.get("algo", "lora"),
        {"lora": "LoRA/LoCon", "loha": "LoHa", "lokr": "LoKr"}[network_module_type("lycoris.kohya", options)])


def _delta_network_from_args(text_encoders, unet, options: Mapping[str, str], module_type: str, *, sdxl: bool,
                             rank: int, alpha, dropout, multiplier: float, train_unet: bool,
                             train_text_encoder: bool) -> LoRANetwork:
    """LoHa / LoKr as sd-scripts' networks/loha.py and lokr.py create them: conv_dim/conv_alpha for kxk convs
    (alpha 1 when not given), use_tucker, factor (LoKr), rank and module dropout, LoRA+ ratios."""
    conv_rank = int(options["conv_dim"]) if options.get("conv_dim") not in (None, "None") else None
    conv_alpha = blocks.float_option(options, "conv_alpha") if conv_rank else None
    if conv_rank and conv_alpha is None:
        conv_alpha = 1.0  # sd-scripts' LoHa/LoKr default once conv_dim is given
    module_options: dict[str, object] = {"use_tucker": str(options.get("use_tucker", "false")).lower() == "true"}
    if module_type == "lokr":
        module_options["factor"] = int(options.get("factor", -1))
        module_options["decompose_both"] = str(options.get("decompose_both", "false")).lower() == "true"
    network = LoRANetwork(text_encoders, unet, sdxl=sdxl, rank=rank, alpha=alpha, conv_rank=conv_rank,
                          conv_alpha=conv_alpha, dropout=dropout,
                          rank_dropout=blocks.float_option(options, "rank_dropout"),
                          module_dropout=blocks.float_option(options, "module_dropout"), train_unet=train_unet,
                          train_text_encoder=train_text_encoder, multiplier=multiplier, module_type=module_type,
                          module_options=module_options)
    network.set_loraplus_lr_ratio(*blocks.loraplus_ratios(options))
    return network


def apply_lr_options(network: LoRANetwork, options: Mapping[str, str]) -> None:
    """Block lr weights and LoRA+ ratios from --network_args, for a network whose shape came from a file."""
    network.set_block_lr_weight(blocks.block_lr_weights(options, network.sdxl))
    network.set_loraplus_lr_ratio(*blocks.loraplus_ratios(options))


def _rename_keys(weights_sd: Mapping[str, torch.Tensor], aliases: Mapping[str, str]):
    """(state dict with aliased module names replaced, how many modules were renamed)."""
    if not aliases:
        return dict(weights_sd), 0
    renamed_names = set()
    result = {}
    for key, tensor in weights_sd.items():
        name, suffix = _split_key(key)
        if name in aliases:
            renamed_names.add(name)
            key = f"{aliases[name]}.{suffix}"
        result[key] = tensor
    return result, len(renamed_names)


def _check_unet_targets(targets: list[LoraTarget], unet: nn.Module, include_conv: bool) -> None:
    """No target at all, or an attention block giving another number of layers than diffusers' layout has
    (e.g. fused q/k/v projections), would train a LoRA that no other tool reads the same way: stop."""
    expected = expected_attention_targets(unet)
    if not targets or (len(targets) < expected if include_conv else len(targets) != expected):
        raise ModelLoadError(
            f"the UNet ({type(unet).__name__}) gave {len(targets)} LoRA layers, but its attention blocks "
            f"(diffusers Transformer2DModel) should give {expected}"
            + ("" if expected else ", so there is nothing to put a LoRA on")
            + ". The UNet must be an unmodified diffusers UNet2DConditionModel.")


def _check_text_encoder_targets(targets: list[LoraTarget], text_encoder: nn.Module, index: int) -> None:
    """Every CLIP layer must give 6 LoRA layers. sd-scripts once trained no text-encoder LoRA at all after a
    transformers rename (CLIPSdpaAttention, sd-scripts PR #1964); a count check turns that into an error."""
    layers = getattr(getattr(text_encoder, "config", None), "num_hidden_layers", None)
    expected = TE_LAYERS_PER_CLIP_BLOCK * layers if layers else None
    if not targets or (expected is not None and len(targets) != expected):
        raise ModelLoadError(
            f"text encoder {index + 1} ({type(text_encoder).__name__}) gave {len(targets)} LoRA layers, expected "
            f"{expected if expected is not None else 'some'} (6 per CLIP layer: q/k/v/out_proj, fc1, fc2). "
            "This transformers version may have renamed its CLIP classes; install the version in requirements.")
