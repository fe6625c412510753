"""Single-file LDM export: tiny models written and read back (our loader and diffusers' own reader), the
full-size SD1.5 / SD2 / SDXL layouts on the meta device, and the OpenCLIP / SDXL tables checked with real
numbers through diffusers' converters (an independent implementation of the reverse direction)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_same_weights
from safetensors import safe_open

from trainer.models.export import openclip_to_ldm, save_single_file, to_ldm_state_dict, unet_to_ldm
from trainer.models.load import CONFIG_DIR, detect_family, load_models


@pytest.fixture(scope="module")
def tiny(tiny_sd1_dir):
    return load_models(str(tiny_sd1_dir))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_export_loads_back_with_every_tensor_equal(tiny, tmp_path, dtype):
    path = tmp_path / "出力 folder" / "tiny export.safetensors"
    save_single_file(tiny, path, dtype, {"modelspec.title": "テスト"})
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    back = load_models(str(path), dtype=dtype, vae_dtype=dtype)
    assert back.family == "sd1" and back.source_file == path
    assert_same_weights(tiny.unet, back.unet, dtype)
    assert_same_weights(tiny.vae, back.vae, dtype)
    assert_same_weights(tiny.text_encoders[0], back.text_encoders[0], dtype)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"modelspec.title": "テスト"}
        position_ids = f.get_tensor("cond_stage_model.transformer.text_model.embeddings.position_ids")
    assert position_ids.dtype == torch.int64 and position_ids.tolist() == [list(range(77))]  # never cast


def test_diffusers_from_single_file_reads_our_file(tiny, tmp_path):
    """diffusers' own single-file reader (given the file path, not our state dict) gets the same weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = save_single_file(tiny, tmp_path / "model.safetensors")
    config = str(CONFIG_DIR / "tiny-sd1")
    unet = UNet2DConditionModel.from_single_file(str(path), config=config, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_single_file(str(path), config=config, subfolder="vae", local_files_only=True)
    assert_same_weights(tiny.unet, unet)
    assert_same_weights(tiny.vae, vae)


def test_save_refuses_other_formats_and_unknown_layers(tiny, tmp_path):
    with pytest.raises(ValueError, match=".safetensors"):
        save_single_file(tiny, tmp_path / "model.ckpt")
    from conftest import TINY_UNET_CONFIG
    from diffusers import UNet2DConditionModel

    odd = UNet2DConditionModel(**TINY_UNET_CONFIG, class_embed_type="timestep")
    with pytest.raises(ValueError, match="class_embedding"):
        unet_to_ldm(odd)


# ---------------------------------------------------------------------------------------------------------------
# Full-size layouts on the meta device (no weights)


def _full_size(variant: str, family: str):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = CONFIG_DIR / variant
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(root / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(root / "vae")))
        encoders = [CLIPTextModel(CLIPTextConfig.from_json_file(root / "text_encoder" / "config.json"))]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(
                CLIPTextConfig.from_json_file(root / "text_encoder_2" / "config.json")))
    return SimpleNamespace(family=family, unet=unet, vae=vae, text_encoders=encoders)


U, V = "model.diffusion_model.", "first_stage_model."
ATTN_Q = (V + "decoder.mid.attn_1.q.weight", (512, 512, 1, 1))  # a 1x1 conv in LDM files


@pytest.mark.parametrize("variant, family, counts, real_shapes", [
    # SD1.5: 686 UNet, 248 VAE and 197 CLIP keys (with position_ids), as the v1-5 files hold under these
    # prefixes; real files also carry the DDPM schedule buffers (betas, ...), which we do not write.
    ("sd15", "sd1", {"model.": 686, "first_stage_model.": 248, "cond_stage_model.": 197},
     dict([ATTN_Q, (U + "input_blocks.1.1.proj_in.weight", (320, 320, 1, 1)),
           ("cond_stage_model.transformer.text_model.embeddings.position_ids", (1, 77))])),
    # SD2: OpenCLIP ViT-H with all 24 blocks (the 24th unused), text_projection and logit_scale.
    ("sd2-768-v", "sd2", {"model.": 686, "first_stage_model.": 248, "cond_stage_model.": 24 * 12 + 6},
     dict([ATTN_Q, (U + "input_blocks.1.1.proj_in.weight", (320, 320)),
           ("cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight", (3072, 1024)),
           ("cond_stage_model.model.positional_embedding", (77, 1024)),
           ("cond_stage_model.model.text_projection", (1024, 1024)), ("cond_stage_model.model.logit_scale", ())])),
    # SDXL base: 1680 UNet keys, CLIP-L 197, OpenCLIP bigG 32 blocks + 6.
    ("sdxl", "sdxl", {"model.": 1680, "first_stage_model.": 248, "conditioner.embedders.0.": 197,
                      "conditioner.embedders.1.": 32 * 12 + 6},
     dict([ATTN_Q, (U + "label_emb.0.0.weight", (1280, 2816)),
           (U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", (640, 2048)),
           (U + "output_blocks.2.2.conv.weight", (1280, 1280, 3, 3)),
           ("conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight", (5120, 1280)),
           ("conditioner.embedders.1.model.text_projection", (1280, 1280))])),
])
def test_full_size_layout_has_the_real_keys_and_diffusers_maps_every_one_back(variant, family, counts,
                                                                               real_shapes):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    models = _full_size(variant, family)
    ldm = to_ldm_state_dict(models)
    assert {p: sum(k.startswith(p) for k in ldm) for p in counts} == counts and len(ldm) == sum(counts.values())
    assert {k: tuple(ldm[k].shape) for k in real_shapes} == real_shapes
    assert detect_family({k: tuple(v.shape) for k, v in ldm.items()}) == family

    def same_shapes(converted, model):
        converted = {k.removeprefix("text_model."): v.shape for k, v in converted.items()
                     if not k.endswith("position_ids")}
        assert converted == {k.removeprefix("text_model."): v.shape for k, v in model.state_dict().items()}

    same_shapes(convert_ldm_unet_checkpoint(ldm, models.unet.config), models.unet)
    same_shapes(convert_ldm_vae_checkpoint(ldm, models.vae.config), models.vae)
    if family == "sd2":
        same_shapes(convert_open_clip_checkpoint(models.text_encoders[0], ldm), models.text_encoders[0])
    else:
        same_shapes(convert_ldm_clip_checkpoint(ldm), models.text_encoders[0])
    if family == "sdxl":
        same_shapes(convert_open_clip_checkpoint(models.text_encoders[1], ldm,
                                                 prefix="conditioner.embedders.1.model."), models.text_encoders[1])


# ---------------------------------------------------------------------------------------------------------------
# SDXL / SD2 tables with real numbers (tiny models of the same topology, read back by diffusers' converters)

TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, projection_dim=16,
                 hidden_act="gelu")


def test_sdxl_topology_unet_round_trips_through_diffusers_converter():
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # SDXL's shape in small: no attention on the top level, 2 layers per block,
        sample_size=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),  # linear proj_in, text_time
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64), layers_per_block=2,
        transformer_layers_per_block=(1, 2), cross_attention_dim=32, attention_head_dim=(4, 8),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 16, norm_num_groups=32)
    ldm = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet).items()}
    assert "model.diffusion_model.label_emb.0.2.weight" in ldm
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in ldm  # upsampler after attention
    back = convert_ldm_unet_checkpoint(ldm, unet.config)
    assert_state_equal(back, unet.state_dict())


def assert_state_equal(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected), [k for k in expected
                                                                      if not torch.equal(got[k], expected[k])][:5]


def test_openclip_bigg_layout_round_trips_with_projection():
    """q/k/v joined in OpenCLIP's order and text_projection transposed: checked by value, not only shape."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    te = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP))
    for p in te.parameters():
        torch.nn.init.normal_(p)  # the default init leaves biases zero and norms one; that would hide swaps
    prefix = "conditioner.embedders.1.model."
    ldm = {prefix + k: v for k, v in openclip_to_ldm(te).items()}
    assert ldm[prefix + "text_projection"].shape == (32, 16)
    assert_state_equal(convert_open_clip_checkpoint(te, ldm, prefix=prefix), te.state_dict())


def test_sd2_text_encoder_gets_a_dummy_last_block_and_keeps_every_weight():
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(**TINY_CLIP))  # 3 blocks here, as SD2's 23 of ViT-H's 24
    for p in te.parameters():
        torch.nn.init.normal_(p)
    ldm = {"cond_stage_model.model." + k: v for k, v in openclip_to_ldm(te, sd2_last_layer=True).items()}
    assert torch.equal(ldm["cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight"],
                       ldm["cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight"])
    assert torch.equal(ldm["cond_stage_model.model.text_projection"], torch.eye(32))
    back = {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(te, ldm).items()}
    extra = {k for k in back if k.startswith("encoder.layers.3.")}  # diffusers drops only a 24th block
    assert_state_equal({k: v for k, v in back.items() if k not in extra}, te.state_dict())


def test_sd1_config_matches_what_the_export_writes():
    """The shipped tiny config is what a tiny exported file is read with: keep the two in step."""
    config = json.loads((CONFIG_DIR / "tiny-sd1" / "unet" / "config.json").read_text(encoding="utf-8"))
    from conftest import TINY_UNET_CONFIG

    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in TINY_UNET_CONFIG.items()} == \
        {k: config[k] for k in TINY_UNET_CONFIG}
