"""Sample images during training: prompt files in sd-scripts' three formats, schedule, names, images."""

import pytest
import torch
from PIL import Image

from trainer.cli import main
from trainer.errors import ConfigError
from trainer.train.sample import (
    SamplePrompt,
    SampleSchedule,
    load_prompts,
    make_scheduler,
    parse_prompt_line,
    sample_file_name,
)


def test_txt_prompt_options():
    p = parse_prompt_line("shp shape, red circle --n blurry, lowres --w 770 --h 500 --d 42 --s 20 --l 6.5 --ss euler_a")
    assert p == SamplePrompt("shp shape, red circle", "blurry, lowres", 768, 496, 42, 20, 6.5, "euler_a")
    assert parse_prompt_line("a cat").width == 512
    assert parse_prompt_line("a cat --w 10").width == 64
    with pytest.raises(ConfigError, match="--x is unknown"):
        parse_prompt_line("a cat --x 3")


def test_prompt_files_in_three_formats(tmp_path):
    txt = tmp_path / "prompts 日本.txt"
    txt.write_text("# a comment\n\nred circle --d 1\nblue square --n green\n", encoding="utf-8")
    assert [p.prompt for p in load_prompts(txt)] == ["red circle", "blue square"]
    toml = tmp_path / "p.toml"
    toml.write_text('[prompt]\nwidth = 64\nheight = 64\nsample_steps = 4\n[[prompt.subset]]\nprompt = "a"\n'
                    '[[prompt.subset]]\nprompt = "b"\nseed = 3\n', encoding="utf-8")
    assert load_prompts(toml) == [SamplePrompt("a", width=64, height=64, sample_steps=4),
                                  SamplePrompt("b", width=64, height=64, sample_steps=4, seed=3)]
    json_file = tmp_path / "p.json"
    json_file.write_text('[{"prompt": "x", "width": 64}, "y --h 128"]', encoding="utf-8")
    assert [(p.prompt, p.width, p.height) for p in load_prompts(json_file)] == [("x", 64, 512), ("y", 512, 128)]


def test_toml_key_in_both_tables_is_named(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text('[prompt]\nwidth = 64\n[[prompt.subset]]\nprompt = "a"\nwidth = 128\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="width"):
        load_prompts(toml)


def test_schedule_follows_sd_scripts():
    steps = SampleSchedule(every_n_steps=5)
    assert [s for s in range(1, 16) if steps.at_step(s)] == [5, 10, 15]
    both = SampleSchedule(every_n_steps=5, every_n_epochs=2)
    assert not both.at_step(5) and both.at_epoch_end(2) and not both.at_epoch_end(3)


def test_file_names():
    name = sample_file_name("mylora", "e000002", 1, 42)
    assert name.startswith("mylora_e000002_01_") and name.endswith("_42.png")
    assert sample_file_name(None, "000100", 0, None).startswith("000100_00_")


def test_schedulers_get_training_betas_and_prediction_type():
    from diffusers import DDPMScheduler

    train = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    euler = make_scheduler("euler_a", train, v_parameterization=True)
    assert type(euler).__name__ == "EulerAncestralDiscreteScheduler"
    assert euler.config.prediction_type == "v_prediction" and euler.config.beta_end == 0.012
    assert make_scheduler("dpmsolver++", train, False).config.algorithm_type == "dpmsolver++"
    with pytest.raises(ConfigError):
        make_scheduler("nope", train, False)


def test_training_writes_sample_images_without_changing_the_result(tiny_sd1_dir, train_data_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks shape --w 64 --h 64 --s 2 --d 7\n", encoding="utf-8")
    common = ["train", "--pretrained_model_name_or_path", str(tiny_sd1_dir), "--train_data_dir", str(train_data_dir),
              "--resolution", "64", "--caption_extension", ".txt", "--max_train_steps", "4", "--seed", "3",
              "--learning_rate", "1e-3", "--max_data_loader_n_workers", "0", "--train_batch_size", "2"]
    assert main(common + ["--output_dir", str(tmp_path / "plain")]) == 0
    assert main(common + ["--output_dir", str(tmp_path / "sampled"), "--output_name", "x", "--sample_prompts",
                          str(prompts), "--sample_every_n_steps", "2", "--sample_at_first"]) == 0
    images = sorted((tmp_path / "sampled" / "sample").glob("*.png"))
    assert [p.name.split("_")[1] for p in images] == ["000000", "000002", "000004"]
    assert Image.open(images[0]).size == (64, 64)
    grid = Image.open(tmp_path / "sampled" / "x_samples_grid.png")  # 3 rows (steps 0, 2, 4) of one prompt
    assert grid.height > 3 * 64 and grid.width > 64
    from safetensors.torch import load_file

    plain = load_file(tmp_path / "plain" / "last.safetensors")
    sampled = load_file(tmp_path / "sampled" / "x.safetensors")
    assert all(torch.equal(plain[k], sampled[k]) for k in plain)  # sampling restored the random state
