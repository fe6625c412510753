"""What a trained LoRA file says about its training: sd-scripts' `ss_*` keys (from train_network.py) plus modelspec.

All values are strings, as sd-scripts writes them (`str(value)`; structured values as JSON)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from trainer import __version__
from trainer.config.args import TrainConfig, parse_network_args
from trainer.network.metadata import a1111_model_hashes, base_model_version, modelspec_metadata

IMPLEMENTATION_VERSION = f"trainer/{__version__}"


def training_metadata(cfg: TrainConfig, *, family: str, plan, dataset, optimizer_name: str, model_name: str,
                      model_file: Path | None, seed: int, mixed_precision: str, started_at: float,
                      used_dataset_config: bool) -> dict[str, str]:
    """The metadata written into every LoRA file of a run; `with_progress` adds the step/epoch at save time."""
    meta: dict[str, Any] = {
        "ss_session_id": random.randint(0, 2**32),
        "ss_training_started_at": started_at,
        "ss_output_name": cfg.output_name,
        "ss_learning_rate": cfg.learning_rate,
        "ss_text_encoder_lr": cfg.text_encoder_lr_value,
        "ss_unet_lr": cfg.unet_lr,
        "ss_num_train_images": dataset.num_train_images,
        "ss_num_validation_images": dataset.num_validation_images,
        "ss_num_reg_images": dataset.num_reg_images,
        "ss_num_batches_per_epoch": plan.num_batches_per_epoch,
        "ss_num_epochs": plan.num_epochs,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_max_train_steps": plan.max_train_steps,
        "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_network_module": cfg.network_module,
        "ss_network_dim": cfg.network_dim,  # sd-scripts records None when the default rank 4 was used
        "ss_network_alpha": cfg.network_alpha,
        "ss_network_dropout": cfg.network_dropout,
        "ss_mixed_precision": mixed_precision,
        "ss_full_fp16": cfg.full_fp16,
        "ss_v2": cfg.v2 or family == "sd2",
        "ss_base_model_version": base_model_version(family, cfg.v_parameterization),
        "ss_clip_skip": cfg.clip_skip,
        "ss_max_token_length": cfg.max_token_length,
        "ss_cache_latents": cfg.cache_latents,
        "ss_seed": seed,
        "ss_lowram": cfg.lowram,
        "ss_noise_offset": cfg.noise_offset,
        "ss_multires_noise_iterations": cfg.multires_noise_iterations,
        "ss_multires_noise_discount": cfg.multires_noise_discount,
        "ss_adaptive_noise_scale": cfg.adaptive_noise_scale,
        "ss_zero_terminal_snr": cfg.zero_terminal_snr,
        "ss_training_comment": cfg.training_comment,
        "ss_sd_scripts_commit_hash": IMPLEMENTATION_VERSION,
        "ss_optimizer": optimizer_name,
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_caption_dropout_rate": cfg.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": cfg.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": cfg.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": cfg.face_crop_aug_range,
        "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_min_snr_gamma": cfg.min_snr_gamma,
        "ss_scale_weight_norms": cfg.scale_weight_norms,
        "ss_ip_noise_gamma": cfg.ip_noise_gamma,
        "ss_debiased_estimation": cfg.debiased_estimation_loss,
        "ss_noise_offset_random_strength": cfg.noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": cfg.ip_noise_gamma_random_strength,
        "ss_loss_type": cfg.loss_type,
        "ss_huber_schedule": cfg.huber_schedule,
        "ss_huber_scale": cfg.huber_scale,
        "ss_huber_c": cfg.huber_c,
        "ss_fp8_base": cfg.fp8_base,
        "ss_fp8_base_unet": cfg.fp8_base_unet,
        "ss_validation_seed": cfg.validation_seed,
        "ss_validation_split": cfg.validation_split,
        "ss_max_validation_steps": cfg.max_validation_steps,
        "ss_validate_every_n_epochs": cfg.validate_every_n_epochs,
        "ss_validate_every_n_steps": cfg.validate_every_n_steps,
        "ss_resize_interpolation": cfg.resize_interpolation,
    }
    meta.update(_dataset_metadata(cfg, dataset, used_dataset_config))
    if cfg.network_args:
        network_args = parse_network_args(cfg.network_args, network_module=cfg.network_module)
        network_args.setdefault("dropout", cfg.network_dropout)
        meta["ss_network_args"] = json.dumps(network_args)
    meta.update(_model_identity(model_name, model_file, "sd_model"))
    if cfg.vae:
        meta.update(_model_identity(cfg.vae, Path(cfg.vae) if Path(cfg.vae).is_file() else None, "vae"))
    if cfg.no_metadata:
        keep = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")
        meta = {k: v for k, v in meta.items() if k in keep}
    meta.update(modelspec_metadata(
        family=family, v_parameterization=cfg.v_parameterization,
        title=cfg.metadata_title or cfg.output_name or f"LoRA@{time.strftime('%Y%m%d%H%M%S')}",
        resolution=cfg.resolution, timestamp=started_at, clip_skip=cfg.clip_skip,
        min_timestep=cfg.min_timestep, max_timestep=cfg.max_timestep, description=cfg.metadata_description,
        author=cfg.metadata_author, license=cfg.metadata_license, tags=cfg.metadata_tags,
        usage_hint=cfg.metadata_usage_hint, thumbnail=cfg.metadata_thumbnail,
        merged_from=cfg.metadata_merged_from, trigger_phrase=cfg.metadata_trigger_phrase,
        preprocessor=cfg.metadata_preprocessor, is_negative_embedding=cfg.metadata_is_negative_embedding,
        implementation_version=IMPLEMENTATION_VERSION))
    return {k: v if isinstance(v, str) else str(v) for k, v in meta.items()}


def with_progress(meta: dict[str, str], step: int, epoch: int, *, minimal: bool = False) -> dict[str, str]:
    """Add what is known only at save time."""
    if minimal:
        return dict(meta)
    return {**meta, "ss_training_finished_at": str(time.time()), "ss_steps": str(step), "ss_epoch": str(epoch)}


def _dataset_metadata(cfg: TrainConfig, dataset, used_dataset_config: bool) -> dict[str, Any]:
    if used_dataset_config:
        return {"ss_datasets": json.dumps(dataset.datasets_metadata()),
                "ss_tag_frequency": json.dumps(dataset.tag_frequency()),
                "ss_dataset_dirs": json.dumps(dataset.dataset_dirs_info())}
    bucket_info = dataset.bucket_info()
    return {
        "ss_batch_size_per_device": cfg.train_batch_size,
        "ss_total_batch_size": cfg.train_batch_size * cfg.gradient_accumulation_steps,
        "ss_resolution": cfg.resolution,
        "ss_color_aug": cfg.color_aug,
        "ss_flip_aug": cfg.flip_aug,
        "ss_random_crop": cfg.random_crop,
        "ss_shuffle_caption": cfg.shuffle_caption,
        "ss_enable_bucket": cfg.enable_bucket,
        "ss_bucket_no_upscale": cfg.bucket_no_upscale,
        "ss_min_bucket_reso": cfg.min_bucket_reso,
        "ss_max_bucket_reso": cfg.max_bucket_reso,
        "ss_keep_tokens": cfg.keep_tokens,
        "ss_dataset_dirs": json.dumps(dataset.dataset_dirs_info()),
        "ss_reg_dataset_dirs": json.dumps(dataset.reg_dataset_dirs_info()),
        "ss_tag_frequency": json.dumps(dataset.tag_frequency()),
        "ss_bucket_info": json.dumps(bucket_info),
    }


def _model_identity(name: str, file: Path | None, what: str) -> dict[str, str]:
    """`ss_sd_model_name` (+ old and new hashes when the model is a local file), likewise for the VAE."""
    meta = {f"ss_{what}_name": Path(name).name if file else name}
    if file is not None and file.is_file():
        old, new = a1111_model_hashes(file)
        meta[f"ss_{what}_hash"] = old
        meta[f"ss_new_{what}_hash"] = new
    return meta
