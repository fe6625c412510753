"""Merging LoRA files into a base model (trainer.models.export.merge_lora_into) and `python -m trainer merge`:
merged weights compute what base + LoRA hooks compute, the saved file loads back, and user mistakes get one
message that names the file and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.errors import ConfigError, ModelLoadError
from trainer.models.export import lora_family, merge_lora_into, save_single_file
from trainer.models.load import load_models
from trainer.network.lora import LoRANetwork, read_weights_file
from trainer.tools.merge import main, parse_lora_spec


def make_lora(models, path: Path, seed: int, *, conv_rank=None, train_text_encoder=True) -> Path:
    """A LoRA file with non-zero lora_up weights (a fresh LoRA has up = 0 and would change nothing)."""
    torch.manual_seed(seed)
    network = LoRANetwork(models.text_encoders, models.unet, rank=4, alpha=2, conv_rank=conv_rank, conv_alpha=1,
                          train_text_encoder=train_text_encoder)
    for module in network.lora_modules():
        torch.nn.init.normal_(module.lora_up.weight, std=0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    network.save_weights(path)
    return path


def outputs(models) -> tuple[torch.Tensor, torch.Tensor]:
    """UNet noise prediction and text-encoder hidden states on fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    ids = torch.randint(0, 1000, (2, 77), generator=generator)
    with torch.no_grad():
        unet_out = models.unet(sample, torch.tensor([10, 500]), encoder_hidden_states=context).sample
        te_out = models.text_encoders[0](ids).last_hidden_state
    return unet_out, te_out


def hooked_outputs(base_dir, loras: list[tuple[Path, float]]):
    """The reference: the base model with each LoRA applied as forward hooks (nothing merged)."""
    models = load_models(str(base_dir))
    for path, multiplier in loras:
        network = LoRANetwork.from_weights(models.text_encoders, models.unet, read_weights_file(path))
        network.set_multiplier(multiplier)
        network.apply_to()
    return outputs(models)


@pytest.fixture
def tiny(tiny_sd1_dir):
    return load_models(str(tiny_sd1_dir))


@pytest.fixture(scope="module")
def lora_files(tiny_sd1_dir, tmp_path_factory):
    models = load_models(str(tiny_sd1_dir))
    folder = tmp_path_factory.mktemp("loras") / "ロラ files"
    return (make_lora(models, folder / "style a.safetensors", seed=1, conv_rank=2),
            make_lora(models, folder / "unet only.safetensors", seed=2, train_text_encoder=False))


def test_merged_weights_compute_what_the_hooks_compute(tiny, tiny_sd1_dir, lora_files):
    loras = [(lora_files[0], 0.7), (lora_files[1], -1.5)]
    expected_unet, expected_te = hooked_outputs(tiny_sd1_dir, loras)
    base_unet, _ = outputs(tiny)
    counts = merge_lora_into(tiny, [p for p, _ in loras], [m for _, m in loras])
    merged_unet, merged_te = outputs(tiny)
    assert counts[0] > counts[1] > 0  # the first also has text-encoder and 3x3 conv layers
    assert (expected_unet - base_unet).abs().max() > 1e-2  # the LoRAs really change the output
    torch.testing.assert_close(merged_unet, expected_unet, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged_te, expected_te, atol=1e-5, rtol=1e-4)


def test_merge_then_export_gives_the_merged_model_back(tiny, lora_files, tmp_path):
    merge_lora_into(tiny, [lora_files[0]], [1.0])
    path = save_single_file(tiny, tmp_path / "merged.safetensors")
    back = load_models(str(path))
    for a, b in zip(outputs(tiny), outputs(back)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# The command


def test_cli_end_to_end_with_spaces_and_japanese(tiny_sd1_dir, lora_files, tmp_path):
    out = tmp_path / "出力 folder" / "merged model.safetensors"
    argv = ["--model", str(tiny_sd1_dir), "--lora", f"{lora_files[0]}:0.5", "--lora", str(lora_files[1]),
            "--output", str(out)]
    assert main(argv) == 0
    expected = hooked_outputs(tiny_sd1_dir, [(lora_files[0], 0.5), (lora_files[1], 1.0)])
    got = outputs(load_models(str(out)))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float32
    assert meta["modelspec.merged_from"] == "tiny sd1 モデル, style a.safetensors:0.5, unet only.safetensors:1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    with pytest.raises(ConfigError, match="already exists.*--overwrite"):
        main(argv)
    assert main(argv + ["--overwrite"]) == 0


def test_cli_sd_scripts_spellings_and_fp16(tiny_sd1_dir, lora_files, tmp_path):
    out = tmp_path / "half.safetensors"
    assert main(["--sd_model", str(tiny_sd1_dir), "--models", *map(str, lora_files), "--ratios", "0.5", "1",
                 "--save_to", str(out), "--save_precision", "fp16"]) == 0
    with safe_open(str(out), framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.float16, torch.int64}  # int64: CLIP position_ids


def test_parse_lora_spec_keeps_windows_drive_colons():
    assert parse_lora_spec("a.safetensors:0.8") == (Path("a.safetensors"), 0.8)
    assert parse_lora_spec(r"C:\loras\my lora.safetensors") == (Path(r"C:\loras\my lora.safetensors"), 1.0)
    assert parse_lora_spec(r'"C:\loras\x.safetensors":-0.5') == (Path(r"C:\loras\x.safetensors"), -0.5)


def _write(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


SDXL_LORA = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4)}
SD1_SHAPED_LORA = {  # the real SD1.5 shapes (768-d context) on the tiny model's layer names
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 768),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(32, 4)}


@pytest.mark.parametrize("case, error, words", [
    ("missing lora", ConfigError, ["does not exist", 'did you mean "style a.safetensors"']),
    ("ckpt output", ConfigError, ["must end in .safetensors"]),
    ("missing base", ConfigError, ["--model", "does not exist"]),
    ("sdxl lora", ModelLoadError, ["trained for SDXL", "SD 1.x", "Fix: merge it into the base model"]),
    ("sdxl metadata", ModelLoadError, ["trained for SDXL", 'trained on "sd_xl_base_1.0.safetensors"']),
    ("other shapes", ModelLoadError, ["does not fit the base model", "[4, 768]", "Fix: merge it into the base"]),
    ("base as lora", ModelLoadError, ["full SD 1.x checkpoint", "not a kohya-format LoRA"]),
    ("lora as base", ModelLoadError, ["is a LoRA file, not a base model", "--lora"]),
    ("output is base", ConfigError, ["is the base model itself"]),
    ("ia3", ModelLoadError, ["a type this trainer does not know", "not a kohya-format LoRA / LoCon / LoHa / LoKr"]),
    ("nan lora", ModelLoadError, ["NaN", "earlier save"]),
])
def test_cli_mistakes_get_one_clear_message(case, error, words, tiny, tiny_sd1_dir, lora_files, tmp_path):
    model, lora, out = str(tiny_sd1_dir), str(lora_files[0]), tmp_path / "out put.safetensors"
    if case == "missing lora":
        lora = str(lora_files[0].parent / "style b.safetensors")
    elif case == "ckpt output":
        out = tmp_path / "out.ckpt"
    elif case == "missing base":
        model = str(tmp_path / "no such model.safetensors")
    elif case == "sdxl lora":
        lora = str(_write(tmp_path / "xl lora.safetensors", SDXL_LORA))
    elif case == "sdxl metadata":
        lora = str(_write(tmp_path / "xl.safetensors", SD1_SHAPED_LORA, {"ss_base_model_version": "sdxl_base_v1-0",
                                                                          "ss_sd_model_name": "sd_xl_base_1.0.safetensors"}))
    elif case == "other shapes":
        lora = str(_write(tmp_path / "sd15 lora.safetensors", SD1_SHAPED_LORA))
    elif case == "base as lora":
        lora = str(save_single_file(tiny, tmp_path / "a base model.safetensors"))
    elif case == "lora as base":
        model = lora
    elif case == "output is base":
        model = str(save_single_file(tiny, out))
    elif case == "ia3":  # LyCORIS (IA)^3: a network type we do not train or merge
        lora = str(_write(tmp_path / "ia3.safetensors", {"lora_unet_x.weight": torch.zeros(4), "lora_unet_x.on_input": torch.zeros(())}))
    elif case == "nan lora":
        weights = read_weights_file(lora_files[0])
        weights[next(k for k in weights if k.endswith("lora_up.weight"))][0, 0] = float("nan")
        lora = str(_write(tmp_path / "nan.safetensors", weights))
    existed = out.exists()
    with pytest.raises(error) as caught:
        main(["--model", model, "--lora", lora, "--output", str(out)])
    assert all(w in str(caught.value) for w in words), str(caught.value)
    assert out.exists() == existed  # nothing written


def test_cli_errors_print_one_message_and_exit_2(tiny_sd1_dir, tmp_path, capsys):
    from trainer.cli import run_guarded

    argv = ["--model", str(tiny_sd1_dir), "--lora", str(tmp_path / "nope.safetensors"), "--output",
            str(tmp_path / "o.safetensors")]
    assert run_guarded(lambda: main(argv)) == 2
    err = capsys.readouterr().err
    assert "nope.safetensors" in err and "Traceback" not in err


def test_lora_family_from_metadata_names_and_shapes():
    assert lora_family({}, {"ss_base_model_version": "sd_v2_v"}) == "sd2"
    assert lora_family(SDXL_LORA) == "sdxl"
    assert lora_family({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 640)}) == "sdxl"
    assert lora_family(SD1_SHAPED_LORA) == "sd1"
    assert lora_family({"x_attn2_to_k.lora_down.weight": torch.zeros(4, 1024)}) == "sd2"
    assert lora_family({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
                        torch.zeros(4, 1024)}) == "sd2"
    assert lora_family({"lora_unet_x_proj_in.lora_down.weight": torch.zeros(4, 32)}) is None
