"""End to end: sd-scripts arguments in, a LoRA file out, on a tiny diffusers model and generated pictures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_dreambooth_folder, read_lora

from trainer.cli import main
from trainer.config.args import parse_train_args
from trainer.train.events import RecordingListener, Reporter
from trainer.train.run import run_training

ROOT = Path(__file__).resolve().parents[1]


def base_args(model_dir, data_dir, out_dir, *extra):
    return ["--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(data_dir),
            "--output_dir", str(out_dir), "--output_name", "my lora", "--resolution", "64",
            "--caption_extension", ".txt", "--network_module", "networks.lora", "--network_dim", "4",
            "--learning_rate", "1e-3", "--max_train_steps", "4", "--train_batch_size", "2", "--seed", "1",
            "--max_data_loader_n_workers", "0", *extra]


def test_cli_trains_a_lora_with_sd_scripts_arguments(tiny_sd1_dir, train_data_dir, tmp_path):
    out = tmp_path / "出力 folder"
    code = main(["train", *base_args(tiny_sd1_dir, train_data_dir, out, "--save_precision", "fp16",
                                     "--save_every_n_steps", "2")])
    assert code == 0
    final = out / "my lora.safetensors"
    tensors, meta = read_lora(final)
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    assert any(k.startswith("lora_unet_") for k in downs) and any(k.startswith("lora_te_") for k in downs)
    assert len(tensors) == 3 * len(downs)  # down, up and alpha per module, nothing else
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert all(tensors[k.replace("lora_down.weight", "alpha")].dim() == 0 for k in downs)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_steps"] == "4" and meta["ss_output_name"] == "my lora"
    assert json.loads(meta["ss_tag_frequency"]) and json.loads(meta["ss_dataset_dirs"])
    assert "sshs_model_hash" in meta and "modelspec.architecture" in meta
    assert (out / "my lora-step00000002.safetensors").exists()  # --save_every_n_steps
    assert not list(out.glob("*.tmp-*"))
    events = [json.loads(line) for line in (out / "my lora.events.jsonl").read_text(encoding="utf-8").splitlines()]
    kinds = [e["kind"] for e in events]
    assert kinds[0] != "failed" and "run_started" in kinds and "step" in kinds and kinds[-1] == "finished"
    steps = [e for e in events if e["kind"] == "step"]
    assert steps[-1]["step"] == 4 and steps[-1]["total"] == 4 and steps[-1]["loss"] > 0


def test_unet_only_run_saves_only_unet_modules(tiny_sd1_dir, train_data_dir, tmp_path):
    cfg = parse_train_args(base_args(tiny_sd1_dir, train_data_dir, tmp_path, "--network_train_unet_only",
                                     "--max_train_steps", "1"))
    recorder = RecordingListener()
    final = run_training(cfg, listeners=[recorder])
    tensors, meta = read_lora(final)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert tensors[next(k for k in tensors if k.endswith(".alpha"))].dtype == torch.int64  # sd-scripts' default 1
    assert recorder.of("finished")


def test_training_lowers_the_loss_on_a_fixed_batch(tiny_sd1_dir, train_data_dir, tmp_path):
    from trainer.train.build import prepare_training
    from trainer.train.step import compute_loss

    cfg = parse_train_args(base_args(tiny_sd1_dir, train_data_dir, tmp_path, "--learning_rate", "3e-3",
                                     "--network_dim", "8", "--network_alpha", "8"))
    setup = prepare_training(cfg, Reporter())
    setup.dataset.set_epoch(1)
    batch = next(iter(setup.dataloader))

    def fixed_loss():
        torch.manual_seed(123)  # same timesteps and noise every time
        with torch.no_grad():
            return compute_loss(setup.step, batch).item()

    before = fixed_loss()
    for _ in range(30):
        torch.manual_seed(123)
        loss = compute_loss(setup.step, batch)
        setup.accelerator.backward(loss)
        setup.optimizer.step()
        setup.optimizer.zero_grad()
    after = fixed_loss()
    assert after < before * 0.9, (before, after)


def test_trained_file_loads_in_diffusers_with_every_key_used(tiny_sd1_dir, train_data_dir, tmp_path):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    cfg = parse_train_args(base_args(tiny_sd1_dir, train_data_dir, tmp_path, "--learning_rate", "1e-2"))
    final = run_training(cfg, listeners=[])
    tensors, _ = read_lora(final)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1_dir), safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, local_files_only=True)

    def render():
        return pipe("sks shape", num_inference_steps=2, height=64, width=64, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    without = render()
    pipe.load_lora_weights(str(final.parent), weight_name=final.name)
    layers = [m for part in (pipe.unet, pipe.text_encoder) for m in part.modules()
              if isinstance(m, LoraLayer) and m.lora_A]
    assert len(layers) == sum(k.endswith(".lora_down.weight") for k in tensors)
    assert not torch.allclose(render(), without)


def test_bad_data_folder_stops_before_training_and_keeps_old_output(tiny_sd1_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "my lora.safetensors"
    existing.write_bytes(b"an earlier LoRA")
    image_folder = make_dreambooth_folder(tmp_path / "train", "10_sks shape")
    # the user points at the 10_ folder itself instead of its parent
    code = main(["train", *base_args(tiny_sd1_dir, image_folder, out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "parent" in err.lower() and "Traceback" not in err
    assert existing.read_bytes() == b"an earlier LoRA"


def test_missing_data_folder_is_named(tiny_sd1_dir, tmp_path, capsys):
    code = main(["train", *base_args(tiny_sd1_dir, tmp_path / "no such folder", tmp_path / "out")])
    assert code == 2
    assert "no such folder" in capsys.readouterr().err


def test_corrupt_image_is_named(tiny_sd1_dir, tmp_path, capsys):
    folder = make_dreambooth_folder(tmp_path / "train", "10_sks shape", n=2)
    (folder / "broken.png").write_bytes(b"not a png at all")
    code = main(["train", *base_args(tiny_sd1_dir, folder.parent, tmp_path / "out")])
    assert code == 2
    assert "broken.png" in capsys.readouterr().err


def test_ctrl_c_saves_the_weights_so_far(tiny_sd1_dir, train_data_dir, tmp_path, monkeypatch):
    from trainer.train import loop

    real = loop.compute_loss
    calls = {"n": 0}

    def interrupt_on_third(setup, batch, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(setup, batch, **kwargs)

    monkeypatch.setattr(loop, "compute_loss", interrupt_on_third)
    code = main(["train", *base_args(tiny_sd1_dir, train_data_dir, tmp_path)])
    assert code == 130
    assert (tmp_path / "my lora-step00000002.safetensors").exists()
    assert not (tmp_path / "my lora.safetensors").exists()
    assert not list(tmp_path.glob("*.tmp-*"))


def test_train_network_shim_and_demo_preset(tmp_path):
    """`python train_network.py --config_file presets/demo.toml` from another folder, as sd-scripts users do."""
    result = subprocess.run([sys.executable, str(ROOT / "train_network.py"), "--config_file",
                             str(ROOT / "presets" / "demo.toml"), "--max_train_epochs", "1",
                             "--save_every_n_epochs", "1"],
                            cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    demo_file = tmp_path / "output" / "demo-lora.safetensors"
    tensors, meta = read_lora(demo_file)
    assert meta["ss_num_epochs"] == "1" and len(tensors) > 0
    assert list((tmp_path / "demo_data" / "train" / "10_shp shape").glob("*.png"))
    assert_diffusers_uses_every_key(demo_file)


def assert_diffusers_uses_every_key(lora_file):
    """The demo's LoRA in diffusers' pipeline for the same built-in model: every module is taken up."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    from trainer.models.load import load_models

    m = load_models("builtin:tiny-sd1")
    pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0],
                                   unet=m.unet, scheduler=m.noise_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    layers = [x for part in (pipe.unet, pipe.text_encoder) for x in part.modules() if isinstance(x, LoraLayer)]
    tensors, _ = read_lora(lora_file)
    assert len(layers) == sum(k.endswith(".lora_down.weight") for k in tensors)


def test_save_state_and_resume_continue_the_same_run(tiny_sd1_dir, train_data_dir, tmp_path):
    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *base_args(tiny_sd1_dir, train_data_dir, straight)]) == 0
    assert main(["train", *base_args(tiny_sd1_dir, train_data_dir, resumed, "--save_state",
                                     "--save_every_n_steps", "2", "--max_train_steps", "2")]) == 0
    state = resumed / "my lora-state"
    assert (state / "train_state.json").is_file() and not list(resumed.glob("*.tmp-*"))
    # sd-scripts' --resume alone restarts the step count at 0; --skip_until_initial_step continues exactly
    assert main(["train", *base_args(tiny_sd1_dir, train_data_dir, resumed, "--resume", str(state),
                                     "--skip_until_initial_step")]) == 0
    a, b = load_file(straight / "my lora.safetensors"), load_file(resumed / "my lora.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_from_a_missing_state_is_an_error_not_a_fresh_start(tiny_sd1_dir, train_data_dir, tmp_path, capsys):
    code = main(["train", *base_args(tiny_sd1_dir, train_data_dir, tmp_path, "--resume", str(tmp_path / "nope"))])
    assert code == 2
    assert "no training state" in capsys.readouterr().err
    assert not (tmp_path / "my lora.safetensors").exists()


def test_fp8_base_weights_and_full_bf16_lora(tiny_sd1_dir, train_data_dir, tmp_path):
    from trainer.train.build import prepare_training
    from trainer.train.loop import train

    cfg = parse_train_args(base_args(tiny_sd1_dir, train_data_dir, tmp_path, "--mixed_precision", "bf16",
                                     "--fp8_base", "--full_bf16", "--max_train_steps", "2"))
    setup = prepare_training(cfg, Reporter())
    linear_dtypes = {m.weight.dtype for part in (setup.models.unet, setup.models.text_encoders[0])
                     for m in part.modules() if isinstance(m, torch.nn.Linear)}
    assert linear_dtypes == {torch.float8_e4m3fn}  # stored in 8 bits, computed in bf16
    final = train(setup, Reporter())
    tensors, _ = read_lora(final)
    assert {t.dtype for k, t in tensors.items() if k.endswith("weight")} == {torch.bfloat16}
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_up" in k)


def test_fp8_without_mixed_precision_is_refused(tiny_sd1_dir, train_data_dir, tmp_path, capsys):
    assert main(["train", *base_args(tiny_sd1_dir, train_data_dir, tmp_path, "--fp8_base")]) == 2
    assert "--mixed_precision bf16" in capsys.readouterr().err


def test_alpha_mask_ignores_transparent_pixels(tiny_sd1_dir, tmp_path):
    from PIL import Image

    folder = make_dreambooth_folder(tmp_path / "train", "10_sks shape", n=2)
    for png in folder.glob("*.png"):
        image = Image.open(png).convert("RGBA")
        image.putalpha(0)  # fully transparent: nothing to learn
        image.save(png)
    args = base_args(tiny_sd1_dir, folder.parent, tmp_path / "out", "--max_train_steps", "2")
    masked = run_training(parse_train_args(args + ["--alpha_mask"]), listeners=[])
    tensors, _ = read_lora(masked)
    assert all(not t.any() for k, t in tensors.items() if "lora_up" in k)
    unmasked = run_training(parse_train_args(args + ["--output_name", "plain"]), listeners=[])
    tensors, _ = read_lora(unmasked)
    assert any(t.any() for k, t in tensors.items() if "lora_up" in k)


def test_fp8_base_with_gradient_checkpointing_gives_the_same_gradients(tiny_sd1_dir, train_data_dir, tmp_path):
    """Recomputing fp8-stored layers re-casts their weights; torch's checkpoint check must not call that a
    mismatch, and the LoRA gradients must equal those without checkpointing."""
    from trainer.train.build import prepare_training
    from trainer.train.step import compute_loss

    grads = []
    for extra in ([], ["--gradient_checkpointing"]):
        cfg = parse_train_args(base_args(tiny_sd1_dir, train_data_dir, tmp_path, "--mixed_precision", "bf16",
                                         "--fp8_base", "--network_weights", str(_nonzero_lora(tmp_path)), *extra))
        setup = prepare_training(cfg, Reporter())
        setup.dataset.set_epoch(1)
        batch = next(iter(setup.dataloader))
        torch.manual_seed(0)
        compute_loss(setup.step, batch).backward()
        grads.append(torch.cat([p.grad.flatten().float() for p in setup.network.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-2, atol=1e-4)


def _nonzero_lora(tmp_path):
    """A LoRA file with non-zero up weights, so that gradients reach every LoRA parameter."""
    path = tmp_path / "start.safetensors"
    if not path.exists():
        import conftest

        from trainer.network.lora import LoRANetwork

        m = conftest.make_tiny_sd1()
        net = LoRANetwork([m["text_encoder"]], m["unet"], rank=4, alpha=4.0)
        for module in net.lora_modules():
            torch.nn.init.normal_(module.lora_up.weight, std=0.1)
        net.save_weights(path)
    return path


def test_a_run_removes_what_a_killed_save_left_and_keeps_the_users_files(tiny_sd1_dir, train_data_dir, tmp_path):
    """Found by a SIGKILL during a save: safetensors' hidden temporary file (51 MB there) stayed for good."""
    import os
    import time

    from safetensors.torch import save_file

    out = tmp_path / "out"
    out.mkdir()
    save_file({"a": torch.zeros(8)}, out / "mine.safetensors")  # a user's file: kept
    half = (out / "mine.safetensors").read_bytes()[:30]
    leftovers = [out / ".tmpQ7x2Lm", out / "my lora-step00000002.safetensors.tmp-1a2b3c4d"]
    for path in leftovers:
        path.write_bytes(half)
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    assert main(["train", *base_args(tiny_sd1_dir, train_data_dir, out, "--max_train_steps", "1")]) == 0
    assert not any(p.exists() for p in leftovers)
    assert (out / "mine.safetensors").is_file() and (out / "my lora.safetensors").is_file()
