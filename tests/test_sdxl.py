"""SDXL LoRA training (sdxl_train_network.py behaviour) on a tiny SDXL-architecture model: two text encoders,
pooled output and size conditioning, text-encoder output caching, SAI key names, diffusers interop."""

import logging
import math
import types

import numpy as np
import pytest
import torch
from conftest import HIDDEN, POOL, NanVae, make_dreambooth_folder, make_image, make_tiny_sdxl, read_lora

from trainer.cli import main
from trainer.config.args import parse_train_args
from trainer.errors import ConfigError, UserError
from trainer.train.events import RecordingListener, Reporter
from trainer.train.run import run_training


def sdxl_args(model_dir, data_dir, out_dir, *extra):
    return ["--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(data_dir),
            "--output_dir", str(out_dir), "--output_name", "xl lora", "--resolution", "64",
            "--caption_extension", ".txt", "--network_module", "networks.lora", "--network_dim", "4",
            "--learning_rate", "1e-2", "--max_train_steps", "2", "--train_batch_size", "2", "--seed", "1",
            "--max_data_loader_n_workers", "0", *extra]


# ---------------------------------------------------------------------------------------------------------------
# End to end


def test_sdxl_lora_trains_with_sai_names_and_loads_in_diffusers(tiny_sdxl_dir, train_data_dir, tmp_path):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    out = tmp_path / "out"
    assert main(["train", "--sdxl", *sdxl_args(tiny_sdxl_dir, train_data_dir, out, "--network_args", "conv_dim=4",
                                               "--max_token_length", "150")]) == 0
    final = out / "xl lora.safetensors"
    tensors, meta = read_lora(final)
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    prefixes = {"_".join(k.split("_")[:3 if k.startswith("lora_unet") else 2]) for k in downs}
    assert prefixes == {"lora_unet_input", "lora_unet_middle", "lora_unet_output", "lora_te1", "lora_te2"}
    assert not any("down_blocks" in k or "up_blocks" in k for k in tensors)  # SAI names, not diffusers'
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in tensors  # conv variant (LoCon)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in tensors
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2.lora_down.weight" in tensors
    assert len(tensors) == 3 * len(downs)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.resolution"] == "64x64" and meta["ss_max_token_length"] == "150"

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe("sks shape", num_inference_steps=2, height=64, width=64, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    without = render()
    pipe.load_lora_weights(str(final.parent), weight_name=final.name)
    layers = [m for part in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) for m in part.modules()
              if isinstance(m, LoraLayer) and m.lora_A]
    assert len(layers) == len(downs)  # every module of the file found its layer
    assert not torch.allclose(render(), without)


@pytest.mark.parametrize("to_disk", [False, True])
def test_cached_text_encoder_outputs_train_the_unet_only(tiny_sdxl_dir, train_data_dir, tmp_path, caplog, to_disk,
                                                         monkeypatch):
    from trainer.train import step

    def no_encoding(*args, **kwargs):
        raise AssertionError("the text encoders ran during training")

    monkeypatch.setattr(step, "encode_batch", no_encoding)
    option = "--cache_text_encoder_outputs_to_disk" if to_disk else "--cache_text_encoder_outputs"
    with caplog.at_level(logging.WARNING, logger="trainer"):
        cfg = parse_train_args(sdxl_args(tiny_sdxl_dir, train_data_dir, tmp_path / "out", option))
    assert cfg.cache_text_encoder_outputs and cfg.network_train_unet_only  # implied, with a warning
    assert "network_train_unet_only" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        final = run_training(cfg, listeners=[])  # no --sdxl: told by the weights, with a warning
    assert "SDXL model" in caplog.text and "sdxl_train_network" in caplog.text
    tensors, meta = read_lora(final)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    npz_files = sorted((train_data_dir / "10_sks shape").glob("*_te_outputs.npz"))
    if not to_disk:
        assert npz_files == []
        return
    assert [f.name for f in npz_files] == [f"img_{i}_te_outputs.npz" for i in range(4)]
    with np.load(npz_files[0]) as npz:
        assert sorted(npz.files) == ["hidden_state1", "hidden_state2", "pool2"]
        assert npz["hidden_state1"].shape == (77, HIDDEN) and npz["hidden_state2"].shape == (77, HIDDEN)
        assert npz["pool2"].shape == (POOL,)
        assert npz["hidden_state1"].dtype == np.float32
        cached = [torch.from_numpy(npz[k]) for k in ("hidden_state1", "hidden_state2", "pool2")]
    # the cache holds what the encoders give for the caption as read from img_0.txt
    from trainer.models.load import load_models
    from trainer.models.text import encode_sdxl_tokens, tokenize_captions

    models = load_models(str(tiny_sdxl_dir), sdxl=True)
    caption = (train_data_dir / "10_sks shape" / "img_0.txt").read_text(encoding="utf-8")
    ids1, ids2 = (tokenize_captions(t, [caption]) for t in models.tokenizers)
    with torch.no_grad():
        expected = encode_sdxl_tokens(models.text_encoders, ids1, ids2, eos_token_id=models.tokenizers[1].eos_token_id)
    for got, want in zip(cached, expected):
        torch.testing.assert_close(got, want[0], rtol=1e-4, atol=1e-5)
    # a second run reuses valid files instead of encoding again
    stamps = [f.stat().st_mtime_ns for f in npz_files]
    cfg2 = parse_train_args(sdxl_args(tiny_sdxl_dir, train_data_dir, tmp_path / "out2", option, "--sdxl",
                                      "--max_train_steps", "1"))
    run_training(cfg2, listeners=[])
    assert [f.stat().st_mtime_ns for f in npz_files] == stamps


# ---------------------------------------------------------------------------------------------------------------
# Text encoders and size conditioning


def tiny_models():
    parts = make_tiny_sdxl()
    return types.SimpleNamespace(text_encoders=[parts["text_encoder"].eval(), parts["text_encoder_2"].eval()],
                                 tokenizers=[parts["tokenizer"], parts["tokenizer_2"]], unet=parts["unet"])


def size_batch(captions):
    n = len(captions)
    return {"captions": captions, "original_sizes_hw": torch.tensor([[1200, 800], [333, 4000]][:n]),
            "crop_top_lefts": torch.tensor([[0, 16], [7, 0]][:n]),
            "target_sizes_hw": torch.tensor([[64, 96], [32, 128]][:n])}


def test_encode_batch_uses_both_encoders_the_sd_scripts_way():
    from trainer.models.text import encode_batch

    m = tiny_models()
    batch = size_batch(["sks shape, red square", "a much longer caption " * 12])
    with torch.no_grad():
        cond = encode_batch(m, batch, max_token_length=150, clip_skip=None, device="cpu")
        kwargs = cond.unet_kwargs(torch.float32)
        ids1 = m.tokenizers[0](batch["captions"], padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
        ids2 = m.tokenizers[1](batch["captions"], padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
        te1, te2 = m.text_encoders
        out2 = te2(ids2, output_hidden_states=True)
    context = kwargs["encoder_hidden_states"]
    assert context.shape == (2, 152, 2 * HIDDEN)  # 2 chunks of 75 + BOS + EOS; TE1 and TE2 concatenated
    # first chunk = the 77-token encoding: TE1 penultimate layer and TE2 penultimate layer, no final norm
    torch.testing.assert_close(context[0, :76, :HIDDEN], te1(ids1, output_hidden_states=True).hidden_states[-2][0, :76])
    torch.testing.assert_close(context[0, :76, HIDDEN:], out2.hidden_states[-2][0, :76])
    # pool2: the projection of TE2's final state at the first EOS of the first chunk (what text_embeds is)
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["text_embeds"], out2.text_embeds)
    assert m.tokenizers[1].pad_token_id == 0 and m.tokenizers[0].pad_token_id == m.tokenizers[0].eos_token_id
    # the six size numbers per sample, from the batch, kept in float32 whatever the training dtype
    time_ids = cond.unet_kwargs(torch.float16)["added_cond_kwargs"]["time_ids"]
    assert time_ids.dtype == torch.float32
    assert time_ids.tolist() == [[1200, 800, 0, 16, 64, 96], [333, 4000, 7, 0, 32, 128]]


def test_diffusers_size_embedding_is_sd_scripts_layout():
    """sd-scripts embeds each size number with 256 sinusoids, frequencies exp(-ln(10000)*k/128), [cos..., sin...],
    after pool2; diffusers' UNet does the same from `time_ids` (Timesteps(256, flip_sin_to_cos=True, shift 0))."""
    from diffusers.models.embeddings import Timesteps

    unet = tiny_models().unet
    assert unet.add_time_proj.flip_sin_to_cos is True and unet.add_time_proj.downscale_freq_shift == 0
    values = torch.tensor([1024.0, 768.0, 0.0, 32.0, 1024.0, 1024.0])
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = values[:, None] * freqs[None]
    sd_scripts = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    proj = Timesteps(256, flip_sin_to_cos=unet.add_time_proj.flip_sin_to_cos,
                     downscale_freq_shift=unet.add_time_proj.downscale_freq_shift)
    torch.testing.assert_close(proj(values), sd_scripts)


def test_time_ids_per_sample_come_from_bucket_and_crop(tiny_sdxl_dir, tmp_path):
    """Through the real dataset and the UNet: what its size embedding receives, sample by sample."""
    from trainer.train.build import prepare_training
    from trainer.train.step import compute_loss

    data = tmp_path / "train"
    make_image(data / "2_wide" / "wide.png", size=(120, 80))
    make_image(data / "2_tall" / "tall.png", size=(80, 120), seed=1)
    cfg = parse_train_args(sdxl_args(tiny_sdxl_dir, data, tmp_path / "out", "--sdxl", "--enable_bucket",
                                     "--min_bucket_reso", "32", "--max_bucket_reso", "128",
                                     "--bucket_reso_steps", "32", "--train_batch_size", "1"))
    setup = prepare_training(cfg, Reporter())
    setup.dataset.set_epoch(1)
    seen = []
    hook = setup.models.unet.add_time_proj.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    try:
        batches = list(setup.dataloader)
        with torch.no_grad():
            for batch in batches:
                compute_loss(setup.step, batch)
    finally:
        hook.remove()
    assert len(seen) == len(batches) == 4
    for batch, ids in zip(batches, seen):
        expected = torch.cat([batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]], 1)
        assert ids.tolist() == expected.flatten().float().tolist()
        original = [80, 120] if "wide" in batch["image_paths"][0] else [120, 80]
        assert ids[:2].tolist() == original  # (h, w) of the picture as it is on disk
        assert ids[4:].tolist() == list(batch["images"].shape[-2:])  # (h, w) of its bucket


# ---------------------------------------------------------------------------------------------------------------
# Refusals and warnings


@pytest.mark.parametrize("extra, words", [
    (["--sdxl", "--v2"], ["--v2", "SDXL"]),
    (["--cache_text_encoder_outputs", "--shuffle_caption"], ["--shuffle_caption", "--cache_text_encoder_outputs"]),
    (["--cache_text_encoder_outputs_to_disk", "--caption_dropout_rate", "0.1"], ["--caption_dropout_rate"]),
    (["--cache_text_encoder_outputs", "--caption_tag_dropout_rate", "0.1"], ["--caption_tag_dropout_rate"]),
    (["--cache_text_encoder_outputs", "--token_warmup_step", "10"], ["--token_warmup_step"]),
    (["--cache_text_encoder_outputs", "--caption_dropout_every_n_epochs", "2"], ["every_n_epochs"]),
    (["--cache_text_encoder_outputs", "--network_train_text_encoder_only"], ["nothing would be trained"]),
])
def test_refused_combinations_say_what_to_remove(tmp_path, extra, words):
    with pytest.raises(ConfigError) as e:
        parse_train_args(sdxl_args(tmp_path / "model", tmp_path / "data", tmp_path / "out", *extra))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_clip_skip_with_sdxl_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="trainer"):
        parse_train_args(sdxl_args(tmp_path, tmp_path, tmp_path, "--sdxl", "--clip_skip", "2"))
    assert "--clip_skip has no effect on SDXL" in caplog.text


def test_caption_options_from_a_dataset_toml_are_refused_with_cached_outputs(tiny_sdxl_dir, tmp_path):
    make_dreambooth_folder(tmp_path / "imgs", folder="pics", n=2)
    toml_file = tmp_path / "dataset.toml"
    toml_file.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n"
                         f"image_dir = '{tmp_path / 'imgs' / 'pics'}'\ncaption_extension = '.txt'\n"
                         "shuffle_caption = true\n", encoding="utf-8")
    args = sdxl_args(tiny_sdxl_dir, tmp_path, tmp_path / "out", "--cache_text_encoder_outputs")
    args = [a for a in args if a not in ("--train_data_dir", str(tmp_path))] + ["--dataset_config", str(toml_file)]
    recorder = RecordingListener()
    with pytest.raises(ConfigError) as e:
        run_training(parse_train_args(args), listeners=[recorder])
    assert "shuffle_caption" in str(e.value) and "pics" in str(e.value)


def test_cached_outputs_on_an_sd1_model_are_refused(tiny_sd1_dir, train_data_dir, tmp_path):
    cfg = parse_train_args(sdxl_args(tiny_sd1_dir, train_data_dir, tmp_path / "out", "--cache_text_encoder_outputs"))
    with pytest.raises(ConfigError) as e:
        run_training(cfg, listeners=[])
    assert "SDXL models only" in str(e.value)


def test_nan_latents_from_an_fp16_sdxl_vae_name_the_fix(caplog):
    from trainer.train.step import batch_latents

    batch = {"latents": None, "images": torch.zeros(1, 3, 64, 64), "image_paths": ["a.png"]}
    with pytest.raises(UserError) as e:
        batch_latents(batch, NanVae(torch.float16), 0.13025, "cpu", torch.float32, family="sdxl")
    assert "--no_half_vae" in str(e.value) and "fp16" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        latents = batch_latents(batch, NanVae(torch.float32), 0.13025, "cpu", torch.float32, family="sdxl")
    assert torch.count_nonzero(latents) == 0 and "NaN latents" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Entry point and presets


def test_sdxl_train_network_shim_adds_sdxl(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "sdxl_train_network.py"),
                           *sdxl_args(tmp_path, tmp_path, tmp_path / "out", "--v2")],
                          capture_output=True, text=True, encoding="utf-8", cwd=tmp_path)
    assert done.returncode != 0
    assert "--v2 is for Stable Diffusion 2.x models and cannot be used with SDXL" in done.stdout + done.stderr


@pytest.mark.parametrize("name", ["sdxl-8gb.toml", "sdxl-12gb.toml"])
def test_sdxl_presets_parse_with_cached_text_encoder_outputs(name):
    from pathlib import Path

    preset = Path(__file__).resolve().parents[1] / "presets" / name
    cfg = parse_train_args(["--config_file", str(preset)])
    assert cfg.sdxl and cfg.cache_text_encoder_outputs and cfg.network_train_unet_only and cfg.no_half_vae
    assert cfg.gradient_checkpointing and cfg.cache_latents and not cfg.shuffle_caption
    assert cfg.resolution == (1024, 1024) and cfg.mixed_precision == "bf16"
    assert "not measured yet" in preset.read_text(encoding="utf-8")
