"""LoHa (`--network_module networks.loha`): sd-scripts' networks/loha.py key names and shapes on the full-size
SD1.5 / SDXL architectures (meta device), the weight maths against formulas written out here, and a tiny run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import read_lora
from test_network_keys import meta_models, read_spec_list  # noqa: F401 (meta_models: a fixture)
from torch import nn

from trainer.cli import main
from trainer.network.loha import LoHaModule
from trainer.network.lora import LoRANetwork, network_from_args


def expected_loha_shapes(name: str, dim_in: int, dim_out: int, kind: str, rank: int, conv_rank: int) -> dict:
    """sd-scripts' LoHaModule shapes: [out, r] and [r, in] pairs; a 3x3 conv flattens its kernel into `in`."""
    r = conv_rank if kind == "conv3x3" else rank
    flat_in = dim_in * 9 if kind == "conv3x3" else dim_in
    return {f"{name}.hada_w1_a": (dim_out, r), f"{name}.hada_w1_b": (r, flat_in),
            f"{name}.hada_w2_a": (dim_out, r), f"{name}.hada_w2_b": (r, flat_in), f"{name}.alpha": ()}


@pytest.mark.parametrize("family, spec_file", [("sd15", "sd15-conv.txt"), ("sdxl", "sdxl-conv.txt"),
                                               ("sd15", "sd15.txt"), ("sd2", "sd2.txt")])
def test_loha_keys_and_shapes_match_sd_scripts_formulas(meta_models, family, spec_file):
    text_encoders, unet = meta_models(family)
    conv = "conv" in spec_file
    options = {"conv_dim": "2", "conv_alpha": "1"} if conv else {}
    network = network_from_args(text_encoders, unet, options, sdxl=family == "sdxl", rank=4, alpha=1,
                                network_module="networks.loha")
    expected = {}
    for row in read_spec_list(spec_file):
        expected.update(expected_loha_shapes(*row, rank=4, conv_rank=2))
    ours = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    assert ours == expected
    assert network.state_dict()[next(k for k in ours if k.endswith(".alpha"))].dtype == torch.int64


def _filled(module: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return module


def reference_loha_delta(sd: dict, weight_shape) -> torch.Tensor:
    """What ComfyUI's / LyCORIS' loader rebuilds from a file: dim = w1_b.shape[0], scale = alpha / dim, Tucker cores
    through einsum, then the base weight's shape."""
    dim = sd["hada_w1_b"].shape[0]
    scale = float(sd["alpha"]) / dim
    if "hada_t1" in sd:
        w1 = torch.einsum("i j k l, j r, i p -> p r k l", sd["hada_t1"], sd["hada_w1_b"], sd["hada_w1_a"])
        w2 = torch.einsum("i j k l, j r, i p -> p r k l", sd["hada_t2"], sd["hada_w2_b"], sd["hada_w2_a"])
    else:
        w1, w2 = sd["hada_w1_a"] @ sd["hada_w1_b"], sd["hada_w2_a"] @ sd["hada_w2_b"]
    return (w1 * w2 * scale).reshape(weight_shape)


@pytest.mark.parametrize("base, tucker", [(nn.Linear(24, 40), False), (nn.Conv2d(8, 16, 1), False),
                                          (nn.Conv2d(8, 16, 3, padding=1), False),
                                          (nn.Conv2d(8, 16, 3, stride=2, padding=1), True)])
def test_loha_delta_and_forward_follow_the_formulas(base, tucker):
    module = _filled(LoHaModule(base, 4, 2.0, use_tucker=tucker))
    assert ("hada_t1" in module.state_dict()) == tucker
    sd = {k: v.detach() for k, v in module.state_dict().items()}
    delta = module.delta_weight()
    torch.testing.assert_close(delta, reference_loha_delta(sd, base.weight.shape), rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 24) if isinstance(base, nn.Linear) else torch.randn(2, 8, 9, 9)
    expected = (F.linear(x, base.weight + delta, base.bias) if isinstance(base, nn.Linear)
                else F.conv2d(x, base.weight + delta, base.bias, stride=base.stride, padding=base.padding))
    module.attach()
    torch.testing.assert_close(base(x), expected, rtol=1e-4, atol=1e-4)
    module.merge_into_base(1.0)  # merged weight = W + delta, and the hook is gone
    torch.testing.assert_close(base(x), expected, rtol=1e-4, atol=1e-4)


def test_loha_starts_at_zero_and_trains_every_factor():
    base = nn.Linear(16, 16)
    module = LoHaModule(base, 4, 1)
    assert torch.count_nonzero(module.delta_weight()) == 0  # w2_a starts at zero, as sd-scripts
    module.attach()
    base(torch.randn(2, 16)).sum().backward()
    assert module.hada_w2_a.grad is not None and module.hada_w2_a.grad.abs().sum() > 0
    assert math.isclose(module.scale, 0.25)


def test_loha_file_round_trip_lora_plus_and_refused_max_norm(tiny_sd1, tmp_path):
    tes, unet = [tiny_sd1["text_encoder"]], tiny_sd1["unet"]
    network = network_from_args(tes, unet, {"conv_dim": "2", "use_tucker": "true", "loraplus_lr_ratio": "4"},
                                rank=4, alpha=2, network_module="networks.loha")
    _filled(network)
    path = tmp_path / "loha.safetensors"
    network.save_weights(path, dtype=torch.float32, metadata={"ss_network_module": "networks.loha"})
    tensors, meta = read_lora(path)
    assert any(k.endswith(".hada_t1") for k in tensors) and meta["ss_network_module"] == "networks.loha"
    again = LoRANetwork.from_weights(tes, unet, tensors)  # --dim_from_weights / merge: the shape from the file
    assert again.module_type == "loha"
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in tensors.items()}
    for a, b in zip(network.lora_modules(), again.lora_modules()):
        torch.testing.assert_close(a.delta_weight(), b.delta_weight())
    groups, descriptions = network.prepare_optimizer_params(None, None, 1e-3)
    assert descriptions == ["textencoder", "textencoder plus", "unet", "unet plus"]
    plus_ids = {id(m.hada_w2_a) for m in network.lora_modules()}
    assert {id(p) for p in groups[1]["params"]} | {id(p) for p in groups[3]["params"]} == plus_ids
    assert groups[1]["lr"] == pytest.approx(4e-3)
    with pytest.raises(ValueError, match="LoRA / LoCon only"):
        network.max_norm_regularization(1.0)


def base_args(model_dir, data_dir, out_dir, *extra):
    return ["--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(data_dir),
            "--output_dir", str(out_dir), "--output_name", "net", "--resolution", "64",
            "--caption_extension", ".txt", "--network_dim", "4", "--learning_rate", "1e-2", "--max_train_steps", "3",
            "--train_batch_size", "2", "--seed", "1", "--max_data_loader_n_workers", "0", *extra]


def train_reload_and_merge(module: str, marker: str, network_args: list[str], tiny_sd1_dir, train_data_dir,
                           tmp_path) -> dict:
    """Train a few steps with `module`, continue from the file (--network_weights), merge it; the saved tensors."""
    out = tmp_path / "out"
    assert main(["train", *base_args(tiny_sd1_dir, train_data_dir, out, "--network_module", module,
                                     "--network_args", *network_args, "--scale_weight_norms", "1.0")]) == 0
    tensors, meta = read_lora(out / "net.safetensors")
    assert meta["ss_network_module"] == module and "conv_dim" in meta["ss_network_args"]
    assert any(k.startswith("lora_te_") for k in tensors) and any(k.startswith("lora_unet_") for k in tensors)
    assert any(k.endswith(marker) for k in tensors) and not any("lora_down" in k for k in tensors)
    trained = [v for k, v in tensors.items() if k.endswith((".hada_w2_a", ".lokr_w2_b", ".lokr_w2"))]
    assert any(torch.count_nonzero(v) for v in trained)  # the zero-initialised factor moved: training changed it
    for extra in ([], ["--dim_from_weights"]):  # continue from the file; then also take the shape from it
        again = tmp_path / f"again{len(extra)}"
        assert main(["train", *base_args(tiny_sd1_dir, train_data_dir, again, "--network_module", module,
                                         "--network_args", *network_args, "--network_weights",
                                         str(out / "net.safetensors"), "--max_train_steps", "1", *extra)]) == 0
        reloaded, _ = read_lora(again / "net.safetensors")
        assert {k: v.shape for k, v in reloaded.items()} == {k: v.shape for k, v in tensors.items()}
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", "--model", str(tiny_sd1_dir), "--lora", str(out / "net.safetensors"),
                 "--output", str(merged)]) == 0
    assert merged.is_file()
    return tensors


def test_loha_trains_reloads_and_merges_from_the_command_line(tiny_sd1_dir, train_data_dir, tmp_path):
    train_reload_and_merge("networks.loha", ".hada_w1_a", ["conv_dim=2", "conv_alpha=1"], tiny_sd1_dir,
                           train_data_dir, tmp_path)


def resumed_run_matches(module: str, network_args: list[str], tiny_sd1_dir, train_data_dir, tmp_path) -> float:
    """Train 4 steps saving states, resume from step 2 (--skip_until_initial_step): the largest difference between
    the resumed and the uninterrupted final weights. Rank and module dropout draw random numbers on the way."""
    args = ["--network_module", module, "--network_args", *network_args, "rank_dropout=0.2", "module_dropout=0.1",
            "--max_train_steps", "4", "--train_batch_size", "1"]
    reference = tmp_path / "reference"
    assert main(["train", *base_args(tiny_sd1_dir, train_data_dir, reference, *args, "--save_state",
                                     "--save_every_n_steps", "2")]) == 0
    resumed = tmp_path / "resumed"
    assert main(["train", *base_args(tiny_sd1_dir, train_data_dir, resumed, *args, "--resume",
                                     str(reference / "net-step00000002-state"), "--skip_until_initial_step")]) == 0
    a, _ = read_lora(reference / "net.safetensors")
    b, _ = read_lora(resumed / "net.safetensors")
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_an_interrupted_loha_run_resumes_to_the_same_weights(tiny_sd1_dir, train_data_dir, tmp_path):
    assert resumed_run_matches("networks.loha", ["conv_dim=2"], tiny_sd1_dir, train_data_dir, tmp_path) <= 1e-6


def test_sd_scripts_plugin_entry_points_build_loha_and_lokr(tiny_sd1, tmp_path):
    """networks/loha.py and lokr.py as train_network.py calls them: create_network(...) with string kwargs, and
    create_network_from_weights(...) shaped like the file."""
    import networks.loha
    import networks.lokr

    te, unet = tiny_sd1["text_encoder"], tiny_sd1["unet"]
    loha = networks.loha.create_network(1.0, 4, 1, None, te, unet, conv_dim="2", use_tucker="True", unknown="x")
    lokr = networks.lokr.create_network(1.0, 4, 1, None, te, unet, factor="4")
    assert loha.module_type == "loha" and any(m.tucker for m in loha.lora_modules())
    assert lokr.module_type == "lokr" and all(m.factors[0] <= 4 for m in lokr.lora_modules())
    path = tmp_path / "lokr.safetensors"
    lokr.save_weights(path)
    again, weights = networks.lokr.create_network_from_weights(1.0, str(path), None, te, unet)
    assert again.module_type == "lokr" and set(again.state_dict()) == set(weights)
