"""trainer.train.resolve: every decision that needs neither the dataset nor the model is made once, before
either is read, and each builder gets its own frozen part."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from trainer.config.args import parse_train_args
from trainer.errors import ConfigError
from trainer.train.resolve import resolve, resolve_precision


def args(model, data, *extra):
    return parse_train_args(["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
                             "--resolution", "64", *extra])


def test_the_weights_decide_the_family_and_the_spec_says_so_once(tiny_sdxl_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="trainer"):
        spec = resolve(args(tiny_sdxl_dir, tmp_path))  # no --sdxl: the weights are SDXL
    assert spec.cfg.sdxl and spec.network.sdxl
    assert "SDXL model" in caplog.text
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1


def test_defaults_of_the_network_and_a_drawn_seed(tiny_sd1_dir, tmp_path):
    spec = resolve(args(tiny_sd1_dir, tmp_path))
    assert spec.network.rank == 4 and spec.network.alpha == 1 and not spec.network.dim_from_weights
    assert isinstance(spec.seed, int) and spec.seed == resolve(args(tiny_sd1_dir, tmp_path, "--seed",
                                                                    str(spec.seed))).seed


def test_block_counts_of_the_family_are_checked_before_any_picture_or_model_is_read(tiny_sdxl_dir, tmp_path):
    missing_data = tmp_path / "no such folder"
    with pytest.raises(ConfigError, match="block_dims"):
        resolve(args(tiny_sdxl_dir, missing_data, "--network_args", "block_dims=" + ",".join(["4"] * 25)))


def test_fp16_falls_back_to_fp32_on_a_cpu_and_full_fp16_with_it(tiny_sd1_dir, tmp_path, caplog):
    cfg = args(tiny_sd1_dir, tmp_path, "--mixed_precision", "fp16", "--full_fp16")
    with caplog.at_level(logging.WARNING, logger="trainer"):
        precision = resolve_precision(cfg, "cpu")
    assert precision.mixed_precision == "no" and precision.weight_dtype == torch.float32
    assert not precision.full_fp16 and "needs a CUDA GPU" in caplog.text
    on_gpu = resolve_precision(cfg, "cuda")
    assert on_gpu.mixed_precision == "fp16" and on_gpu.full_fp16 and on_gpu.weight_dtype == torch.float16


def test_fp8_without_a_16_bit_dtype_is_refused(tiny_sd1_dir, tmp_path):
    cfg = args(tiny_sd1_dir, tmp_path, "--mixed_precision", "fp16", "--fp8_base")
    with pytest.raises(ConfigError, match="fp8"):
        resolve_precision(cfg, "cpu")
    assert resolve_precision(dataclasses.replace(cfg, mixed_precision="bf16"), "cpu").fp8_unet


def test_a_misspelt_optimizer_is_refused_before_the_dataset_is_read(tiny_sd1_dir, tmp_path):
    with pytest.raises(ConfigError, match="AdamWW.*AdamW"):
        resolve(args(tiny_sd1_dir, tmp_path / "no such folder", "--optimizer_type", "AdamWW"))


def single_file_with_markers(folder, *markers):
    from safetensors.torch import load_file, save_file

    from trainer.models.export import save_single_file
    from trainer.models.load import load_models

    path = save_single_file(load_models("builtin:tiny-sd1"), folder / "v予測 model.safetensors")
    state = load_file(str(path))
    state.update({marker: torch.tensor([]) for marker in markers})  # empty tensors, as such checkpoints carry
    save_file(state, str(path))
    return path


def test_a_checkpoint_marked_v_pred_and_ztsnr_trains_as_one_and_says_so(tmp_path, caplog):
    from trainer.train.build import load_frozen_models

    path = single_file_with_markers(tmp_path, "v_pred", "ztsnr")
    with caplog.at_level(logging.INFO, logger="trainer"):
        spec = resolve(args(path, tmp_path))
    assert spec.cfg.v_parameterization and spec.cfg.zero_terminal_snr
    assert "marked as a v-prediction model with zero terminal SNR" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        models, _ = load_frozen_models(spec.cfg, spec.precision, torch.device("cpu"))
    assert models.noise_scheduler.config.prediction_type == "v_prediction"
    assert models.noise_scheduler.config.rescale_betas_zero_snr
    assert "normally used with SD 2.x" not in caplog.text  # the marker says so: no warning about the flag


def test_unmarked_checkpoints_keep_the_flags_and_edm_is_refused(tmp_path):
    plain = single_file_with_markers(tmp_path)
    spec = resolve(args(plain, tmp_path))
    assert not spec.cfg.v_parameterization and not spec.cfg.zero_terminal_snr
    (tmp_path / "edm").mkdir()
    edm = single_file_with_markers(tmp_path / "edm", "edm_vpred.sigma_max")
    with pytest.raises(ConfigError, match="EDM"):
        resolve(args(edm, tmp_path))
