"""--resume continues the very run it left: the same LoRA weights as the uninterrupted run (1e-6), from an epoch
end, mid-epoch in a later epoch, the state a Ctrl-C leaves and the last periodic state a kill leaves; with
gradient accumulation, caption shuffle/dropout, buckets, regularisation images and cached latents on.

Each case trains a reference run that writes a state after every step, then resumes from one of them. The
controls at the end put back what used to break it (a data order that ran on from epoch to epoch, the random
streams of a Ctrl-C'd step) and show that these tests then fail."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import make_dreambooth_folder, make_image
from safetensors.torch import load_file

from trainer.cli import main
from trainer.data import dataset as dataset_module
from trainer.train import loop
from trainer.train.state import StepBoundary

NAME = "resume"


def make_data(root: Path) -> tuple[Path, Path]:
    """Four captioned pictures of two sizes (two buckets), and two regularisation pictures."""
    train = root / "train"
    folder = make_dreambooth_folder(train, "1_sks shape", n=2, size=(64, 64))
    for i in (2, 3):
        make_image(folder / f"img_{i}.png", size=(256, 64), seed=10 + i)
    for i in range(4):
        (folder / f"img_{i}.txt").write_text(f"sks shape, red, square, tag{i}", encoding="utf-8")
    reg = root / "reg" / "1_shape"
    for i in range(2):
        make_image(reg / f"reg_{i}.png", seed=50 + i)
    return train, reg.parent


# (arguments, optimizer steps per epoch): a run trains 3 epochs less one step, so the last state is in epoch 3
PLAIN = (("--train_batch_size", "2", "--max_train_steps", "5"), 2)
# reg pictures are repeated to as many as the train pictures (sd-scripts): 8 micro-batches, 4 steps per epoch
EVERYTHING = (("--train_batch_size", "1", "--gradient_accumulation_steps", "2", "--shuffle_caption",
               "--caption_dropout_rate", "0.3", "--caption_tag_dropout_rate", "0.2", "--enable_bucket",
               "--min_bucket_reso", "64", "--max_bucket_reso", "256", "--resolution", "128",
               "--cache_latents", "--noise_offset", "0.05", "--max_train_steps", "11"), 4)

# random crops, flips and colour changes drawn per picture, read by a worker process
AUGMENTED = (("--train_batch_size", "2", "--max_train_steps", "5", "--random_crop", "--flip_aug", "--color_aug",
              "--shuffle_caption", "--resolution", "48", "--max_data_loader_n_workers", "1"), 2)


def run_args(model: Path, data: tuple[Path, Path], out: Path, features: tuple, *extra: str) -> list[str]:
    train, reg = data
    args = ["train", "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(train),
            "--output_dir", str(out), "--output_name", NAME, "--resolution", "64", "--caption_extension", ".txt",
            "--network_module", "networks.lora", "--network_dim", "4", "--learning_rate", "1e-2",
            "--seed", "7", "--max_data_loader_n_workers", "0", *features[0]]
    if features is EVERYTHING:
        args += ["--reg_data_dir", str(reg)]
    return args + list(extra)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / f"{NAME}.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return make_data(tmp_path_factory.mktemp("data") / "データ")


@pytest.fixture(scope="module", params=["plain", "everything", "augmented"])
def reference(request, tiny_sd1_dir, data, tmp_path_factory):
    """The uninterrupted run, with a state folder after every step (saving one draws no random number)."""
    features = {"plain": PLAIN, "everything": EVERYTHING, "augmented": AUGMENTED}[request.param]
    out = tmp_path_factory.mktemp(f"ref-{request.param}")
    assert main(run_args(tiny_sd1_dir, data, out, features, "--save_state", "--save_every_n_steps", "1")) == 0
    per_epoch = features[1]
    for step, epoch in ((per_epoch, 1), (per_epoch + 1, 2)):  # the steps per epoch the cases rely on
        saved = json.loads((out / f"{NAME}-step{step:08d}-state" / "train_state.json").read_text(encoding="utf-8"))
        assert (saved["current_epoch"], saved["current_step"]) == (epoch, step)
    return features, out


def resume(model, data, features, state: Path, out: Path) -> dict[str, torch.Tensor]:
    assert main(run_args(model, data, out, features, "--resume", str(state), "--skip_until_initial_step")) == 0
    return final_weights(out)


@pytest.mark.parametrize("where", ["epoch-end", "mid-epoch-2", "last-in-epoch-3"])
def test_resume_from_a_periodic_state_ends_with_the_uninterrupted_weights(reference, tiny_sd1_dir, data, tmp_path,
                                                                          where):
    """Epoch 1's last step; the first step of epoch 2; the last state before the end, which is what a kill
    (or a power cut) leaves to resume from."""
    features, ref = reference
    per_epoch = features[1]
    at_step = {"epoch-end": per_epoch, "mid-epoch-2": per_epoch + 1, "last-in-epoch-3": 3 * per_epoch - 2}[where]
    state = ref / f"{NAME}-step{at_step:08d}-state"
    assert state.is_dir(), sorted(p.name for p in ref.iterdir())
    assert max_difference(resume(tiny_sd1_dir, data, features, state, tmp_path), final_weights(ref)) <= 1e-6


def test_states_do_not_change_the_run(reference, tiny_sd1_dir, data, tmp_path):
    features, ref = reference
    assert main(run_args(tiny_sd1_dir, data, tmp_path, features)) == 0
    assert max_difference(final_weights(tmp_path), final_weights(ref)) == 0


def interrupt_in_micro_batch(monkeypatch, n: int) -> None:
    """Ctrl-C in the n-th micro-batch, after its loss has drawn timesteps and noise: the worst moment."""
    real, calls = loop.compute_loss, []

    def compute_then_stop(setup, batch, **kwargs):
        loss = real(setup, batch, **kwargs)
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return loss

    monkeypatch.setattr(loop, "compute_loss", compute_then_stop)


def test_resume_from_the_state_a_ctrl_c_leaves(reference, tiny_sd1_dir, data, tmp_path, monkeypatch):
    features, ref = reference
    micro_per_step = 2 if features is EVERYTHING else 1
    # stop in step 4, in its last micro-batch under accumulation: counted, noise drawn, optimizer not stepped
    interrupt_in_micro_batch(monkeypatch, 4 * micro_per_step)
    stopped = tmp_path / "stopped"
    assert main(run_args(tiny_sd1_dir, data, stopped, features, "--save_state")) == 130
    state = stopped / f"{NAME}-step00000003-state"
    assert (stopped / f"{NAME}-step00000003.safetensors").is_file() and state.is_dir()
    monkeypatch.undo()
    assert max_difference(resume(tiny_sd1_dir, data, features, state, tmp_path / "resumed"),
                          final_weights(ref)) <= 1e-6


# --- controls: what used to break resume, put back, must fail these tests ---------------------------------

def test_control_a_batch_order_that_runs_on_across_epochs_is_caught(tiny_sd1_dir, data, tmp_path, monkeypatch):
    """The old DataLoader generator, seeded once: epoch 2 of a resumed run got epoch 1's order."""
    orders: dict[int, random.Random] = {}

    def runs_on(self):
        rng = orders.setdefault(id(self), random.Random(self.seed))
        return iter(rng.sample(range(len(self.dataset)), len(self.dataset)))

    monkeypatch.setattr(dataset_module.EpochOrder, "__iter__", runs_on)
    ref = tmp_path / "ref"
    assert main(run_args(tiny_sd1_dir, data, ref, PLAIN, "--save_state", "--save_every_n_steps", "2")) == 0
    resumed = resume(tiny_sd1_dir, data, PLAIN, ref / f"{NAME}-step00000002-state", tmp_path / "resumed")
    assert max_difference(resumed, final_weights(ref)) > 1e-4


def test_control_a_ctrl_c_state_with_the_step_in_progress_random_streams_is_caught(reference, tiny_sd1_dir, data,
                                                                                    tmp_path, monkeypatch):
    features, ref = reference
    if features is not PLAIN:
        pytest.skip("one control is enough")
    monkeypatch.setattr(StepBoundary, "restore", lambda self: None)
    interrupt_in_micro_batch(monkeypatch, 4)
    stopped = tmp_path / "stopped"
    assert main(run_args(tiny_sd1_dir, data, stopped, features, "--save_state")) == 130
    monkeypatch.undo()
    resumed = resume(tiny_sd1_dir, data, features, stopped / f"{NAME}-step00000003-state", tmp_path / "resumed")
    assert max_difference(resumed, final_weights(ref)) > 1e-4


# --- a state that does not belong to this run --------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_state(tiny_sd1_dir, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("saved")
    assert main(run_args(tiny_sd1_dir, data, out, PLAIN, "--save_state", "--save_every_n_steps", "2")) == 0
    return out / f"{NAME}-step00000002-state"


def test_a_state_records_what_run_it_belongs_to(plain_state):
    run = json.loads((plain_state / "train_state.json").read_text(encoding="utf-8"))["run"]
    assert run["optimizer"].endswith("AdamW") and run["network"]["module"] == "networks.lora"
    assert run["dataset"]["pictures"] == 4 and run["dataset"]["batches_per_epoch"] == 2 and run["seed"] == 7


@pytest.mark.parametrize("change, named", [
    (("--optimizer_type", "SGD"), "the optimizer torch.optim.adamw.AdamW"),
    (("--network_dim", "8"), "another network"),
])
def test_a_state_for_another_optimizer_or_network_is_refused_by_name(plain_state, tiny_sd1_dir, data, tmp_path,
                                                                     capsys, change, named):
    code = main(run_args(tiny_sd1_dir, data, tmp_path, PLAIN, "--resume", str(plain_state), *change))
    err = capsys.readouterr().err
    assert code == 2 and named in err and "Traceback" not in err
    assert not (tmp_path / f"{NAME}.safetensors").exists()


def test_a_state_of_another_dataset_continues_with_a_warning(plain_state, tiny_sd1_dir, data, tmp_path, capsys):
    other = make_data(tmp_path / "other")
    (other[0] / "1_sks shape" / "img_3.png").unlink()
    (other[0] / "1_sks shape" / "img_3.txt").unlink()
    assert main(run_args(tiny_sd1_dir, other, tmp_path / "out", PLAIN, "--resume", str(plain_state),
                         "--seed", "8")) == 0
    warning = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "dataset, seed (7 then, 8 now) differ" in warning and "no longer an exact continuation" in warning


def test_an_older_state_without_a_record_is_still_refused_for_another_optimizer(plain_state, tiny_sd1_dir, data,
                                                                                  tmp_path, capsys):
    """States from before the record (and sd-scripts' own) hold only the step fields; torch would load AdamW's
    settings into SGD and the first step would fail with KeyError: 'momentum'."""
    import shutil

    old = tmp_path / "old-state"
    shutil.copytree(plain_state, old)
    (old / "train_state.json").write_text('{"current_epoch": 1, "current_step": 2}', encoding="utf-8")
    code = main(run_args(tiny_sd1_dir, data, tmp_path / "out", PLAIN, "--resume", str(old),
                         "--optimizer_type", "SGD", "--skip_until_initial_step"))
    err = capsys.readouterr().err
    assert code == 2 and "another optimizer" in err and "momentum" in err and "Traceback" not in err
