"""What a checkpoint file holds, read without building any model: its tensors (safely), its key -> shape
table (for .safetensors from the header alone), and what kind of file it is (an SD1/SD2/SDXL base model, or
a LoRA, a VAE, a refiner, ... given by mistake), with the message a user sees for each wrong kind.

Split out of load.py so that loading (building models) and export (writing this layout) share one reader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from trainer.errors import ModelLoadError

SD1_TE = "cond_stage_model.transformer."
SD2_TE = "cond_stage_model.model."
SDXL_TE1 = "conditioner.embedders.0.transformer."
SDXL_TE2 = "conditioner.embedders.1.model."
UNET = "model.diffusion_model."
VAE = "first_stage_model."
FAMILIES = ("sd1", "sd2", "sdxl")


# ---------------------------------------------------------------------------------------------------------------
# What kind of file


def detect_family(shapes: Mapping[str, tuple], source: str = "the checkpoint") -> str:
    """"sd1" | "sd2" | "sdxl" from an LDM state dict's key -> shape map (no weights needed).

    Anything that is not a full SD base model (a LoRA, a VAE, an SDXL refiner, a diffusers component file,
    an unknown safetensors) raises ModelLoadError saying what the file looks like and what to do.
    """
    kind = classify_checkpoint(shapes)
    if kind in ("sd1", "sd2", "sdxl"):
        return kind
    raise ModelLoadError(f"{source} {WRONG_KIND[kind]}")


WRONG_KIND = {
    "lora": "is a LoRA / LyCORIS file (its keys start with lora_ or hold lora_down/lora_up weights), not a "
            "base model. Fix: set --pretrained_model_name_or_path to the Stable Diffusion checkpoint the LoRA "
            "was trained on; use --network_weights to continue training this LoRA.",
    "vae": "holds only VAE weights (encoder./decoder.), not a full base model. Fix: pass it as --vae and set "
           "--pretrained_model_name_or_path to a full SD checkpoint.",
    "embedding": "is a textual-inversion embedding, not a base model. Fix: point "
                 "--pretrained_model_name_or_path at a full SD checkpoint.",
    "sdxl-refiner": "is an SDXL refiner, which cannot be trained as a base model. Fix: use the SDXL base "
                    "checkpoint (or a model fine-tuned from it).",
    "inpaint": "is an inpainting model (its UNet takes 9 input channels); LoRA training needs a normal "
               "text-to-image model (4 input channels). Fix: use the non-inpainting version of the model.",
    "unet-only": "has UNet weights (model.diffusion_model.*) but no text encoder, so it is not a complete "
                 "SD checkpoint. Fix: download the full checkpoint (the 'full' or 'pruned' file, not a "
                 "UNet-only one), or use a diffusers folder.",
    "diffusers-component": "holds diffusers-format weights of a single component (for example a folder's "
                           "unet/diffusion_pytorch_model.safetensors). Fix: point --pretrained_model_name_or_path "
                           "at the diffusers folder that contains model_index.json instead.",
    "text-encoder-only": "holds only text-encoder weights, not a full base model. Fix: use the full SD "
                         "checkpoint.",
    "unknown": "is not a Stable Diffusion checkpoint this trainer recognises (expected SD1.x, SD2.x or SDXL "
               "in the original LDM layout: keys model.diffusion_model.*, first_stage_model.*, and "
               "cond_stage_model.* or conditioner.embedders.*). Fix: check that you picked the right file; "
               "models of other architectures (SD3, Flux, ...) are not supported.",
}


def classify_checkpoint(shapes: Mapping[str, tuple]) -> str:
    """What an LDM-layout state dict holds: a family name, or one of the keys of WRONG_KIND."""
    keys = list(shapes)
    if not keys:
        return "unknown"
    if any(k.startswith(("lora_", "lycoris_")) or ".lora_down." in k or ".lora.down." in k or ".lora_A." in k
           or "hada_w1" in k or "lokr_w1" in k for k in keys):
        return "lora"
    if any(k in ("emb_params", "string_to_param", "clip_l", "clip_g") or k.startswith("string_to_param.")
           for k in keys) and len(keys) <= 4:
        return "embedding"
    has_unet = any(k.startswith(UNET) for k in keys)
    conv_in = tuple(shapes.get(UNET + "input_blocks.0.0.weight", ()))
    if len(conv_in) == 4 and conv_in[1] != 4:  # 9 = latents + mask + masked image
        return "inpaint"
    if any(k.startswith("conditioner.embedders.") for k in keys):
        if not any(k.startswith(SDXL_TE1) for k in keys) and any(k.startswith("conditioner.embedders.0.model.")
                                                                  for k in keys):
            return "sdxl-refiner"
        return "sdxl" if has_unet else "text-encoder-only"
    has_te = any(k.startswith("cond_stage_model.") for k in keys)
    if has_unet and has_te:
        return _sd1_or_sd2(shapes)
    if has_unet:
        return "unet-only"
    if has_te:
        return "text-encoder-only"
    if all(k.startswith((VAE, "encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in keys):
        return "vae"
    if any(k.startswith(("down_blocks.", "up_blocks.", "mid_block.", "text_model.", "encoder.layers."))
           for k in keys):
        return "diffusers-component"
    return "unknown"


def _sd1_or_sd2(shapes: Mapping[str, tuple]) -> str:
    """SD2 uses OpenCLIP ViT-H (cond_stage_model.model., 1024-d); SD1 uses OpenAI CLIP-L (transformer., 768-d).

    The layout decides. v-prediction is not in the layout: see `prediction_markers`.
    """
    if any(k.startswith(SD2_TE) for k in shapes):
        return "sd2"
    return "sd1"


# Empty tensors some fine-tunes (NoobAI v-pred and other SDXL anime models) carry to say how they were trained;
# ComfyUI reads them: "v_pred" = v-prediction, "ztsnr" (with v_pred) = zero terminal SNR, "edm_vpred.*" = EDM.
PREDICTION_MARKERS = ("v_pred", "ztsnr", "edm_vpred.sigma_max", "edm_vpred.sigma_min")


def prediction_markers(shapes: Mapping[str, tuple]) -> set[str]:
    return {key for key in PREDICTION_MARKERS if key in shapes}


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_checkpoint_shapes(path: Path) -> dict[str, tuple]:
    """key -> shape of a checkpoint; for .safetensors from the header alone (also catches truncation)."""
    if path.suffix.lower() == ".safetensors":
        return {k: tuple(v["shape"]) for k, v in _safetensors_header(path).items()}
    return {k: tuple(v.shape) for k, v in torch_load(path).items()}


def read_checkpoint(path: Path, dtype_for, preloaded: dict | None = None) -> dict:
    """All tensors of a checkpoint (EMA copies skipped), floating ones cast to `dtype_for(key)` one by one."""
    skip = ("model_ema.",)
    if preloaded is None and path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        out = {}
        try:
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    if not k.startswith(skip):
                        out[k] = _cast(f.get_tensor(k), dtype_for(k))
        except Exception as e:
            raise corrupt_error(path, f"reading it failed ({short_message(e)})") from None
        return out
    source = preloaded if preloaded is not None else torch_load(path)
    return {k: _cast(v, dtype_for(k)) for k, v in source.items() if not k.startswith(skip)}


def _cast(t, dtype):
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def _safetensors_header(path: Path) -> dict:
    """The tensor table of a .safetensors file, checked against the file size (truncated downloads)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or n > min(size - 8, 200_000_000):
            text = head + f.read(200)
            if text.lstrip().lower().startswith((b"<!doctype", b"<html", b"{")):
                raise corrupt_error(path, "it is a web page or text file, not model weights (the download site "
                                           "probably sent a login or error page)")
            raise corrupt_error(path, "it does not start with a safetensors header")
        raw = f.read(n)
    try:
        table = json.loads(raw.decode("utf-8"))
        table.pop("__metadata__", None)
        end = max((int(v["data_offsets"][1]) for v in table.values()), default=0)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise corrupt_error(path, "its header is damaged (or it was cut short inside the header)") from None
    if 8 + n + end > size:
        raise corrupt_error(path, f"it is {size / 2**20:.1f} MiB but its header describes "
                                   f"{(8 + n + end) / 2**20:.1f} MiB: the download was cut short")
    return table


def torch_load(path: Path) -> dict:
    """A .ckpt/.pt state dict via torch.load(weights_only=True): tensors only, no code runs."""
    import pickle

    import torch

    if not _looks_like_torch_file(path):
        raise corrupt_error(path, "it is not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" in str(e) or "zipfile" in str(e).lower() and "legacy" in str(e).lower():
            obj = _torch_load_no_mmap(path, torch)
        else:
            raise corrupt_error(path, f"torch could not read it ({short_message(e)})") from None
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, which would run the file's code: not repeated here
        raise ModelLoadError(
            f'"{path}" is a pickle that needs more than plain tensors to load. It is refused because loading such '
            f"a file can run arbitrary code. Fix: convert it to .safetensors with a trusted tool, or download the "
            f".safetensors version of the model.") from None
    except (EOFError, OSError, ValueError) as e:
        raise corrupt_error(path, f"torch could not read it ({short_message(e)})") from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning checkpoints wrap the weights
    if not isinstance(obj, dict):
        raise corrupt_error(path, f"it holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _looks_like_torch_file(path: Path) -> bool:
    """A torch.save file starts as a zip archive (PK) or, in the old format, as a pickle (protocol byte 0x80)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return head == b"PK" or head[:1] == b"\x80"


def _torch_load_no_mmap(path: Path, torch):
    try:  # the old (non-zip) .ckpt format cannot be memory-mapped
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise corrupt_error(path, f"torch could not read it ({short_message(e)})") from None


def normalise_te_keys(state: dict) -> dict:
    """Old SD1 files lack the `text_model.` level in their CLIP keys; add it (as sd-scripts does) and drop
    the position_ids buffer, which newer transformers no longer stores."""
    out = {}
    for k, v in state.items():
        if k.endswith("embeddings.position_ids"):
            continue
        if k.startswith(SD1_TE) and not k.startswith(SD1_TE + "text_model."):
            k = SD1_TE + "text_model." + k[len(SD1_TE):]
        out[k] = v
    return out


def corrupt_error(path: Path, reason: str) -> ModelLoadError:
    return ModelLoadError(f'"{path}" cannot be read as model weights: {reason}. Expected a complete '
                          f"Stable Diffusion .safetensors/.ckpt checkpoint. Fix: download the file again and "
                          f"check its size against the size shown on the download page.")


def short_message(error: Exception, limit: int = 300) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:limit] + ("..." if len(text) > limit else "")
