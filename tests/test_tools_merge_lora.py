"""`python -m trainer merge_lora` (trainer.tools.merge_lora): LoRA files into one LoRA. Concatenation gives exactly
the weighted sum of the deltas; --new_rank gives torch's best rank-k of that sum (sd-scripts' svd_merge_lora.py),
and the result loads into our LoRANetwork."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import lora_file_deltas, read_lora
from trainer.cli import main as cli_main
from trainer.errors import ConfigError
from trainer.network import lora_math
from trainer.network.lora import LoRANetwork, read_weights_file
from trainer.tools.merge_lora import main


def trained_like(tiny_sd1, path: Path, seed: int, *, rank: int, alpha, conv_rank=None, train_text_encoder=True):
    """A LoRA (LoCon with conv_rank) saved by our LoRANetwork, with non-zero up weights."""
    torch.manual_seed(seed)
    network = LoRANetwork([tiny_sd1["text_encoder"]], tiny_sd1["unet"], rank=rank, alpha=alpha, conv_rank=conv_rank,
                          conv_alpha=2, train_text_encoder=train_text_encoder)
    for module in network.lora_modules():
        torch.nn.init.normal_(module.lora_up.weight, std=0.1)
    network.save_weights(path, metadata={"ss_base_model_version": "sd_v1", "modelspec.title": f"lora {seed}"})
    return path


@pytest.fixture
def two_loras(tiny_sd1, tmp_path) -> tuple[Path, Path]:
    # Different ranks, alphas (int and float), a LoCon and a UNet-only file: every folding case at once.
    a = trained_like(tiny_sd1, tmp_path / "a.safetensors", 1, rank=4, alpha=1, conv_rank=2)
    b = trained_like(tiny_sd1, tmp_path / "b.safetensors", 2, rank=8, alpha=16.0, train_text_encoder=False)
    return a, b


def test_concatenated_merge_is_exactly_the_weighted_sum_of_deltas(two_loras, tmp_path):
    a, b = two_loras
    out = tmp_path / "ab.safetensors"
    assert main(["--models", str(a), str(b), "--ratios", "0.7", "-0.5", "--save_to", str(out)]) == 0
    da, db, merged = lora_file_deltas(a), lora_file_deltas(b), lora_file_deltas(out)
    assert merged.keys() == da.keys() | db.keys()
    for name, delta in merged.items():
        expected = 0.7 * da.get(name, 0) - 0.5 * db.get(name, 0)
        torch.testing.assert_close(delta, expected, rtol=0, atol=1e-6, msg=name)
    tensors, meta = read_lora(out)
    ranks = {name: tensors[f"{name}.lora_down.weight"].shape[0] for name in merged}
    assert {ranks[n] for n in db} == {12} and {ranks[n] for n in da if n not in db} == {4, 2}
    assert meta["ss_network_dim"] == "Dynamic"  # TE modules have rank 4, UNet ones 12
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.merged_from"] == "lora 1, lora 2" and meta["modelspec.title"] == "ab"


def test_the_same_files_at_ratio_one_keep_their_weights_and_one_alpha(tiny_sd1, tmp_path):
    a = trained_like(tiny_sd1, tmp_path / "a.safetensors", 1, rank=4, alpha=2)
    b = trained_like(tiny_sd1, tmp_path / "b.safetensors", 2, rank=4, alpha=2)
    out = tmp_path / "ab.safetensors"
    main(["--models", str(a), str(b), "--save_to", str(out)])
    tensors, meta = read_lora(out)
    ta = read_weights_file(a)
    name = next(k for k in ta if k.endswith(".lora_up.weight"))
    assert torch.equal(tensors[name][:, :4], ta[name])  # 2 / 4 x 1 is the largest scale: nothing rescaled
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4.0"  # scale 4 / 8 = the files' 2 / 4


def test_svd_merge_is_the_best_rank_k_of_the_summed_delta(two_loras, tmp_path):
    a, b = two_loras
    out = tmp_path / "svd.safetensors"
    main(["--models", str(a), str(b), "--ratios", "1", "0.5", "--new_rank", "3", "--new_conv_rank", "1",
          "--clamp_quantile", "1", "--save_to", str(out), "--device", "cpu"])
    da, db, merged = lora_file_deltas(a), lora_file_deltas(b), lora_file_deltas(out)
    for name, delta in merged.items():
        summed = da.get(name, 0) + 0.5 * db.get(name, 0)
        rank = 1 if summed.dim() == 4 and summed.shape[2] == 3 else 3
        u, s, vh = torch.linalg.svd(summed.flatten(1), full_matrices=False)
        best = (u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]).reshape(summed.shape)
        torch.testing.assert_close(delta, best, rtol=0, atol=1e-5, msg=name)
    tensors, meta = read_lora(out)
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "3.0"
    assert meta["ss_network_args"] == '{"conv_dim": "1", "conv_alpha": "1.0"}'


def test_svd_merge_clamps_at_the_quantile_by_default_as_sd_scripts(two_loras, tmp_path):
    a, b = two_loras
    exact, clamped = tmp_path / "exact.safetensors", tmp_path / "clamped.safetensors"
    main(["--models", str(a), str(b), "--new_rank", "3", "--clamp_quantile", "1", "--save_to", str(exact)])
    main(["--models", str(a), str(b), "--new_rank", "3", "--save_to", str(clamped)])
    te, tc = read_weights_file(exact), read_weights_file(clamped)
    key = next(k for k in te if k.endswith(".lora_up.weight"))
    down_key = key.replace("lora_up", "lora_down")
    high = lora_math.quantile(torch.cat([te[key].flatten(), te[down_key].flatten()]), 0.99)
    torch.testing.assert_close(tc[key], te[key].clamp(-high, high))


def test_merged_file_loads_into_a_lora_network_and_the_cli_runs_it(tiny_sd1, two_loras, tmp_path):
    a, b = two_loras
    out = tmp_path / "ab.safetensors"
    assert cli_main(["merge_lora", "--lora", f"{a}:0.5", "--lora", str(b), "--save_to", str(out),
                     "--save_precision", "bf16"]) == 0
    assert {t.dtype for t in read_lora(out)[0].values()} == {torch.bfloat16}
    network = LoRANetwork.from_weights([tiny_sd1["text_encoder"]], tiny_sd1["unet"], read_weights_file(out))
    assert len(network.lora_modules()) == len(lora_file_deltas(a).keys() | lora_file_deltas(b).keys())


def test_files_for_different_models_or_other_networks_are_refused(two_loras, tmp_path):
    a, _ = two_loras
    other = tmp_path / "other.safetensors"
    name = next(k for k in read_weights_file(a) if k.endswith(".lora_down.weight"))[: -len(".lora_down.weight")]
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 1024), f"{name}.lora_up.weight": torch.zeros(1024, 4),
               f"{name}.dora_scale": torch.zeros(1, 1024)}, str(other))
    with pytest.raises(ConfigError) as error:
        main(["--models", str(a), str(other), "--save_to", str(tmp_path / "out.safetensors")])
    assert "dora_scale" in str(error.value) and "different base models" in str(error.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_ratio_count_and_inputs_as_output_are_checked(two_loras, tmp_path):
    a, b = two_loras
    with pytest.raises(ConfigError, match="one ratio per file"):
        main(["--models", str(a), str(b), "--ratios", "1", "--save_to", str(tmp_path / "o.safetensors")])
    with pytest.raises(ConfigError, match="one of the input files"):
        main(["--models", str(a), str(b), "--save_to", str(b), "--overwrite"])
