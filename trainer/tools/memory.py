"""Peak GPU memory of a LoRA training run, estimated on any machine, before a model is downloaded.

How the number is made (each part is exact or measured, none is a rule of thumb):

- Parameters: the family's full-size UNet, text encoder(s) and VAE are built from the shipped configs inside
  torch's `FakeTensorMode` (tensors with shapes and dtypes but no storage: building SDXL costs no memory and
  well under a second), the LoRA network is attached exactly as training does, and every tensor's bytes are
  summed, rounded up to the CUDA caching allocator's 512-byte blocks. LoRA gradients are counted here too.
- Optimizer: states per trainable tensor from how each optimizer stores them (AdamW: two fp32 tensors;
  bitsandbytes 8-bit: one byte per state for tensors of 4096+ elements, fp32 below; Adafactor: factored rows
  and columns; ...), see `optimizer_state_bytes`.
- Activations: one real training micro-step (`trainer.train.loop.compute_loss` and `backward`, with the
  config's batch, resolution, gradient checkpointing and LoRA) runs on those fake tensors, and a
  `TorchDispatchMode` counts the bytes of every storage an operation creates until Python frees it (weak
  references to the storages, the same mechanism as torch.distributed._tools.MemTracker, without its
  per-module bookkeeping). The peak of that count is what the allocator's `max_memory_allocated` would add
  on top of the weights. Autograd, checkpoint recomputation and the order in which tensors die are the real
  ones, so the number follows the code rather than a formula fitted to one model.

Fake tensors live on the CPU, and CPU autocast casts differently from CUDA autocast (CUDA runs group_norm,
layer_norm, softmax and the losses in fp32). `CudaAutocastLike` replays CUDA's cast lists instead, so the
activation dtypes are the GPU's. Scaled-dot-product attention traces through its fused (flash) kernel, whose
saved tensors match CUDA's flash / memory-efficient kernels and xformers (O(tokens), no attention matrix).

Not counted, and covered by the `needs_card_gb` margin: the CUDA context (about 0.3-0.5 GB, outside torch's
counters), cuDNN/cuBLAS workspaces, and allocator fragmentation (reserved - allocated, assumed 10 %). Both
margins are assumptions until docs/benchmarks.md has GPU measurements to calibrate them. Data-dependent
reads (`if torch.isnan(x).any()`) see 0 / False on fake tensors, i.e. the ordinary path.
"""

from __future__ import annotations

import math
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch

from trainer.config.args import TrainConfig, network_module_type, parse_network_args
from trainer.models.families import FAMILY_OF, build_architecture, default_dtype
from trainer.models.load import models_from_parts
from trainer.models.text import CHUNK, sdxl_conditioning
from trainer.network.lora import LoRANetwork, network_from_args
from trainer.presets import CUDA_OVERHEAD_GB, DEFAULT_NETWORK_DIM, FRAGMENTATION
from trainer.train.build import enable_gradient_checkpointing
from trainer.train.resolve import weight_dtype_for
from trainer.train.step import DiffusionSettings, StepParts, compute_loss

GB = 2**30
ALLOCATOR_BLOCK = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes



@dataclass(frozen=True)
class MemoryEstimate:
    """Peak `torch.cuda.max_memory_allocated` of training, in GiB, split by what holds it."""

    parameters_gb: float  # frozen weights on the GPU + LoRA weights + LoRA gradients
    optimizer_gb: float  # optimizer states of the LoRA weights
    activations_gb: float  # saved activations and temporaries at the peak of forward + backward
    total_gb: float  # the sum: the expected peak allocated memory
    notes: tuple[str, ...] = ()
    caching_gb: float = 0.0  # peak while caching latents (all models and a VAE encode), when that is higher
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_card_gb(self) -> float:
        """VRAM a card should have: the peak plus fragmentation and the CUDA context."""
        return max(self.total_gb, self.caching_gb) * FRAGMENTATION + CUDA_OVERHEAD_GB


# ---------------------------------------------------------------------------------------------------------------
# Architectures


def parameter_counts(family_config: str) -> dict[str, int]:
    """Exact parameter counts of the full-size architecture (built on the meta device)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        parts = build_architecture(family_config, dtype=torch.float32, vae_dtype=torch.float32)
    counts = {"unet": _numel(parts["unet"]), "vae": _numel(parts["vae"])}
    for i, encoder in enumerate(parts["text_encoders"]):
        counts["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = _numel(encoder)
    return counts


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def allocated_bytes(tensors) -> int:
    """Bytes the CUDA allocator hands out for these tensors' storages (each storage once, 512-byte blocks)."""
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes()) if t.device.type != "meta" and not _is_fake(t) else id(t)
        if key not in seen:
            seen.add(key)
            total += _round_block(storage.nbytes())
    return total


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _round_block(nbytes: int) -> int:
    return -(-nbytes // ALLOCATOR_BLOCK) * ALLOCATOR_BLOCK if nbytes else 0


# ---------------------------------------------------------------------------------------------------------------
# Optimizer states


def optimizer_state_bytes(optimizer_type: str | None, shapes: list[torch.Size],
                          element_size: int = 4) -> tuple[int, str | None]:
    """Bytes of optimizer state for trainable tensors of these shapes (states in the weights' dtype,
    `element_size` bytes: 2 with --full_bf16), and a note when it is a guess."""
    name = (optimizer_type or "AdamW").lower().rsplit(".", 1)[-1]
    per_weight = {"adamw": 2, "adam": 2, "pagedadamw": 2, "pagedadamw32bit": 2, "adamw32bit": 2, "lion": 1,
                  "sgdnesterov": 1, "sgd": 1, "prodigy": 4, "dadaptadagrad": 2}  # prodigy: exp_avg(_sq), s, p0
    total, note = 0, None
    for shape in shapes:
        n = math.prod(shape)
        if name.endswith("8bit"):
            # bitsandbytes keeps tensors under 4096 elements in fp32; larger ones use 1 byte per state plus one
            # fp32 absmax per 256-element block.
            states = 1 if name.startswith(("lion", "sgd")) else 2
            total += states * (n * 4 if n < 4096 else n + math.ceil(n / 256) * 4)
        elif name == "adafactor":
            # factored second moment for 2-D+ tensors (rows + columns), full for 1-D; no first moment by default
            total += ((shape[0] + math.prod(shape[1:])) if len(shape) >= 2 else n) * element_size
        elif name in per_weight or name.startswith("dadapt"):
            total += per_weight.get(name, 3) * n * element_size  # D-Adaptation: exp_avg, exp_avg_sq, s
        else:
            total += 2 * n * element_size
            note = f"optimizer {optimizer_type}: states assumed to be AdamW's (two values per weight)"
    return total, note


# ---------------------------------------------------------------------------------------------------------------
# Counting live bytes


class LiveBytes:
    """Counts the bytes of every storage created while active, until Python frees it; keeps the peak.

    A `TorchDispatchMode` sees each operation's outputs after autograd has recorded what it saves, so the
    count follows real tensor lifetimes, including recomputation under gradient checkpointing. Storages that
    existed before (weights, inputs) are registered with `known` so views of them are not counted."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        from torch.utils.weak import WeakIdKeyDictionary

        tracker = self
        scalar_reads = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in scalar_reads and _is_fake(args[0]):
                    # A fake tensor has no value: data-dependent checks (`if torch.isnan(x).any()`) read 0 /
                    # False and take the ordinary path.
                    return args[0].dtype.is_floating_point and 0.0 or (False if args[0].dtype == torch.bool else 0)
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker._count(t)
                return out

        self._mode = _Mode()
        self._seen = WeakIdKeyDictionary()
        self.live = 0
        self.peak = 0

    def known(self, tensors) -> None:
        for t in tensors:
            self._seen.setdefault(t.untyped_storage(), None)

    def reset_peak(self) -> None:
        self.peak = self.live

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        size = _round_block(storage.nbytes())
        self._seen[storage] = weakref.ref(storage, partial(self._freed, size))
        self.live += size
        self.peak = max(self.peak, self.live)

    def _freed(self, size: int, _ref) -> None:
        self.live -= size

    def __enter__(self) -> "LiveBytes":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


class CudaAutocastLike:
    """CUDA autocast's casting rules, replayed as a TorchFunctionMode so a CPU (fake) trace gets the GPU's
    activation dtypes. Lists from torch's CUDA autocast op reference ("ops that can autocast to float16" /
    "to float32"); ops outside both run in their inputs' dtype, as under autocast."""

    def __init__(self, dtype: torch.dtype):
        import torch.nn.functional as F
        from torch.overrides import TorchFunctionMode

        low = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
               F.prelu, F.scaled_dot_product_attention, torch.matmul, torch.mm, torch.bmm, torch.baddbmm,
               torch.addmm, torch.addbmm, torch.mv, torch.addmv, torch.addr, torch.conv2d, torch.conv1d,
               torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.bmm, torch.Tensor.mm,
               torch.Tensor.baddbmm, torch.Tensor.addmm}
        wide = {F.group_norm, F.layer_norm, F.softmax, F.log_softmax, F.mse_loss, F.l1_loss, F.smooth_l1_loss,
                F.huber_loss, F.softplus, F.normalize, torch.softmax, torch.log_softmax, torch.group_norm,
                torch.layer_norm, torch.exp, torch.log, torch.pow, torch.sum, torch.prod, torch.cumsum,
                torch.rsqrt, torch.reciprocal, torch.norm, torch.Tensor.softmax, torch.Tensor.log_softmax,
                torch.Tensor.exp, torch.Tensor.log, torch.Tensor.pow, torch.Tensor.__pow__, torch.Tensor.sum,
                torch.Tensor.prod, torch.Tensor.cumsum, torch.Tensor.rsqrt, torch.Tensor.reciprocal,
                torch.Tensor.norm}

        def cast(value, source: tuple[torch.dtype, ...], target: torch.dtype):
            if isinstance(value, torch.Tensor) and value.dtype in source:
                return value.to(target)
            if isinstance(value, (list, tuple)):
                return type(value)(cast(v, source, target) for v in value)
            return value

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in low:
                    args, kwargs = cast(args, (torch.float32,), dtype), {k: cast(v, (torch.float32,), dtype)
                                                                         for k, v in kwargs.items()}
                elif func in wide:
                    half = (torch.float16, torch.bfloat16)
                    args, kwargs = cast(args, half, torch.float32), {k: cast(v, half, torch.float32)
                                                                     for k, v in kwargs.items()}
                return func(*args, **kwargs)

        self._mode = _Mode()
        self.dtype = dtype

    def __enter__(self):
        self._mode.__enter__()
        _EMULATING.append(self.dtype)
        return self

    def __exit__(self, *exc) -> None:
        _EMULATING.pop()
        self._mode.__exit__(*exc)


_EMULATING: list[torch.dtype] = []  # dtypes of the CudaAutocastLike contexts now active


def checkpoint_keeping_autocast(module, *args):
    """diffusers' gradient-checkpoint function, but the recomputation in backward runs under the same
    CudaAutocastLike as the forward did (torch.utils.checkpoint does this itself for real autocast)."""
    import torch.utils.checkpoint

    dtype = _EMULATING[-1] if _EMULATING else None

    def contexts():
        return nullcontext(), (CudaAutocastLike(dtype) if dtype is not None else nullcontext())

    # determinism_check off: with fp8 weights a convolution saves its parameter, whose dtype the layerwise
    # casting flips between forward and recomputation (the check then fails although the result is right).
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, context_fn=contexts,
                                             determinism_check="none")


# ---------------------------------------------------------------------------------------------------------------
# The estimate


def estimate_training_memory(family: str, *, resolution: int | tuple[int, int], batch_size: int = 1,
                             mixed_precision: str = "fp16", gradient_checkpointing: bool = False,
                             network_dim: int = 4, train_text_encoder: bool = True, cache_latents: bool = False,
                             cache_text_encoder_outputs: bool = False, optimizer_type: str | None = "AdamW",
                             attention: str = "sdpa", conv_dim: int | None = None, no_half_vae: bool = False,
                             vae_batch_size: int = 1, max_token_length: int | None = None,
                             v_parameterization: bool = False, fp8_base: bool = False, fp8_base_unet: bool = False,
                             full_bf16: bool = False, network_module: str = "networks.lora",
                             network_options: dict[str, str] | None = None) -> MemoryEstimate:
    """Expected peak allocated GPU memory of training a LoRA on `family` (a shipped config: sd15, sd2-512,
    sd2-768-v, sdxl, tiny-sd1) with these settings, without a GPU and without model weights. `network_module`
    networks.loha / networks.lokr (with their `network_options`) count that type's factors and the full-size
    deltas it builds in each step."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    dtype = weight_dtype_for(mixed_precision)
    vae_dtype = torch.float32 if no_half_vae else dtype
    notes: list[str] = []
    if cache_text_encoder_outputs and FAMILY_OF[family] != "sdxl":
        notes.append("cache_text_encoder_outputs applies to SDXL only: ignored")
        cache_text_encoder_outputs = False
    train_text_encoder = train_text_encoder and not cache_text_encoder_outputs  # cached encoders cannot learn
    if attention not in ("sdpa", "xformers", "mem_eff_attn"):
        notes.append(f"attention {attention}: estimated as SDPA (flash / memory-efficient kernel)")
    with FakeTensorMode(allow_non_fake_inputs=True):
        parts, network = training_models(family, dtype=dtype, vae_dtype=vae_dtype, rank=network_dim,
                                         conv_rank=conv_dim, train_text_encoder=train_text_encoder,
                                         gradient_checkpointing=gradient_checkpointing,
                                         fp8_unet=fp8_base or fp8_base_unet,
                                         fp8_text_encoders=fp8_base and not fp8_base_unet,
                                         lora_dtype=torch.bfloat16 if full_bf16 else torch.float32,
                                         network_module=network_module, network_options=network_options)
        trainable = [p for p in network.parameters() if p.requires_grad]
        resident = [parts["unet"]] + ([] if cache_text_encoder_outputs else parts["text_encoders"])
        resident += [] if cache_latents else [parts["vae"]]
        sizes = dict(frozen_bytes=allocated_bytes(t for m in resident for t in (*m.parameters(), *m.buffers())),
                     lora_bytes=allocated_bytes([*network.parameters(), *network.buffers()]),
                     grad_bytes=allocated_bytes(trainable))
        sizes["optimizer_bytes"], note = optimizer_state_bytes(optimizer_type, [p.shape for p in trainable],
                                                               element_size=2 if full_bf16 else 4)
        sizes["step_peak_bytes"] = step_peak_bytes(
            parts, network, family, batch=batch_size, size=size, dtype=dtype, cache_latents=cache_latents,
            cache_text_encoder_outputs=cache_text_encoder_outputs, train_text_encoder=train_text_encoder,
            max_token_length=max_token_length, v_parameterization=v_parameterization)
        sizes["caching_bytes"] = caching_peak_bytes(parts, vae_batch_size, size, vae_dtype) if cache_latents else 0
    notes += [note] if note else []
    if (fp8_base or fp8_base_unet) and not gradient_checkpointing:
        notes.append("fp8 weights without gradient_checkpointing: autograd keeps every Linear layer's 16-bit "
                     "weight copy until backward, which takes back much of the saving; turn it on")
    details = dict(sizes, trainable_parameters=sum(p.numel() for p in trainable), family=family,
                   resolution=list(size), batch_size=batch_size, mixed_precision=mixed_precision,
                   gradient_checkpointing=gradient_checkpointing)
    return _assemble(details, notes)


def _assemble(d: dict, notes: list[str]) -> MemoryEstimate:
    grads = d["grad_bytes"]
    # AdamW's foreach step on CUDA makes about two fp32 temporaries per state; activations are gone by then.
    activations = max(d["step_peak_bytes"], 3 * grads) - grads
    total = d["frozen_bytes"] + d["lora_bytes"] + grads + d["optimizer_bytes"] + activations
    notes.append("not included: the CUDA context (~0.3-0.5 GB), cuDNN/cuBLAS workspaces and allocator "
                 "fragmentation; needs_card_gb adds a margin for them")
    if d["caching_bytes"] > total:
        notes.append(f"latent caching is the peak ({d['caching_bytes'] / GB:.2f} GB): every model is on the GPU "
                     f"while the VAE encodes; keep vae_batch_size at 1")
    return MemoryEstimate(
        parameters_gb=(d["frozen_bytes"] + d["lora_bytes"] + grads) / GB, optimizer_gb=d["optimizer_bytes"] / GB,
        activations_gb=activations / GB, total_gb=total / GB, notes=tuple(notes),
        caching_gb=d["caching_bytes"] / GB, details=d)


def training_models(family: str, *, dtype: torch.dtype, vae_dtype: torch.dtype, rank: int,
                    conv_rank: int | None, train_text_encoder: bool, gradient_checkpointing: bool,
                    fp8_unet: bool = False, fp8_text_encoders: bool = False,
                    lora_dtype: torch.dtype = torch.float32, network_module: str = "networks.lora",
                    network_options: dict[str, str] | None = None):
    """(parts, network): the frozen models and the attached LoRA, prepared as trainer.train.build does
    (freeze_models, build_network, enable_gradient_checkpointing). Real tensors, or fake under FakeTensorMode."""
    parts = build_architecture(family, dtype=dtype, vae_dtype=vae_dtype)
    for module in (parts["unet"], parts["vae"], *parts["text_encoders"]):
        module.requires_grad_(False)
    for module in ([parts["unet"]] if fp8_unet else []) + (parts["text_encoders"] if fp8_text_encoders else []):
        store_in_fp8(module, dtype)
    with default_dtype(lora_dtype):  # --full_bf16: LoRA weights (and so their optimizer states) in bf16
        network = attach_lora(parts, family, rank, conv_rank, train_text_encoder, network_module, network_options)
    if gradient_checkpointing:
        enable_gradient_checkpointing(SimpleNamespace(**parts), train_text_encoder)
        parts["unet"].enable_gradient_checkpointing(checkpoint_keeping_autocast)
    return parts, network


FP8_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
              torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d, torch.nn.Embedding)


def store_in_fp8(module: torch.nn.Module, compute_dtype: torch.dtype, prefix: str = "") -> None:
    """diffusers' layerwise casting, which freeze_models applies for --fp8_base, rebuilt so fake tensors allow
    it: the same layers (diffusers' DEFAULT_SKIP_MODULES_PATTERN skipped) keep float8_e4m3fn weights and are
    switched to `compute_dtype` for the length of their forward, through `param.data` as diffusers' `.to()`
    does. Autograd then behaves as with diffusers: a Linear keeps its 16-bit weight (the transposed view it
    saves) until backward, a convolution saves the parameter itself, which is fp8 again by then."""
    import re

    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    if any(re.search(pattern, prefix) for pattern in DEFAULT_SKIP_MODULES_PATTERN):
        return
    if not isinstance(module, FP8_LAYERS):
        for name, child in module.named_children():
            store_in_fp8(child, compute_dtype, f"{prefix}.{name}" if prefix else name)
        return
    params = [p for p in module.parameters(recurse=False)]
    stored = [p.data.to(torch.float8_e4m3fn) for p in params]
    for p, data in zip(params, stored):
        p.data = data

    def upcast(layer, args):
        for p, data in zip(params, stored):
            p.data = data.to(compute_dtype)

    def restore(layer, args, output):  # diffusers makes a new fp8 copy here; the same bytes
        for p, data in zip(params, stored):
            p.data = data

    module.register_forward_pre_hook(upcast)
    module.register_forward_hook(restore)


def attach_lora(parts: dict, family: str, rank: int, conv_rank: int | None, train_text_encoder: bool,
                network_module: str = "networks.lora", network_options: dict[str, str] | None = None):
    sdxl = FAMILY_OF[family] == "sdxl"
    if network_module_type(network_module, network_options or {}) != "lora":
        options = dict(network_options or {}, **({"conv_dim": str(conv_rank)} if conv_rank else {}))
        network = network_from_args(parts["text_encoders"], parts["unet"], options, sdxl=sdxl, rank=rank, alpha=rank,
                                    train_text_encoder=train_text_encoder, network_module=network_module)
    else:
        network = LoRANetwork(parts["text_encoders"], parts["unet"], sdxl=sdxl, rank=rank, alpha=rank,
                              conv_rank=conv_rank, conv_alpha=1.0 if conv_rank else None,
                              train_text_encoder=train_text_encoder)
    network.apply_to()
    network.train()
    return network


def step_peak_bytes(parts: dict, network, family: str, *, batch: int, size: tuple[int, int], dtype: torch.dtype,
                    cache_latents: bool = True, cache_text_encoder_outputs: bool = False,
                    train_text_encoder: bool = True, max_token_length: int | None = None,
                    v_parameterization: bool = False) -> int:
    """Peak bytes above the weights of one trainer.train.step.compute_loss + backward, on fake or real tensors
    (fp16/bf16 `dtype`: under CudaAutocastLike, as accelerate's autocast would run it on a GPU)."""
    models = models_from_parts(parts, family, v_parameterization=v_parameterization)
    settings = DiffusionSettings.from_config(TrainConfig(max_token_length=max_token_length),
                                             v_parameterization=models.v_parameterization,
                                             latent_scale=models.latent_scale)
    step = StepParts(models=models, settings=settings, device=torch.device("cpu"),
                     autocast=(lambda: CudaAutocastLike(dtype)) if dtype != torch.float32 else nullcontext,
                     weight_dtype=dtype, train_text_encoder=train_text_encoder,
                     text_cache=_CachedText(parts["text_encoders"], dtype) if cache_text_encoder_outputs else None)
    width, height = size
    sizes = torch.tensor([[height, width]] * batch)
    batch_data = {"captions": ["a photo of a cat"] * batch, "loss_weights": torch.ones(batch),
                  "latents": torch.randn(batch, 4, height // 8, width // 8) if cache_latents else None,
                  "images": None if cache_latents else torch.randn(batch, 3, height, width),
                  "original_sizes_hw": sizes, "crop_top_lefts": torch.zeros_like(sizes), "target_sizes_hw": sizes}
    tracker = LiveBytes()
    tracker.known(t for m in (network, parts["unet"], parts["vae"], *parts["text_encoders"])
                  for t in (*m.parameters(), *m.buffers()))
    tracker.known(v for v in batch_data.values() if isinstance(v, torch.Tensor))
    with tracker:
        loss = compute_loss(step, batch_data)
        loss.backward()
        del loss
    return tracker.peak


class _CachedText:
    """Stands in for trainer.train.text_cache's cache: SDXL conditioning read from memory, shapes only."""

    def __init__(self, text_encoders: list, dtype: torch.dtype):
        self.widths = [encoder.config.hidden_size for encoder in text_encoders]
        self.pooled = getattr(text_encoders[-1].config, "projection_dim", self.widths[-1])
        self.dtype = dtype

    def conditioning(self, batch: dict, device):
        n = len(batch["captions"])
        hidden1, hidden2 = (torch.zeros(n, CHUNK, width, dtype=self.dtype) for width in self.widths[:2])
        return sdxl_conditioning(hidden1, hidden2, torch.zeros(n, self.pooled, dtype=self.dtype), batch)


def caching_peak_bytes(parts: dict, batch: int, size: tuple[int, int], dtype: torch.dtype) -> int:
    """Peak while latents are cached: trainer.train.build.prepare_training puts only the VAE on the GPU for
    caching (the UNet and text encoders follow afterwards), plus one no-grad VAE encode of `batch`."""
    weights = allocated_bytes(t for t in (*parts["vae"].parameters(), *parts["vae"].buffers()))
    tracker = LiveBytes()
    tracker.known(t for t in (*parts["vae"].parameters(), *parts["vae"].buffers()))
    width, height = size
    with tracker, torch.no_grad():
        images = torch.randn(batch, 3, height, width, dtype=dtype)
        parts["vae"].encode(images).latent_dist.sample().float()
    return weights + tracker.peak


def estimate_for_config(cfg, family: str, *, resolution: tuple[int, int] | None = None,
                        batch_size: int | None = None) -> MemoryEstimate:
    """The estimate for a TrainConfig's settings (the largest bucket side when bucketing is on)."""
    # Buckets keep the area of --resolution (fewer pixels, never more), so it sets the peak.
    width, height = resolution or cfg.resolution or (512, 512)
    attention = "xformers" if cfg.xformers else "sdpa"
    return estimate_training_memory(
        family, resolution=(width, height), batch_size=batch_size or cfg.train_batch_size,
        mixed_precision=cfg.mixed_precision, gradient_checkpointing=cfg.gradient_checkpointing,
        network_dim=cfg.network_dim or DEFAULT_NETWORK_DIM, train_text_encoder=cfg.train_text_encoder,
        cache_latents=cfg.cache_latents, cache_text_encoder_outputs=cfg.cache_text_encoder_outputs,
        optimizer_type=cfg.optimizer_type, attention=attention, conv_dim=_conv_dim(cfg),
        no_half_vae=cfg.no_half_vae, vae_batch_size=cfg.vae_batch_size or 1,
        max_token_length=cfg.max_token_length, v_parameterization=cfg.v_parameterization,
        fp8_base=getattr(cfg, "fp8_base", False), fp8_base_unet=getattr(cfg, "fp8_base_unet", False),
        full_bf16=getattr(cfg, "full_bf16", False), network_module=cfg.network_module or "networks.lora",
        network_options=parse_network_args(cfg.network_args, network_module=cfg.network_module))


def _conv_dim(cfg) -> int | None:
    options = parse_network_args(cfg.network_args, network_module=cfg.network_module)
    return int(options["conv_dim"]) if "conv_dim" in options else None
