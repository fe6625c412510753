"""`python -m trainer resize_lora` (trainer.tools.resize_lora): resizing to the delta's own rank keeps it, lower
ranks keep the largest singular values, dynamic methods pick their formula's rank, the metadata is updated as
sd-scripts updates it, and the file loads back into our LoRANetwork."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import lora_file_deltas, read_lora
from trainer.cli import main as cli_main
from trainer.errors import ConfigError
from trainer.network.lora import LoRANetwork, read_weights_file
from trainer.network.metadata import sshs_hashes
from trainer.tools.resize_lora import main

DELTA_RANK = 3


def planted_lora(tiny_sd1, path: Path, *, rank=8, conv_rank=None, alpha=4, comment="trained on cats") -> Path:
    """A LoRA (LoCon with conv_rank) saved by our own LoRANetwork whose every delta has rank DELTA_RANK: only the
    first DELTA_RANK columns of each lora_up are non-zero."""
    torch.manual_seed(0)
    network = LoRANetwork([tiny_sd1["text_encoder"]], tiny_sd1["unet"], rank=rank, alpha=alpha,
                          conv_rank=conv_rank, conv_alpha=1)
    for module in network.lora_modules():
        with torch.no_grad():
            module.lora_up.weight.normal_(std=0.1)
            module.lora_up.weight[:, DELTA_RANK:] = 0
    network.save_weights(path, metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
                                         "ss_output_name": "cats", "ss_training_comment": comment,
                                         "modelspec.title": "cats"})
    return path


@pytest.fixture
def locon(tiny_sd1, tmp_path) -> Path:
    return planted_lora(tiny_sd1, tmp_path / "in" / "cats.safetensors", conv_rank=6)


def test_resize_to_the_delta_rank_keeps_every_delta(locon, tmp_path):
    out = tmp_path / "small.safetensors"
    assert main(["--model", str(locon), "--save_to", str(out), "--new_rank", "3", "--new_conv_rank", "3"]) == 0
    before, after = lora_file_deltas(locon), lora_file_deltas(out)
    assert before.keys() == after.keys()
    assert {tuple(t.shape) for t in before.values()} >= {(32, 32, 1, 1), (32, 32, 3, 3), (32, 32)}
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-5, msg=name)
    tensors, _ = read_lora(out)
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_down.weight")} == {3}


def test_lower_rank_is_torchs_best_rank_k_of_each_delta(locon, tmp_path):
    out = tmp_path / "rank2.safetensors"
    main(["--model", str(locon), "--save_to", str(out), "--new_rank", "2", "--new_conv_rank", "1"])
    before, after = lora_file_deltas(locon), lora_file_deltas(out)
    for name, delta in before.items():
        rank = 1 if delta.dim() == 4 and delta.shape[2] == 3 else 2
        u, s, vh = torch.linalg.svd(delta.flatten(1), full_matrices=False)
        best = (u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]).reshape(delta.shape)
        torch.testing.assert_close(after[name], best, rtol=0, atol=1e-5, msg=name)


def test_metadata_is_updated_as_sd_scripts_does(locon, tmp_path):
    out = tmp_path / "small.safetensors"
    main(["--model", str(locon), "--save_to", str(out), "--new_rank", "2", "--new_conv_rank", "1"])
    tensors, meta = read_lora(out)
    assert meta["ss_network_dim"] == "2"
    assert meta["ss_network_alpha"] == str(float(torch.tensor(4.0) / 8 * 2))  # old scale x new rank: "1.0"
    assert meta["ss_training_comment"] == "dimension is resized from 8 to 2 (conv: 1); trained on cats"
    assert meta["ss_output_name"] == "cats" and meta["modelspec.title"] == "cats"
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == sshs_hashes(tensors, meta)
    _, old_meta = read_lora(locon)
    assert meta["sshs_model_hash"] != old_meta["sshs_model_hash"]
    alphas = {k: float(t) for k, t in tensors.items() if k.endswith(".alpha")}
    # 4 / 8 x 2 for the rank-8 modules, 1 / 6 x 1 (in float32, as sd-scripts computes it) for the 3x3 convs
    assert set(alphas.values()) == {1.0, float(torch.tensor(1.0) / 6)}


def test_resized_file_of_our_trainer_loads_back_into_a_lora_network(tiny_sd1, locon, tmp_path):
    out = tmp_path / "small.safetensors"
    main(["--model", str(locon), "--save_to", str(out), "--new_rank", "3", "--save_precision", "fp16"])
    tensors, _ = read_lora(out)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    network = LoRANetwork.from_weights([tiny_sd1["text_encoder"]], tiny_sd1["unet"], read_weights_file(out))
    result = network.load_weights(out)
    assert result["loaded"] == len(lora_file_deltas(locon)) and not result["missing"]
    module = network.lora_modules()[0]
    torch.testing.assert_close(module.delta_weight(), lora_file_deltas(locon)[module.lora_name], rtol=0, atol=2e-3)


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)))[0]


def sd_scripts_layout_file(path: Path, singular_values: list[float], dtype=torch.float16) -> Path:
    """A file as sd-scripts writes one (fp16, float alpha, no metadata) whose one module's delta has exactly
    these singular values: up = Q1 diag(S), down = Q2^T, alpha = rank."""
    rank = len(singular_values)
    up = orthonormal(64, rank, 1) @ torch.diag(torch.tensor(singular_values, dtype=torch.float32))
    down = orthonormal(48, rank, 2).T
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": down.to(dtype).contiguous(), f"{name}.lora_up.weight": up.to(dtype).contiguous(),
               f"{name}.alpha": torch.tensor(float(rank)).to(dtype)}, str(path))
    return path


@pytest.mark.parametrize("method, param, expected_rank", [
    ("sv_fro", 0.9, 3),  # S^2 = 64 16 4 1 .25 .0625 (sum 85.3125): cum .750 .938 -> position 1 -> 3
    ("sv_ratio", 5.0, 4),  # S > 8 / 5 = 1.6: 8 4 2 -> 3 -> 4
    ("sv_cumulative", 0.8, 4),  # S / 15.75 cumulative: .508 .762 .889 -> position 2 -> 3 -> 4
])
def test_dynamic_resize_picks_the_rank_of_the_formula(tmp_path, method, param, expected_rank):
    source = sd_scripts_layout_file(tmp_path / "lora.safetensors", [8, 4, 2, 1, 0.5, 0.25])
    out = tmp_path / "dyn.safetensors"
    main(["--model", str(source), "--save_to", str(out), "--new_rank", "6", "--dynamic_method", method,
          "--dynamic_param", str(param)])
    tensors, meta = read_lora(out)
    (down,) = [t for k, t in tensors.items() if k.endswith("lora_down.weight")]
    assert down.shape == (expected_rank, 48)
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"
    assert meta["ss_training_comment"] == f"Dynamic resize with {method}: {param} from 6; "
    (alpha,) = [float(t) for k, t in tensors.items() if k.endswith(".alpha")]
    assert alpha == expected_rank  # scale 1 (alpha = rank) is kept


def test_verbose_prints_each_module_and_the_average_retention(tmp_path, capsys):
    source = sd_scripts_layout_file(tmp_path / "lora.safetensors", [8, 4, 2, 1], torch.float32)
    main(["--model", str(source), "--save_to", str(tmp_path / "out.safetensors"), "--new_rank", "2", "--verbose"])
    printed = capsys.readouterr().out
    fro = ((64 + 16) / (64 + 16 + 4 + 1)) ** 0.5
    assert f"sum(S) retained: {12 / 15:.1%}, fro retained: {fro:.1%}, max(S) ratio: 2.0" in printed
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in printed
    assert f"Average Frobenius norm retention: {fro:.2%} | std: 0.000" in printed


def test_the_cli_command_runs_resize_lora(tmp_path):
    source = sd_scripts_layout_file(tmp_path / "lora.safetensors", [8, 4, 2, 1])
    out = tmp_path / "out.safetensors"
    assert cli_main(["resize_lora", "--model", str(source), "--save_to", str(out), "--new_rank", "2",
                     "--device", "cpu"]) == 0
    assert read_lora(out)[0]["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"] == 2


def test_loha_and_lokr_files_are_refused_by_name(tmp_path):
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)}, str(loha))
    with pytest.raises(ConfigError, match="LoHa file"):
        main(["--model", str(loha), "--save_to", str(tmp_path / "out.safetensors")])
    lokr = tmp_path / "lokr.safetensors"
    save_file({"lora_unet_x.lokr_w1": torch.zeros(2, 2)}, str(lokr))
    with pytest.raises(ConfigError, match="LoKr file"):
        main(["--model", str(lokr), "--save_to", str(tmp_path / "out.safetensors")])
    assert not (tmp_path / "out.safetensors").exists()


def test_the_input_is_never_overwritten_and_an_existing_output_needs_overwrite(tmp_path):
    source = sd_scripts_layout_file(tmp_path / "lora.safetensors", [8, 4, 2, 1])
    before = source.read_bytes()
    with pytest.raises(ConfigError, match="one of the input files"):
        main(["--model", str(source), "--save_to", str(source), "--overwrite"])
    assert source.read_bytes() == before
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"mine")
    with pytest.raises(ConfigError, match="--overwrite"):
        main(["--model", str(source), "--save_to", str(existing)])
    assert existing.read_bytes() == b"mine"
    main(["--model", str(source), "--save_to", str(existing), "--overwrite", "--new_rank", "2"])
    assert read_lora(existing)[1]["ss_network_dim"] == "2"


def test_dynamic_method_without_param_and_a_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="needs --dynamic_param"):
        main(["--model", "x.safetensors", "--save_to", str(tmp_path / "o.safetensors"), "--dynamic_method", "sv_fro"])
    with pytest.raises(ConfigError, match="does not exist"):
        main(["--model", str(tmp_path / "nope.safetensors"), "--save_to", str(tmp_path / "o.safetensors")])
