"""LoRANetwork on the tiny SD1 models: hooks vs merge, training touches only LoRA weights, files round-trip
and are written atomically, diffusers loads what we write, and the networks.lora plugin shim."""

from __future__ import annotations

import hashlib

import pytest
import torch

from trainer.errors import UserError
from trainer.network.lora import LoRANetwork, NetworkWeightsError, read_weights_file
from trainer.network.metadata import sshs_hashes


def make_network(parts: dict, **options) -> LoRANetwork:
    return LoRANetwork([parts["text_encoder"]], parts["unet"], **options)


def randomize_up(network: LoRANetwork, seed: int = 1, std: float = 0.05) -> None:
    """Non-zero up weights: with the default zeros every LoRA-vs-base comparison would pass even if broken."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.lora_modules():
            up = module.lora_up.weight
            up.copy_(torch.randn(up.shape, generator=generator) * std)


def outputs(parts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(UNet noise prediction, text encoder hidden states) for fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 6, 32, generator=generator)
    input_ids = torch.tensor([[512, 10, 20, 30, 513, 513]] * 2)
    with torch.no_grad():
        unet_out = parts["unet"](sample, torch.tensor([10, 500]), encoder_hidden_states=context).sample
        te_out = parts["text_encoder"](input_ids).last_hidden_state
    return unet_out, te_out


def test_hooked_output_equals_merged_weights_and_differs_from_base(tiny_sd1):
    base = outputs(tiny_sd1)
    network = make_network(tiny_sd1, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0)
    randomize_up(network)
    network.apply_to()
    network.eval()
    network.set_multiplier(0.7)
    hooked = outputs(tiny_sd1)
    network.merge_to_base(0.7)
    merged = outputs(tiny_sd1)
    for b, h, m in zip(base, hooked, merged):
        assert not torch.allclose(b, h, atol=1e-3)
        torch.testing.assert_close(m, h, rtol=1e-5, atol=1e-5)
    assert any(m.lora_down.weight.shape[-2:] == (3, 3) for m in network.lora_modules())  # LoCon merged too


def test_multiplier_zero_and_remove_give_the_base_output_exactly(tiny_sd1):
    base = outputs(tiny_sd1)
    network = make_network(tiny_sd1, conv_rank=2)
    randomize_up(network)
    network.apply_to()
    assert not torch.equal(outputs(tiny_sd1)[0], base[0])
    network.set_multiplier(0.0)
    assert all(torch.equal(a, b) for a, b in zip(outputs(tiny_sd1), base))
    network.set_multiplier(1.0)
    network.remove()
    assert all(torch.equal(a, b) for a, b in zip(outputs(tiny_sd1), base))
    # The models themselves were never changed: no LoRA module and no replaced forward inside them.
    assert not any("lora" in name for name, _ in tiny_sd1["unet"].named_modules())


def test_training_step_changes_only_lora_weights(tiny_sd1):
    unet, text_encoder = tiny_sd1["unet"], tiny_sd1["text_encoder"]
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    before = {f"unet.{k}": v.clone() for k, v in unet.state_dict().items()}
    before |= {f"te.{k}": v.clone() for k, v in text_encoder.state_dict().items()}
    network = make_network(tiny_sd1, rank=4, alpha=1)
    randomize_up(network)
    network.apply_to()
    network.train()
    groups, descriptions = network.prepare_optimizer_params(None, None, 1e-2)
    assert descriptions == ["textencoder", "unet"]
    lora_before = {k: v.clone() for k, v in network.state_dict().items()}
    optimizer = torch.optim.AdamW(groups)
    input_ids = torch.tensor([[512, 10, 20, 513]])
    context = text_encoder(input_ids).last_hidden_state
    prediction = unet(torch.randn(1, 4, 8, 8), torch.tensor([100]), encoder_hidden_states=context).sample
    prediction.pow(2).mean().backward()
    optimizer.step()

    after = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    after |= {f"te.{k}": v for k, v in text_encoder.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    lora_after = network.state_dict()
    changed = {k for k in lora_before if not torch.equal(lora_before[k], lora_after[k])}
    weights = {k for k in lora_before if not k.endswith(".alpha")}
    assert changed == weights


def test_optimizer_groups_follow_sd_scripts_lr_rules(tiny_sd1):
    network = make_network(tiny_sd1)
    groups, descriptions = network.prepare_optimizer_params(0, 5e-4, 1e-4)
    assert descriptions == ["unet"] and groups[0]["lr"] == 5e-4
    groups, descriptions = network.prepare_optimizer_params(None, None, 1e-4)
    assert [g["lr"] for g in groups] == [1e-4, 1e-4]
    assert sum(len(g["params"]) for g in groups) == len(network.trainable_parameters()) == 2 * len(network.module_names())


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_save_load_round_trip(tiny_sd1, tmp_path, dtype):
    network = make_network(tiny_sd1, rank=4, alpha=1)  # int alpha: the CLI default
    randomize_up(network)
    path = tmp_path / "出力 dir" / "my lora.safetensors"
    network.save_weights(path, dtype, {"ss_network_dim": 4, "ss_v2": False, "other": None})
    saved = read_weights_file(path)
    expected_alpha_dtype = dtype or torch.int64  # QUIRK: int alpha stays int64 unless --save_precision casts it
    assert all(v.dtype == expected_alpha_dtype for k, v in saved.items() if k.endswith(".alpha"))
    assert all(v.dtype == (dtype or torch.float32) for k, v in saved.items() if not k.endswith(".alpha"))

    fresh = make_network(tiny_sd1, rank=4, alpha=8.0)
    report = fresh.load_weights(path)
    assert report == {"loaded": len(network.module_names()), "missing": [], "skipped": [], "renamed": 0}
    original, loaded = network.state_dict(), fresh.state_dict()
    for key, value in original.items():
        if key.endswith(".alpha"):
            assert loaded[key].item() == 1 and loaded[key].dtype == (torch.int64 if dtype is None else torch.float32)
        else:
            assert torch.equal(loaded[key], value.to(dtype).float() if dtype else value)
    assert all(m.scale == 0.25 for m in fresh.lora_modules())


def test_saved_metadata_is_all_strings_with_sshs_hashes(tiny_sd1, tmp_path):
    from safetensors import safe_open

    network = make_network(tiny_sd1)
    path = tmp_path / "meta.safetensors"
    network.save_weights(path, None, {"ss_network_alpha": 1, "ss_flag": True, "ss_reso": (512, 512),
                                      "modelspec.title": "x"})
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert all(isinstance(v, str) for v in metadata.values())
    # Independent of our hash code: the tensor bytes after the header are the same in the file.
    raw = path.read_bytes()
    header_length = int.from_bytes(raw[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(raw[8 + header_length:]).hexdigest()
    assert metadata["sshs_legacy_hash"] == "e3b0c442"  # a file under 1 MiB: the hash of an empty read
    assert metadata["ss_flag"] == "True" and metadata["ss_reso"] == "(512, 512)" and metadata["ss_network_alpha"] == "1"
    # The hashes cover the tensors and the ss_* keys only, as sd-webui-additional-networks recomputes them.
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == sshs_hashes(
        tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})


def test_pt_file_round_trip(tiny_sd1, tmp_path):
    network = make_network(tiny_sd1)
    randomize_up(network)
    network.save_weights(tmp_path / "a.ckpt", None, {"ignored": "x"})
    fresh = make_network(tiny_sd1)
    fresh.load_weights(tmp_path / "a.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), fresh.state_dict().values()))


def test_save_is_atomic(tiny_sd1, tmp_path, monkeypatch):
    import safetensors.torch

    network = make_network(tiny_sd1)
    path = tmp_path / "lora.safetensors"
    network.save_weights(path)
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]
    good = path.read_bytes()

    def crash_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    randomize_up(network)
    with pytest.raises(KeyboardInterrupt):
        network.save_weights(path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


def test_float_alpha_from_file_is_not_truncated(tiny_sd1):
    network = make_network(tiny_sd1, rank=4, alpha=1)  # int64 alpha buffers
    weights = {k: v.clone() for k, v in network.state_dict().items()}
    weights = {k: (torch.tensor(0.5) if k.endswith(".alpha") else v) for k, v in weights.items()}
    network.load_weights_dict(weights)
    module = network.lora_modules()[0]
    assert module.alpha.dtype == torch.float32 and module.alpha.item() == 0.5 and module.scale == 0.125


def test_keys_for_no_module_and_wrong_shapes_are_clear_errors(tiny_sd1):
    network = make_network(tiny_sd1, rank=4)
    weights = dict(network.state_dict())
    weights["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(4, 4)
    with pytest.raises(NetworkWeightsError, match="lora_unet_not_a_layer.lora_down.weight"):
        network.load_weights_dict(weights)
    assert issubclass(NetworkWeightsError, UserError)
    other_rank = make_network(tiny_sd1, rank=8).state_dict()
    with pytest.raises(NetworkWeightsError, match=r"file \[8, 32\], this network \[4, 32\]"):
        network.load_weights_dict(other_rank)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(NetworkWeightsError, match="not found"):
        read_weights_file(tmp_path / "nope.safetensors")


def test_unet_only_network_has_no_text_encoder_modules_and_skips_them_on_load(tiny_sd1, tmp_path):
    full = make_network(tiny_sd1)
    full.save_weights(tmp_path / "full.safetensors")
    unet_only = make_network(tiny_sd1, train_text_encoder=False)
    assert unet_only.module_names() and not any(n.startswith("lora_te") for n in unet_only.state_dict())
    report = unet_only.load_weights(tmp_path / "full.safetensors")
    assert len(report["skipped"]) == 12 and report["missing"] == []
    assert not any(n.startswith("lora_unet") for n in make_network(tiny_sd1, train_unet=False).module_names())


def test_linear_and_1x1_conv_weights_load_into_each_other(tiny_sd1):
    """SD2 proj_in/proj_out are Linear in diffusers models and 1x1 convs in single-file checkpoints (sd2.txt and
    sd2-ckpt.txt in tests/fixtures/lora-keys)."""
    network = make_network(tiny_sd1)
    randomize_up(network)
    weights = {k: (v.flatten(1) if v.dim() == 4 else v) for k, v in network.state_dict().items()}
    assert any("proj_in" in k and v.dim() == 2 for k, v in weights.items())
    fresh = make_network(tiny_sd1)
    fresh.load_weights_dict(weights)
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), fresh.state_dict().values()))


def test_max_norm_scales_only_modules_above_the_limit(tiny_sd1):
    network = make_network(tiny_sd1, rank=4, alpha=4)
    randomize_up(network, std=1e-4)  # norms far below the limit: these must stay exactly as they are
    big, *small = network.lora_modules()
    with torch.no_grad():
        big.lora_up.weight.fill_(1.0)
    norm_before = big.delta_weight().norm().item()
    small_before = [m.lora_up.weight.clone() for m in small]
    small_norms = [m.delta_weight().norm().item() for m in small]
    scaled, mean_norm, max_norm = network.apply_max_norm_regularization(1.0)
    assert norm_before > 1.0 and scaled == 1
    assert big.delta_weight().norm().item() == pytest.approx(1.0, rel=1e-5) and max_norm == pytest.approx(1.0)
    assert all(torch.equal(m.lora_up.weight, w) for m, w in zip(small, small_before))
    assert mean_norm == pytest.approx((1.0 + sum(small_norms)) / len(network.lora_modules()), rel=1e-5)


def test_max_norm_tensor_form_leaves_the_numbers_on_the_device(tiny_sd1):
    """The loop's form: the same (scaled, mean, max) as one tensor, so a step need not wait for the GPU."""
    first, second = make_network(tiny_sd1, rank=4, alpha=4), make_network(tiny_sd1, rank=4, alpha=4)
    second.load_state_dict(first.state_dict())
    for network in (first, second):
        randomize_up(network, std=0.5)
    expected = first.apply_max_norm_regularization(0.1)
    result = second.max_norm_regularization(0.1)
    assert isinstance(result, torch.Tensor) and result.shape == (3,)
    assert expected[0] > 0 and result.tolist() == pytest.approx(list(expected), rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_hook_adds_the_lora_in_the_base_layers_dtype_and_trains_it():
    """A half-precision base with fp32 LoRA weights (fp8/fp16 base training): output in the base's dtype,
    equal to base + lora_output, and the gradient reaches both LoRA weights."""
    from trainer.network.lora import LoRAModule

    torch.manual_seed(0)
    for base, x in ((torch.nn.Linear(8, 6), torch.randn(2, 3, 8)),
                    (torch.nn.Conv2d(8, 6, 3, padding=1), torch.randn(2, 8, 5, 5))):
        base = base.to(torch.bfloat16)
        x = x.to(torch.bfloat16)
        module = LoRAModule(base, rank=4, alpha=2, multiplier=0.5)
        torch.nn.init.normal_(module.lora_up.weight)
        with torch.no_grad():
            expected = base(x) + module.lora_output(x).to(torch.bfloat16)
        module.attach()
        out = base(x)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
        out.float().square().sum().backward()
        assert module.lora_down.weight.grad.abs().sum() > 0 and module.lora_up.weight.grad.abs().sum() > 0


def test_rank_dropout_keeps_the_expected_output():
    """Dropped ranks are compensated by 1/(1-p), so the average training output equals the eval output."""
    from trainer.network.lora import LoRAModule

    torch.manual_seed(0)
    module = LoRAModule(torch.nn.Linear(8, 8), rank=4, alpha=4, rank_dropout=0.5)
    torch.nn.init.normal_(module.lora_up.weight)
    tokens = torch.randn(1, 1, 8).expand(20000, 1, 8)
    module.eval()
    expected = module.lora_output(tokens[:1])
    module.train()
    torch.testing.assert_close(module.lora_output(tokens).mean(0, keepdim=True), expected, rtol=0.05, atol=0.05)


def test_merge_refuses_to_overflow_a_half_precision_base():
    from trainer.network.lora import LoRAModule

    base = torch.nn.Linear(4, 4).half()
    weight = base.weight.clone()
    module = LoRAModule(base, rank=2, alpha=2, name="lora_unet_x")
    with torch.no_grad():
        module.lora_up.weight.fill_(1e5)
        module.lora_down.weight.fill_(1.0)
    with pytest.raises(ValueError, match="lora_unet_x.*infinite"):
        module.merge_into_base()
    assert torch.equal(base.weight, weight)


def test_dropouts_apply_only_in_training_mode(tiny_sd1):
    base = outputs(tiny_sd1)
    network = make_network(tiny_sd1, module_dropout=1.0)
    randomize_up(network)
    network.apply_to()
    network.train()
    assert torch.equal(outputs(tiny_sd1)[0], base[0])  # every module skipped
    network.eval()
    assert not torch.equal(outputs(tiny_sd1)[0], base[0])

    module = make_network(tiny_sd1, rank=4, dropout=0.5, rank_dropout=0.5).lora_modules()[0]  # a TE Linear
    torch.nn.init.normal_(module.lora_up.weight)
    tokens = torch.randn(2, 3, module.lora_down.in_features)
    module.eval()
    assert torch.equal(module.lora_output(tokens), module.lora_output(tokens))
    module.train()
    assert not torch.equal(module.lora_output(tokens), module.lora_output(tokens))


def test_no_targets_and_wrong_text_encoder_counts_are_clear_errors(tiny_sd1):
    from trainer.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="nothing to put a LoRA on"):
        LoRANetwork([tiny_sd1["text_encoder"]], torch.nn.Sequential(torch.nn.Linear(4, 4)))
    unet = tiny_sd1["unet"]
    unet.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[2] = torch.nn.Identity()
    with pytest.raises(ModelLoadError, match="gave 47 LoRA layers.*should give 48"):
        make_network(tiny_sd1)
    tiny_sd1["text_encoder"].config.num_hidden_layers = 3
    with pytest.raises(ModelLoadError, match="6 per CLIP layer"):
        make_network(tiny_sd1)


def test_merge_refuses_nan(tiny_sd1):
    network = make_network(tiny_sd1)
    weight = tiny_sd1["unet"].conv_in.weight.clone()
    with torch.no_grad():
        network.lora_modules()[-1].lora_up.weight.fill_(float("nan"))
    before = {k: v.clone() for k, v in tiny_sd1["unet"].state_dict().items()}
    with pytest.raises(ValueError, match="NaN"):
        network.merge_to_base()
    assert all(torch.equal(v, tiny_sd1["unet"].state_dict()[k]) for k, v in before.items())
    assert torch.equal(weight, tiny_sd1["unet"].conv_in.weight)


@pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning")
@pytest.mark.parametrize("options", [dict(rank=4, alpha=2.0), dict(rank=4, alpha=2.0, conv_rank=4, conv_alpha=1.0)],
                         ids=["lora", "locon-3x3-convs"])
def test_diffusers_load_lora_weights_uses_every_module(tiny_sd1, tmp_path, options):
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    pipe = StableDiffusionPipeline(tiny_sd1["vae"], tiny_sd1["text_encoder"], tiny_sd1["tokenizer"], tiny_sd1["unet"],
                                   tiny_sd1["scheduler"], safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe("sks shape", num_inference_steps=2, height=64, width=64, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    base = generate()
    network = make_network(tiny_sd1, **options)
    randomize_up(network, std=0.2)
    network.apply_to()
    with_our_hooks = generate()
    network.remove()
    network.save_weights(tmp_path / "our lora.safetensors", None, {"ss_network_dim": "4"})
    down_keys = [k for k in read_weights_file(tmp_path / "our lora.safetensors") if k.endswith("lora_down.weight")]

    pipe.load_lora_weights(str(tmp_path), weight_name="our lora.safetensors")
    layers = [m for model in (pipe.unet, pipe.text_encoder) for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == len(down_keys) == len(network.module_names())
    # One loaded tensor compared with ours, to be sure the names landed on the right layers.
    to_q = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    ours = network.get_submodule("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")
    assert torch.equal(next(iter(to_q.lora_A.values())).weight, ours.lora_down.weight)
    # diffusers reads alpha / rank as we do: its LoRA gives our result, which differs from the base model.
    with_diffusers_lora = generate()
    torch.testing.assert_close(with_diffusers_lora, with_our_hooks, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(with_diffusers_lora, base, atol=1e-3)


# -- networks.lora, the sd-scripts plugin shim -------------------------------------------------------


def test_plugin_create_network_builds_the_same_modules(tiny_sd1):
    import networks.lora

    plugin = networks.lora.create_network(1.0, 4, 1, None, tiny_sd1["text_encoder"], tiny_sd1["unet"],
                                          neuron_dropout=None, conv_dim="2", conv_alpha="1", dropout=None)
    ours = make_network(tiny_sd1, rank=4, alpha=1, conv_rank=2, conv_alpha=1.0)
    assert plugin.module_names() == ours.module_names()
    assert {k: (v.shape, v.dtype) for k, v in plugin.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in ours.state_dict().items()}
    plugin.apply_to(tiny_sd1["text_encoder"], tiny_sd1["unet"], False, True)
    assert plugin.module_names() and not any(n.startswith("lora_te") for n in plugin.state_dict())
    with pytest.raises(UserError, match="block_dims"):
        networks.lora.create_network(1.0, 4, 1, None, tiny_sd1["text_encoder"], tiny_sd1["unet"], block_dims="2,2")


def test_plugin_create_network_from_weights_takes_ranks_from_the_file(tiny_sd1, tmp_path):
    import networks.lora

    source = make_network(tiny_sd1, rank=3, alpha=1.5, conv_rank=2, train_text_encoder=False)
    randomize_up(source)
    source.save_weights(tmp_path / "w.safetensors", torch.float16)
    network, weights_sd = networks.lora.create_network_from_weights(
        1.0, str(tmp_path / "w.safetensors"), None, tiny_sd1["text_encoder"], tiny_sd1["unet"])
    assert network.module_names() == source.module_names() and len(weights_sd) == 3 * len(source.module_names())
    for key, value in network.state_dict().items():
        assert torch.equal(value, weights_sd[key].float())


# -- --dim_from_weights and --base_weights (through the training build) ----------------------------------------


def tiny_models(parts: dict):
    from types import SimpleNamespace

    return SimpleNamespace(text_encoders=[parts["text_encoder"]], unet=parts["unet"], family="sd1", name="tiny")


def test_dim_from_weights_takes_the_network_shape_from_the_file(tiny_sd1, tmp_path):
    from trainer.config.args import parse_train_args
    from trainer.train.build import build_network
    from trainer.train.resolve import network_settings

    source = make_network(tiny_sd1, rank=3, alpha=1.5, conv_rank=2, conv_alpha=0.5)
    randomize_up(source)
    path = tmp_path / "開始 lora.safetensors"
    source.save_weights(path)
    args = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--network_dim", "8",
            "--network_weights", str(path)]
    network = build_network(network_settings(parse_train_args(
        args + ["--dim_from_weights", "--network_args", "loraplus_lr_ratio=4"])), tiny_models(tiny_sd1))
    shapes = {k: (v.shape, v.dtype) for k, v in network.state_dict().items()}
    assert shapes == {k: (v.shape, v.dtype) for k, v in source.state_dict().items()}
    assert {m.rank for m in network.lora_modules()} == {3, 2}  # not --network_dim 8
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in network.state_dict().items())
    assert all(m.attached for m in network.lora_modules())
    assert "unet plus" in network.prepare_optimizer_params(None, None, 1e-4)[1]  # network_args lr options apply
    network.remove()

    unet_only = build_network(network_settings(parse_train_args(args + ["--dim_from_weights",
                                                                        "--network_train_unet_only"])),
                              tiny_models(tiny_sd1))
    assert unet_only.module_names() == [n for n in source.module_names() if n.startswith("lora_unet_")]
    unet_only.remove()
    with pytest.raises(NetworkWeightsError, match="match no LoRA module"):  # no conv_dim: no conv modules
        build_network(network_settings(parse_train_args(args)), tiny_models(tiny_sd1))


def test_training_run_merges_base_weights_first(tiny_sd1_dir, train_data_dir, tmp_path):
    from conftest import make_tiny_sd1
    from test_train_run import base_args

    from trainer.cli import main

    base_lora = make_network(make_tiny_sd1(), rank=4, alpha=4.0)  # the weights saved in tiny_sd1_dir
    randomize_up(base_lora, std=0.5)
    lora_path = tmp_path / "ベース lora.safetensors"
    base_lora.save_weights(lora_path)

    def train(name: str, *extra: str) -> dict:
        out = tmp_path / name
        assert main(["train", *base_args(tiny_sd1_dir, train_data_dir, out, "--max_train_steps", "2"), *extra]) == 0
        return read_weights_file(out / "my lora.safetensors")

    def differ(a: dict, b: dict) -> bool:
        return any(not torch.allclose(a[k], b[k]) for k in a if k.endswith("lora_up.weight"))

    plain = train("plain")
    merged = train("merged", "--base_weights", str(lora_path))
    assert plain.keys() == merged.keys() and differ(plain, merged)  # merged into the base, not saved with ours
    # Multiplier 0 builds the same merge network (same random draws) but adds nothing: with the same seed the
    # runs are identical, so what sets `merged` apart is the merged weights.
    zero = train("zero", "--base_weights", str(lora_path), "--base_weights_multiplier", "0")
    zero_again = train("zero again", "--base_weights", str(lora_path), "--base_weights_multiplier", "0.0")
    assert all(torch.equal(zero[k], zero_again[k]) for k in zero) and differ(zero, merged)
