"""Data parallel, as `accelerate launch --num_processes 2 train_network.py ...` runs it: two CPU processes
(gloo) each train on their own share of the batches and end with the same LoRA, which the main process saves."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

PROBE = Path(__file__).with_name("distributed_probe.py")


@pytest.mark.slow
def test_two_processes_split_the_data_and_agree_on_the_weights(tiny_sd1_dir, train_data_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    args = ["--pretrained_model_name_or_path", str(tiny_sd1_dir), "--train_data_dir", str(train_data_dir),
            "--output_dir", str(out), "--output_name", "ddp", "--resolution", "64", "--caption_extension", ".txt",
            "--max_train_steps", "3", "--train_batch_size", "2", "--learning_rate", "1e-2", "--seed", "5",
            "--max_data_loader_n_workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29533", str(PROBE), str(out), *args],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text(encoding="utf-8")) for i in (0, 1)]
    assert ranks[0]["seen"] and ranks[1]["seen"] and ranks[0]["seen"] != ranks[1]["seen"]
    assert len(ranks[0]["seen"]) + len(ranks[1]["seen"]) == 40  # 4 pictures x 10 repeats, shared out
    assert ranks[0]["weights"] == ranks[1]["weights"]  # averaged gradients keep the copies identical
    saved = load_file(out / "ddp.safetensors")
    assert saved.keys() == ranks[0]["weights"].keys()
    for key, tensor in saved.items():
        assert torch.equal(tensor.float().flatten(), torch.tensor(ranks[0]["weights"][key]))
