"""The Windows VRAM-spill watch: one warning when memory nears the card's size or steps suddenly slow down."""

from types import SimpleNamespace

import torch

from trainer.train.watch import NO_WATCH, SpillWatch, spill_watch


def make_watch(memory=None, total_gb=8.0, **kwargs):
    warnings = []
    watch = SpillWatch(warnings.append, ["train_batch_size = 1", "gradient_checkpointing = true"],
                       total_gb=total_gb, memory_gb=memory, **kwargs)
    return watch, warnings


def feed(watch, seconds):
    for s in seconds:
        watch.add_step(s)


def test_a_sudden_3x_slowdown_warns_once_naming_the_policy_and_settings():
    watch, warnings = make_watch()
    feed(watch, [20.0] * 5 + [1.0, 1.2, 0.9] * 4)  # slow warm-up steps are not the baseline
    assert warnings == []
    feed(watch, [5.0] * 30)
    assert len(warnings) == 1
    assert "5x slower" in warnings[0] and "Sysmem Fallback Policy" in warnings[0]
    assert "train_batch_size = 1; gradient_checkpointing = true" in warnings[0]


def test_steady_bucket_mix_outliers_and_a_2_5x_drift_do_not_warn():
    watch, warnings = make_watch()
    feed(watch, [1.0] * 5 + [0.5, 1.5] * 5)  # two bucket sizes alternating
    feed(watch, ([1.0, 3.0] * 4 + [60.0, 2.0]) * 10)  # an occasional long step; the median is 2.5x
    assert warnings == []


def test_memory_near_the_card_size_warns_from_the_first_step_and_is_read_rarely():
    reads = []

    def memory():
        reads.append(1)
        return 7.7

    watch, warnings = make_watch(memory, total_gb=8.0, memory_every=10)
    watch.add_step(1.0)
    assert len(warnings) == 1 and "7.7 GB of the card's 8.0 GB" in warnings[0]
    assert "Sysmem Fallback Policy" in warnings[0]
    feed(watch, [50.0] * 40)
    assert len(warnings) == 1 and len(reads) == 1  # one warning; after it the watch does nothing


def test_memory_with_room_left_is_checked_every_n_steps_without_warning():
    reads = []
    watch, warnings = make_watch(lambda: reads.append(1) or 7.0, total_gb=8.0, memory_every=10)
    feed(watch, [1.0] * 25)
    assert warnings == [] and len(reads) == 3  # steps 1, 11, 21


def test_timing_times_the_wrapped_step_with_the_given_clock():
    now = [0.0]
    watch, warnings = make_watch(clock=lambda: now[0], warmup=0, baseline=1, window=1)
    for seconds in (1.0, 4.0):
        with watch.timing():
            now[0] += seconds
        now[0] += 100.0  # a sampling pause outside the step is not counted
    assert len(warnings) == 1 and "4x slower" in warnings[0]


def test_no_watch_and_cpu_runs_do_nothing():
    with NO_WATCH.timing():
        pass
    NO_WATCH.add_step(1e9)
    NO_WATCH.check_memory(1e9)
    setup = SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")))
    assert spill_watch(None, setup, None) is NO_WATCH


def test_training_feeds_the_watch_every_step_and_its_warning_becomes_an_event(
        tiny_sd1_dir, train_data_dir, tmp_path, monkeypatch):
    from trainer.config.args import parse_train_args
    from trainer.train import run as run_module
    from trainer.train.events import RecordingListener
    from trainer.train.run import run_training

    made, memory = [], iter([0.5, 0.5, 0.99])  # the card fills up on the third step

    def fake_spill_watch(cfg, setup, reporter):
        made.append(SpillWatch(lambda m: reporter.emit("warning", message=m, reason="vram_spill"), ["x = 1"],
                               total_gb=1.0, memory_gb=lambda: next(memory), memory_every=1))
        return made[-1]

    monkeypatch.setattr(run_module, "spill_watch", fake_spill_watch)  # what run_training calls
    cfg = parse_train_args(["--pretrained_model_name_or_path", str(tiny_sd1_dir), "--train_data_dir",
                            str(train_data_dir), "--output_dir", str(tmp_path), "--resolution", "64",
                            "--caption_extension", ".txt", "--network_dim", "4", "--max_train_steps", "3",
                            "--train_batch_size", "2", "--max_data_loader_n_workers", "0",
                            "--network_train_unet_only"])
    recorder = RecordingListener()
    run_training(cfg, listeners=[recorder])
    spills = [e for e in recorder.of("warning") if e.data.get("reason") == "vram_spill"]
    assert len(spills) == 1 and "x = 1" in spills[0].data["message"]
    assert made[0].steps == 3  # every step was timed
    assert recorder.of("finished")
