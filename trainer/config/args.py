"""The one table of training arguments, and how CLI + `--config_file` TOML become a frozen `TrainConfig`.

Every sd-scripts argument is declared once below, as a field of `TrainConfig`: its name, type, default
(sd-scripts' own), help text, section and status. The argparse parser, the `--config_file` merge,
`--output_config` and the compatibility table in docs/ are all generated from these fields, so none of
them can drift from the others.

Status of an argument here:
  done   - implemented with sd-scripts' meaning.
  warn   - accepted and ignored with a warning, because ignoring it cannot change the trained LoRA.
  refuse - recognised, but not supported yet: a non-default value stops before training with a message.
"""

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from trainer.config.blocks import check_block_options
from trainer.config.optimizers import parse_optimizer_args, parse_scheduler_args
from trainer.errors import ConfigError, did_you_mean
from trainer.files import atomic_write_text

log = logging.getLogger(__name__)

DONE, WARN, REFUSE = "done", "warn", "refuse"

MODEL, NETWORK, OPTIMIZER, TRAINING, SAVING, DATASET, LOSS, NOISE, MEMORY, LOGGING, SAMPLING, METADATA, \
    VALIDATION, DISTRIBUTED, SDXL = ("model", "network", "optimizer", "training", "saving", "dataset", "loss",
                                     "noise", "memory", "logging", "sampling", "metadata", "validation",
                                     "distributed", "sdxl")


def arg(default: Any, help: str, section: str, status: str = DONE, *, choices: Sequence | None = None,
        kind: str | None = None, note: str = "") -> Any:
    """Declare one argument. `kind` overrides the parser kind derived from the annotation.

    `note` says why an argument warns or is refused; it is shown to the user."""
    return field(default=default, metadata=dict(help=help, section=section, status=status, choices=choices,
                                                kind=kind, note=note))


def flag(help: str, section: str, status: str = DONE, note: str = "") -> Any:
    return arg(False, help, section, status, note=note)


NOT_YET = "not supported yet"
DEEPSPEED_NOTE = ("not supported yet: DeepSpeed shards full fine-tuning across GPUs, while a LoRA fits on each "
                  "card, so plain data parallel does the job (accelerate launch --num_processes N train_network.py)")
LOGGING_NOTE = ("TensorBoard needs `pip install tensorboard`, wandb `pip install wandb`; without them the run warns "
                "once and trains without that tracker")


@dataclass(frozen=True)
class TrainConfig:
    # ------------------------------------------------------------------ model
    pretrained_model_name_or_path: str | None = arg(
        None, "base model: a .safetensors/.ckpt file, a diffusers folder, a hub id, or builtin:tiny-sd1", MODEL)
    v2: bool = flag("the base model is Stable Diffusion 2.x", MODEL)
    v_parameterization: bool = flag("train with the v-prediction target (SD2 768-v models)", MODEL)
    sdxl: bool = flag("the base model is SDXL (what sdxl_train_network.py sets; detected from the model when "
                      "not given)", SDXL)
    tokenizer_cache_dir: str | None = arg(None, "folder to read/write CLIP tokenizers for offline use", MODEL)
    vae: str | None = arg(None, "replacement VAE (file or diffusers folder)", MODEL)
    no_half_vae: bool = flag("keep the VAE in fp32 under mixed precision", MODEL)
    lowram: bool = flag("load models straight to the GPU", MEMORY, WARN, note="models are always loaded lazily here")
    highvram: bool = flag("skip CUDA cache clears during latent caching", MEMORY, WARN,
                          note="has no effect on the result")
    lowvram: bool = flag("low-VRAM loading (sd-scripts model-dependent)", MEMORY, WARN, note="has no effect here")
    fp8_base: bool = flag("store the frozen UNet and text encoder(s) in float8 (needs mixed precision)", MEMORY)
    fp8_base_unet: bool = flag("store only the frozen UNet in float8 (needs mixed precision)", MEMORY)
    disable_mmap_load_safetensors: bool = flag("read safetensors without mmap", MEMORY, WARN,
                                               note="has no effect on the result")

    # ------------------------------------------------------------------ network
    network_module: str | None = arg("networks.lora", "network module: networks.lora (LoRA/LoCon), networks.loha "
                                                      "(LoHa), networks.lokr (LoKr), lycoris.kohya (algo=lora, locon, "
                                                      "loha, lokr); see the table of network modules below", NETWORK)
    network_dim: int | None = arg(None, "LoRA rank (default 4)", NETWORK)
    # sd-scripts' default is the int 1 (argparse does not convert defaults): the saved alpha is then int64.
    network_alpha: float = arg(1, "LoRA alpha; scale = alpha / dim; 0 means alpha = dim", NETWORK)
    network_dropout: float | None = arg(None, "dropout on the LoRA down projection's output", NETWORK)
    network_args: list[str] | None = arg(None, "key=value network options (networks.lora: conv_dim, conv_alpha, "
                                               "rank_dropout, module_dropout, block_dims, block_alphas, "
                                               "conv_block_dims, conv_block_alphas, down/mid/up_lr_weight, "
                                               "block_lr_zero_threshold, loraplus_lr_ratio, "
                                               "loraplus_unet/text_encoder_lr_ratio; the other modules' keys are in "
                                               "the table of network modules below)", NETWORK)
    network_weights: str | None = arg(None, "LoRA file to start from (ours or sd-scripts')", NETWORK)
    dim_from_weights: bool = flag("take the network shape (modules, ranks, alphas) from --network_weights",
                                  NETWORK)
    network_train_unet_only: bool = flag("train only the UNet LoRA", NETWORK)
    network_train_text_encoder_only: bool = flag("train only the text-encoder LoRA", NETWORK)
    unet_lr: float | None = arg(None, "learning rate of the UNet LoRA (default: --learning_rate)", NETWORK)
    text_encoder_lr: list[float] | None = arg(None, "learning rate of the text-encoder LoRA (first value used)",
                                              NETWORK)
    scale_weight_norms: float | None = arg(None, "max-norm regularisation of each LoRA delta", NETWORK)
    base_weights: list[str] | None = arg(None, "LoRA files merged into the base model before training", NETWORK)
    base_weights_multiplier: list[float] | None = arg(None, "multipliers for --base_weights (default 1.0 each)",
                                                      NETWORK)
    training_comment: str | None = arg(None, "stored as ss_training_comment", METADATA)
    no_metadata: bool = flag("save only the minimum metadata", METADATA)
    save_model_as: str = arg("safetensors", "file format of the LoRA", SAVING,
                             choices=("safetensors", "ckpt", "pt"))
    cpu_offload_checkpointing: bool = flag("offload activations while checkpointing (SDXL)", MEMORY, WARN,
                                           note="only meaningful for SDXL")
    skip_until_initial_step: bool = flag(
        "continue exactly at the initial step (--initial_step/--initial_epoch/--resume): the step counter starts "
        "there and the batches already trained on are skipped", TRAINING,
        note="without it, as in sd-scripts, only the epoch counter moves on: the step counter restarts at 0 and "
             "up to max_train_steps new steps are trained")
    initial_epoch: int | None = arg(None, "start at this epoch (1-based); the step is (epoch - 1) x steps per epoch",
                                    TRAINING, note="used instead of the --resume state's step")
    initial_step: int | None = arg(None, "start at this global step (0-based; wins over --initial_epoch)", TRAINING,
                                   note="used instead of the --resume state's step; the LR schedule restarts "
                                        "unless resuming")

    # ------------------------------------------------------------------ validation
    validation_seed: int | None = arg(None, "seed of the validation split and of the validation noise (else --seed)",
                                      VALIDATION)
    validation_split: float = arg(0.0, "fraction of each non-reg subset held out for validation", VALIDATION)
    validate_every_n_steps: int | None = arg(None, "also validate every N steps", VALIDATION)
    validate_every_n_epochs: int | None = arg(None, "validate every N epochs (default: every epoch when images are "
                                              "held out)", VALIDATION)
    max_validation_steps: int | None = arg(None, "cap on validation batches (0: no validation)", VALIDATION)

    # ------------------------------------------------------------------ optimizer and schedule
    optimizer_type: str = arg("", "optimizer name (AdamW by default) or module.Class", OPTIMIZER)
    use_8bit_adam: bool = flag("legacy alias of --optimizer_type AdamW8bit", OPTIMIZER)
    use_lion_optimizer: bool = flag("legacy alias of --optimizer_type Lion", OPTIMIZER)
    learning_rate: float = arg(2e-6, "base learning rate", OPTIMIZER)
    max_grad_norm: float = arg(1.0, "gradient clipping norm; 0 disables", OPTIMIZER)
    optimizer_args: list[str] | None = arg(None, "key=value optimizer options (values as Python literals)",
                                           OPTIMIZER)
    lr_scheduler: str = arg("constant", "learning-rate schedule", OPTIMIZER,
                            choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                     "polynomial", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
                                     "piecewise_constant", "adafactor"))
    lr_scheduler_type: str = arg("", "custom scheduler class: module.Class, or a torch.optim.lr_scheduler name",
                                 OPTIMIZER)
    lr_scheduler_args: list[str] | None = arg(None, "key=value scheduler options (values as Python literals)",
                                              OPTIMIZER)
    lr_warmup_steps: float = arg(0, "warmup steps (int), or a ratio of total steps (float < 1, or '10%')",
                                 OPTIMIZER, kind="int_or_float")
    lr_decay_steps: float = arg(0, "decay steps for warmup_stable_decay (int or ratio)", OPTIMIZER,
                                kind="int_or_float")
    lr_scheduler_num_cycles: int = arg(1, "restarts for cosine_with_restarts", OPTIMIZER)
    lr_scheduler_power: float = arg(1.0, "power for polynomial", OPTIMIZER)
    lr_scheduler_timescale: int | None = arg(None, "timescale for inverse_sqrt", OPTIMIZER)
    lr_scheduler_min_lr_ratio: float | None = arg(None, "floor for cosine_with_min_lr / warmup_stable_decay",
                                                  OPTIMIZER)
    fused_backward_pass: bool = flag("fused Adafactor backward (full fine-tuning only)", MEMORY, WARN,
                                     note="sd-scripts' LoRA trainer does not use it either")

    # ------------------------------------------------------------------ training
    output_dir: str | None = arg(None, "folder for the LoRA files", SAVING)
    output_name: str | None = arg(None, "file name of the LoRA, without extension", SAVING)
    save_precision: str | None = arg(None, "dtype of the saved LoRA", SAVING, choices=(None, "float", "fp16", "bf16"))
    save_every_n_epochs: int | None = arg(None, "also save every N epochs", SAVING)
    save_every_n_steps: int | None = arg(None, "also save every N steps", SAVING)
    save_n_epoch_ratio: int | None = arg(None, "save about N times over the run", SAVING)
    save_last_n_epochs: int | None = arg(None, "keep only the last N epoch files", SAVING)
    save_last_n_steps: int | None = arg(None, "keep only step files of the last N steps", SAVING)
    save_last_n_epochs_state: int | None = arg(None, "keep only the last N epoch states", SAVING)
    save_last_n_steps_state: int | None = arg(None, "keep only the states of the last N steps", SAVING)
    save_state: bool = flag("also save a state folder (optimizer, scheduler, RNG) for --resume", SAVING)
    save_state_on_train_end: bool = flag("save a state folder at the end", SAVING)
    resume: str | None = arg(None, "state folder to continue from; add --skip_until_initial_step to go on from its "
                                   "step (without it, as in sd-scripts, only its epoch is taken and the step count "
                                   "restarts at 0)", SAVING)
    train_batch_size: int = arg(1, "images per step", TRAINING)
    max_train_steps: int = arg(1600, "number of optimizer steps", TRAINING)
    max_train_epochs: int | None = arg(None, "number of epochs (overrides --max_train_steps)", TRAINING)
    max_data_loader_n_workers: int = arg(8, "data loader worker processes (capped at the CPU count)", TRAINING)
    persistent_data_loader_workers: bool = flag("keep data loader workers between epochs", TRAINING)
    seed: int | None = arg(None, "random seed (random when not given)", TRAINING)
    gradient_checkpointing: bool = flag("trade compute for memory", MEMORY)
    gradient_accumulation_steps: int = arg(1, "micro-batches per optimizer step", TRAINING)
    mixed_precision: str = arg("no", "autocast precision", TRAINING, choices=("no", "fp16", "bf16"))
    full_fp16: bool = flag("LoRA weights, gradients and optimizer state in fp16 (needs --mixed_precision fp16 "
                           "and a CUDA GPU)", MEMORY)
    full_bf16: bool = flag("LoRA weights in bf16 (needs --mixed_precision bf16)", MEMORY)
    max_token_length: int | None = arg(None, "caption tokens: 75 (default), 150 or 225", TRAINING,
                                       choices=(None, 75, 150, 225))
    clip_skip: int | None = arg(None, "use the output of the k-th last text-encoder layer", TRAINING)
    xformers: bool = flag("xformers attention (falls back to SDPA with a warning when unavailable)", MEMORY)
    sdpa: bool = flag("PyTorch scaled-dot-product attention", MEMORY)
    mem_eff_attn: bool = flag("memory-efficient attention", MEMORY)
    torch_compile: bool = flag("torch.compile the UNet (a backend that does not work here: one warning, then "
                               "eager)", MEMORY)
    dynamo_backend: str = arg("inductor", "torch.compile backend (with --torch_compile)", MEMORY)
    ddp_timeout: int | None = arg(None, "DDP timeout in minutes", DISTRIBUTED, WARN, note="single process only")
    ddp_gradient_as_bucket_view: bool = flag("DDP option", DISTRIBUTED, WARN, note="single process only")
    ddp_static_graph: bool = flag("DDP option", DISTRIBUTED, WARN, note="single process only")

    # ------------------------------------------------------------------ logging
    logging_dir: str | None = arg(None, "log folder: TensorBoard logs go to <logging_dir>/<log_prefix><YYYYmmddHHMMSS>/"
                                        "network_train/ (sd-scripts' tags)", LOGGING, note=LOGGING_NOTE)
    log_with: str | None = arg(None, "tracker: tensorboard (needs --logging_dir; the default with it), wandb or all",
                               LOGGING, choices=("tensorboard", "wandb", "all"), note=LOGGING_NOTE)
    log_prefix: str | None = arg(None, "prefix of the run folder name in --logging_dir", LOGGING)
    log_tracker_name: str | None = arg(None, "tracker name: TensorBoard subfolder and wandb project "
                                             "(default network_train)", LOGGING)
    wandb_run_name: str | None = arg(None, "wandb run name", LOGGING)
    log_tracker_config: str | None = arg(None, "TOML with one table of init options per tracker ([wandb] for "
                                               "wandb.init, [tensorboard] for SummaryWriter)", LOGGING)
    wandb_api_key: str | None = arg(None, "wandb API key (wandb.login before the run)", LOGGING)
    log_config: bool = flag("log the arguments (without paths and secrets) to the tracker", LOGGING)
    console_log_level: str | None = arg(None, "console log level", LOGGING,
                                        choices=(None, "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    console_log_file: str | None = arg(None, "write the log to this file instead of the console (as sd-scripts; the "
                                                 "progress bar stays on the console)", LOGGING)
    console_log_simple: bool = flag("plain console log", LOGGING)

    # ------------------------------------------------------------------ noise and loss
    noise_offset: float | None = arg(None, "noise offset (e.g. 0.05-0.1)", NOISE)
    noise_offset_random_strength: bool = flag("scale the noise offset by U(0,1)", NOISE)
    adaptive_noise_scale: float | None = arg(None, "add latent-mean-proportional offset", NOISE)
    multires_noise_iterations: int | None = arg(None, "pyramid noise iterations", NOISE)
    multires_noise_discount: float = arg(0.3, "pyramid noise discount", NOISE)
    ip_noise_gamma: float | None = arg(None, "input perturbation noise", NOISE)
    ip_noise_gamma_random_strength: bool = flag("scale ip_noise_gamma by U(0,1)", NOISE)
    zero_terminal_snr: bool = flag("rescale betas to zero terminal SNR", NOISE)
    min_timestep: int | None = arg(None, "lowest timestep sampled (default 0)", NOISE)
    max_timestep: int | None = arg(None, "timestep bound, exclusive (default 1000)", NOISE)
    loss_type: str = arg("l2", "loss", LOSS, choices=("l1", "l2", "huber", "smooth_l1"))
    huber_schedule: str = arg("snr", "huber c schedule", LOSS, choices=("constant", "exponential", "snr"))
    huber_c: float = arg(0.1, "huber c", LOSS)
    huber_scale: float = arg(1.0, "huber scale", LOSS)
    prior_loss_weight: float = arg(1.0, "loss weight of regularisation images", LOSS)
    min_snr_gamma: float | None = arg(None, "Min-SNR weighting gamma (5 is common)", LOSS)
    scale_v_pred_loss_like_noise_pred: bool = flag("scale v-prediction loss like noise prediction", LOSS)
    v_pred_like_loss: float | None = arg(None, "add a v-prediction-like loss", LOSS)
    debiased_estimation_loss: bool = flag("debiased estimation loss weighting", LOSS)
    weighted_captions: bool = flag("(word:1.2) attention syntax in captions", TRAINING)
    masked_loss: bool = flag("weight the loss by mask images (white = trained, black = ignored): allows "
                             "image_dir + conditioning_data_dir subsets in the dataset config", LOSS)
    conditioning_data_dir: str | None = arg(None, "mask images named like the images in --train_data_dir (used "
                                                  "with --masked_loss and no --dataset_config)", LOSS)

    # ------------------------------------------------------------------ samples
    sample_prompts: str | None = arg(None, "prompt file for sample images (.txt, .toml or .json)", SAMPLING)
    sample_every_n_steps: int | None = arg(None, "sample every N steps", SAMPLING)
    sample_every_n_epochs: int | None = arg(None, "sample every N epochs (wins over steps)", SAMPLING)
    sample_at_first: bool = flag("sample before training", SAMPLING)
    sample_sampler: str = arg("ddim", "sampler for samples", SAMPLING,
                              choices=("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a",
                                       "dpmsolver", "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a",
                                       "k_dpm_2", "k_dpm_2_a"))

    # ------------------------------------------------------------------ dataset
    dataset_config: str | None = arg(None, "dataset TOML/JSON ([general], [[datasets]], [[datasets.subsets]])",
                                     DATASET)
    train_data_dir: str | None = arg(None, "parent folder of N_token image folders", DATASET)
    reg_data_dir: str | None = arg(None, "parent folder of N_token regularisation folders", DATASET)
    in_json: str | None = arg(None, "fine-tuning metadata JSON", DATASET)
    dataset_repeats: int = arg(1, "repeats in fine-tuning mode", DATASET)
    resolution: tuple[int, int] | None = arg(None, "training resolution: '512' or 'W,H'", DATASET,
                                             kind="resolution")
    enable_bucket: bool = flag("aspect-ratio buckets", DATASET)
    min_bucket_reso: int = arg(256, "smallest bucket side", DATASET)
    max_bucket_reso: int = arg(1024, "largest bucket side", DATASET)
    bucket_reso_steps: int = arg(64, "bucket side step", DATASET)
    bucket_no_upscale: bool = flag("never upscale images into buckets", DATASET)
    resize_interpolation: str | None = arg(None, "resize filter", DATASET,
                                           choices=(None, "lanczos", "nearest", "bilinear", "linear", "bicubic",
                                                    "cubic", "area"))
    caption_extension: str = arg(".caption", "caption file extension (GUIs usually use .txt)", DATASET)
    caption_extention: str | None = arg(None, "misspelled legacy alias of --caption_extension", DATASET)
    shuffle_caption: bool = flag("shuffle comma-separated tags", DATASET)
    caption_separator: str = arg(",", "tag separator", DATASET)
    keep_tokens: int = arg(0, "leading tags kept in place when shuffling", DATASET)
    keep_tokens_separator: str = arg("", "separator ending the fixed part of a caption", DATASET)
    secondary_separator: str | None = arg(None, "separator treated as one tag", DATASET)
    enable_wildcard: bool = flag("{a|b} wildcards and multi-line captions", DATASET)
    caption_prefix: str | None = arg(None, "text put before every caption", DATASET)
    caption_suffix: str | None = arg(None, "text put after every caption", DATASET)
    caption_dropout_rate: float = arg(0.0, "probability of an empty caption", DATASET)
    caption_dropout_every_n_epochs: int = arg(0, "empty captions every N epochs", DATASET)
    caption_tag_dropout_rate: float = arg(0.0, "probability of dropping each tag", DATASET)
    token_warmup_min: int = arg(1, "tags at the start of token warmup", DATASET)
    token_warmup_step: float = arg(0, "steps (or ratio) of token warmup", DATASET)
    color_aug: bool = flag("random hue/gamma changes", DATASET)
    flip_aug: bool = flag("random horizontal flips", DATASET)
    random_crop: bool = flag("random crop offsets", DATASET)
    face_crop_aug_range: str | None = arg(None, "face crop range '2.0,4.0'", DATASET)
    cache_latents: bool = flag("encode images once before training", MEMORY)
    cache_latents_to_disk: bool = flag("cache latents in .npz files next to the images", MEMORY)
    vae_batch_size: int = arg(1, "batch size of the VAE when caching", MEMORY)
    skip_cache_check: bool = flag("trust existing cache files", MEMORY)
    cache_info: bool = flag("cache image sizes and captions in metadata_cache.json", DATASET)
    alpha_mask: bool = flag("use the PNG alpha channel as a loss mask (transparent = ignored)", LOSS)
    debug_dataset: bool = flag("instead of training, go through one epoch of the dataset: print each batch "
                               "(images, bucket, captions as processed, loss weights) and write its images to "
                               "debug_dataset/ in --output_dir; loads no model", DATASET,
                               note="PNG files instead of sd-scripts' OpenCV window")
    dataset_class: str | None = arg(
        None, "your dataset class pkg.module.Class, built as Class(None, max_token_length, resolution, "
              "debug_dataset); item i is a batch dict with \"images\" (B,3,H,W) in [-1,1] (or \"latents\") and "
              "\"captions\" (docs/dataset_class.md)", DATASET,
        note="tokenizer is None and input_ids are ignored (captions are tokenized here); no --cache_latents")

    # ------------------------------------------------------------------ SDXL script only
    cache_text_encoder_outputs: bool = flag("encode captions once before training (SDXL; implies "
                                            "--network_train_unet_only)", SDXL)
    cache_text_encoder_outputs_to_disk: bool = flag("cache text-encoder outputs in <image>_te_outputs.npz files "
                                                    "(SDXL; implies --cache_text_encoder_outputs)", SDXL)

    # ------------------------------------------------------------------ modelspec metadata
    metadata_title: str | None = arg(None, "modelspec title", METADATA)
    metadata_author: str | None = arg(None, "modelspec author", METADATA)
    metadata_description: str | None = arg(None, "modelspec description", METADATA)
    metadata_license: str | None = arg(None, "modelspec license", METADATA)
    metadata_tags: str | None = arg(None, "modelspec tags", METADATA)
    metadata_usage_hint: str | None = arg(None, "modelspec usage hint", METADATA)
    metadata_thumbnail: str | None = arg(None, "modelspec thumbnail (file or data URL)", METADATA)
    metadata_merged_from: str | None = arg(None, "modelspec merged_from", METADATA)
    metadata_trigger_phrase: str | None = arg(None, "modelspec trigger phrase", METADATA)
    metadata_preprocessor: str | None = arg(None, "modelspec preprocessor", METADATA)
    metadata_is_negative_embedding: str | None = arg(None, "modelspec is_negative_embedding", METADATA)

    # ------------------------------------------------------------------ hub and DeepSpeed (sd-scripts extras)
    huggingface_repo_id: str | None = arg(
        None, "upload each saved LoRA file to this Hugging Face repo (created if missing)", SAVING)
    huggingface_repo_type: str | None = arg(None, "hub repo type (model, dataset, space; default model)", SAVING)
    huggingface_path_in_repo: str | None = arg(None, "folder in the hub repo for uploads (default: its root)", SAVING)
    huggingface_token: str | None = arg(None, "hub token (never logged or written to --output_config)", SAVING)
    huggingface_repo_visibility: str | None = arg(None, "a created hub repo is private unless this is public",
                                                  SAVING)
    save_state_to_huggingface: bool = flag("also upload state folders to the hub repo", SAVING)
    resume_from_huggingface: bool = flag("--resume names a hub state: repo_id/path[:revision[:repo_type]]", SAVING)
    async_upload: bool = flag("upload in the background (the final file is uploaded before the run ends)", SAVING)
    deepspeed: bool = flag("DeepSpeed", DISTRIBUTED, REFUSE, note=DEEPSPEED_NOTE)
    zero_stage: int = arg(2, "DeepSpeed ZeRO stage", DISTRIBUTED, REFUSE, note=DEEPSPEED_NOTE)
    offload_optimizer_device: str | None = arg(None, "DeepSpeed option", DISTRIBUTED, REFUSE, note=DEEPSPEED_NOTE)
    offload_optimizer_nvme_path: str | None = arg(None, "DeepSpeed option", DISTRIBUTED, REFUSE, note=DEEPSPEED_NOTE)
    offload_param_device: str | None = arg(None, "DeepSpeed option", DISTRIBUTED, REFUSE, note=DEEPSPEED_NOTE)
    offload_param_nvme_path: str | None = arg(None, "DeepSpeed option", DISTRIBUTED, REFUSE, note=DEEPSPEED_NOTE)
    zero3_init_flag: bool = flag("DeepSpeed option", DISTRIBUTED, REFUSE, note=DEEPSPEED_NOTE)
    zero3_save_16bit_model: bool = flag("DeepSpeed option", DISTRIBUTED, REFUSE, note=DEEPSPEED_NOTE)
    fp16_master_weights_and_gradients: bool = flag("DeepSpeed option", DISTRIBUTED, REFUSE, note=DEEPSPEED_NOTE)

    # ------------------------------------------------------------------ the config files themselves
    config_file: str | None = arg(None, "TOML of arguments (CLI values win)", TRAINING)
    output_config: bool = flag("write the resolved arguments to --config_file and exit", TRAINING)

    # -- derived views (not arguments) ---------------------------------------------------------------
    @property
    def text_encoder_lr_value(self) -> float | None:
        """sd-scripts' networks.lora uses only the first --text_encoder_lr value."""
        return self.text_encoder_lr[0] if self.text_encoder_lr else None

    @property
    def train_text_encoder(self) -> bool:
        return not self.network_train_unet_only

    @property
    def train_unet(self) -> bool:
        return not self.network_train_text_encoder_only


ARGUMENTS: tuple[dataclasses.Field, ...] = tuple(dataclasses.fields(TrainConfig))
ARGUMENT_NAMES = frozenset(f.name for f in ARGUMENTS)


# ---------------------------------------------------------------------------------------------------
# Kinds: how a field is parsed from the command line and checked when it comes from a TOML file.


def kind_of(f: dataclasses.Field) -> str:
    if f.metadata["kind"]:
        return f.metadata["kind"]
    base = [t for t in getattr(f.type, "__args__", (f.type,)) if t is not type(None)][0]
    if base is bool:
        return "flag"
    if getattr(base, "__origin__", None) is list:
        return f"{base.__args__[0].__name__}_list"
    return base.__name__


def parse_int_or_float(text: str) -> int | float:
    """sd-scripts' `int_or_float`: '100' -> 100 steps, '0.1' -> ratio, '10%' -> 0.1."""
    text = str(text).strip()
    if text.endswith("%"):
        return float(text[:-1]) / 100
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def parse_resolution(text: str | int | Sequence) -> tuple[int, int]:
    """'512' -> (512, 512); '512,768' -> (512, 768) as (width, height); TOML ints and [w, h] lists too."""
    if isinstance(text, int) and not isinstance(text, bool):
        return (text, text)
    parts = list(text) if isinstance(text, (list, tuple)) else [p for p in str(text).split(",")]
    try:
        sizes = [int(str(p).strip()) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) <= 0:
        raise ValueError(f"expected '512' or 'W,H' such as '512,768', got {text!r}")
    return (sizes[0], sizes[1])


def _cli_type(convert, accepted: str):
    """argparse says only "invalid <function> value" for a ValueError; this names the accepted form."""
    def parse(text: str):
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {accepted}") from None
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


_CLI_TYPES = {"str": str, "int": _cli_type(int, "a whole number, e.g. 4"),
              "float": _cli_type(float, "a number, e.g. 1e-4 or 0.5"),
              "int_or_float": _cli_type(parse_int_or_float, "a whole number of steps or a fraction, e.g. 100 or 0.1"),
              "resolution": _cli_type(parse_resolution, "'512' or 'W,H' such as '512,768' (pixels, above 0)"),
              "str_list": str, "float_list": _cli_type(float, "numbers, e.g. 1.0 0.5")}


def convert_value(f: dataclasses.Field, value: Any) -> Any:
    """Check and convert a value from a TOML file (or a default) to the field's type; ValueError says why."""
    kind = kind_of(f)
    if value is None:
        return None
    if kind == "flag":
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if kind in ("str_list", "float_list"):
        items = value if isinstance(value, list) else [value]  # sd-scripts accepts a scalar from TOML too
        return [_convert_scalar(kind[:-5], item) for item in items]
    return _convert_scalar(kind, value)


def _convert_scalar(kind: str, value: Any) -> Any:
    if kind == "resolution":
        return parse_resolution(value)
    if kind == "int_or_float":
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        return value if isinstance(value, (int, float)) else parse_int_or_float(value)
    if kind == "int":
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ValueError(f"expected a whole number, got {value!r}")
        return int(value)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ValueError(f"expected a number, got {value!r}")
        return value  # keep an int as int: sd-scripts records `network_alpha = 16` as "16" in metadata
    if kind == "str":
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unknown argument kind {kind}")


# ---------------------------------------------------------------------------------------------------
# The parser


def build_parser(prog: str = "python -m trainer train") -> argparse.ArgumentParser:
    """An argparse parser with every argument of the table. Defaults are SUPPRESSed so that the result holds
    only what the command line gave; the merge with TOML values and defaults happens in `parse_train_args`."""
    parser = argparse.ArgumentParser(prog=prog, description="Train a LoRA with sd-scripts' arguments.",
                                     argument_default=argparse.SUPPRESS, allow_abbrev=False)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in ARGUMENTS:
        meta = f.metadata
        group = groups.get(meta["section"]) or groups.setdefault(
            meta["section"], parser.add_argument_group(meta["section"]))
        help_text = meta["help"] + ("" if meta["status"] == DONE else f" [{meta['status']}: {meta['note'] or NOT_YET}]")
        help_text = help_text.replace("%", "%%")  # argparse %-formats help texts ('10%' in lr_warmup_steps)
        kind = kind_of(f)
        option = f"--{f.name}"
        if kind == "flag":
            group.add_argument(option, action="store_true", help=help_text)
        elif kind.endswith("_list"):
            group.add_argument(option, nargs="*", type=_CLI_TYPES[kind], help=help_text)
        else:
            choices = meta["choices"]
            cli_choices = [c for c in choices if c is not None] if choices else None
            if cli_choices and kind == "int":
                cli_choices = [int(c) for c in cli_choices]
            group.add_argument(option, type=_CLI_TYPES[kind], choices=cli_choices, help=help_text,
                               metavar=f.name.upper() if cli_choices else None)
    return parser


def flatten_config_toml(data: dict) -> dict[str, Any]:
    """sd-scripts' rule: top-level tables are sections whose keys are hoisted; the section names are ignored."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def read_config_file(path: str) -> tuple[Path, dict[str, Any]]:
    """Load an arguments TOML (`.toml` appended when missing, as sd-scripts does) into a flat dict."""
    import toml

    file = Path(path if path.lower().endswith(".toml") else path + ".toml")
    if not file.is_file():
        raise ConfigError(f"--config_file {path}: no such file ({file.resolve()}). Check the path; relative "
                          f"paths are taken from the current folder ({Path.cwd()}).")
    try:
        data = toml.loads(file.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not UTF-8 text. Save it as UTF-8 (in Notepad: Save as -> Encoding UTF-8).")
    except toml.TomlDecodeError as e:
        raise ConfigError(f"{file}: TOML syntax error at line {e.lineno}, column {e.colno}: {e.msg}. "
                          "Strings need quotes (resolution = \"512,512\"), paths may use '\\\\' or '/'.")
    return file, flatten_config_toml(data)


def check_toml_values(file: Path, values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    by_name = {f.name: f for f in ARGUMENTS}
    converted, problems = {}, []
    for key, value in values.items():
        if key not in by_name:
            problems.append(f"{file}: unknown key '{key}'{did_you_mean(key, ARGUMENT_NAMES)}. "
                            "Keys are sd-scripts argument names without the leading '--'.")
            continue
        try:
            converted[key] = convert_value(by_name[key], value)
        except ValueError as e:
            problems.append(f"{file}: key '{key}': {e}.")
    return converted, problems


# ---------------------------------------------------------------------------------------------------
# network_args: the keys sd-scripts' networks/lora.py (create_network) understands

NETWORK_ARGS_DONE = ("conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout", "block_dims",
                     "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight", "mid_lr_weight",
                     "up_lr_weight", "block_lr_zero_threshold", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                     "loraplus_text_encoder_lr_ratio")
NETWORK_ARGS_NOT_YET: tuple[str, ...] = ()  # networks.lora keys recognised but refused (none left)
# sd-scripts' networks/loha.py and lokr.py (branch feat-support-lokr-loha): no block-wise options there.
LOHA_ARGS_DONE = ("conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout", "use_tucker", "verbose",
                  "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
LOKR_ARGS_DONE = LOHA_ARGS_DONE + ("factor",)
DELTA_ARGS_NOT_YET = ("exclude_patterns", "include_patterns", "network_reg_dims", "network_reg_lrs",
                      "train_llm_adapter")
# lycoris.kohya's own spellings, mapped onto the native modules (algo=lora/locon -> LoRA, loha, lokr).
LYCORIS_ARGS_DONE = ("algo", "preset", "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout",
                     "factor", "use_tucker", "use_cp", "decompose_both", "dora_wd", "train_norm", "use_scalar")
LYCORIS_ALGOS = {"lora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr"}
LYCORIS_ALGOS_NOT_YET = ("ia3", "dylora", "glora", "full", "diag-oft", "boft", "oft")
LYCORIS_PRESETS = ("full", "attn-mlp")  # the layer sets our module selection matches (see docs/compatibility.md)
# Options that would change the file format or the maths, accepted only at their "off" value.
LYCORIS_FLAGS_NOT_YET = {"dora_wd": "DoRA (weight-decomposed LoRA, dora_scale keys)", "train_norm": "norm-layer training",
                         "use_scalar": "the trained scalar"}
NETWORK_ARGS_BY_MODULE = {"networks.lora": NETWORK_ARGS_DONE, "trainer.network.lora": NETWORK_ARGS_DONE,
                          "networks.loha": LOHA_ARGS_DONE, "networks.lokr": LOKR_ARGS_DONE,
                          "lycoris.kohya": LYCORIS_ARGS_DONE}
SUPPORTED_NETWORK_MODULES = tuple(NETWORK_ARGS_BY_MODULE)
_TRUE = ("true", "1", "yes")


def network_module_type(network_module: str | None, options: Mapping[str, str]) -> str:
    """"lora", "loha" or "lokr": the native module type a --network_module (and lycoris.kohya's algo=) trains."""
    module = network_module or "networks.lora"
    if module == "lycoris.kohya":
        return LYCORIS_ALGOS[options.get("algo", "lora").lower()]
    return {"networks.loha": "loha", "networks.lokr": "lokr"}.get(module, "lora")


def parse_network_args(items: Iterable[str] | None, sdxl: bool | None = None,
                       network_module: str | None = "networks.lora") -> dict[str, str]:
    """`["conv_dim=8", "conv_alpha=1"]` -> {"conv_dim": "8", "conv_alpha": "1"}; values stay strings (sd-scripts).

    The keys allowed are those `network_module` reads. The values are checked too. Per-block lists must have the
    block count of the model family (25 SD1.x/SD2.x, 23 SDXL); `sdxl=None` means the family is not known yet and
    either count passes."""
    module = network_module or "networks.lora"
    allowed = NETWORK_ARGS_BY_MODULE.get(module, NETWORK_ARGS_DONE)
    not_yet = DELTA_ARGS_NOT_YET if module in ("networks.loha", "networks.lokr") else NETWORK_ARGS_NOT_YET
    parsed, problems = {}, []
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            problems.append(f"--network_args '{item}': expected key=value, e.g. conv_dim=8")
        elif key in not_yet:
            problems.append(f"--network_args {key}: {NOT_YET} by this trainer for {module} (supported: "
                            f"{', '.join(allowed)}); remove it to train.")
        elif key not in allowed:
            problems.append(f"--network_args {key}: unknown key{did_you_mean(key, allowed + not_yet)}"
                            f"; {module} understands {', '.join(allowed)}.")
        else:
            parsed[key] = value.strip()
    if not problems and module == "lycoris.kohya":
        problems = _lycoris_problems(parsed)
    if not problems:
        problems = _network_value_problems(parsed, sdxl)
    if problems:
        raise ConfigError(problems)
    return parsed


def _lycoris_problems(options: dict[str, str]) -> list[str]:
    """algo and preset values we map, and the LyCORIS features we do not have, refused by name."""
    problems = []
    algo = options.get("algo", "lora").lower()
    if algo in LYCORIS_ALGOS_NOT_YET:
        problems.append(f"--network_args algo={algo}: LyCORIS' {algo} is {NOT_YET} by this trainer; use algo=lora, "
                        "locon, loha or lokr.")
    elif algo not in LYCORIS_ALGOS:
        problems.append(f"--network_args algo={algo}: unknown algorithm{did_you_mean(algo, tuple(LYCORIS_ALGOS))}; "
                        f"supported: {', '.join(LYCORIS_ALGOS)}.")
    preset = options.get("preset", "full").lower()
    if preset not in LYCORIS_PRESETS:
        problems.append(f"--network_args preset={preset}: {NOT_YET} by this trainer (supported: "
                        f"{', '.join(LYCORIS_PRESETS)}; they train the layers sd-scripts' networks.lora trains).")
    for key, what in LYCORIS_FLAGS_NOT_YET.items():
        if options.get(key, "false").lower() in _TRUE:
            problems.append(f"--network_args {key}=True: {what} is {NOT_YET} by this trainer; remove it (or set "
                            f"{key}=False) to train.")
    if "use_cp" in options:  # LyCORIS' older name for use_tucker
        options.setdefault("use_tucker", options["use_cp"])
    return problems


def _network_value_problems(options: dict[str, str], sdxl: bool | None) -> list[str]:
    problems = []
    for key, kind, low, high in (("conv_dim", int, 1, None), ("conv_alpha", float, None, None), ("factor", int, -1, None),
                                 ("rank_dropout", float, 0.0, 1.0), ("module_dropout", float, 0.0, 1.0)):
        text = options.get(key)
        if text is None or text == "None":
            continue
        try:
            value = kind(text)
        except ValueError:
            problems.append(f"--network_args {key}={text}: expected {'a whole number' if kind is int else 'a number'}")
            continue
        if (low is not None and value < low) or (high is not None and value >= high):
            bounds = f"at least {low}" if high is None else f"from {low} up to (not including) {high}"
            problems.append(f"--network_args {key}={text}: must be {bounds}")
    return problems + check_block_options(options, sdxl)


def _raw_options(v: dict[str, Any]) -> dict[str, str]:
    """--network_args as key -> value without checks (the check runs once, below, with every problem listed)."""
    options = dict(item.partition("=")[::2] for item in v["network_args"] or ())
    options = {k.strip(): value.strip() for k, value in options.items()}
    if options.get("algo", "lora").lower() not in LYCORIS_ALGOS:
        options.pop("algo", None)
    return options


def _check_network_files(v: dict[str, Any]) -> list[str]:
    """--dim_from_weights needs --network_weights; --base_weights files must exist (checked before models load)."""
    problems = []
    if v["dim_from_weights"] and not v["network_weights"]:
        problems.append("--dim_from_weights takes the LoRA shape from --network_weights, which is not given; "
                        "add --network_weights <file> or remove --dim_from_weights.")
    for path in v["base_weights"] or ():
        if not Path(path).is_file():
            problems.append(f"--base_weights {path}: file not found. Give the path of a LoRA .safetensors file.")
    multipliers = v["base_weights_multiplier"] or []
    if len(multipliers) > len(v["base_weights"] or []):
        log.warning("--base_weights_multiplier has %d values for %d --base_weights files; the extra ones are "
                    "ignored.", len(multipliers), len(v["base_weights"] or []))
    return problems


# ---------------------------------------------------------------------------------------------------
# From argv to TrainConfig


def default_values() -> dict[str, Any]:
    return {f.name: f.default for f in ARGUMENTS}


def parse_train_args(argv: Sequence[str], *, prog: str = "python -m trainer train") -> TrainConfig:
    """Command line (+ `--config_file` TOML; explicit CLI values win) -> a checked, frozen TrainConfig.

    Unknown command-line options fail like argparse does (exit status 2). Every other problem is gathered
    and raised as one ConfigError, so a user can fix the whole config in one pass."""
    cli = vars(build_parser(prog).parse_args(list(argv)))
    values = default_values()
    problems: list[str] = []
    if cli.get("config_file") and not cli.get("output_config"):  # with --output_config it is the target
        file, raw = read_config_file(cli["config_file"])
        from_file, problems = check_toml_values(file, raw)
        values.update(from_file)
    values.update(cli)
    if values.get("caption_extention") and "caption_extension" not in cli:
        values["caption_extension"] = values["caption_extention"]
    problems += _apply_aliases(values)
    problems += _check_statuses(values)
    problems += check_combinations(values)
    if problems:
        raise ConfigError(problems)
    return TrainConfig(**values)


def _apply_aliases(values: dict[str, Any]) -> list[str]:
    problems = []
    for legacy, name in (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion")):
        if values[legacy]:
            if values["optimizer_type"]:
                problems.append(f"--{legacy} and --optimizer_type {values['optimizer_type']} contradict each other;"
                                f" keep only --optimizer_type.")
            values["optimizer_type"] = values["optimizer_type"] or name
    if values["cache_latents_to_disk"]:
        values["cache_latents"] = True
    if values["cache_text_encoder_outputs_to_disk"]:
        values["cache_text_encoder_outputs"] = True
    if values["cache_text_encoder_outputs"] and not values["network_train_unet_only"] \
            and not values["network_train_text_encoder_only"]:
        log.warning("--cache_text_encoder_outputs: training the UNet LoRA only (--network_train_unet_only), "
                    "because cached text-encoder outputs cannot follow a text-encoder LoRA.")
        values["network_train_unet_only"] = True
    return problems


def _check_statuses(values: dict[str, Any]) -> list[str]:
    problems = []
    for f in ARGUMENTS:
        status, value = f.metadata["status"], values[f.name]
        if status == DONE or value == f.default or value in (None, [], ()):
            continue
        reason = f.metadata["note"] or NOT_YET
        if status == WARN:
            log.warning("--%s is ignored: %s.", f.name, reason)
        else:
            problems.append(f"--{f.name}: {reason}. Remove it from the command line or config "
                            "file (see docs/compatibility.md for what is supported).")
    return problems


def check_combinations(v: dict[str, Any]) -> list[str]:
    """sd-scripts' cross-argument rules (its train_util.verify_training_args) and a few of ours; returns the problems found."""
    problems = []
    if not v["pretrained_model_name_or_path"] and not v["output_config"] and not v["debug_dataset"]:
        problems.append("--pretrained_model_name_or_path is required: a .safetensors/.ckpt file, a diffusers folder "
                        "or builtin:tiny-sd1 (the demo model).")
    if not (v["train_data_dir"] or v["dataset_config"] or v["in_json"] or v["dataset_class"]) and not v["output_config"]:
        problems.append("No training images given: set --train_data_dir (the parent of folders like '10_mychar') "
                        "or --dataset_config.")
    if v["network_module"] not in SUPPORTED_NETWORK_MODULES:
        problems.append(f"--network_module {v['network_module']}: not supported by this trainer"
                        f"{did_you_mean(str(v['network_module']), SUPPORTED_NETWORK_MODULES)}. Supported: networks.lora "
                        "(LoRA, and LoCon with conv_dim), networks.loha (LoHa), networks.lokr (LoKr), lycoris.kohya "
                        "(algo=lora, locon, loha or lokr).")
    elif v["network_module"] != "networks.lora" and network_module_type(v["network_module"], _raw_options(v)) != "lora":
        if v["scale_weight_norms"]:
            log.warning("--scale_weight_norms is ignored: %s has no max-norm regularisation (sd-scripts ignores it "
                        "too, with a warning).", v["network_module"])
        if v["network_dropout"]:
            log.warning("--network_dropout is ignored: LoHa / LoKr have no neuron dropout (as in sd-scripts); "
                        "rank_dropout and module_dropout in --network_args work.")
    if v["network_train_unet_only"] and v["network_train_text_encoder_only"]:
        problems.append("--network_train_unet_only and --network_train_text_encoder_only together train nothing; "
                        "keep one.")
    if v["adaptive_noise_scale"] is not None and v["noise_offset"] is None:
        problems.append("--adaptive_noise_scale needs --noise_offset.")
    if v["scale_v_pred_loss_like_noise_pred"] and not v["v_parameterization"]:
        problems.append("--scale_v_pred_loss_like_noise_pred needs --v_parameterization.")
    if v["v_pred_like_loss"] and v["v_parameterization"]:
        problems.append("--v_pred_like_loss cannot be used with --v_parameterization.")
    if v["v2"] and v["clip_skip"] is not None:
        log.warning("--clip_skip with --v2: SD2 was trained on the penultimate layer already; this is usually "
                    "not what you want.")
    if v["log_with"] in ("tensorboard", "all") and not v["logging_dir"]:
        problems.append(f"--log_with {v['log_with']} writes TensorBoard logs, which need --logging_dir <folder>; "
                        "add it (or use --log_with wandb).")
    problems += _check_precision(v)
    problems += _check_sdxl(v)
    problems += _check_optimizer_options(v)
    if v["cache_latents"] and (v["color_aug"] or v["random_crop"]):
        problems.append("--cache_latents cannot be used with --color_aug or --random_crop (cached latents cannot "
                        "be augmented); drop one of them.")
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "vae_batch_size"):
        if v[name] is not None and v[name] < 1:
            problems.append(f"--{name} must be at least 1 (got {v[name]}).")
    if v["network_dim"] is not None and v["network_dim"] < 1:
        problems.append(f"--network_dim must be at least 1 (got {v['network_dim']}).")
    if v["max_train_epochs"] is not None and v["max_train_epochs"] < 1:
        problems.append(f"--max_train_epochs must be at least 1 (got {v['max_train_epochs']}).")
    if v["initial_epoch"] is not None and v["initial_epoch"] < 1:
        problems.append(f"--initial_epoch counts from 1 (got {v['initial_epoch']}).")
    if v["initial_step"] is not None and v["initial_step"] < 0:
        problems.append(f"--initial_step must be 0 or more (got {v['initial_step']}).")
    problems += _check_dataset_class(v)
    try:
        parse_network_args(v["network_args"], network_module=v["network_module"])
    except ConfigError as e:
        problems += e.problems
    problems += _check_network_files(v)
    return problems


FP8_NEEDS_MIXED_PRECISION = ("--fp8_base / --fp8_base_unet store weights in 8 bits and compute in 16: they need "
                             "--mixed_precision bf16 or fp16")


def _check_precision(v: dict[str, Any]) -> list[str]:
    """--full_fp16/--full_bf16 keep the LoRA itself in the autocast dtype (as sd-scripts); fp8 storage needs a
    16-bit compute dtype. (fp16 that falls back to fp32 on a CPU is caught at build time.)"""
    problems = [f"--full_{p} needs --mixed_precision {p} (got {v['mixed_precision']})."
                for p in ("fp16", "bf16") if v[f"full_{p}"] and v["mixed_precision"] != p]
    if (v["fp8_base"] or v["fp8_base_unet"]) and v["mixed_precision"] == "no":
        problems.append(FP8_NEEDS_MIXED_PRECISION + ".")
    if v["dynamo_backend"] != "inductor" and not v["torch_compile"]:
        log.warning("--dynamo_backend %s has no effect without --torch_compile.", v["dynamo_backend"])
    return problems


def _check_optimizer_options(v: dict[str, Any]) -> list[str]:
    """What can be told before any model loads: key=value syntax, warmup with a custom schedule, the
    piecewise_constant rules, weighted captions with cached text-encoder outputs."""
    problems = []
    scheduler_args: dict = {}
    try:
        parse_optimizer_args(v["optimizer_args"])
    except ConfigError as e:
        problems += e.problems
    try:
        scheduler_args = parse_scheduler_args(v["lr_scheduler_args"])
    except ConfigError as e:
        problems += e.problems
    schedule_free = (v["optimizer_type"] or "").lower().endswith("schedulefree")  # no schedule is used at all
    if v["lr_scheduler_type"] and v["lr_warmup_steps"] and not schedule_free:
        problems.append(f"--lr_scheduler_type {v['lr_scheduler_type']} does not use --lr_warmup_steps (as in "
                        "sd-scripts); set --lr_warmup_steps 0.")
    if v["lr_scheduler"] == "piecewise_constant" and not (v["lr_scheduler_type"] or schedule_free or problems) \
            and "step_rules" not in scheduler_args:
        problems.append("--lr_scheduler piecewise_constant needs its rules: --lr_scheduler_args "
                        "\"step_rules=1:10,0.1:20,0.01\" (lr x1 until step 10, x0.1 until step 20, then x0.01).")
    if v["weighted_captions"] and v["cache_text_encoder_outputs"]:
        problems.append("--weighted_captions cannot be used with --cache_text_encoder_outputs(_to_disk) here: the "
                        "cached outputs are unweighted. Remove one of them.")
    return problems


def _check_dataset_class(v: dict[str, Any]) -> list[str]:
    """--dataset_class replaces the folders and dataset TOMLs, as in sd-scripts."""
    if not v["dataset_class"]:
        return []
    ignored = [f"--{n}" for n in ("train_data_dir", "reg_data_dir", "dataset_config", "in_json") if v[n]]
    if ignored or v["validation_split"]:
        log.warning("--dataset_class: %s not used (the class serves every batch; no validation split).",
                    ", ".join(ignored + (["--validation_split"] if v["validation_split"] else [])))
    return [f"--{n} cannot be used with --dataset_class {v['dataset_class']}: the class serves its own batches "
            "(return \"latents\" from it to train on cached latents)." for n in
            ("cache_latents", "cache_text_encoder_outputs") if v[n]]


# Caption options that change a caption every step; cached text-encoder outputs cannot follow them.
PER_STEP_CAPTION_OPTIONS = ("shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                            "caption_tag_dropout_rate", "token_warmup_step")


def _check_sdxl(v: dict[str, Any]) -> list[str]:
    """sdxl_train_network.py's own rules (its assert_extra_args). Subset values from a dataset TOML are checked again
    when the dataset is built (trainer.train.text_cache)."""
    problems = []
    if v["sdxl"] and v["v2"]:
        problems.append("--v2 is for Stable Diffusion 2.x models and cannot be used with SDXL (--sdxl / "
                        "sdxl_train_network.py); remove --v2.")
    if v["sdxl"] and v["clip_skip"] is not None:
        log.warning("--clip_skip has no effect on SDXL: its text-encoder layers are fixed (as in sd-scripts).")
    if v["cache_text_encoder_outputs"]:
        for name in PER_STEP_CAPTION_OPTIONS:
            if v[name]:
                problems.append(f"--cache_text_encoder_outputs cannot be used with --{name}: the outputs are made "
                                f"once per image, but --{name} changes the caption every step. Remove --{name} or "
                                "--cache_text_encoder_outputs(_to_disk).")
        if v["network_train_text_encoder_only"]:
            problems.append("--cache_text_encoder_outputs trains the UNet LoRA only, and "
                            "--network_train_text_encoder_only the text encoders only: nothing would be trained. "
                            "Keep one of them.")
    if v["sdxl"] and v["text_encoder_lr"] and len(v["text_encoder_lr"]) > 1:
        log.warning("--text_encoder_lr: networks.lora uses the first value (%s) for both SDXL text encoders, as "
                    "sd-scripts does.", v["text_encoder_lr"][0])
    return problems


# ---------------------------------------------------------------------------------------------------
# Writing configs back


def non_default_values(cfg: TrainConfig) -> dict[str, Any]:
    """The arguments whose value differs from the default, as TOML-ready values (sd-scripts' --output_config)."""
    out = {}
    for f in ARGUMENTS:
        value = getattr(cfg, f.name)
        if f.name in ("config_file", "output_config", "wandb_api_key", "huggingface_token") or value == f.default:
            continue
        if kind_of(f) == "resolution" and value is not None:
            value = f"{value[0]},{value[1]}"
        out[f.name] = value
    return out


def write_output_config(cfg: TrainConfig) -> Path:
    """`--output_config`: write the non-default arguments as a flat TOML to --config_file; never overwrite."""
    import toml


    if not cfg.config_file:
        raise ConfigError("--output_config needs --config_file: the path of the TOML to write.")
    target = Path(cfg.config_file if cfg.config_file.lower().endswith(".toml") else cfg.config_file + ".toml")
    if target.exists():
        raise ConfigError(f"--output_config: {target} already exists; choose a new --config_file name "
                          "(nothing was overwritten).")
    atomic_write_text(target, toml.dumps(non_default_values(cfg)))
    return target
