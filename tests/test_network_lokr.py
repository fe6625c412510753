"""LoKr (`--network_module networks.lokr`): sd-scripts' networks/lokr.py key names and shapes on the full-size
SD1.5 / SDXL architectures (meta device), the Kronecker maths against formulas written out here, and a tiny run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import read_lora
from test_network_keys import read_spec_list
from test_network_loha import _filled, meta_models, resumed_run_matches, train_reload_and_merge  # noqa: F401
from torch import nn

from trainer.network.lokr import LoKrModule, factorization
from trainer.network.lora import LoRANetwork, network_from_args


def balanced_split(dimension: int) -> tuple[int, int]:
    """(m, n) with m the largest divisor not above sqrt(dimension): what factorization(dim, -1) must give."""
    m = max(d for d in range(1, math.isqrt(dimension) + 1) if dimension % d == 0)
    return m, dimension // m


def test_factorization_is_the_balanced_split_and_honours_factor():
    for dimension in (320, 640, 768, 1024, 1280, 2048, 2560, 3072, 5120, 10240, 1920, 960):
        assert factorization(dimension) == balanced_split(dimension)
    assert factorization(320) == (16, 20) and factorization(1280, 8) == (8, 160) and factorization(512, 4) == (4, 128)


def expected_lokr_shapes(name, dim_in, dim_out, kind, rank) -> dict:
    """sd-scripts' LoKrModule: w1 [out_l, in_m] full; w2 low-rank [out_k, r] @ [r, in_n (x 9 for a 3x3 conv)]
    while rank < max(out_k, in_n) / 2, else full lokr_w2 [out_k, in_n (, 3, 3)]."""
    out_l, out_k = balanced_split(dim_out)
    in_m, in_n = balanced_split(dim_in)
    shapes = {f"{name}.lokr_w1": (out_l, in_m), f"{name}.alpha": ()}
    if rank < max(out_k, in_n) / 2:
        shapes.update({f"{name}.lokr_w2_a": (out_k, rank),
                       f"{name}.lokr_w2_b": (rank, in_n * (9 if kind == "conv3x3" else 1))})
    else:
        shapes[f"{name}.lokr_w2"] = (out_k, in_n, 3, 3) if kind == "conv3x3" else (out_k, in_n)
    return shapes


@pytest.mark.parametrize("family, spec_file, rank", [("sd15", "sd15-conv.txt", 4), ("sdxl", "sdxl-conv.txt", 8),
                                                     ("sd15", "sd15.txt", 100000), ("sd2", "sd2.txt", 4)])
def test_lokr_keys_and_shapes_match_sd_scripts_formulas(meta_models, family, spec_file, rank):  # noqa: F811
    text_encoders, unet = meta_models(family)
    options = {"conv_dim": str(rank)} if "conv" in spec_file else {}
    network = network_from_args(text_encoders, unet, options, sdxl=family == "sdxl", rank=rank, alpha=1,
                                network_module="networks.lokr")
    expected = {}
    for row in read_spec_list(spec_file):
        expected.update(expected_lokr_shapes(*row, rank=rank))
    ours = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    assert ours == expected
    if rank == 100000:  # every factor full: sd-scripts saves alpha = rank and the scale is 1
        assert all(m.scale == 1.0 and m.full_factors for m in network.lora_modules())


def reference_lokr_delta(sd: dict, weight_shape) -> torch.Tensor:
    """What ComfyUI's / LyCORIS' loader rebuilds from a file: w1, w2 from full or low-rank factors (Tucker core
    through einsum), scale = alpha / dim only where a factor is low-rank, kron with w1 widened to w2's rank."""
    dim = None
    if "lokr_w1" in sd:
        w1 = sd["lokr_w1"]
    else:
        w1, dim = sd["lokr_w1_a"] @ sd["lokr_w1_b"], sd["lokr_w1_b"].shape[0]
    if "lokr_w2" in sd:
        w2 = sd["lokr_w2"]
    else:
        dim = sd["lokr_w2_b"].shape[0]
        if "lokr_t2" in sd:
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", sd["lokr_t2"], sd["lokr_w2_a"], sd["lokr_w2_b"])
        else:  # a 3x3 conv's kernel stays flattened in w2: the 2-D kron, reshaped, holds the same numbers
            w2 = sd["lokr_w2_a"] @ sd["lokr_w2_b"]
    scale = float(sd["alpha"]) / dim if dim is not None else 1.0
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return (torch.kron(w1, w2.contiguous()) * scale).reshape(weight_shape)


@pytest.mark.parametrize("base, options", [
    (nn.Linear(24, 40), {}), (nn.Linear(24, 40), {"factor": 4}), (nn.Linear(64, 64), {"decompose_both": True}),
    (nn.Conv2d(8, 16, 1), {}), (nn.Conv2d(16, 32, 3, padding=1), {}),
    (nn.Conv2d(16, 32, 3, stride=2, padding=1), {"use_tucker": True}), (nn.Conv2d(8, 16, 3, padding=1), {"rank": 64}),
])
def test_lokr_delta_and_forward_follow_the_formulas(base, options):
    options = dict(options)
    module = _filled(LoKrModule(base, options.pop("rank", 2), 3.0, **options))
    sd = {k: v.detach() for k, v in module.state_dict().items()}
    assert ("lokr_t2" in sd) == bool(options.get("use_tucker")) and ("lokr_w1_a" in sd) == ("decompose_both" in options)
    delta = module.delta_weight()
    torch.testing.assert_close(delta, reference_lokr_delta(sd, tuple(base.weight.shape)), rtol=1e-5, atol=1e-5)
    x = torch.randn(3, base.in_features) if isinstance(base, nn.Linear) else torch.randn(2, base.in_channels, 9, 9)
    expected = (F.linear(x, base.weight + delta, base.bias) if isinstance(base, nn.Linear)
                else F.conv2d(x, base.weight + delta, base.bias, stride=base.stride, padding=base.padding))
    module.attach()
    torch.testing.assert_close(base(x), expected, rtol=1e-4, atol=1e-4)


def test_lokr_starts_at_zero_and_lora_plus_speeds_up_w1(tiny_sd1):
    tes, unet = [tiny_sd1["text_encoder"]], tiny_sd1["unet"]
    network = network_from_args(tes, unet, {"loraplus_unet_lr_ratio": "8"}, rank=2, alpha=1,
                                network_module="networks.lokr")
    assert all(torch.count_nonzero(m.delta_weight()) == 0 for m in network.lora_modules())
    groups, descriptions = network.prepare_optimizer_params(None, None, 1e-3)
    assert descriptions == ["textencoder", "unet", "unet plus"]
    unet_w1 = {id(m.lokr_w1) for m in network.lora_modules() if m.lora_name.startswith("lora_unet")}
    assert {id(p) for p in groups[2]["params"]} == unet_w1 and groups[2]["lr"] == pytest.approx(8e-3)


def test_a_lokr_file_with_another_factor_loads_by_its_shapes(tiny_sd1, tmp_path):
    tes, unet = [tiny_sd1["text_encoder"]], tiny_sd1["unet"]
    network = _filled(network_from_args(tes, unet, {"factor": "4", "conv_dim": "2", "use_tucker": "true"}, rank=2,
                                        alpha=1, network_module="networks.lokr"))
    path = tmp_path / "lokr.safetensors"
    network.save_weights(path)
    tensors, _ = read_lora(path)
    again = LoRANetwork.from_weights(tes, unet, tensors)  # no factor given: w1's shape comes from the file
    assert again.module_type == "lokr"
    for a, b in zip(network.lora_modules(), again.lora_modules()):
        torch.testing.assert_close(a.delta_weight(), b.delta_weight())


def test_lokr_trains_reloads_and_merges_from_the_command_line(tiny_sd1_dir, train_data_dir, tmp_path):
    tensors = train_reload_and_merge("networks.lokr", ".lokr_w1", ["conv_dim=2", "factor=4"], tiny_sd1_dir,
                                     train_data_dir, tmp_path)
    assert all(tensors[k].dim() == 2 for k in tensors if k.endswith(".lokr_w1"))


def test_an_interrupted_lokr_run_resumes_to_the_same_weights(tiny_sd1_dir, train_data_dir, tmp_path):
    assert resumed_run_matches("networks.lokr", ["conv_dim=2", "factor=4"], tiny_sd1_dir, train_data_dir,
                               tmp_path) <= 1e-6
