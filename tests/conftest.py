"""Shared fixtures: tiny SD1-architecture models built from configs in code, generated images and
dataset folders. Nothing here downloads anything; everything is seeded so tests are repeatable."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# ---------------------------------------------------------------------------------------------------
# Tiny models (SD1 topology, ~1 M UNet params: one full training step takes about 70 ms on two CPU cores)

TINY_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 64),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=64,
)
TINY_TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=49408,
    max_position_embeddings=77,
    bos_token_id=512,
    eos_token_id=513,
    pad_token_id=513,
)


def make_tiny_tokenizer():
    """A CLIP tokenizer with a 514-entry byte-level vocabulary (no merges): fast, and the same class and
    special-token ids layout as the real one."""
    from trainer.models.tokenizer import BOS, EOS, build_clip_tokenizer, bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    return build_clip_tokenizer({t: i for i, t in enumerate(tokens)}, [])


def make_tiny_sd1(seed: int = 0) -> dict:
    """Fresh tiny SD1 components: unet, vae, text_encoder, tokenizer, scheduler (sd-scripts' betas)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=make_tiny_tokenizer(),
                scheduler=scheduler)


def read_lora(path) -> tuple[dict, dict]:
    """A saved LoRA file's tensors and metadata."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def lora_file_deltas(path) -> dict:
    """Each module's weight delta (up @ down x alpha / rank) in a saved LoRA file, by module name."""
    from trainer.network import lora_math
    from trainer.network.lora import read_weights_file

    tensors = read_weights_file(path)
    return {key[: -len(".lora_down.weight")]: lora_math.lora_delta(
        tensors[key], tensors[key.replace("lora_down", "lora_up")], tensors.get(key.replace("lora_down.weight", "alpha")))
        for key in tensors if key.endswith(".lora_down.weight")}


def assert_same_weights(a, b, dtype=None):
    """Same keys and exactly equal tensors (after casting `a`'s floating ones to `dtype` when given)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        expected = sa[k].to(dtype) if dtype is not None and sa[k].is_floating_point() else sa[k]
        assert sb[k].dtype == expected.dtype, k
        assert torch.equal(expected, sb[k]), k


@pytest.fixture
def tiny_sd1() -> dict:
    return make_tiny_sd1()


def save_tiny_sd1_diffusers(root: Path, seed: int = 0) -> Path:
    """Write the tiny model as a diffusers folder (model_index.json + subfolders), as a user's would be."""
    parts = make_tiny_sd1(seed)
    root.mkdir(parents=True, exist_ok=True)
    parts["unet"].save_pretrained(root / "unet")
    parts["vae"].save_pretrained(root / "vae")
    parts["text_encoder"].save_pretrained(root / "text_encoder")
    parts["tokenizer"].save_pretrained(root / "tokenizer")
    parts["scheduler"].save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory) -> Path:
    """A tiny SD1 diffusers folder under a path with a space and Japanese characters."""
    return save_tiny_sd1_diffusers(tmp_path_factory.mktemp("models") / "tiny sd1 モデル")


def save_tiny_sd2_768v_diffusers(root: Path, seed: int = 0) -> Path:
    """The tiny model with what makes a folder SD 2.x 768-v: a 1024-wide text encoder (one layer, a 514-token
    vocabulary, so it stays small), cross-attention of that width, padding with id 0, v-prediction."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    save_tiny_sd1_diffusers(root, seed)
    torch.manual_seed(seed)
    UNet2DConditionModel(**{**TINY_UNET_CONFIG, "cross_attention_dim": 1024, "use_linear_projection": True}
                         ).save_pretrained(root / "unet")
    CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT_CONFIG, "hidden_size": 1024, "num_hidden_layers": 1,
                                    "num_attention_heads": 16, "vocab_size": 514, "pad_token_id": 0})
                  ).save_pretrained(root / "text_encoder")
    tokenizer = make_tiny_tokenizer()
    tokenizer.pad_token = "!"  # id 0, as SD 2.x's tokenizer pads
    tokenizer.save_pretrained(root / "tokenizer")
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  clip_sample=False, prediction_type="v_prediction").save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory) -> Path:
    return save_tiny_sd2_768v_diffusers(tmp_path_factory.mktemp("models") / "tiny sd2 モデル")


# ---------------------------------------------------------------------------------------------------
# Images and dataset folders


def make_image(path: Path, size=(64, 64), seed: int = 0, mode: str = "RGB") -> Path:
    """A simple seeded picture (a coloured square on a gradient) saved at `path`."""
    rng = np.random.default_rng(seed)
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 255, size=3)
    img = np.stack([(xs * 255 // max(w - 1, 1) + base[0]) % 256,
                    (ys * 255 // max(h - 1, 1) + base[1]) % 256,
                    np.full_like(xs, base[2])], axis=-1).astype(np.uint8)
    x0, y0 = rng.integers(0, max(w // 2, 1)), rng.integers(0, max(h // 2, 1))
    img[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 255, size=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).convert(mode).save(path)
    return path


def make_dreambooth_folder(parent: Path, folder: str = "10_sks shape", n: int = 4, size=(64, 64),
                           caption_ext: str = ".txt", captions: bool = True, seed: int = 0) -> Path:
    """`parent/folder` with `n` images and (optionally) caption files `img_i<caption_ext>`."""
    sub = parent / folder
    for i in range(n):
        make_image(sub / f"img_{i}.png", size=size, seed=seed + i)
        if captions:
            (sub / f"img_{i}{caption_ext}").write_text(f"sks shape, red square, picture {i}", encoding="utf-8")
    return sub


@pytest.fixture
def train_data_dir(tmp_path) -> Path:
    """A DreamBooth-style train_data_dir (parent of `10_sks shape`) under a path with a space and Japanese."""
    parent = tmp_path / "データ set" / "train"
    make_dreambooth_folder(parent)
    return parent


# ---- tiny SDXL --------------------------------------------------------------------------------------------

HIDDEN = 32  # both tiny text encoders; the real ones are 768 and 1280 wide
POOL = 32
TIME_DIM = 8  # the real UNet embeds each size number with 256 sinusoids


def make_tiny_sdxl(seed: int = 0) -> dict:
    """SDXL topology in miniature: text_time added embedding, attention only in the inner level, linear
    projections, two ResNets per down level and three per up level (so SAI block numbers apply)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * HIDDEN, attention_head_dim=8, transformer_layers_per_block=1,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=POOL + 6 * TIME_DIM)
    vae = AutoencoderKL(**TINY_VAE_CONFIG, scaling_factor=0.13025)
    te1 = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT_CONFIG, projection_dim=POOL))
    tok2 = make_tiny_tokenizer()
    tok2.pad_token = "!"  # sd-scripts' tokenizer 2 pads with id 0
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
    return dict(unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=make_tiny_tokenizer(),
                tokenizer_2=tok2, scheduler=scheduler)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models") / "tiny sdxl モデル"
    parts = make_tiny_sdxl()
    for name, part in parts.items():
        part.save_pretrained(root / name)
    classes = dict(unet="diffusers", vae="diffusers", scheduler="diffusers", text_encoder="transformers",
                   text_encoder_2="transformers", tokenizer="transformers", tokenizer_2="transformers")
    index = {name: [lib, type(parts[name]).__name__] for name, lib in classes.items()}
    index.update({"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
                  "force_zeros_for_empty_prompt": True})
    (root / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    return root


class NanVae(torch.nn.Module):
    """A VAE whose latents are all NaN, as SDXL's VAE gives in fp16: for the NaN-latent handling."""

    def __init__(self, dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=dtype))

    def encode(self, images):
        sample = torch.full((images.shape[0], 4, 8, 8), float("nan"))
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(sample=lambda: sample))


@pytest.fixture(autouse=True, scope="session")
def _private_user_cache(tmp_path_factory):
    """The picture-check cache (trainer.paths.user_cache_dir) goes to a folder of this test session, never the
    user's own; subprocesses inherit it."""
    import os

    old = os.environ.get("TRAINER_CACHE_DIR")
    os.environ["TRAINER_CACHE_DIR"] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    if old is None:
        os.environ.pop("TRAINER_CACHE_DIR", None)
    else:
        os.environ["TRAINER_CACHE_DIR"] = old
