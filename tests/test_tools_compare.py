"""`python -m trainer compare`: a run's epoch files side by side in one grid, rows in epoch order, each prompt
with the same seed in every row, so rows differ only by the LoRA and its strength."""

from __future__ import annotations

import argparse

import pytest
import torch
from PIL import Image

from trainer.cli import main
from trainer.errors import ConfigError
from trainer.models.load import load_models
from trainer.network.lora import LoRANetwork
from trainer.tools.compare import comparison_prompts, default_output, epoch_order, lora_files, parse_strengths
from trainer.train.grid import MIN_CELL, ROW_LABEL_WIDTH


def save_lora(tiny_sd1_dir, path, seed: int) -> None:
    models = load_models(str(tiny_sd1_dir))
    network = LoRANetwork(models.text_encoders, models.unet, rank=2, alpha=2)
    torch.manual_seed(seed)
    for module in network.lora_modules():  # a trained LoRA: up weights far from their zero start
        torch.nn.init.normal_(module.lora_up.weight, std=0.5)
    network.save_weights(path)


def test_folders_list_epochs_in_order_and_the_final_file_last(tmp_path):
    for name in ("me.safetensors", "me-000010.safetensors", "me-000002.safetensors", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in lora_files([str(tmp_path)])] == [
        "me-000002.safetensors", "me-000010.safetensors", "me.safetensors"]
    assert epoch_order(tmp_path / "me-000002.safetensors") < epoch_order(tmp_path / "me.safetensors")
    with pytest.raises(ConfigError, match="no such file"):
        lora_files([str(tmp_path / "missing")])


def test_strengths_prompts_and_output_name(tmp_path):
    assert parse_strengths("0.4, 0.6,1") == [0.4, 0.6, 1.0]
    with pytest.raises(ConfigError, match="--strengths"):
        parse_strengths("0.4;0.6")
    prompts_file = tmp_path / "p.txt"
    prompts_file.write_text("red --d 9\nblue --s 5\n", encoding="utf-8")
    args = argparse.Namespace(prompts=str(prompts_file), prompt=["green"], seed=100, steps=3, width=64, height=None)
    got = comparison_prompts(args)
    assert [(p.prompt, p.seed, p.sample_steps, p.width) for p in got] == [
        ("red", 9, 3, 64), ("blue", 101, 5, 64), ("green", 102, 3, 64)]
    (tmp_path / "compare_grid.png").write_bytes(b"a user's picture")
    assert default_output([tmp_path / "me.safetensors"]).name == "compare_grid-2.png"


def test_grid_of_epochs_and_strengths(tiny_sd1_dir, tmp_path):
    run = tmp_path / "出力 out"
    run.mkdir()
    save_lora(tiny_sd1_dir, run / "me-000001.safetensors", seed=1)
    save_lora(tiny_sd1_dir, run / "me.safetensors", seed=2)
    out = tmp_path / "grid.png"
    assert main(["compare", "--model", str(tiny_sd1_dir), "--loras", str(run), "--prompt", "a shape --d 3",
                 "--prompt", "a circle", "--steps", "2", "--width", "64", "--height", "64",
                 "--strengths", "0,1", "--out", str(out)]) == 0
    grid = Image.open(out).convert("RGB")
    rows, side = 1 + 2 * 2, MIN_CELL  # no LoRA, then each file at strengths 0 and 1; 64 px scaled up
    top = grid.height - rows * side
    assert grid.width == ROW_LABEL_WIDTH + 2 * side and top > 0

    def cell(row: int, column: int) -> bytes:
        x, y = ROW_LABEL_WIDTH + column * side, top + row * side
        return grid.crop((x, y, x + side, y + side)).tobytes()

    assert cell(1, 0) == cell(0, 0) and cell(3, 1) == cell(0, 1)  # strength 0 draws the base model's picture
    assert cell(2, 0) != cell(0, 0) and cell(4, 0) != cell(2, 0)  # each file changes it, differently
    assert cell(0, 0) != cell(0, 1)  # the columns are different prompts
