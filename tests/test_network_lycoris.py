"""`--network_module lycoris.kohya`: LyCORIS' --network_args spelling mapped onto the native LoRA / LoHa / LoKr
modules, with kohya key names (LyCORIS itself names text-encoder keys lora_te_encoder_... under transformers 5)."""

from __future__ import annotations

import pytest
from conftest import read_lora
from test_network_keys import read_spec_list
from test_network_loha import meta_models, train_reload_and_merge  # noqa: F401 (a fixture)

from trainer.config.args import network_module_type, parse_network_args, parse_train_args
from trainer.errors import ConfigError
from trainer.network.lora import network_from_args

BASE = ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", "data", "--output_dir", "out"]


@pytest.mark.parametrize("algo, module_type", [("lora", "lora"), ("locon", "lora"), ("loha", "loha"),
                                               ("lokr", "lokr"), ("LoKr", "lokr")])
def test_algo_chooses_the_native_module(algo, module_type):
    options = parse_network_args([f"algo={algo}", "conv_dim=4", "conv_alpha=1", "preset=full"],
                                 network_module="lycoris.kohya")
    assert network_module_type("lycoris.kohya", options) == module_type


@pytest.mark.parametrize("item, words", [
    ("algo=ia3", ["algo=ia3", "not supported yet", "algo=lora, locon, loha or lokr"]),
    ("algo=diag-oft", ["algo=diag-oft", "not supported yet"]),
    ("algo=boft", ["algo=boft", "not supported yet"]),
    ("algo=glora", ["algo=glora"]),
    ("algo=full", ["algo=full"]),
    ("algo=lohaa", ["unknown algorithm", "did you mean"]),
    ("dora_wd=True", ["dora_wd=True", "DoRA", "not supported yet"]),
    ("train_norm=True", ["train_norm=True"]),
    ("preset=attn-only", ["preset=attn-only", "full, attn-mlp"]),
    ("block_dims=1,2", ["block_dims", "unknown key"]),
])
def test_lycoris_features_we_lack_are_refused_by_name(item, words):
    with pytest.raises(ConfigError) as caught:
        parse_train_args(BASE + ["--network_module", "lycoris.kohya", "--network_args", item])
    assert all(w in str(caught.value) for w in words), str(caught.value)


def test_sd_scripts_loha_and_lokr_refuse_block_options_and_unknown_modules():
    with pytest.raises(ConfigError, match="networks.loha understands"):
        parse_network_args(["block_dims=" + ",".join(["4"] * 25)], network_module="networks.loha")
    with pytest.raises(ConfigError, match="network_reg_dims: not supported yet"):
        parse_network_args(["network_reg_dims=attn.*=8"], network_module="networks.lokr")
    assert parse_network_args(["factor=8", "use_tucker=True"], network_module="networks.lokr")["factor"] == "8"
    with pytest.raises(ConfigError, match="factor"):
        parse_network_args(["factor=8"], network_module="networks.loha")


@pytest.mark.parametrize("algo, marker", [("loha", "hada_w1_a"), ("lokr", "lokr_w1"), ("locon", "lora_down.weight")])
def test_lycoris_networks_carry_kohya_names(meta_models, algo, marker):  # noqa: F811
    text_encoders, unet = meta_models("sd15")
    options = parse_network_args([f"algo={algo}", "conv_dim=4", "conv_alpha=1"], network_module="lycoris.kohya")
    network = network_from_args(text_encoders, unet, options, rank=4, alpha=1, network_module="lycoris.kohya")
    names = {key.partition(".")[0] for key in network.state_dict()}
    assert names == {row[0] for row in read_spec_list("sd15-conv.txt")}
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert network.module_type == network_module_type("lycoris.kohya", options)
    assert any(key.endswith(marker) for key in network.state_dict())


def test_lycoris_kohya_lokr_trains_from_the_command_line(tiny_sd1_dir, train_data_dir, tmp_path):
    train_reload_and_merge("lycoris.kohya", ".lokr_w1", ["algo=lokr", "conv_dim=2", "factor=4", "preset=full"],
                           tiny_sd1_dir, train_data_dir, tmp_path)
    _, meta = read_lora(tmp_path / "out" / "net.safetensors")
    assert '"algo": "lokr"' in meta["ss_network_args"]
