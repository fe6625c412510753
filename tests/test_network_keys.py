"""The LoRA layer walk and kohya names match the lists sd-scripts itself produced (tests/fixtures/lora-keys), for the
full-size SD1.5, SD2 and SDXL architectures built on the meta device (no weights, about a second each)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from trainer.network.keys import (
    find_lora_targets,
    kohya_name,
    sdxl_diffusers_path,
    sdxl_sai_path,
    text_encoder_kohya_path,
)

# Generated from sd-scripts' own networks/lora.py by the scripts in that folder; see its README.md.
SPEC_DIR = Path(__file__).resolve().parent / "fixtures" / "lora-keys"

SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 layers_per_block=2, use_linear_projection=False, sample_size=64)
SD2_UNET = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                attention_head_dim=[5, 10, 20, 20], layers_per_block=2, use_linear_projection=True,
                sample_size=96)
SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, use_linear_projection=True,
)
CLIP_L = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
              hidden_act="quick_gelu")
SD2_TE = dict(hidden_size=1024, num_hidden_layers=23, num_attention_heads=16, intermediate_size=4096,
              hidden_act="gelu")
CLIP_G = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
              hidden_act="gelu", projection_dim=1280)


def build_meta(family: str):
    """(text_encoders, unet) of the full-size architecture, with every tensor on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        if family == "sd15":
            return [CLIPTextModel(CLIPTextConfig(**CLIP_L))], UNet2DConditionModel(**SD15_UNET)
        if family == "sd2":
            return [CLIPTextModel(CLIPTextConfig(**SD2_TE))], UNet2DConditionModel(**SD2_UNET)
        tes = [CLIPTextModel(CLIPTextConfig(**CLIP_L)), CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))]
        return tes, UNet2DConditionModel(**SDXL_UNET)


@pytest.fixture(scope="module")
def meta_models():
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = build_meta(family)
        return cache[family]

    return get


def read_spec_list(name: str) -> set[tuple[str, int, int, str]]:
    rows = set()
    for line in (SPEC_DIR / name).read_text(encoding="utf-8").splitlines():
        if line.strip():
            lora_name, dim_in, dim_out, kind = line.split()
            rows.add((lora_name, int(dim_in), int(dim_out), kind))
    return rows


def listed(targets) -> set[tuple[str, int, int, str]]:
    rows = set()
    for t in targets:
        m = t.module
        dims = (m.in_features, m.out_features) if t.kind == "linear" else (m.in_channels, m.out_channels)
        rows.add((t.name, *dims, t.kind))
    return rows


def walk(text_encoders, unet, *, include_conv: bool, sdxl: bool) -> list:
    prefixes = ("lora_te1", "lora_te2") if sdxl else ("lora_te",)
    targets = []
    for te, prefix in zip(text_encoders, prefixes):
        targets += find_lora_targets(te, prefix=prefix, is_text_encoder=True, include_conv=False)
    targets += find_lora_targets(unet, prefix="lora_unet", is_text_encoder=False, include_conv=include_conv,
                                 sdxl=sdxl)
    return targets


@pytest.mark.parametrize("family, include_conv, spec_file", [
    ("sd15", False, "sd15.txt"),
    ("sd15", True, "sd15-conv.txt"),
    ("sd2", False, "sd2.txt"),
    ("sdxl", False, "sdxl.txt"),
    ("sdxl", True, "sdxl-conv.txt"),
])
def test_targets_match_sd_scripts_lists(meta_models, family, include_conv, spec_file):
    text_encoders, unet = meta_models(family)
    targets = walk(text_encoders, unet, include_conv=include_conv, sdxl=family == "sdxl")
    expected = read_spec_list(spec_file)
    assert len(targets) == len(expected)  # no name produced twice
    found = listed(targets)
    assert found - expected == set() and expected - found == set()


def test_lora_state_dict_shapes_and_order_match_sd_scripts(meta_models):
    """network.state_dict() of a default SD1.5 LoRA: same keys, shapes and dtypes (int64 alpha) as sd-scripts'."""
    from trainer.network.lora import LoRANetwork

    text_encoders, unet = meta_models("sd15")
    network = LoRANetwork(text_encoders, unet, rank=4, alpha=1)
    lines = (SPEC_DIR / "sd15-statedict.txt").read_text(encoding="utf-8").splitlines()
    section = []
    for line in lines[2:]:
        if line.startswith("#"):
            break
        key, rest = line.split(" ", 1)
        shape, dtype = rest.rsplit(" ", 1)
        section.append((key, shape, dtype))
    ours = [(k, str(list(v.shape)), str(v.dtype).removeprefix("torch.")) for k, v in network.state_dict().items()]
    # Same set; the in-memory order differs only where sd-scripts' own UNet registers its layers in another
    # order than diffusers' (attn2 / ff). Files do not depend on it: safetensors sorts by dtype and name.
    assert sorted(ours) == sorted(section)
    assert [k for k, *_ in ours[:3]] == [k for k, *_ in section[:3]]


def test_sdxl_path_table_round_trips_every_spec_row():
    rows = [line.split() for line in (SPEC_DIR / "sdxl-diffusers-map.txt").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    assert len(rows) == 788
    for lora_name, diffusers_path, *_ in rows:
        sai = sdxl_sai_path(diffusers_path)
        assert kohya_name("lora_unet", sai) == lora_name
        assert sdxl_diffusers_path(sai) == diffusers_path


@pytest.mark.parametrize("path", ["conv_in", "down_blocks.2.downsamplers.0.conv", "up_blocks.2.upsamplers.0.conv",
                                  "down_blocks.0.resnets.0.norm1", "mid_block.attentions.1.proj_in",
                                  "down_blocks.0.resnets.2.conv1"])
def test_sdxl_table_refuses_paths_sdxl_does_not_have(path):
    with pytest.raises(ValueError, match="SDXL"):
        sdxl_sai_path(path)


@pytest.mark.parametrize("path", ["input_blocks.0.0.weight", "input_blocks.3.0.conv", "output_blocks.8.2.conv",
                                  "middle_block.3.in_layers.2", "out.2"])
def test_sdxl_inverse_table_refuses_unknown_paths(path):
    with pytest.raises(ValueError, match="SDXL"):
        sdxl_diffusers_path(path)


def test_kohya_name_rules():
    assert kohya_name("lora_unet", "down_blocks.0.attentions.0.proj_in") == "lora_unet_down_blocks_0_attentions_0_proj_in"
    # transformers 5.x CLIPTextModel paths start at `encoder.`; CLIPTextModelWithProjection keeps `text_model.`
    assert text_encoder_kohya_path("encoder.layers.0.mlp.fc1") == "text_model.encoder.layers.0.mlp.fc1"
    assert text_encoder_kohya_path("text_model.encoder.layers.0.mlp.fc1") == "text_model.encoder.layers.0.mlp.fc1"


def test_walker_chooses_by_type_not_by_class_name():
    """A subclass of CLIPAttention (as transformers' SDPA variants are) is still a target."""
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.models.clip.modeling_clip import CLIPAttention

    class RenamedAttention(CLIPAttention):
        pass

    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    te = CLIPTextModel(config)
    te.encoder.layers[0].self_attn = RenamedAttention(config)
    names = {t.name for t in find_lora_targets(te, prefix="lora_te", is_text_encoder=True, include_conv=False)}
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names and len(names) == 6


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    import json

    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return length, json.loads(raw[8:8 + length])


@pytest.mark.parametrize("precision, section_index", [(None, 2), ("fp16", 3)])
def test_saved_sd15_file_has_sd_scripts_layout(meta_models, tmp_path, precision, section_index):
    """Same tensors in the same on-disk order and dtypes, same header and file size as sd-scripts' save_weights()
    (the values differ: these weights are uninitialised memory)."""
    import torch

    from trainer.network.lora import LoRANetwork

    text_encoders, unet = meta_models("sd15")
    network = LoRANetwork(text_encoders, unet, rank=4, alpha=1).to_empty(device="cpu")
    path = tmp_path / "sd15 ロラ.safetensors"
    network.save_weights(path, torch.float16 if precision else None, None)

    sections = (SPEC_DIR / "sd15-statedict.txt").read_text(encoding="utf-8").split("\n# section")
    title, *rows = sections[section_index].strip().splitlines()
    header_bytes = int(re.search(r"header (\d+) bytes", title)[1])
    file_bytes = int(re.search(r"file (\d+) bytes", title)[1])
    length, header = read_safetensors_header(path)
    metadata = header.pop("__metadata__")
    on_disk = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    ours = [f"{key} {str(info['shape']).replace(' ', '').replace(',', ', ')} {info['dtype']}" for key, info in on_disk]
    assert ours == rows
    assert sorted(metadata) == ["sshs_legacy_hash", "sshs_model_hash"]
    assert (length, path.stat().st_size) == (header_bytes, file_bytes)


@pytest.mark.filterwarnings("ignore:for lora_unet.*non-meta:UserWarning")
def test_sdxl_file_with_diffusers_style_names_loads_under_sgm_names(meta_models):
    """Some tools save SDXL LoRAs as `lora_unet_down_blocks_...`; sd-scripts' create_network_from_weights converts
    them to the SGM names (`lora_unet_input_blocks_...`) on load."""
    import torch

    from trainer.network.lora import LoRANetwork

    text_encoders, unet = meta_models("sdxl")
    weights = {
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 640),
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.zeros(640, 2),
        "lora_unet_down_blocks_1_attentions_0_proj_in.alpha": torch.tensor(1.0),
        "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight": torch.zeros(3, 320, 3, 3),
        "lora_unet_down_blocks_0_downsamplers_0_conv.lora_up.weight": torch.zeros(320, 3, 1, 1),
        "lora_unet_down_blocks_0_downsamplers_0_conv.alpha": torch.tensor(3),
    }
    network = LoRANetwork.from_weights(text_encoders, unet, weights, sdxl=True)
    assert network.module_names() == ["lora_unet_input_blocks_3_0_op", "lora_unet_input_blocks_4_1_proj_in"]
    op = network.get_submodule("lora_unet_input_blocks_3_0_op")
    assert op.rank == 3 and op.lora_down.stride == (2, 2)  # the downsampler's stride is copied
    assert network.load_weights_dict(weights)["renamed"] == 2


@pytest.mark.parametrize("family, options, keys", [
    ("sd15", {}, 792), ("sd15", {"train_text_encoder": False}, 576), ("sd15", {"conv_rank": 4}, 1050),
    ("sd2", {}, 990), ("sdxl", {}, 2958), ("sdxl", {"train_text_encoder": False}, 2166),
    ("sdxl", {"conv_rank": 4}, 3156), ("sdxl", {"conv_rank": 4, "train_text_encoder": False}, 2364),
])
def test_network_key_counts_match_sd_scripts(meta_models, family, options, keys):
    """The state-dict key counts in tests/fixtures/lora-keys/README.md, through LoRANetwork's own checks."""
    from trainer.network.lora import LoRANetwork

    text_encoders, unet = meta_models(family)
    network = LoRANetwork(text_encoders, unet, sdxl=family == "sdxl", **options)
    assert len(network.state_dict()) == keys
