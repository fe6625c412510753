"""Block-wise LoRA options of sd-scripts' networks.lora (the `--network_args` block_dims, block_alphas,
conv_block_dims, conv_block_alphas, down/mid/up_lr_weight, block_lr_zero_threshold and loraplus_*): block numbers
of module names, per-block ranks, per-block learning rates (and blocks dropped at weight 0), LoRA+ param groups."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest

from trainer.config.blocks import block_index, block_lr_weights, preset_weights
from trainer.errors import ConfigError
from trainer.network.keys import find_lora_targets
from trainer.network.lora import network_from_args

# Generated from sd-scripts' own networks/lora.py by the scripts in that folder; see its README.md.
SPEC_DIR = Path(__file__).resolve().parent / "fixtures" / "lora-keys"

# Blocks of the tiny SD1 UNet (conftest): down_blocks.0 = attention + resnet (1) and a downsampler (3),
# down_blocks.1 = resnet (4), mid (12), up_blocks.0 = resnets (13, 14) and an upsampler (15),
# up_blocks.1 = attention + resnet (16, 17).
TINY_BLOCKS = {1, 3, 4, 12, 13, 14, 15, 16, 17}
TINY_ATTENTION_BLOCKS = {1, 12, 16, 17}


@pytest.mark.parametrize("name, sdxl, index", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", False, 1),
    ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q", False, 2),
    ("lora_unet_down_blocks_0_resnets_1_conv1", False, 2),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", False, 3),
    ("lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0", False, 5),
    ("lora_unet_down_blocks_1_resnets_0_conv_shortcut", False, 4),
    ("lora_unet_down_blocks_3_resnets_1_time_emb_proj", False, 11),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj", False, 12),
    ("lora_unet_mid_block_resnets_1_conv2", False, 12),
    ("lora_unet_up_blocks_0_resnets_0_conv1", False, 13),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", False, 15),
    ("lora_unet_up_blocks_1_attentions_0_proj_in", False, 16),
    ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2", False, 24),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", False, -1),
    ("lora_unet_input_blocks_1_0_in_layers_2", True, 2),
    ("lora_unet_input_blocks_3_0_op", True, 4),
    ("lora_unet_input_blocks_4_1_proj_in", True, 5),
    ("lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k", True, 9),
    ("lora_unet_middle_block_0_emb_layers_1", True, 10),
    ("lora_unet_middle_block_1_transformer_blocks_9_ff_net_2", True, 11),
    ("lora_unet_middle_block_2_out_layers_3", True, 12),
    ("lora_unet_output_blocks_0_1_transformer_blocks_3_attn2_to_out_0", True, 13),
    ("lora_unet_output_blocks_2_2_conv", True, 15),
    ("lora_unet_output_blocks_8_0_skip_connection", True, 21),
    ("lora_te2_text_model_encoder_layers_31_mlp_fc1", True, -1),
])
def test_block_index_of_sd_scripts_module_names(name, sdxl, index):
    assert block_index(name, sdxl) == index


def spec_names(file: str) -> list[str]:
    return [line.split()[0] for line in (SPEC_DIR / file).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("spec_file, sdxl, blocks", [
    ("sd15-conv.txt", False, set(range(1, 25))),  # SD1.5 has a LoRA in every block but 0 (conv_in)
    ("sd2.txt", False, {1, 2, 4, 5, 7, 8, 12, 16, 17, 18, 19, 20, 21, 22, 23, 24}),
    ("sdxl-conv.txt", True, set(range(2, 22))),  # input_blocks 0 is conv_in
])
def test_every_module_sd_scripts_makes_has_a_block(spec_file, sdxl, blocks):
    names = spec_names(spec_file)
    assert {block_index(n, sdxl) for n in names if n.startswith("lora_unet_")} == blocks
    assert all(block_index(n, sdxl) == -1 for n in names if n.startswith("lora_te"))


def sdxl_block_from_diffusers(path: str) -> int:
    """Independent of the SGM names: SDXL's block number from the diffusers module path. sd-scripts numbers
    input_blocks k as 1+k, middle_block k as 10+k and output_blocks k as 13+k; the SGM-to-diffusers layout is the
    table in tests/fixtures/lora-keys/README.md."""
    if m := re.match(r"down_blocks\.(\d)\.(resnets|attentions|downsamplers)\.(\d)", path):
        level, kind, j = int(m[1]), m[2], int(m[3])
        return 1 + (3 * (level + 1) if kind == "downsamplers" else 3 * level + j + 1)
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d)", path):
        return 10 + (1 if m[1] == "attentions" else 2 * int(m[2]))
    m = re.match(r"up_blocks\.(\d)\.(resnets|attentions|upsamplers)\.(\d)", path)
    level, kind, j = int(m[1]), m[2], int(m[3])
    return 13 + 3 * level + (2 if kind == "upsamplers" else j)


def test_sdxl_block_of_every_module_agrees_with_the_diffusers_layout():
    rows = [line.split() for line in (SPEC_DIR / "sdxl-diffusers-map.txt").read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]
    rows = [r for r in rows if r[0].startswith("lora_unet_") or not r[0].startswith("lora_")]
    assert len(rows) == 788
    for row in rows:
        name = row[0] if row[0].startswith("lora_unet_") else "lora_unet_" + row[0]
        assert block_index(name, True) == sdxl_block_from_diffusers(row[1]), row


# -- per-block ranks --------------------------------------------------------------------------------------------


def per_block(values: dict[int, object], default: object, count: int = 25) -> str:
    return ",".join(str(values.get(i, default)) for i in range(count))


def unet_modules(network) -> dict:
    return {m.lora_name: m for m in network.lora_modules() if m.lora_name.startswith("lora_unet_")}


def test_block_dims_give_each_block_its_rank_and_alpha(tiny_sd1):
    te, unet = tiny_sd1["text_encoder"], tiny_sd1["unet"]
    dims = {1: 2, 3: 7, 4: 5, 12: 3, 13: 1, 16: 0, 17: 6}
    conv_dims = {1: 3, 12: 0, 15: 4}
    options = {"block_dims": per_block(dims, 4), "block_alphas": per_block({4: 0.5, 17: 3}, 1),
               "conv_block_dims": per_block(conv_dims, 2), "conv_block_alphas": per_block({1: 1.5}, 1)}
    network = network_from_args([te], unet, options, rank=8, alpha=1)

    expected = {}
    for target in find_lora_targets(unet, prefix="lora_unet", is_text_encoder=False, include_conv=True):
        index = block_index(target.name, False)
        if target.kind == "conv3x3":
            rank, alpha = conv_dims.get(index, 2), 1.5 if index == 1 else 1.0
        else:
            rank, alpha = dims.get(index, 4), {4: 0.5, 17: 3.0}.get(index, 1.0)
        if rank:
            expected[target.name] = (rank, alpha)
    modules = unet_modules(network)
    assert set(modules) == set(expected) and len(modules) < 79  # some blocks were left out
    assert not any(block_index(n, False) == 16 and m.lora_down.weight.dim() == 2 for n, m in modules.items())
    for name, module in modules.items():
        rank, alpha = expected[name]
        assert module.lora_down.weight.shape[0] == rank and module.lora_up.weight.shape[1] == rank, name
        assert module.alpha.item() == alpha and module.scale == alpha / rank
    assert all(m.rank == 8 for m in network.lora_modules() if m.lora_name.startswith("lora_te_"))


def test_plugin_create_network_passes_block_options_through(tiny_sd1):
    import networks.lora

    options = {"block_dims": per_block({1: 2, 17: 0}, 4), "conv_dim": "2", "up_lr_weight": "1,1,0",
               "loraplus_lr_ratio": "8"}
    plugin = networks.lora.create_network(1.0, "4", 1, None, tiny_sd1["text_encoder"], tiny_sd1["unet"],
                                          neuron_dropout=None, dropout=None, **options)
    ours = network_from_args([tiny_sd1["text_encoder"]], tiny_sd1["unet"], options, rank=4, alpha=1)
    assert {k: v.shape for k, v in plugin.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert plugin.block_lr_weights[15] == 0 and plugin.loraplus_ratios == (8.0, None, None)
    with pytest.raises(ConfigError, match="block_dims has 23 values, but needs 25"):
        networks.lora.create_network(1.0, 4, 1, None, tiny_sd1["text_encoder"], tiny_sd1["unet"],
                                     block_dims=per_block({}, 4, count=23))


# -- per-block learning rates -----------------------------------------------------------------------------------


def test_lr_weights_make_one_param_group_per_block(tiny_sd1):
    options = {"conv_dim": "2", "down_lr_weight": "1,0.25,1,0.75,2", "mid_lr_weight": "0.1",
               "up_lr_weight": "1,0.5,1,1,0.2"}
    network = network_from_args([tiny_sd1["text_encoder"]], tiny_sd1["unet"], options)
    groups, descriptions = network.prepare_optimizer_params(5e-5, 1e-3, 1e-4)
    weights = {1: 0.25, 3: 0.75, 4: 2.0, 12: 0.1, 13: 1.0, 14: 0.5, 15: 1.0, 16: 1.0, 17: 0.2}
    assert descriptions[0] == "textencoder" and len(set(descriptions)) == len(descriptions)
    lrs = dict(zip(descriptions, (g["lr"] for g in groups)))
    assert lrs == pytest.approx({"textencoder": 5e-5, **{f"unet_block{i}": 1e-3 * w for i, w in weights.items()}})
    modules = unet_modules(network)
    for description, group in zip(descriptions[1:], groups[1:]):
        block = int(description.removeprefix("unet_block"))
        expected = [p for n, m in modules.items() if block_index(n, False) == block
                    for p in (m.lora_down.weight, m.lora_up.weight)]
        assert [id(p) for p in group["params"]] == [id(p) for p in expected]
    assert sum(len(g["params"]) for g in groups) == len(network.trainable_parameters())


def test_blocks_at_or_below_the_zero_threshold_get_no_modules(tiny_sd1):
    options = {"conv_dim": "2", "down_lr_weight": "0.5,0.05,0,1", "up_lr_weight": "0,0,0,0.1,0.3",
               "block_lr_zero_threshold": "0.1"}
    network = network_from_args([tiny_sd1["text_encoder"]], tiny_sd1["unet"], options)
    # down: block 1 -> 0.05 (at or below 0.1), 3 -> 1, 4 -> padded 1.0; up: 13-15 -> 0, 16 -> 0.1, 17 -> 0.3.
    assert {block_index(n, False) for n in unet_modules(network)} == {3, 4, 12, 17}
    assert any(n.startswith("lora_te_") for n in network.module_names())
    groups, descriptions = network.prepare_optimizer_params(None, 1e-3, 1e-4)
    lrs = {d: g["lr"] for d, g in zip(descriptions, groups)}
    assert lrs == pytest.approx({"textencoder": 1e-4, "unet_block3": 1e-3, "unet_block4": 1e-3, "unet_block12": 1e-3,
                                 "unet_block17": 3e-4})


def test_presets_padding_and_family_layout(caplog):
    assert preset_weights("down_lr_weight", "linear", 12) == pytest.approx([i / 11 for i in range(12)])
    assert preset_weights("up_lr_weight", "reverse_linear+0.5", 9) == pytest.approx([1.5 - i / 8 for i in range(9)])
    assert preset_weights("x", "sine", 12) == pytest.approx([math.sin(math.pi * i / 22) for i in range(12)])
    assert preset_weights("x", "cosine", 12) == pytest.approx([math.sin(math.pi * i / 22) for i in range(11, -1, -1)])
    assert preset_weights("x", "zeros+0.25", 9) == [0.25] * 9
    with pytest.raises(ConfigError, match="12 comma-separated weights"):
        preset_weights("down_lr_weight", "0.5", 12)

    sd = block_lr_weights({"down_lr_weight": "cosine", "mid_lr_weight": "0.5"}, sdxl=False)
    assert len(sd) == 25 and sd[0] == pytest.approx(1.0) and sd[11] == 0.0  # cos(pi/2) = 0: the block is dropped
    assert sd[12] == 0.5 and sd[13:] == [1.0] * 12
    with caplog.at_level(logging.WARNING, logger="trainer"):
        sdxl = block_lr_weights({"down_lr_weight": "0.5,,2", "mid_lr_weight": "0.1,0.2,0.3,0.4",
                                 "up_lr_weight": ",".join(["0.7"] * 11)}, sdxl=True)
    # SDXL: block 0 and 22 (no LoRA there) keep 1.0; an empty item is 0; short lists are padded with 1.0,
    # long ones cut, each with a warning.
    assert sdxl == pytest.approx([1.0, 0.5, 0.0, 2.0] + [1.0] * 6 + [0.1, 0.2, 0.3] + [0.7] * 9 + [1.0])
    assert "the other 6 blocks get 1.0" in caplog.text and "only the first 3 are used" in caplog.text
    assert block_lr_weights({"block_dims": "1"}, sdxl=False) is None


# -- LoRA+ ------------------------------------------------------------------------------------------------------


def test_loraplus_puts_lora_up_weights_in_their_own_groups(tiny_sd1):
    te, unet = tiny_sd1["text_encoder"], tiny_sd1["unet"]
    network = network_from_args([te], unet, {"loraplus_lr_ratio": "4", "loraplus_unet_lr_ratio": "16"})
    groups, descriptions = network.prepare_optimizer_params(1e-4, 1e-3, 1e-5)
    assert descriptions == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 4e-4, 1e-3, 1.6e-2])
    te_modules = [m for m in network.lora_modules() if m.lora_name.startswith("lora_te_")]
    assert [id(p) for p in groups[0]["params"]] == [id(m.lora_down.weight) for m in te_modules]
    assert [id(p) for p in groups[1]["params"]] == [id(m.lora_up.weight) for m in te_modules]
    assert [id(p) for p in groups[3]["params"]] == [id(m.lora_up.weight) for m in unet_modules(network).values()]

    network = network_from_args([te], unet, {"loraplus_text_encoder_lr_ratio": "2", "mid_lr_weight": "0.5"})
    groups, descriptions = network.prepare_optimizer_params(None, None, 1e-4)
    lrs = {d: g["lr"] for d, g in zip(descriptions, groups)}  # no UNet ratio: lora_up stays with lora_down
    assert lrs == pytest.approx({"textencoder": 1e-4, "textencoder plus": 2e-4, "unet_block1": 1e-4,
                                 "unet_block12": 5e-5, "unet_block16": 1e-4, "unet_block17": 1e-4})

    network = network_from_args([te], unet, {"loraplus_lr_ratio": "16", "down_lr_weight": "1,0.5"})
    groups, descriptions = network.prepare_optimizer_params(0, 1e-3, 1e-4)  # te lr 0: no TE groups
    lrs = {d: g["lr"] for d, g in zip(descriptions, groups)}
    assert lrs == pytest.approx({"unet_block1": 5e-4, "unet_block1 plus": 8e-3, "unet_block12": 1e-3,
                                 "unet_block12 plus": 1.6e-2, "unet_block16": 1e-3, "unet_block16 plus": 1.6e-2,
                                 "unet_block17": 1e-3, "unet_block17 plus": 1.6e-2})
    assert descriptions[:2] == ["unet_block1", "unet_block1 plus"]  # each block's plus group right after it


def test_sdxl_block_dims_on_the_full_size_architecture():
    from test_network_keys import build_meta

    text_encoders, unet = build_meta("sdxl")
    dims = {i: i % 4 for i in range(23)}  # ranks 0-3: blocks 4, 8, 12, 16, 20 get nothing
    options = {"block_dims": per_block(dims, 0, count=23), "conv_block_dims": per_block({5: 2, 15: 3}, 0, 23)}
    network = network_from_args(text_encoders, unet, options, sdxl=True, rank=4, train_text_encoder=False)
    modules = unet_modules(network)
    assert modules and all(n.startswith("lora_unet_") for n in network.module_names())
    conv = {n for n, m in modules.items() if m.lora_down.weight.shape[-2:] == (3, 3)}
    assert {block_index(n, True) for n in conv} == {5, 15}
    for name, module in modules.items():
        index = block_index(name, True)
        assert module.rank == ({5: 2, 15: 3}[index] if name in conv else dims[index]) > 0
    # Blocks 4 and 7 (input_blocks 3 and 6) hold only the downsampler's 3x3 conv, whose conv rank is 0 here.
    ranked = {i for i in range(2, 22) if dims[i]} - {4, 7}
    assert {block_index(n, True) for n in modules} == ranked
    targets = find_lora_targets(unet, prefix="lora_unet", is_text_encoder=False, include_conv=True, sdxl=True)
    conv_dims = {5: 2, 15: 3}
    assert len(modules) == sum(1 for t in targets if (conv_dims.get(block_index(t.name, True), 0)
                                                      if t.kind == "conv3x3" else dims[block_index(t.name, True)]))
