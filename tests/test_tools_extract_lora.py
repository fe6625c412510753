"""`python -m trainer extract_lora` (trainer.tools.extract_lora): a tiny model plus known low-rank changes planted in
a few layers gives those changes back as a LoRA; unchanged layers are left out, the text encoder only when it
changed by more than --min_diff (sd-scripts' rule), from diffusers folders and single files alike."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import read_lora, save_tiny_sd1_diffusers
from trainer.cli import main as cli_main
from trainer.errors import ConfigError
from trainer.models.export import save_single_file
from trainer.models.load import load_models
from trainer.network import lora_math
from trainer.network.lora import LoRANetwork, read_weights_file
from trainer.tools.extract_lora import main

# kohya name -> (module path, part) of the layers that get a planted change
PLANTED = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ("encoder.layers.0.self_attn.q_proj", "te"),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k":
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", "unet"),
    "lora_unet_down_blocks_0_attentions_0_proj_in": ("down_blocks.0.attentions.0.proj_in", "unet"),  # 1x1 conv
    "lora_unet_down_blocks_0_resnets_0_conv1": ("down_blocks.0.resnets.0.conv1", "unet"),  # 3x3 conv (LoCon)
}
CONV3X3 = "lora_unet_down_blocks_0_resnets_0_conv1"


def rank2_change(shape: torch.Size, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    columns = int(torch.Size(shape[1:]).numel())
    return (torch.randn(shape[0], 2, generator=generator) @ torch.randn(2, columns, generator=generator) * 0.3
            ).reshape(shape)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(original folder, tuned folder, {kohya name: the change}): the tuned model is the original with a rank-2
    change added to each PLANTED layer and nothing else."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    root = tmp_path_factory.mktemp("extract")
    org = save_tiny_sd1_diffusers(root / "org model")
    tuned = root / "tuned model"
    shutil.copytree(org, tuned)
    parts = {"unet": UNet2DConditionModel.from_pretrained(org / "unet"),
             "te": CLIPTextModel.from_pretrained(org / "text_encoder")}
    changes = {}
    for seed, (name, (path, part)) in enumerate(PLANTED.items()):
        # transformers 5 dropped CLIPTextModel's `text_model.` level; match the path's end either way
        layer = next(m for p, m in parts[part].named_modules() if p == path or p.endswith("." + path))
        changes[name] = rank2_change(layer.weight.shape, seed)
        with torch.no_grad():
            layer.weight += changes[name]
    parts["unet"].save_pretrained(tuned / "unet")
    parts["te"].save_pretrained(tuned / "text_encoder")
    return org, tuned, changes


def deltas(path: Path) -> dict[str, torch.Tensor]:
    tensors = read_weights_file(path)
    return {key[: -len(".lora_down.weight")]: lora_math.lora_delta(
        tensors[key], tensors[key.replace("lora_down", "lora_up")], tensors.get(key.replace("lora_down.weight", "alpha")))
        for key in tensors if key.endswith(".lora_down.weight")}


def test_extract_gives_the_planted_changes_back_and_leaves_unchanged_layers_out(planted, tmp_path):
    org, tuned, changes = planted
    out = tmp_path / "lora.safetensors"
    assert main(["--model_org", str(org), "--model_tuned", str(tuned), "--save_to", str(out), "--dim", "2",
                 "--conv_dim", "2", "--clamp_quantile", "1", "--device", "cpu"]) == 0
    extracted = deltas(out)
    assert extracted.keys() == changes.keys()
    for name, change in changes.items():
        torch.testing.assert_close(extracted[name], change, rtol=0, atol=1e-4, msg=name)
    _, meta = read_lora(out)
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_network_args"] == '{"conv_dim": "2", "conv_alpha": "2.0"}'
    assert meta["ss_v2"] == "False" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_module"] == "networks.lora" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["sshs_model_hash"]


def test_without_conv_dim_3x3_convs_are_not_extracted_and_the_default_clamp_applies(planted, tmp_path):
    org, tuned, changes = planted
    out = tmp_path / "lora.safetensors"
    exact = tmp_path / "exact.safetensors"
    main(["--model_org", str(org), "--model_tuned", str(tuned), "--save_to", str(out), "--dim", "2"])
    main(["--model_org", str(org), "--model_tuned", str(tuned), "--save_to", str(exact), "--dim", "2",
          "--clamp_quantile", "1"])
    assert deltas(out).keys() == changes.keys() - {CONV3X3}
    clamped, unclamped = read_weights_file(out), read_weights_file(exact)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    up, down = unclamped[f"{name}.lora_up.weight"], unclamped[f"{name}.lora_down.weight"]
    high = lora_math.quantile(torch.cat([up.flatten(), down.flatten()]), 0.99)
    torch.testing.assert_close(clamped[f"{name}.lora_up.weight"], up.clamp(-high, high))
    torch.testing.assert_close(clamped[f"{name}.lora_down.weight"], down.clamp(-high, high))
    assert not torch.equal(clamped[f"{name}.lora_up.weight"], up)
    assert read_lora(out)[1]["ss_network_args"] == "{}"


def test_text_encoder_within_min_diff_is_left_out(planted, tmp_path):
    org, tuned, changes = planted
    out = tmp_path / "lora.safetensors"
    largest = float(changes["lora_te_text_model_encoder_layers_0_self_attn_q_proj"].abs().max())
    main(["--model_org", str(org), "--model_tuned", str(tuned), "--save_to", str(out), "--dim", "2",
          "--min_diff", str(largest * 1.01)])
    assert not any(name.startswith("lora_te") for name in deltas(out))


def test_a_single_file_tuned_model_gives_the_same_lora_which_loads_into_a_network(planted, tmp_path):
    org, tuned, changes = planted
    single = save_single_file(load_models(str(tuned)), tmp_path / "tuned.safetensors")
    out = tmp_path / "lora.safetensors"
    assert cli_main(["extract_lora", "--model_org", str(org), "--model_tuned", str(single), "--save_to", str(out),
                     "--dim", "2", "--clamp_quantile", "1", "--save_precision", "fp16"]) == 0
    extracted = deltas(out)
    assert extracted.keys() == changes.keys() - {CONV3X3}
    for name in extracted:
        torch.testing.assert_close(extracted[name], changes[name], rtol=0, atol=2e-3, msg=name)
    models = load_models(str(org))
    network = LoRANetwork.from_weights(models.text_encoders, models.unet, read_weights_file(out))
    assert sorted(network.module_names()) == sorted(extracted)


def test_identical_models_and_missing_paths_are_clear_errors(planted, tmp_path):
    org, _, _ = planted
    with pytest.raises(ConfigError, match="nothing to extract"):
        main(["--model_org", str(org), "--model_tuned", str(org), "--save_to", str(tmp_path / "o.safetensors")])
    with pytest.raises(ConfigError, match="does not exist"):
        main(["--model_org", str(org), "--model_tuned", str(tmp_path / "nope.safetensors"),
              "--save_to", str(tmp_path / "o.safetensors")])
    assert not (tmp_path / "o.safetensors").exists()


def test_sdxl_is_recognised_and_named_as_sd_scripts_names_it(tiny_sdxl_dir, tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    tuned = tmp_path / "tuned sdxl"
    shutil.copytree(tiny_sdxl_dir, tuned)
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir / "unet")
    te2 = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl_dir / "text_encoder_2")
    to_v = unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v")
    q_proj = next(m for p, m in te2.named_modules() if p.endswith("encoder.layers.0.self_attn.q_proj"))
    changes = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v": rank2_change(to_v.weight.shape, 1),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": rank2_change(q_proj.weight.shape, 2)}
    with torch.no_grad():
        to_v.weight += changes["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v"]
        q_proj.weight += changes["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"]
    unet.save_pretrained(tuned / "unet")
    te2.save_pretrained(tuned / "text_encoder_2")
    out = tmp_path / "sdxl.safetensors"
    main(["--model_org", str(tiny_sdxl_dir), "--model_tuned", str(tuned), "--save_to", str(out), "--dim", "2",
          "--clamp_quantile", "1"])
    extracted = deltas(out)
    assert extracted.keys() == changes.keys()  # text encoder 1 did not change: none of its layers is kept
    for name, change in changes.items():
        torch.testing.assert_close(extracted[name], change, rtol=0, atol=1e-4, msg=name)
    meta = read_lora(out)[1]
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
