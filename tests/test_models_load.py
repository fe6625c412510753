"""Base-model loading: the built-in demo model, diffusers folders, single-file LDM checkpoints (written from a
tiny model by trainer.models.export), family detection, and the errors users meet."""

from __future__ import annotations

import json
import logging
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_same_weights
from safetensors.torch import save_file

from trainer.errors import ModelLoadError
from trainer.models.export import to_ldm_state_dict
from trainer.models.load import classify_checkpoint, detect_family, load_models


def to_ldm(unet, vae, text_encoder) -> dict:
    """The SD1 single-file layout, written by trainer.models.export (checked on its own in test_models_export)."""
    return to_ldm_state_dict(SimpleNamespace(family="sd1", unet=unet, vae=vae, text_encoders=[text_encoder]))


@pytest.fixture(scope="module")
def builtin():
    return load_models("builtin:tiny-sd1")


@pytest.fixture(scope="module")
def ldm_file(builtin, tmp_path_factory):
    """The built-in model as a single-file fp32 .safetensors under a path with a space and Japanese."""
    path = tmp_path_factory.mktemp("single") / "チェック point" / "tiny model.safetensors"
    path.parent.mkdir()
    save_file(to_ldm(builtin.unet, builtin.vae, builtin.text_encoders[0]), str(path))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Built-in demo model


def test_builtin_tiny_model_is_fixed_and_leaves_the_rng_alone(builtin):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    start = time.perf_counter()
    again = load_models("builtin:tiny-sd1")
    assert time.perf_counter() - start < 2.0
    assert torch.equal(torch.get_rng_state(), before)
    for a, b in [(builtin.unet, again.unet), (builtin.vae, again.vae),
                 (builtin.text_encoders[0], again.text_encoders[0])]:
        assert_same_weights(a, b)
    assert (again.family, again.name, again.source_file, again.latent_scale) == \
        ("sd1", "builtin:tiny-sd1", None, 0.18215)
    assert tuple(again.unet.config.block_out_channels) == (32, 64) and again.text_encoders[0].config.hidden_size == 32
    assert again.tokenizers[0]("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    sched = again.noise_scheduler.config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule, sched.num_train_timesteps, sched.clip_sample,
            sched.prediction_type) == (0.00085, 0.012, "scaled_linear", 1000, False, "epsilon")


def test_builtin_v_parameterization_sets_scheduler_and_warns_for_sd1(caplog):
    with caplog.at_level(logging.WARNING, logger="trainer.models.load"):
        models = load_models("builtin:tiny-sd1", v_parameterization=True)
    assert models.noise_scheduler.config.prediction_type == "v_prediction" and models.v_parameterization
    assert any("--v_parameterization" in r.getMessage() for r in caplog.records)


def test_unknown_builtin_suggests_the_right_name():
    with pytest.raises(ModelLoadError, match='did you mean "tiny-sd1"'):
        load_models("builtin:tiny-sd")


# ---------------------------------------------------------------------------------------------------------------
# Diffusers folders


def test_diffusers_folder_loads_with_its_tokenizer_and_dtypes(tiny_sd1_dir):
    from conftest import make_tiny_sd1

    models = load_models(str(tiny_sd1_dir), dtype=torch.float16, vae_dtype=torch.float32)
    ref = make_tiny_sd1(0)
    assert_same_weights(ref["unet"], models.unet, torch.float16)
    assert_same_weights(ref["vae"], models.vae)
    assert_same_weights(ref["text_encoder"], models.text_encoders[0], torch.float16)
    assert len(models.tokenizers[0]) == 514  # the folder's own tokenizer, not the built-in one
    assert (models.family, models.name, models.source_file) == ("sd1", "tiny sd1 モデル", None)


@pytest.mark.parametrize("flags, words", [(dict(v2=True), ["SD 1.x", "remove --v2"]),
                                          (dict(sdxl=True), ["SDXL trainer", "train_network"])])
def test_flag_that_contradicts_the_folder_names_the_flag(tiny_sd1_dir, flags, words):
    with pytest.raises(ModelLoadError) as e:
        load_models(str(tiny_sd1_dir), **flags)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_folder_without_model_index_points_at_the_file_inside(tmp_path):
    folder = tmp_path / "モデル folder"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelLoadError) as e:
        load_models(str(folder))
    assert "model_index.json" in str(e.value) and "model.safetensors" in str(e.value)


def test_folder_with_missing_weights_names_the_component(tiny_sd1_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd1_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="unet/"):
        load_models(str(broken))


# ---------------------------------------------------------------------------------------------------------------
# Single-file LDM checkpoints


def test_single_file_round_trip_fp32(builtin, ldm_file):
    models = load_models(str(ldm_file))
    assert_same_weights(builtin.unet, models.unet)
    assert_same_weights(builtin.vae, models.vae)
    assert_same_weights(builtin.text_encoders[0], models.text_encoders[0])
    assert (models.family, models.name, models.source_file) == ("sd1", "tiny model.safetensors", ldm_file)
    assert models.tokenizers[0].pad_token == "<|endoftext|>"


def test_single_file_fp16_loads_in_fp16_and_vae_in_fp32(builtin, tmp_path):
    state = to_ldm(builtin.unet, builtin.vae, builtin.text_encoders[0])
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(path))
    models = load_models(str(path), dtype=torch.float16, vae_dtype=torch.float32)
    assert_same_weights(builtin.unet, models.unet, torch.float16)
    assert_same_weights(builtin.text_encoders[0], models.text_encoders[0], torch.float16)
    vae_ref = {k: v.half().float() for k, v in builtin.vae.state_dict().items()}
    assert all(torch.equal(vae_ref[k], v) for k, v in models.vae.state_dict().items())


def test_ckpt_with_state_dict_wrapper_ema_and_old_clip_keys(builtin, tmp_path):
    state = to_ldm(builtin.unet, builtin.vae, builtin.text_encoders[0])
    # old SD1 files: CLIP keys without the text_model. level; EMA copies beside the weights; Lightning wrapper
    state = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
             for k, v in state.items()}
    state.update({f"model_ema.diffusion_modelx{i}": torch.zeros(1) for i in range(3)})
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": state, "global_step": 10}, path)
    models = load_models(str(path))
    assert_same_weights(builtin.unet, models.unet)
    assert_same_weights(builtin.text_encoders[0], models.text_encoders[0])


def test_ckpt_needing_arbitrary_pickle_is_refused(tmp_path):
    import argparse

    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "hyper_parameters": argparse.Namespace(x=1)}, path)
    with pytest.raises(ModelLoadError) as e:
        load_models(str(path))
    assert "safetensors" in str(e.value) and "code" in str(e.value)


def test_truncated_safetensors_says_the_download_was_cut(ldm_file, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(ldm_file.read_bytes()[:1_000_000])
    with pytest.raises(ModelLoadError) as e:
        load_models(str(cut))
    assert "cut short" in str(e.value) and "download the file again" in str(e.value)


def test_html_saved_as_safetensors_is_recognised(tmp_path):
    page = tmp_path / "model.safetensors"
    page.write_text("<!DOCTYPE html><html><body>Please log in</body></html>", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="web page"):
        load_models(str(page))


def test_lora_file_as_base_model(tmp_path):
    path = tmp_path / "my_lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, str(path))
    with pytest.raises(ModelLoadError) as e:
        load_models(str(path))
    assert "my_lora.safetensors" in str(e.value) and "LoRA" in str(e.value) and "--network_weights" in str(e.value)


def test_non_sd_safetensors(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"transformer.blocks.0.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint"):
        load_models(str(path))


def test_missing_path_suggests_a_close_name(ldm_file):
    wrong = ldm_file.parent / "tiny modle.safetensors"
    with pytest.raises(ModelLoadError) as e:
        load_models(str(wrong))
    assert "does not exist" in str(e.value) and 'did you mean "tiny model.safetensors"' in str(e.value)


def test_quoted_windows_style_path_is_accepted(builtin, ldm_file):
    models = load_models(f'"{ldm_file}"')
    assert models.source_file == ldm_file


def test_hub_id_offline_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        load_models("someone/some-model")
    assert "hub id" in str(e.value) and "offline" in str(e.value)


def _write_header_only(path, shapes):
    """A small safetensors with the given keys (tiny tensors): enough for detection and flag checks."""
    save_file({k: torch.zeros(*[min(d, 4) for d in s]) for k, s in shapes.items()}, str(path))
    return path


@pytest.mark.parametrize("family, flags, words", [
    ("sd2", {}, ["SD 2.x", "add --v2"]),
    ("sdxl", {}, ["SDXL model", "sdxl_train_network"]),
    ("sdxl", dict(sdxl=True, v2=True), ["remove --v2"]),
])
def test_flag_mismatch_on_single_files_fails_before_reading_weights(tmp_path, family, flags, words):
    path = _write_header_only(tmp_path / f"{family}.safetensors", REAL_SHAPES[family])
    with pytest.raises(ModelLoadError) as e:
        load_models(str(path), **flags)
    assert all(w in str(e.value) for w in words), str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# --vae


def test_vae_replacement_from_file_with_and_without_prefix_and_from_folder(builtin, tiny_sd1_dir, tmp_path):
    from conftest import make_tiny_sd1

    other = make_tiny_sd1(seed=7)["vae"]
    ldm = {k: v for k, v in to_ldm(builtin.unet, other, builtin.text_encoders[0]).items()
           if k.startswith("first_stage_model.")}
    with_prefix, bare = tmp_path / "vae a.safetensors", tmp_path / "vae b.safetensors"
    save_file(ldm, str(with_prefix))
    save_file({k[len("first_stage_model."):]: v for k, v in ldm.items()}, str(bare))
    for path in (with_prefix, bare):
        assert_same_weights(other, load_models("builtin:tiny-sd1", vae=str(path)).vae)
    folder_vae = load_models("builtin:tiny-sd1", vae=str(tiny_sd1_dir)).vae
    assert_same_weights(make_tiny_sd1(0)["vae"], folder_vae)


def test_vae_that_is_a_lora_is_refused(tmp_path):
    path = tmp_path / "l.safetensors"
    save_file({"lora_te_x.lora_down.weight": torch.zeros(1, 1)}, str(path))
    with pytest.raises(ModelLoadError, match="--vae .*LoRA"):
        load_models("builtin:tiny-sd1", vae=str(path))


# ---------------------------------------------------------------------------------------------------------------
# Family detection from key -> shape maps with the real model's shapes (no weights)

U = "model.diffusion_model."
REAL_SHAPES = {
    "sd1": {U + "input_blocks.0.0.weight": (320, 4, 3, 3),
            U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
            U + "out.2.weight": (4, 320, 3, 3),
            "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)},
    "sd2": {U + "input_blocks.0.0.weight": (320, 4, 3, 3),
            U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
            U + "input_blocks.1.1.proj_in.weight": (320, 320),
            "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
            "cond_stage_model.model.token_embedding.weight": (49408, 1024),
            "cond_stage_model.model.positional_embedding": (77, 1024),
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024)},
    "sdxl": {U + "input_blocks.0.0.weight": (320, 4, 3, 3),
             U + "label_emb.0.0.weight": (1280, 2816),
             U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
             "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
             "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
             "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
             "conditioner.embedders.1.model.positional_embedding": (77, 1280),
             "conditioner.embedders.1.model.text_projection": (1280, 1280)},
}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_detect_family_on_real_shapes(family):
    assert detect_family(REAL_SHAPES[family]) == family
    # EMA copies and an older CLIP layout do not change the answer
    extra = {"model_ema.decay": (), "model_ema.diffusion_modelinput_blocks00weight": (320, 4, 3, 3)}
    assert detect_family({**REAL_SHAPES[family], **extra}) == family


@pytest.mark.parametrize("shapes, kind, words", [
    ({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": (4, 1280)}, "lora", ["LoRA"]),
    ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}, "vae", ["--vae"]),
    ({k: s for k, s in REAL_SHAPES["sd1"].items() if k.startswith("first_stage_model.")}, "vae", ["--vae"]),
    ({U + "input_blocks.0.0.weight": (384, 4, 3, 3), U + "label_emb.0.0.weight": (1536, 2560),
      "conditioner.embedders.0.model.token_embedding.weight": (49408, 1280),
      "conditioner.embedders.0.model.text_projection": (1280, 1280)}, "sdxl-refiner", ["refiner"]),
    ({**REAL_SHAPES["sd1"], U + "input_blocks.0.0.weight": (320, 9, 3, 3)}, "inpaint", ["inpainting"]),
    ({k: s for k, s in REAL_SHAPES["sd1"].items() if k.startswith(U)}, "unet-only", ["no text encoder"]),
    ({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}, "diffusers-component", ["model_index.json"]),
    ({"emb_params": (4, 768)}, "embedding", ["embedding"]),
    ({"joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536)}, "unknown", ["not a Stable Diffusion"]),
])
def test_detect_family_rejects_files_that_are_not_base_models(shapes, kind, words):
    assert classify_checkpoint(shapes) == kind
    with pytest.raises(ModelLoadError) as e:
        detect_family(shapes, '"x.safetensors"')
    assert str(e.value).startswith('"x.safetensors"') and all(w in str(e.value) for w in words), str(e.value)


def test_shipped_configs_match_the_real_architectures():
    """Parameter counts of the shipped full-size configs, built on the meta device (no weights)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.models.load import CONFIG_DIR

    def millions(model):
        return round(sum(p.numel() for p in model.parameters()) / 1e6, 1)

    with init_empty_weights():
        unets = {n: millions(UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(
            str(CONFIG_DIR / n / "unet")))) for n in ("sd15", "sd2-768-v", "sdxl")}
        te2 = millions(CLIPTextModel(CLIPTextConfig.from_json_file(CONFIG_DIR / "sd2-512/text_encoder/config.json")))
    assert unets == {"sd15": 859.5, "sd2-768-v": 865.9, "sdxl": 2567.5}
    assert te2 == 340.4  # OpenCLIP ViT-H text tower without its last layer (23 of 24), as SD2 uses it
    index = json.loads((CONFIG_DIR / "sdxl" / "model_index.json").read_text(encoding="utf-8"))
    assert "text_encoder_2" in index


def test_truncated_ckpt_and_unet_subfolder_and_symlink_name(builtin, ldm_file, tiny_sd1_dir, tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"a": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ModelLoadError, match="download the file again"):
        load_models(str(path))
    with pytest.raises(ModelLoadError, match="folder above it"):
        load_models(str(tiny_sd1_dir / "unet"))
    link = tmp_path / "リンク.safetensors"
    try:
        link.symlink_to(ldm_file)
    except OSError:  # Windows without developer mode
        pytest.skip("symlinks not allowed here")
    models = load_models(str(link))
    assert models.name == "リンク.safetensors" and models.source_file == ldm_file.resolve()


def _openclip_shapes(prefix: str, width: int, layers: int) -> dict:
    """The OpenCLIP text tower's LDM keys and shapes (SD2: ViT-H, 24 blocks; SDXL: bigG, 32 blocks)."""
    shapes = {"token_embedding.weight": (49408, width), "positional_embedding": (77, width),
              "ln_final.weight": (width,), "ln_final.bias": (width,), "text_projection": (width, width),
              "logit_scale": ()}
    block = {"ln_1.weight": (width,), "ln_1.bias": (width,), "attn.in_proj_weight": (3 * width, width),
             "attn.in_proj_bias": (3 * width,), "attn.out_proj.weight": (width, width),
             "attn.out_proj.bias": (width,), "ln_2.weight": (width,), "ln_2.bias": (width,),
             "mlp.c_fc.weight": (4 * width, width), "mlp.c_fc.bias": (4 * width,),
             "mlp.c_proj.weight": (width, 4 * width), "mlp.c_proj.bias": (width,)}
    for i in range(layers):
        shapes.update({f"transformer.resblocks.{i}.{k}": s for k, s in block.items()})
    return {prefix + k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.mark.parametrize("variant, cls, prefix, width, layers", [
    ("sd2-512", "CLIPTextModel", "cond_stage_model.model.", 1024, 24),
    ("sdxl", "CLIPTextModelWithProjection", "conditioner.embedders.1.model.", 1280, 32),
])
def test_openclip_text_encoders_map_onto_the_shipped_configs(variant, cls, prefix, width, layers):
    """Meta device: every weight of the SD2 / SDXL-2 text encoder is filled from the OpenCLIP layout
    (SD2 drops the 24th block, as SD2 uses the penultimate layer)."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig

    from trainer.models.load import CONFIG_DIR

    sub = "text_encoder_2" if variant == "sdxl" else "text_encoder"
    with init_empty_weights():
        te = getattr(transformers, cls)(CLIPTextConfig.from_json_file(CONFIG_DIR / variant / sub / "config.json"))
    back = convert_open_clip_checkpoint(te, _openclip_shapes(prefix, width, layers), prefix=prefix)
    if not hasattr(te, "text_model"):  # transformers 5 flattened CLIPTextModel
        back = {k.removeprefix("text_model."): v for k, v in back.items()}
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in te.state_dict().items()}


def test_a_text_file_named_ckpt_is_not_a_checkpoint_and_no_unsafe_advice_is_given(tmp_path):
    from trainer.errors import ModelLoadError
    from trainer.models.checkpoint import torch_load

    fake = tmp_path / "モデル.ckpt"
    fake.write_text("<html>404 not found</html>", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="not a PyTorch checkpoint") as caught:
        torch_load(fake)
    assert "weights_only" not in str(caught.value)
