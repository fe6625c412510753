"""Load the base model the user points at into diffusers / transformers classes.

Accepted, as in sd-scripts' `--pretrained_model_name_or_path`: a single-file `.safetensors` / `.ckpt` in the
original LDM layout (what civitai and most Hugging Face pages offer), a diffusers folder (`model_index.json`),
a hub id (`owner/name`, downloaded once into the standard HF cache), and `builtin:tiny-sd1`, a tiny random
model for the demo and smoke tests.

Unlike sd-scripts, nothing here needs the network for a local file: the component configs are shipped in
`configs/` and the CLIP tokenizers are built from a vocabulary file a PyPI package ships (tokenizer.py).
Everything that can go wrong because of what the user gave raises `ModelLoadError` with the fix spelled out.
Reading checkpoint files and telling what they hold lives in checkpoint.py; writing them in export.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from trainer.errors import ModelLoadError, did_you_mean
from trainer.models.checkpoint import (  # noqa: F401  (re-exported: trainer.models.load's public names)
    FAMILIES,
    SD1_TE,
    SD2_TE,
    SDXL_TE1,
    SDXL_TE2,
    UNET,
    VAE,
    WRONG_KIND,
    classify_checkpoint,
    corrupt_error,
    detect_family,
    normalise_te_keys,
    prediction_markers,
    read_checkpoint,
    read_checkpoint_shapes,
    short_message,
    torch_load,
)
from trainer.models.families import ARCHITECTURES, LATENT_SCALE, tokenizers_for
from trainer.models.tokenizer import openai_clip_tokenizer
from trainer.paths import MODEL_CONFIGS_DIR

logger = logging.getLogger(__name__)


class _DropEmptyFp32Warning(logging.Filter):
    """diffusers warns "modules that should be kept in float32: []" on every dtype cast, even with none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_DropEmptyFp32Warning())

CONFIG_DIR = MODEL_CONFIGS_DIR
BUILTIN_MODELS = {"tiny-sd1": "tiny-sd1"}
# sd-scripts trains every family with this DDPM schedule, whatever the model folder's scheduler says.
DDPM_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  clip_sample=False)
# The hub ids whose tokenizers sd-scripts saves under --tokenizer_cache_dir (with "/" -> "_").
TOKENIZER_IDS = {"sd1": ["openai/clip-vit-large-patch14"], "sd2": ["stabilityai/stable-diffusion-2"],
                 "sdxl": ["openai/clip-vit-large-patch14", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"]}
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
                "pytorch_model.bin")

_FLAG_FOR_FAMILY = {"sd1": "no --v2 and the SD1/SD2 script (train_network)",
                    "sd2": "--v2 (and --v_parameterization for a 768-v model) with train_network",
                    "sdxl": "the SDXL script (sdxl_train_network), without --v2"}


@dataclass
class LoadedModels:
    """Everything training needs from the base model; `name`/`source_file` feed the ss_* metadata."""

    family: str  # "sd1" | "sd2" | "sdxl"
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoders: list  # [CLIPTextModel] or, for SDXL, [CLIPTextModel, CLIPTextModelWithProjection]
    tokenizers: list  # transformers CLIPTokenizer, one per text encoder
    noise_scheduler: Any  # diffusers DDPMScheduler with sd-scripts' betas
    v_parameterization: bool
    latent_scale: float
    name: str  # what ss_sd_model_name says: a file/folder's basename, a hub id or the builtin name
    source_file: Path | None  # the single file to hash for ss_sd_model_hash; None for folders and builtins


def load_models(name_or_path: str, *, v2: bool = False, v_parameterization: bool = False, sdxl: bool = False,
                vae: str | None = None, tokenizer_cache_dir: str | None = None, dtype=None,
                vae_dtype=None) -> LoadedModels:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and the DDPM scheduler for training.

    The flags are cross-checked against what the weights say; a mismatch is a ModelLoadError naming the flag,
    because the tokenizer padding, text-encoder layer choice and LoRA key names all depend on the family.
    `dtype` is the storage dtype of the frozen weights (default float32); `vae_dtype` defaults to `dtype`
    (pass float32 for --no_half_vae). Floating weights are cast tensor by tensor while reading, so an fp32
    file loaded as fp16 never sits in memory as a full fp32 copy.
    """
    import torch

    dtype = dtype or torch.float32
    vae_dtype = vae_dtype or dtype
    spec = _strip_quotes(str(name_or_path))
    flags = dict(v2=v2, sdxl=sdxl, v_parameterization=v_parameterization)  # checked before weights are read
    path = Path(spec).expanduser()
    if spec.startswith("builtin:"):
        parts = _load_builtin(spec, dtype, vae_dtype, flags)
    elif path.is_dir():
        parts = _load_diffusers_folder(path.resolve(), spec, dtype, vae_dtype, tokenizer_cache_dir, flags)
    elif path.is_file():
        parts = _load_single_file(path.resolve(), dtype, vae_dtype, tokenizer_cache_dir, flags)
    elif looks_like_hub_id(spec):
        parts = _load_diffusers_folder(_download_from_hub(spec), spec, dtype, vae_dtype, tokenizer_cache_dir,
                                       flags)
    else:
        raise missing_path_error(path)
    if path.exists() and not spec.startswith("builtin:"):
        parts["name"] = path.name or path.resolve().name  # as given: a symlink keeps its own name
    if vae:
        parts["vae"] = load_vae(vae, parts["config_root"], vae_dtype)
    return LoadedModels(family=parts["family"], unet=parts["unet"], vae=parts["vae"],
                        text_encoders=parts["text_encoders"], tokenizers=parts["tokenizers"],
                        noise_scheduler=training_scheduler(v_parameterization), v_parameterization=v_parameterization,
                        latent_scale=LATENT_SCALE[parts["family"]], name=parts["name"],
                        source_file=parts.get("source_file"))


def load_for_drawing(name_or_path: str, *, v2: bool = False, sdxl: bool = False, v_parameterization: bool = False,
                     vae: str | None = None):
    """The base model ready to draw pictures with (regimages, compare): on the GPU in fp16 when there is one
    (SDXL's VAE stays fp32: it overflows in fp16), else on the CPU in fp32, in eval mode. The family and a
    single file's v-prediction marker are read from the weights, so the flags are needed only where the
    weights cannot say (an SD 2 768-v diffusers folder). Returns (LoadedModels, device)."""
    import torch

    family = detect_model_family(name_or_path)
    path = Path(_strip_quotes(str(name_or_path))).expanduser()
    marked = path.suffix.lower() == ".safetensors" and "v_pred" in prediction_markers(read_checkpoint_shapes(path))
    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    models = load_models(name_or_path, v2=v2 or family == "sd2", sdxl=sdxl or family == "sdxl",
                         v_parameterization=v_parameterization or marked, vae=vae, dtype=dtype,
                         vae_dtype=torch.float32 if family == "sdxl" else dtype)
    device = torch.device("cuda" if cuda else "cpu")
    for part in (models.unet, models.vae, *models.text_encoders):
        part.to(device).eval()
    return models, device


def training_scheduler(v_parameterization: bool):
    """The DDPM schedule sd-scripts trains every family with, for epsilon or v-prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**DDPM_BETAS, prediction_type="v_prediction" if v_parameterization else "epsilon")


def models_from_parts(parts: dict, architecture: str, *, v_parameterization: bool = False,
                      name: str | None = None) -> LoadedModels:
    """LoadedModels around a shipped architecture built with random weights (trainer.models.families'
    `build_architecture`: real tensors for bench, fake ones for the memory estimate)."""
    arch = ARCHITECTURES[architecture]
    v_parameterization = v_parameterization or arch.v_parameterization
    return LoadedModels(family=arch.family, unet=parts["unet"], vae=parts["vae"], text_encoders=parts["text_encoders"],
                        tokenizers=tokenizers_for(arch.family), noise_scheduler=training_scheduler(v_parameterization),
                        v_parameterization=v_parameterization, latent_scale=LATENT_SCALE[arch.family],
                        name=name or f"random:{architecture}", source_file=None)


# ---------------------------------------------------------------------------------------------------------------
# Family and flag checks


def detect_model_family(name_or_path: str) -> str:
    """"sd1" | "sd2" | "sdxl" of what load_models would load, without building any model: for tools
    (merge, export) that take the family from the weights instead of from --v2 / the script choice."""
    spec = _strip_quotes(str(name_or_path))
    path = Path(spec).expanduser()
    if spec.startswith("builtin:"):
        key = spec.split(":", 1)[1]
        if key not in BUILTIN_MODELS:
            raise ModelLoadError(f'Unknown built-in model "{spec}"{did_you_mean(key, BUILTIN_MODELS)}.')
        return "sd1"
    if path.is_dir():
        return _folder_family(path.resolve())
    if path.is_file():
        return detect_family(read_checkpoint_shapes(path.resolve()), f'"{path.resolve()}"')
    if looks_like_hub_id(spec):
        return _folder_family(_download_from_hub(spec))
    raise missing_path_error(path)


def _check_family_flags(family: str, *, v2: bool, sdxl: bool, v_parameterization: bool, source: str,
                        v_pred_marker: bool = False,
                        scheduler_prediction: str | None = None) -> None:
    """A family/flag mismatch is an error: SD1 and SD2 differ in tokenizer padding and text-encoder layers,
    SDXL in everything, so silently "fixing" it would train something other than what the flags say."""
    problem = None
    if family == "sdxl" and not sdxl:
        problem = "is an SDXL model, but the SD1/SD2 trainer was asked for"
    elif family != "sdxl" and sdxl:
        problem = f"is an {family.upper()} model, but the SDXL trainer (sdxl_train_network) was asked for"
    elif family == "sdxl" and v2:
        problem = "is an SDXL model, and --v2 is only for SD 2.x models: remove --v2"
    elif family == "sd2" and not v2:
        problem = "is an SD 2.x model (OpenCLIP text encoder, 1024-d), but --v2 is not set: add --v2"
    elif family == "sd1" and v2:
        problem = "is an SD 1.x model (CLIP-L text encoder, 768-d), but --v2 is set: remove --v2"
    if problem:
        raise ModelLoadError(f"{source} {problem}. Fix: for this model use {_FLAG_FOR_FAMILY[family]}.")
    if v_parameterization and family != "sd2" and not v_pred_marker:
        logger.warning("--v_parameterization is set for an %s model; v-prediction is normally used with SD 2.x "
                       "768-v models. Remove it unless this model was trained with v-prediction.", family)
    if scheduler_prediction == "v_prediction" and not v_parameterization:
        logger.warning("%s says its prediction_type is v_prediction, but --v_parameterization is not set; "
                       "add --v_parameterization for a v-prediction model.", source)


# ---------------------------------------------------------------------------------------------------------------
# The built-in demo model


def _load_builtin(spec: str, dtype, vae_dtype, flags: dict) -> dict:
    """A tiny random SD1-topology model, the same on every call, without touching the caller's RNG."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    key = spec.split(":", 1)[1]
    if key not in BUILTIN_MODELS:
        raise ModelLoadError(f'Unknown built-in model "{spec}"{did_you_mean(key, BUILTIN_MODELS)}. '
                             f"Available: {', '.join('builtin:' + k for k in BUILTIN_MODELS)}.")
    _check_family_flags("sd1", source=spec, **flags)
    root = CONFIG_DIR / BUILTIN_MODELS[key]
    with torch.random.fork_rng(devices=[]):  # weights are fixed; training seeds stay as the caller set them
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(root / "text_encoder" / "config.json"))
    return dict(family="sd1", unet=unet.to(dtype).eval(), vae=vae.to(vae_dtype).eval(),
                text_encoders=[text_encoder.to(dtype).eval()], tokenizers=[openai_clip_tokenizer()],
                name=spec, source_file=None, config_root=root)


# ---------------------------------------------------------------------------------------------------------------
# Diffusers folders and hub ids


def _load_diffusers_folder(folder: Path, spec: str, dtype, vae_dtype, tokenizer_cache_dir, flags: dict) -> dict:
    """Each component from its subfolder, offline; the family from the configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    family = _folder_family(folder)
    is_path = Path(spec).expanduser().exists()
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    prediction = _read_json(scheduler_file).get("prediction_type") if scheduler_file.is_file() else None
    _check_family_flags(family, source=f'"{folder}"' if is_path else f'"{spec}"', scheduler_prediction=prediction,
                        **flags)
    unet = _from_pretrained(UNet2DConditionModel, folder, "unet", dtype)
    vae = _from_pretrained(AutoencoderKL, folder, "vae", vae_dtype)
    encoders = [_from_pretrained(CLIPTextModel, folder, "text_encoder", dtype)]
    if family == "sdxl":
        encoders.append(_from_pretrained(CLIPTextModelWithProjection, folder, "text_encoder_2", dtype))
    tokenizers = _folder_tokenizers(folder, family, tokenizer_cache_dir)
    return dict(family=family, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers, name=spec,
                source_file=None, config_root=folder)


def _folder_family(folder: Path) -> str:
    """Family of a diffusers folder from model_index.json and the text-encoder / UNet configs."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise _folder_without_index_error(folder)
    index = _read_json(index_file)
    for part in ("unet", "vae", "text_encoder"):
        if not (folder / part / "config.json").is_file():
            extra = "" if part != "text_encoder" or "text_encoder_2" not in index else \
                " (a folder with only text_encoder_2 is an SDXL refiner, which cannot be trained as a base)"
            raise ModelLoadError(
                f'The diffusers folder "{folder}" has no {part}/config.json{extra}. Expected a Stable Diffusion '
                f"1.x/2.x/XL folder with unet/, vae/, text_encoder/ (and text_encoder_2/ for SDXL). Fix: "
                f"download the complete folder, or use a single-file .safetensors checkpoint.")
    unet_cfg = _read_json(folder / "unet" / "config.json")
    if unet_cfg.get("in_channels", 4) != 4:
        raise ModelLoadError(f'"{folder}" {WRONG_KIND["inpaint"]}')
    if "text_encoder_2" in index or unet_cfg.get("addition_embed_type") == "text_time":
        return "sdxl"
    hidden = _read_json(folder / "text_encoder" / "config.json").get("hidden_size")
    return "sd2" if hidden == 1024 else "sd1"


def _from_pretrained(cls, folder: Path, sub: str, dtype):
    """One component from a diffusers folder, offline, in `dtype`; failures name the subfolder."""
    kwargs = dict(subfolder=sub, local_files_only=True)
    kwargs["torch_dtype" if cls.__module__.startswith("diffusers") else "dtype"] = dtype
    try:
        return cls.from_pretrained(str(folder), **kwargs).eval()
    except Exception as e:  # OSError (missing file), SafetensorError (truncated), ValueError (shape), ...
        found = sorted(p.name for p in (folder / sub).iterdir()) if (folder / sub).is_dir() else []
        raise ModelLoadError(
            f'Could not load {sub}/ of the diffusers folder "{folder}": {short_message(e)}\n'
            f"Files there: {', '.join(found) or 'none'}. Expected {sub}/config.json and one weights file "
            f"({' or '.join(WEIGHT_FILES[:2] if sub in ('unet', 'vae') else WEIGHT_FILES[2:])}). Fix: "
            f"download that file again (a truncated download is the usual cause).") from None


def _folder_tokenizers(folder: Path, family: str, cache_dir: str | None) -> list:
    """The folder's tokenizer/ (and tokenizer_2/) when present, else the offline-built CLIP tokenizer."""
    from transformers import CLIPTokenizer

    fallback = _default_tokenizers(family, cache_dir)
    result = []
    for i, sub in enumerate(["tokenizer", "tokenizer_2"][:len(fallback)]):
        tok = None
        if (folder / sub).is_dir():
            try:
                tok = CLIPTokenizer.from_pretrained(str(folder / sub), local_files_only=True)
            except Exception as e:
                logger.warning("Could not read %s (%s); using the built-in CLIP tokenizer.", folder / sub, short_message(e))
        if tok is not None and i == 1:
            tok.pad_token = "!"  # sd-scripts forces SDXL tokenizer 2's pad id to 0 ("!")
        result.append(tok or fallback[i])
    return result


def _default_tokenizers(family: str, cache_dir: str | None) -> list:
    """sd-scripts' tokenizers (the hub ids above): from --tokenizer_cache_dir if saved there, else built offline."""
    from transformers import CLIPTokenizer

    result = []
    for i, hub_id in enumerate(TOKENIZER_IDS[family]):
        pad_bang = family == "sd2" or i == 1  # SD2 and SDXL tokenizer 2 pad with "!" (id 0)
        cached = Path(cache_dir) / hub_id.replace("/", "_") if cache_dir else None
        if cached is not None and (cached / "tokenizer_config.json").is_file():
            tok = CLIPTokenizer.from_pretrained(str(cached), local_files_only=True)
            if pad_bang:
                tok.pad_token = "!"
        else:
            tok = openai_clip_tokenizer(pad_token="!") if pad_bang else openai_clip_tokenizer()
        result.append(tok)
    return result


def _download_from_hub(repo_id: str, patterns: list[str] | None = None) -> Path:
    """A diffusers repo from the hub into the standard HF cache (only configs, tokenizers and weights)."""
    from huggingface_hub import snapshot_download

    patterns = patterns or ["model_index.json", "*/config.json", "scheduler/*.json", "tokenizer*/*",
                            "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                            "text_encoder*/model.safetensors"]
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except Exception as e:
        if offline or "offline" in str(e).lower() or isinstance(e, (ConnectionError, TimeoutError)):
            reason = "the hub cannot be reached (offline mode: HF_HUB_OFFLINE is set)" if offline \
                else "the hub cannot be reached (no network)"
            raise ModelLoadError(
                f'"{repo_id}" is not a local file or folder, and looks like a Hugging Face hub id, but {reason} '
                f"and it is not in the local HF cache. Fix: give the path of a downloaded .safetensors file or "
                f"diffusers folder, or run once with network access to cache it.") from None
        raise ModelLoadError(
            f'"{repo_id}" is not a local file or folder, and downloading it as a Hugging Face hub id failed: '
            f"{short_message(e)}. Fix: check the path (or the repo id, and whether the repo needs a login).") from None


# ---------------------------------------------------------------------------------------------------------------
# Single-file LDM checkpoints


def _load_single_file(path: Path, dtype, vae_dtype, tokenizer_cache_dir, flags: dict) -> dict:
    """A .safetensors/.ckpt in the original LDM layout, converted with diffusers' single-file mapping and
    the shipped configs (no network)."""
    raw = None if path.suffix.lower() == ".safetensors" else torch_load(path)  # a pickle is read only once
    shapes = read_checkpoint_shapes(path) if raw is None else {k: tuple(v.shape) for k, v in raw.items()}
    family = detect_family(shapes, f'"{path}"')
    _check_family_flags(family, source=f'"{path}"', v_pred_marker="v_pred" in prediction_markers(shapes), **flags)
    root = CONFIG_DIR / _config_variant(family, shapes, flags["v_parameterization"], path)
    state = normalise_te_keys(read_checkpoint(path, lambda k: vae_dtype if k.startswith(VAE) else dtype, raw))
    del raw
    unet = _component_from_ldm("UNet2DConditionModel", state, root, "unet", dtype, path)
    vae = _component_from_ldm("AutoencoderKL", state, root, "vae", vae_dtype, path)
    encoders = [_component_from_ldm("CLIPTextModel", state, root, "text_encoder", dtype, path)]
    if family == "sdxl":
        encoders.append(_component_from_ldm("CLIPTextModelWithProjection", state, root, "text_encoder_2", dtype,
                                            path))
    del state
    return dict(family=family, unet=unet, vae=vae, text_encoders=encoders,
                tokenizers=_default_tokenizers(family, tokenizer_cache_dir), name=path.name, source_file=path,
                config_root=root)


def _config_variant(family: str, shapes: Mapping[str, tuple], v_parameterization: bool, path: Path) -> str:
    """Which shipped config folder fits: by family, v-prediction (SD2) and the text-encoder width."""
    width_key = {"sd1": SD1_TE, "sd2": SD2_TE, "sdxl": SDXL_TE1}[family]
    widths = [s[-1] for k, s in shapes.items() if k.startswith(width_key) and k.endswith("token_embedding.weight")]
    width = widths[0] if widths else None
    expected = {"sd1": 768, "sd2": 1024, "sdxl": 768}[family]
    if family == "sd1" and width == 32:
        return "tiny-sd1"  # the built-in demo model saved as a single file
    if width is not None and width != expected:
        raise ModelLoadError(
            f'"{path}" looks like an {family.upper()} checkpoint, but its text encoder is {width}-d instead of '
            f"{expected}-d, so it is a custom architecture that cannot be loaded with the standard configs. "
            f"Fix: convert it to a diffusers folder (with its own configs) and point at that folder.")
    if family == "sd2":
        return "sd2-768-v" if v_parameterization else "sd2-512"
    return {"sd1": "sd15", "sdxl": "sdxl"}[family]



def _component_from_ldm(class_name: str, state: dict, root: Path, sub: str, dtype, path: Path):
    """One component via diffusers' LDM->diffusers mapping; a weight left unloaded is an error, not noise."""
    import diffusers
    import transformers
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    try:
        if class_name.startswith("CLIP"):
            model = create_diffusers_clip_model_from_ldm(getattr(transformers, class_name), state, subfolder=sub,
                                                         config=str(root), torch_dtype=dtype,
                                                         local_files_only=True)
        else:
            model = getattr(diffusers, class_name).from_single_file(state, config=str(root), subfolder=sub,
                                                                    local_files_only=True, torch_dtype=dtype)
    except Exception as e:  # shape mismatch, missing component, ...
        raise ModelLoadError(f'Could not load the {sub} from "{path}": {short_message(e)}. The file does not match the '
                             f"{root.name} architecture it was detected as; it may be damaged or a "
                             f"modified architecture. Fix: re-download it, or use a diffusers folder.") from None
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelLoadError(f'"{path}" is missing {len(missing)} {sub} weights (e.g. {missing[0]}); the '
                             f"file is incomplete or pruned too far. Fix: download the full checkpoint again.")
    return model.eval()



# ---------------------------------------------------------------------------------------------------------------
# --vae


def load_vae(spec: str, config_root: Path, dtype):
    """A replacement VAE: diffusers folder (itself, or its vae/), or a single file (LDM keys with or without
    `first_stage_model.`, or diffusers keys). Shapes come from the base model's VAE config in config_root."""
    from diffusers import AutoencoderKL

    spec = _strip_quotes(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path.resolve()
        if (path / "vae" / "config.json").is_file():
            return _from_pretrained(AutoencoderKL, path, "vae", dtype)
        if (path / "config.json").is_file():
            return _from_pretrained(AutoencoderKL, path, "", dtype)
        raise ModelLoadError(f'--vae "{path}" is a folder without config.json or vae/config.json. Fix: point '
                             f"--vae at a diffusers VAE folder (or a model folder with vae/) or a .safetensors "
                             f"VAE file.")
    if not path.is_file():
        if looks_like_hub_id(spec):
            return _from_pretrained(AutoencoderKL, _download_from_hub_vae(spec), "", dtype)
        raise missing_path_error(path, what="--vae")
    path = path.resolve()
    shapes = read_checkpoint_shapes(path)
    kind = classify_checkpoint(shapes)
    if kind not in ("vae", "sd1", "sd2", "sdxl", "diffusers-component"):
        raise ModelLoadError(f'--vae "{path}" {WRONG_KIND[kind]}'.replace("not a base model", "not a VAE"))
    state = read_checkpoint(path, lambda k: dtype)
    if kind == "diffusers-component" or any(k.startswith("encoder.down_blocks.") for k in state):
        return _vae_from_diffusers_keys(state, config_root, dtype, path)
    if kind == "vae" and not any(k.startswith(VAE) for k in state):
        state = {VAE + k: v for k, v in state.items()}
    return _component_from_ldm("AutoencoderKL", state, config_root, "vae", dtype, path)


def _vae_from_diffusers_keys(state: dict, config_root: Path, dtype, path: Path):
    """A VAE file already in diffusers key layout (e.g. a folder's diffusion_pytorch_model.safetensors)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    with init_empty_weights():
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(config_root), subfolder="vae"))
    try:
        vae.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelLoadError(f'--vae "{path}" does not fit this model\'s VAE: {short_message(e)}. Fix: use a VAE made '
                             f"for this model family.") from None
    return vae.to(dtype).eval()


def _download_from_hub_vae(repo_id: str) -> Path:
    """sd-scripts tries the repo root, then vae/ (a VAE repo or a whole model's repo)."""
    folder = _download_from_hub(repo_id, ["config.json", "diffusion_pytorch_model.safetensors",
                                          "vae/config.json", "vae/diffusion_pytorch_model.safetensors"])
    return folder / "vae" if (folder / "vae" / "config.json").is_file() else folder


# ---------------------------------------------------------------------------------------------------------------
# Messages


def missing_path_error(path: Path, what: str = "--pretrained_model_name_or_path") -> ModelLoadError:
    hint = ""
    parent = path.parent
    if parent.is_dir():
        hint = did_you_mean(path.name, [p.name for p in parent.iterdir()])
    elif str(path) and not parent.exists():
        hint = f' (the folder "{parent}" does not exist either)'
    return ModelLoadError(
        f'{what} "{path}" does not exist{hint}. Expected a .safetensors/.ckpt file, a diffusers folder '
        f'(with model_index.json), a Hugging Face hub id like "owner/name", or builtin:tiny-sd1. Fix: check '
        f"the path (copy it from the file's properties; quotes are not needed in a TOML string).")


def _folder_without_index_error(folder: Path) -> ModelLoadError:
    if (folder / "config.json").is_file() and (folder.parent / "model_index.json").is_file():
        return ModelLoadError(
            f'"{folder}" is the {folder.name}/ part of a diffusers folder, not the whole model. Fix: point '
            f'--pretrained_model_name_or_path at the folder above it, "{folder.parent}".')
    files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES)
    hint = (f" It contains {', '.join(files[:5])}: to use one, give the path of that file instead, e.g. "
            f'"{folder / files[0]}".') if files else ""
    return ModelLoadError(
        f'"{folder}" is a folder but has no model_index.json, so it is not a diffusers model folder.{hint} '
        f"Expected a diffusers folder (model_index.json, unet/, vae/, text_encoder/) or a single "
        f".safetensors/.ckpt checkpoint file. Fix: point --pretrained_model_name_or_path at one of those.")



def looks_like_hub_id(spec: str) -> bool:
    """owner/name that is not a local path (a local "owner" folder means the user meant a path)."""
    return bool(HUB_ID.fullmatch(spec)) and not Path(spec).parent.is_dir()


def _strip_quotes(text: str) -> str:
    """Windows "Copy as path" wraps paths in quotes; a TOML string then carries them literally."""
    text = text.strip()
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'" else text



def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f'"{path}" is not valid JSON ({short_message(e)}). Fix: download it again.') from None
