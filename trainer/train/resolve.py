"""`resolve(cfg) -> RunSpec`: every decision that needs neither the dataset nor the model, made once.

What is decided here: the model family as the weights say (train_network.py vs sdxl_train_network.py),
v-prediction where the checkpoint is marked as such, the seed, where and in what precision the run computes (fp16 falls back to fp32 on a CPU, and --full_fp16 with
it), the torch.compile backend, the optimizer class, and the LoRA's shape (rank and alpha defaults, --network_args with the block
counts of the family). A mistake in any of them stops the run here, before a picture or a model is read.

The builders in trainer.train.build each take their own frozen part of the spec (`Precision`,
`NetworkSettings`); the config itself is resolved once here and never rebound afterwards."""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config.args import FP8_NEEDS_MIXED_PRECISION, TrainConfig, parse_network_args
from trainer.errors import ConfigError
from trainer.models.checkpoint import prediction_markers, read_checkpoint_shapes
from trainer.models.compile import check_backend
from trainer.models.load import detect_model_family
from trainer.presets import DEFAULT_NETWORK_DIM
from trainer.train.optim import resolve_optimizer_class
from trainer.train.precision import resolve_full_fp16

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    """Where and in what precision the run computes."""
    device_type: str           # "cuda" | "cpu"
    mixed_precision: str       # "no" | "fp16" | "bf16": --mixed_precision after the CPU fallback
    weight_dtype: torch.dtype  # the frozen base weights' dtype
    full_fp16: bool            # LoRA weights, gradients and optimizer state in fp16 (after the fallback)
    full_bf16: bool            # ... in bf16
    fp8_unet: bool             # the frozen UNet stored as float8 (--fp8_base / --fp8_base_unet)
    fp8_text_encoders: bool    # the frozen text encoders too (--fp8_base without --fp8_base_unet)
    no_half_vae: bool          # the VAE stays fp32

    @property
    def vae_dtype(self) -> torch.dtype:
        return torch.float32 if self.no_half_vae else self.weight_dtype


@dataclass(frozen=True)
class NetworkSettings:
    """The LoRA to build: sd-scripts' --network_dim / --network_alpha / --network_dropout / --network_args."""
    sdxl: bool
    rank: int
    alpha: float | int | None
    dropout: float | None
    options: dict  # parsed --network_args (conv_dim, block_dims, loraplus_lr_ratio, ...), checked for the family
    train_unet: bool
    train_text_encoder: bool
    weights: str | None      # --network_weights: start from this LoRA file
    dim_from_weights: bool   # ... and take the network's shape from it
    module: str = "networks.lora"  # --network_module: networks.lora, networks.loha, networks.lokr, lycoris.kohya


@dataclass(frozen=True)
class RunSpec:
    """The resolved config and the decisions made from it; `build` turns it into a TrainingSetup."""
    cfg: TrainConfig  # with the decisions written in (--sdxl as the weights say, --full_fp16 after the fallback)
    seed: int
    precision: Precision
    network: NetworkSettings
    compile_backend: str | None  # --torch_compile: the checked --dynamo_backend; None when not compiling


def resolve(cfg: TrainConfig) -> RunSpec:
    cfg = resolve_prediction_type(resolve_model_family(cfg))
    resolve_optimizer_class(cfg.optimizer_type)  # a misspelt name or a missing package stops the run here
    precision = resolve_precision(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    cfg = dataclasses.replace(cfg, full_fp16=precision.full_fp16)
    return RunSpec(cfg=cfg, seed=resolve_seed(cfg.seed), precision=precision, network=network_settings(cfg),
                   compile_backend=check_backend(cfg.dynamo_backend) if cfg.torch_compile else None)


def resolve_seed(seed: int | None) -> int:
    return seed if seed is not None else random.randint(0, 2**32 - 1)


def resolve_model_family(cfg: TrainConfig) -> TrainConfig:
    """train_network.py vs sdxl_train_network.py (--sdxl): the weights decide, a disagreeing script or flag
    gets a warning. Only where telling the family is cheap (a local folder or .safetensors header; builtin):
    a pickled .ckpt would be read twice and a hub id downloaded before the dataset is checked, so for those
    load_models checks the flag against the weights and names the right script."""
    spec = str(cfg.pretrained_model_name_or_path or "").strip().strip("\"'")
    path = Path(spec).expanduser()
    if path.is_dir() or spec.startswith("builtin:") or (path.is_file() and path.suffix.lower() == ".safetensors"):
        family = detect_model_family(spec)
        if (family == "sdxl") != cfg.sdxl:
            if family == "sdxl":
                log.warning("%s is an SDXL model: training an SDXL LoRA, as sdxl_train_network.py would "
                            "(use sdxl_train_network.py or --sdxl to say so).", spec)
            else:
                log.warning("%s is an %s model, not SDXL: training it as train_network.py would (drop --sdxl / "
                            "use train_network.py to say so).", spec, family.upper())
            cfg = dataclasses.replace(cfg, sdxl=family == "sdxl")
    if cfg.cache_text_encoder_outputs and not cfg.sdxl:
        raise ConfigError(f"--cache_text_encoder_outputs(_to_disk) works for SDXL models only (as in sd-scripts), "
                          f"and {spec} is not trained as one. Remove the option (for an SDXL .ckpt, use "
                          "sdxl_train_network.py or --sdxl).")
    return cfg


def resolve_prediction_type(cfg: TrainConfig) -> TrainConfig:
    """A single-file checkpoint marked as v-prediction (its "v_pred" key, and "ztsnr" for zero terminal SNR,
    as ComfyUI reads them: NoobAI v-pred and other SDXL fine-tunes) trains as one, with one line saying so.
    sd-scripts has no flag that says "not v-prediction", so a marker can only add what the flags leave out."""
    path = Path(str(cfg.pretrained_model_name_or_path or "").strip().strip("\"'")).expanduser()
    if not (path.is_file() and path.suffix.lower() == ".safetensors"):
        return cfg  # a .ckpt would be read twice; diffusers folders say it in their scheduler config
    markers = prediction_markers(read_checkpoint_shapes(path))
    if any(m.startswith("edm_vpred") for m in markers):
        raise ConfigError(f"{path} is an EDM v-prediction model (its edm_vpred keys), which sd-scripts' LoRA "
                          "training does not support; use the model's ordinary v-prediction or eps version.")
    if "v_pred" not in markers:
        return cfg
    turned_on = {"v_parameterization": True, "zero_terminal_snr": "ztsnr" in markers}
    turned_on = {name: True for name, wanted in turned_on.items() if wanted and not getattr(cfg, name)}
    if turned_on:
        log.info("%s is marked as a v-prediction model%s: training with %s.", path.name,
                 " with zero terminal SNR" if "ztsnr" in markers else "",
                 " and ".join(f"--{name}" for name in turned_on))
    return dataclasses.replace(cfg, **turned_on)


def resolve_precision(cfg: TrainConfig, device_type: str) -> Precision:
    mixed_precision = select_mixed_precision(cfg.mixed_precision, device_type)
    weight_dtype = weight_dtype_for(mixed_precision)
    if (cfg.fp8_base or cfg.fp8_base_unet) and weight_dtype == torch.float32:  # fp16 fell back to fp32 on a CPU
        raise ConfigError(FP8_NEEDS_MIXED_PRECISION + " (fp16 needs a CUDA GPU; on a CPU use bf16).")
    return Precision(device_type=device_type, mixed_precision=mixed_precision, weight_dtype=weight_dtype,
                     full_fp16=bool(cfg.full_fp16) and resolve_full_fp16(cfg.full_fp16, mixed_precision),
                     full_bf16=bool(cfg.full_bf16), fp8_unet=bool(cfg.fp8_base or cfg.fp8_base_unet),
                     fp8_text_encoders=bool(cfg.fp8_base and not cfg.fp8_base_unet), no_half_vae=cfg.no_half_vae)


def select_mixed_precision(requested: str, device_type: str) -> str:
    """fp16 autocast needs a GPU; on CPU fall back to fp32 with a warning rather than failing."""
    if requested == "fp16" and device_type == "cpu":
        log.warning("--mixed_precision fp16 needs a CUDA GPU; training in fp32 on the CPU instead.")
        return "no"
    return requested


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def network_settings(cfg: TrainConfig) -> NetworkSettings:
    return NetworkSettings(
        sdxl=cfg.sdxl, rank=cfg.network_dim or DEFAULT_NETWORK_DIM, alpha=cfg.network_alpha,
        dropout=cfg.network_dropout, options=parse_network_args(cfg.network_args, sdxl=cfg.sdxl,
                                                               network_module=cfg.network_module),
        train_unet=cfg.train_unet, train_text_encoder=cfg.train_text_encoder, weights=cfg.network_weights,
        dim_from_weights=cfg.dim_from_weights, module=cfg.network_module or "networks.lora")
