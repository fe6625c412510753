"""`build(spec, reporter) -> TrainingSetup`: the finished parts the loop takes, from a RunSpec
(trainer.train.resolve: every decision that needs neither data nor model is already made there).

Each `build_*` / phase function takes only its part of the spec. `build` runs them in an order that matters
(device moves, caching before the LoRA exists, draws from the random generators):
  check_inputs        seed, output folder, dataset (bad images fail before any model loads), prompts
  start_accelerator   the Accelerator for the resolved precision
  plan_steps          run plan and start point (--resume), still before any model loads
  load_frozen_models  base model, --base_weights, attention, frozen weights on the device
  fill_caches         latents, SDXL text-encoder outputs
  attach_network      the LoRA, its dtype, gradient checkpointing, torch.compile
  build_optimization  dataloader, optimizer and scheduler, prepared by accelerate
  then the metadata, the saver, the --resume state, the sampler and the validator.
Phases announce themselves (trainer.train.phases), so an out-of-memory error knows where it happened."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, set_seed

from trainer import interrupts
from trainer.config.args import TrainConfig
from trainer.data.config import load_dataset_config, resolve_datasets, verify_bucket_reso_steps
from trainer.data.custom import load_dataset_class
from trainer.data.dataset import build_train_dataset, make_dataloader
from trainer.errors import ConfigError
from trainer.models.attention import select_attention
from trainer.models.compile import compile_unet
from trainer.models.export import merge_lora_into
from trainer.models.load import load_models
from trainer.network.lora import LoRANetwork, apply_lr_options, network_from_args, read_weights_file
from trainer.train.checkpoint import Saver, build_saver, check_output_dir, remove_leftovers
from trainer.train.events import Reporter
from trainer.train.hub import resolve_hub_resume
from trainer.train.metadata import training_metadata
from trainer.train.optim import build_optimizer, build_scheduler, eval_mode_for
from trainer.train.phases import phase
from trainer.train.precision import allow_fp16_unscale, fp16_optimizer_args
from trainer.train.resolve import NetworkSettings, Precision, RunSpec, resolve
from trainer.train.sample import build_sampler, load_sample_prompts
from trainer.train.state import (
    ResumePoint,
    check_state_fits,
    describe_run,
    initial_step_of,
    load_training_state,
    read_state_step,
    start_point,
)
from trainer.train.step import DiffusionSettings, StepParts
from trainer.train.text_cache import cache_text_encoder_outputs, check_cacheable
from trainer.train.validate import NoValidator, build_validator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """Values derived once from the config and the dataset size, printed before training starts."""
    num_batches_per_epoch: int
    steps_per_epoch: int       # optimizer steps per epoch
    max_train_steps: int
    num_epochs: int
    total_batch_size: int
    seed: int


def plan_run(num_batches: int, *, max_train_steps: int, max_train_epochs: int | None, batch_size: int,
             gradient_accumulation_steps: int, seed: int, num_processes: int = 1) -> RunPlan:
    """sd-scripts' arithmetic: epochs override steps; the loop stops at max_train_steps."""
    steps_per_epoch = math.ceil(num_batches / num_processes / gradient_accumulation_steps)
    if max_train_epochs:
        max_train_steps = max_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    return RunPlan(num_batches, steps_per_epoch, max_train_steps, num_epochs,
                   batch_size * gradient_accumulation_steps * num_processes, seed)


@dataclass
class TrainingSetup:
    """The finished parts handed to the loop."""
    accelerator: Any
    models: Any
    network: Any
    dataset: Any
    dataloader: Any
    optimizer: Any
    lr_scheduler: Any
    plan: RunPlan
    resume: Any  # train.state.ResumePoint: where the loop starts
    saver: Saver
    sampler: Any  # train.sample.Sampler, or NoSampler when sampling is off
    step: StepParts  # what each loss computation reads (trainer.train.step)
    max_grad_norm: float
    scale_weight_norms: float | None
    validator: Any = field(default_factory=NoValidator)  # train.validate.Validator when images are held out
    lr_descriptions: list[str] = field(default_factory=list)  # per optimizer param group: "textencoder", "unet"...


def build_dataset(cfg: TrainConfig, seed: int):
    if cfg.dataset_class:  # the user's class instead of folders and dataset TOMLs (trainer.data.custom)
        return load_dataset_class(cfg.dataset_class, resolution=cfg.resolution,
                                  max_token_length=cfg.max_token_length, debug_dataset=cfg.debug_dataset)
    user_config = load_dataset_config(cfg.dataset_config, masked_loss=cfg.masked_loss) if cfg.dataset_config else None
    specs = resolve_datasets(cfg, user_config)
    verify_bucket_reso_steps(specs, 32 if cfg.sdxl else 64)  # bucket steps sd-scripts accepts: 64 (SD 1/2), 32 (SDXL)
    dataset = build_train_dataset(specs, seed=seed, prior_loss_weight=cfg.prior_loss_weight,
                                  max_train_steps_hint=cfg.max_train_steps)
    if cfg.cache_text_encoder_outputs:
        check_cacheable(dataset)  # subset options from a dataset TOML; the CLI ones were checked by args.py
    return dataset


def build_network(settings: NetworkSettings, models):
    """The LoRA from --network_args, or shaped like --network_weights with --dim_from_weights, attached to
    `models`."""
    sdxl = settings.sdxl
    if settings.dim_from_weights:
        network = LoRANetwork.from_weights(models.text_encoders, models.unet, read_weights_file(settings.weights),
                                           sdxl=sdxl, source=settings.weights)
        apply_lr_options(network, settings.options)
        log.info("Network shape (modules, ranks, alphas) and weights taken from %s", settings.weights)
    else:
        network = network_from_args(models.text_encoders, models.unet, settings.options, sdxl=sdxl,
                                    rank=settings.rank, alpha=settings.alpha, dropout=settings.dropout,
                                    train_unet=settings.train_unet, train_text_encoder=settings.train_text_encoder,
                                    network_module=settings.module)
    network.apply_to(apply_text_encoder=settings.train_text_encoder, apply_unet=settings.train_unet)
    if settings.weights and not settings.dim_from_weights:
        network.load_weights(settings.weights)
        log.info("Starting from the LoRA weights in %s", settings.weights)
    return network


def merge_base_weights(cfg: TrainConfig, models) -> None:
    """--base_weights: LoRA files merged into the base model before anything else sees it (fp8 storage, the
    text-encoder output cache), as sd-scripts does before its network exists."""
    if not cfg.base_weights:
        return
    multipliers = list(cfg.base_weights_multiplier or [])[:len(cfg.base_weights)]
    multipliers += [1.0] * (len(cfg.base_weights) - len(multipliers))
    merge_lora_into(models, cfg.base_weights, multipliers)
    log.info("Merged into the base model: %s", ", ".join(f"{p} x{m}" for p, m in zip(cfg.base_weights, multipliers)))


def freeze_models(models, weight_dtype: torch.dtype, *, no_half_vae: bool, device, fp8_unet: bool = False,
                  fp8_text_encoders: bool = False, vae_only_on_device: bool = False) -> None:
    """Frozen base weights in the training dtype; only LoRA parameters get gradients. The VAE goes to the
    device; the UNet and text encoders too, unless `vae_only_on_device` (latent caching first: with only the
    VAE on the GPU, SDXL's caching peak drops by the UNet's and encoders' size; see `place_on_device`).

    fp8: weights are *stored* as float8_e4m3fn (half the memory of fp16) and cast up to the training dtype
    layer by layer as they are used (diffusers' layerwise casting; norms and embeddings stay as they are)."""
    for module in (models.unet, *models.text_encoders):
        module.requires_grad_(False)
        module.to(device="cpu" if vae_only_on_device else device, dtype=weight_dtype)
    if fp8_unet or fp8_text_encoders:
        from diffusers.hooks import apply_layerwise_casting

        for module in ([models.unet] if fp8_unet else []) + (list(models.text_encoders) if fp8_text_encoders else []):
            apply_layerwise_casting(module, storage_dtype=torch.float8_e4m3fn, compute_dtype=weight_dtype)
    models.vae.requires_grad_(False)
    models.vae.to(device=device, dtype=torch.float32 if no_half_vae else weight_dtype)
    models.vae.eval()


def place_on_device(models, device) -> None:
    """The UNet and text encoders join the device once latent caching is done."""
    for module in (models.unet, *models.text_encoders):
        module.to(device)


def build_optimizer_and_scheduler(cfg: TrainConfig, network, plan: RunPlan, num_processes: int):
    """(optimizer, scheduler, ss_optimizer name, the param groups' names: "textencoder", "unet", ...)."""
    groups, descriptions = network.prepare_optimizer_params(cfg.text_encoder_lr_value, cfg.unet_lr,
                                                            cfg.learning_rate)
    log.info("LoRA param groups: %s", ", ".join(f"{d} lr={g['lr']:g}" for d, g in zip(descriptions, groups)))
    if not groups:
        raise ConfigError("Nothing to train: every learning rate is 0 (--unet_lr / --text_encoder_lr / "
                          "--learning_rate).")
    optimizer, name = build_optimizer(cfg.optimizer_type, groups, cfg.learning_rate, cfg.optimizer_args)
    scheduler_name = cfg.lr_scheduler
    if type(optimizer).__name__ == "Adafactor" and optimizer.defaults.get("relative_step") and \
            scheduler_name != "adafactor" and not cfg.lr_scheduler_type:
        log.warning("Adafactor with relative_step sets its own learning rate: using the adafactor schedule "
                    "instead of --lr_scheduler %s (as sd-scripts does).", scheduler_name)
        scheduler_name = "adafactor"
    scheduler = build_scheduler(
        scheduler_name, optimizer, total_steps=plan.max_train_steps * num_processes,
        warmup=cfg.lr_warmup_steps, decay=cfg.lr_decay_steps, num_cycles=cfg.lr_scheduler_num_cycles,
        power=cfg.lr_scheduler_power, timescale=cfg.lr_scheduler_timescale,
        min_lr_ratio=cfg.lr_scheduler_min_lr_ratio, scheduler_type=cfg.lr_scheduler_type,
        scheduler_args=cfg.lr_scheduler_args, initial_lr=cfg.learning_rate)
    return optimizer, scheduler, name, descriptions


def prepare_training(cfg: TrainConfig, reporter: Reporter, *, models=None) -> TrainingSetup:
    """`build(resolve(cfg), ...)`: the whole front door for a config."""
    return build(resolve(cfg), reporter, models=models)


def build(spec: RunSpec, reporter: Reporter, *, models=None) -> TrainingSetup:
    """Build every part the loop needs, failing on user mistakes before anything slow happens. The order of
    the phases is the order of the side effects (see the module docstring) and is kept on purpose.

    `models` (a LoadedModels already in memory: bench's random-weight full-size models) replaces loading
    --pretrained_model_name_or_path; everything else runs as in any training run."""
    cfg, precision, seed = spec.cfg, spec.precision, spec.seed
    started_at = time.time()
    dataset, prompts = check_inputs(cfg, seed)
    accelerator = start_accelerator(cfg, precision)
    plan, resume_dir, resume = plan_steps(cfg, dataset, seed, accelerator.num_processes)  # before any model loads
    models, attention = load_frozen_models(cfg, precision, accelerator.device, models)
    text_cache = fill_caches(cfg, dataset, models, accelerator)  # before the LoRA exists: caches see the base model
    network = attach_network(cfg, spec.network, precision, models, accelerator.device, spec.compile_backend)
    dataloader, optimizer, lr_scheduler, optimizer_name, lr_descriptions = build_optimization(
        cfg, precision, dataset, network, plan, seed, accelerator)

    metadata = training_metadata(
        cfg, family=models.family, plan=plan, dataset=dataset, optimizer_name=optimizer_name,
        model_name=models.name, model_file=models.source_file, seed=seed, mixed_precision=precision.mixed_precision,
        started_at=started_at, used_dataset_config=bool(cfg.dataset_config))
    eval_mode = eval_mode_for(optimizer)  # schedule-free optimizers sample and save their averaged weights
    run = describe_run(optimizer=optimizer_name, network_module=cfg.network_module,
                       network=accelerator.unwrap_model(network), dataset=dataset, seed=seed,
                       batch_size=cfg.train_batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    saver = build_saver(cfg, accelerator.unwrap_model(network), metadata, reporter, accelerator, eval_mode,
                        every_n_epochs=save_every_n_epochs(cfg, plan.num_epochs), run=run)
    # random states too: after the LoRA's init and the session id drew theirs
    restore_state(resume_dir, accelerator, optimizer, run)
    sampler = build_sampler(cfg, prompts, models, network, accelerator, reporter, eval_mode)
    reporter.emit("info", message=f"attention: {attention}; device: {accelerator.device}; "
                                  f"precision: {precision.mixed_precision}; optimizer: {optimizer_name}")
    setup = TrainingSetup(
        accelerator=accelerator, models=models, network=network, dataset=dataset, dataloader=dataloader,
        optimizer=optimizer, lr_scheduler=lr_scheduler, plan=plan, resume=resume, saver=saver, sampler=sampler,
        step=StepParts(
            models=models, device=accelerator.device, autocast=accelerator.autocast,
            weight_dtype=precision.weight_dtype, text_cache=text_cache,
            settings=DiffusionSettings.from_config(cfg, v_parameterization=models.v_parameterization,
                                                   latent_scale=models.latent_scale),
            train_text_encoder=cfg.train_text_encoder and network_has_text_encoder(network, accelerator)),
        max_grad_norm=cfg.max_grad_norm,
        # LoHa / LoKr have no max-norm regularisation: sd-scripts ignores the option for them (args.py warns)
        scale_weight_norms=cfg.scale_weight_norms if accelerator.unwrap_model(network).module_type == "lora" else None,
        lr_descriptions=lr_descriptions)
    setup.validator = build_validator(cfg, setup, reporter)
    return setup


def check_inputs(cfg: TrainConfig, seed: int) -> tuple[Any, list]:
    """(dataset, sample prompts): the user's mistakes that need no model stop the run here, bad images
    included. The seed is set first; the dataset's shuffling draws from it."""
    set_seed(seed)
    check_output_dir(Path(cfg.output_dir or "output"))
    remove_leftovers(Path(cfg.output_dir or "output"), cfg.output_name)
    return build_dataset(cfg, seed), load_sample_prompts(cfg)


def start_accelerator(cfg: TrainConfig, precision: Precision) -> Accelerator:
    """The Accelerator for the resolved precision (a fresh one: see `fresh_accelerator_state`)."""
    fresh_accelerator_state()
    # Batches come in pinned memory on CUDA (make_dataloader), so their copy to the GPU need not wait for it.
    cuda = precision.device_type == "cuda"
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=precision.mixed_precision, cpu=not cuda,
                              dataloader_config=DataLoaderConfiguration(non_blocking=cuda))
    if precision.full_fp16:
        allow_fp16_unscale(accelerator.scaler)  # fp16 LoRA gradients (trainer.train.precision says why)
    return accelerator


def plan_steps(cfg: TrainConfig, dataset, seed: int, num_processes: int) -> tuple[RunPlan, str | None, Any]:
    """(RunPlan, the --resume state folder, ResumePoint): every dataset item is one batch, so the plan and the
    start point are known before any model loads. --resume_from_huggingface downloads the state folder here."""
    plan = plan_run(len(dataset), max_train_steps=cfg.max_train_steps, max_train_epochs=cfg.max_train_epochs,
                    batch_size=cfg.train_batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                    seed=seed, num_processes=num_processes)
    resume_dir = resolve_hub_resume(cfg)
    return plan, resume_dir, plan_start(cfg, plan, resume_dir)


def load_frozen_models(cfg: TrainConfig, precision: Precision, device, models=None) -> tuple[Any, str]:
    """(models, attention backend): the base model loaded (unless given), --base_weights merged in, the
    zero-terminal-SNR schedule, the attention backend, then the weights frozen and placed (`freeze_models`)."""
    with phase("load"):
        if models is None:
            models = load_models(cfg.pretrained_model_name_or_path, v2=cfg.v2, sdxl=cfg.sdxl, vae=cfg.vae,
                                 v_parameterization=cfg.v_parameterization, tokenizer_cache_dir=cfg.tokenizer_cache_dir,
                                 dtype=precision.weight_dtype, vae_dtype=precision.vae_dtype)
        merge_base_weights(cfg, models)
        if cfg.zero_terminal_snr:
            models.noise_scheduler = type(models.noise_scheduler).from_config(
                models.noise_scheduler.config, rescale_betas_zero_snr=True)
        attention = select_attention(models.unet, models.vae, xformers=cfg.xformers, sdpa=cfg.sdpa,
                                     mem_eff_attn=cfg.mem_eff_attn)
        freeze_models(models, precision.weight_dtype, no_half_vae=precision.no_half_vae, device=device,
                      fp8_unet=precision.fp8_unet, fp8_text_encoders=precision.fp8_text_encoders,
                      vae_only_on_device=cfg.cache_latents)
    return models, attention


def fill_caches(cfg: TrainConfig, dataset, models, accelerator) -> Any:
    """--cache_latents (then the UNet and text encoders join the VAE on the device) and SDXL's
    --cache_text_encoder_outputs; returns the text-encoder output cache or None.

    Moving the models to the device after caching is the "load" phase, not "cache_latents"."""
    if cfg.cache_latents:
        with phase("cache_latents"):
            cache_latents(dataset, models.vae, cfg, accelerator.device, models.family)
        with phase("load"):
            place_on_device(models, accelerator.device)
    if not cfg.cache_text_encoder_outputs:
        return None
    validation = dataset.validation_dataset()  # held-out images are scored with cached outputs too
    records = dataset.records + (validation.records if validation is not None else [])
    with phase("cache_text"):
        return cache_text_encoder_outputs(
            SimpleNamespace(records=records), models, max_token_length=cfg.max_token_length,
            to_disk=cfg.cache_text_encoder_outputs_to_disk, batch_size=cfg.train_batch_size,
            device=accelerator.device, autocast=accelerator.autocast)


def attach_network(cfg: TrainConfig, settings: NetworkSettings, precision: Precision, models, device,
                   compile_backend: str | None) -> Any:
    """The LoRA attached to the models, in its training dtype, with gradient checkpointing and torch.compile
    as asked."""
    network = build_network(settings, models)
    if precision.full_bf16:
        network.to(torch.bfloat16)  # LoRA weights and optimizer state in bf16: less memory, coarser updates
    if precision.full_fp16:
        network.to(torch.float16)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(models, settings.train_text_encoder, fp8=precision.fp8_unet)
    if compile_backend:
        compile_unet(models.unet, compile_backend, device)  # after the LoRA hooks are attached
    return network


def build_optimization(cfg: TrainConfig, precision: Precision, dataset, network, plan: RunPlan, seed: int,
                       accelerator) -> tuple[Any, Any, Any, str, list[str]]:
    """(dataloader, optimizer, lr_scheduler, ss_optimizer name, param-group names), prepared by accelerate,
    with the network registered so that save_state/load_state include its weights."""
    dataloader = make_dataloader(dataset, num_workers=cfg.max_data_loader_n_workers,
                                 persistent_workers=cfg.persistent_data_loader_workers, seed=seed)
    dataset.set_max_train_steps(plan.max_train_steps)
    optimizer_cfg = dataclasses.replace(cfg, optimizer_args=fp16_optimizer_args(
        cfg.optimizer_type, cfg.optimizer_args)) if precision.full_fp16 else cfg
    optimizer, lr_scheduler, optimizer_name, lr_descriptions = build_optimizer_and_scheduler(
        optimizer_cfg, network, plan, accelerator.num_processes)
    # The LoRA runs inside the base model's forward through hooks, so a DDP wrapper around it would never
    # see a forward pass: it is not prepared; the loop averages its gradients across processes itself.
    optimizer, dataloader, lr_scheduler = accelerator.prepare(optimizer, dataloader, lr_scheduler)
    accelerator.register_for_checkpointing(network)
    return dataloader, optimizer, lr_scheduler, optimizer_name, lr_descriptions


def save_every_n_epochs(cfg: TrainConfig, num_epochs: int) -> int | None:
    """--save_every_n_epochs, or from --save_n_epoch_ratio N: save about N times over the run."""
    if cfg.save_n_epoch_ratio and not cfg.save_every_n_epochs:
        return max(1, num_epochs // cfg.save_n_epoch_ratio)
    return cfg.save_every_n_epochs


def fresh_accelerator_state() -> None:
    """accelerate keeps one process-wide state and refuses a second Accelerator with other precision
    settings; a new run in the same process (tests, a notebook) starts from a clean one. The distributed
    part (process group) is kept."""
    AcceleratorState._reset_state(reset_partial_state=False)


def network_has_text_encoder(network, accelerator) -> bool:
    return any(name.startswith("lora_te") for name in accelerator.unwrap_model(network).module_names())


def cache_latents(dataset, vae, cfg: TrainConfig, device, family: str) -> None:
    """Encode every image once; the VAE then leaves the GPU, which frees its memory for training."""
    vae_dtype = next(vae.parameters()).dtype

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        return vae.encode(images.to(device, vae_dtype)).latent_dist.sample().float().cpu()

    for images in (dataset, dataset.validation_dataset()):  # held-out images are validated from latents too
        if images is not None:
            images.cache_latents(encode, vae_batch_size=cfg.vae_batch_size, to_disk=cfg.cache_latents_to_disk,
                                 family=family, skip_cache_check=cfg.skip_cache_check,
                                 progress=lambda done, total: interrupts.check())  # each VAE batch: a safe point
    vae.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def enable_gradient_checkpointing(models, train_text_encoder: bool, *, fp8: bool = False) -> None:
    """Recompute activations in the backward pass. With fp8 storage the recomputation re-casts the weights,
    whose temporary copies torch's checkpoint metadata check would call "different" although the values are
    the same, so that check is off then (the gradients are identical; tests compare them)."""
    checkpoint = None
    if fp8:
        import functools

        from torch.utils.checkpoint import checkpoint as torch_checkpoint

        checkpoint = functools.partial(torch_checkpoint, use_reentrant=False, determinism_check="none")
    models.unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
    models.unet.train()  # diffusers checkpoints only in training mode
    if train_text_encoder:
        for encoder in models.text_encoders:
            # transformers 5 renamed it; the old name warns
            getattr(encoder, "activation_checkpointing_enable", encoder.gradient_checkpointing_enable)()
            encoder.train()


def plan_start(cfg: TrainConfig, plan: RunPlan, resume_dir: str | None = None):
    """Where the loop starts (as sd-scripts' train_network.py): --initial_step / --initial_epoch, else the --resume state's
    step, counted on or not by --skip_until_initial_step (see train.state.start_point). Decided before any
    model loads, so a start past the end fails at once."""
    state_step = read_state_step(resume_dir) if resume_dir else None
    explicit = cfg.initial_step is not None or cfg.initial_epoch is not None
    if state_step is not None and explicit:
        log.warning("--resume: the state's step %d is not used because --initial_step/--initial_epoch is given "
                    "(as in sd-scripts).", state_step)
    initial = initial_step_of(initial_step=cfg.initial_step, initial_epoch=cfg.initial_epoch,
                              state_step=state_step, steps_per_epoch=plan.steps_per_epoch)
    if initial <= 0:
        return ResumePoint()
    if initial >= plan.max_train_steps:
        source = (f"--resume {resume_dir}: that run already did {initial} steps" if not explicit else
                  f"--initial_step/--initial_epoch: the run would start at step {initial}")
        raise ConfigError(f"{source}, and this one has {plan.max_train_steps} in all "
                          f"({plan.steps_per_epoch} per epoch). Raise --max_train_steps / --max_train_epochs "
                          "to train more, or start earlier.")
    start = start_point(initial, skip_until_initial_step=cfg.skip_until_initial_step,
                        steps_per_epoch=plan.steps_per_epoch,
                        gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    if cfg.skip_until_initial_step:
        log.info("Continuing after step %d: epoch %d, skipping its first %d batch(es).", initial, start.epoch,
                 start.batches_to_skip)
        if not resume_dir:
            log.info("--initial_step without --resume: the LR schedule starts from its beginning (as in sd-scripts).")
    else:
        log.info("Starting at epoch %d (initial step %d); the step counter starts at 0 because "
                 "--skip_until_initial_step is not given (as in sd-scripts).", start.epoch, initial)
    return start


def restore_state(resume_dir: str | None, accelerator, optimizer, run: dict) -> None:
    """--resume: load the LoRA weights, optimizer, scheduler and random states of the state folder, once it
    is known to belong to this run (trainer.train.state.check_state_fits)."""
    if resume_dir:
        check_state_fits(resume_dir, run)
        done = load_training_state(accelerator, resume_dir, optimizer)
        log.info("Restored the training state of %s (saved after step %d).", resume_dir, done)
