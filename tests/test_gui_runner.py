"""The GUI's training runs (trainer.gui.runner): the events file followed line by line, and real runs of the
demo model through a subprocess: finished, stopped with Ctrl-C semantics, failed on a config error."""

from __future__ import annotations

import json
import os
import signal

import pytest

from trainer.gui import runner as R
from trainer.gui.form import PRESETS_DIR, load_values, write_config
from trainer.gui.runner import GRID_CAPTION, RunStatus, TrainingRun, status_markdown


def line(kind: str, **data) -> bytes:
    return (json.dumps({"time": 1.0, "kind": kind, **data}, ensure_ascii=False) + "\n").encode("utf-8")


class FakeProcess:
    """Stands in for the trainer's process: the test decides when it ends and with which code."""

    def __init__(self, command, **options):
        self.command, self.options = command, options
        self.code = None
        self.signals = []

    def poll(self):
        return self.code

    def send_signal(self, sig):
        self.signals.append(sig)

    def kill(self):
        self.code = -9


@pytest.fixture
def fake_popen(monkeypatch):
    started = []

    def popen(command, **options):
        started.append(FakeProcess(command, **options))
        return started[-1]

    monkeypatch.setattr(R.subprocess, "Popen", popen)
    return started


def test_poll_reads_only_new_complete_lines_of_this_run(tmp_path, fake_popen):
    config = tmp_path / "my config.toml"
    config.write_text('output_dir = "out put"\noutput_name = "キャラ"\n', encoding="utf-8")
    events = tmp_path / "out put" / "キャラ.events.jsonl"
    events.parent.mkdir()
    events.write_bytes(line("run_started", total_steps=5) + line("finished", path="old.safetensors", steps=5,
                                                                 seconds=1))
    run = TrainingRun("my config.toml", cwd=tmp_path)
    assert run.events_path == events and run.log_path == events.with_name("キャラ.gui.log")
    run.start()
    process = fake_popen[0]
    assert process.command[1:5] == ["-m", "trainer", "train", "--config_file"]
    assert process.command[5] == str(config)
    assert process.options["env"]["PYTHONUTF8"] == "1" and process.options["env"]["PYTHONIOENCODING"] == "utf-8"
    assert process.options["cwd"] == tmp_path
    assert process.options.get("start_new_session") or process.options.get("creationflags")
    assert run.poll().state == "running" and run.status.step == 0  # the older run's lines are not this run's

    warning = line("warning", message="VRAM 残り少ない")
    with open(events, "ab") as f:
        f.write(line("run_started", total_steps=100, num_epochs=2, summary=["images: 40"]))
        f.write(line("step", step=10, total=100, epoch=1, lr=[1e-4], vram_gb=3.25, loss=0.125, it_per_s=2.0))
        f.write(warning[:20])  # cut inside the Japanese characters: the trainer is still writing this line
    status = run.poll()
    assert (status.state, status.step, status.total, status.epoch, status.loss) == ("running", 10, 100, 1, 0.125)
    assert status.eta_s == pytest.approx(45.0) and status.vram_gb == 3.25 and status.info == ["images: 40"]
    assert status.warnings == []
    text = status_markdown(status)
    assert "Step 10 / 100" in text and "loss 0.1250" in text and "2.00 it/s" in text and "ETA 45 s" in text
    assert "VRAM 3.2 GB" in text or "VRAM 3.3 GB" in text

    with open(events, "ab") as f:
        f.write(warning[20:])
        f.write(line("sample", path="out put/sample/a.png", prompt="キャラ, smiling"))
        f.write(line("saved", path="out put/キャラ-000001.safetensors"))
    status = run.poll()
    assert status.warnings == ["VRAM 残り少ない"]
    assert status.samples == [("out put/sample/a.png", "キャラ, smiling")]
    assert status.saved == ["out put/キャラ-000001.safetensors"]

    with open(events, "ab") as f:
        f.write(line("sample_grid", path="out put/キャラ_samples_grid.png"))
        f.write(line("finished", path="out put/キャラ.safetensors", steps=100, seconds=75.0))
    process.code = 0
    status = run.poll()
    assert (status.state, status.output, status.step) == ("finished", "out put/キャラ.safetensors", 100)
    assert status.eta_s is None
    assert status.samples[-1] == ("out put/キャラ_samples_grid.png", GRID_CAPTION)  # the gallery shows it first
    assert "✅" in status_markdown(status) and "1:15" in status_markdown(status)
    assert not run.running
    # Where the files are, as a full path: the trainer's "out put/..." is relative to the folder it ran in.
    assert status.folder == str(tmp_path / "out put")
    assert f"Saved in `{tmp_path / 'out put'}`: `キャラ-000001.safetensors`" in status_markdown(status)


def test_polls_from_several_threads_fold_each_event_once(tmp_path, fake_popen):
    import threading

    config = tmp_path / "c.toml"
    config.write_text('output_dir = "out"\noutput_name = "x"\n', encoding="utf-8")
    run = TrainingRun(str(config), cwd=tmp_path)
    run.start()
    run.events_path.parent.mkdir(exist_ok=True)
    run.events_path.write_bytes(b"".join(line("saved", path=f"x-{i}.safetensors") for i in range(3000)))
    barrier = threading.Barrier(8)

    def poll():
        barrier.wait()
        run.poll()

    threads = [threading.Thread(target=poll) for _ in range(8)]  # the page's timer and a button, at once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert run.status.saved == [f"x-{i}.safetensors" for i in range(3000)]


def test_a_failed_event_gives_its_reason(tmp_path, fake_popen):
    config = tmp_path / "c.toml"
    config.write_text(f'output_dir = "{(tmp_path / "o").as_posix()}"\n', encoding="utf-8")
    run = TrainingRun(config)
    run.start()
    with open(tmp_path / "o" / "last.events.jsonl", "ab") as f:
        f.write(line("failed", reason="--train_data_dir: folder not found: C:\\x"))
    fake_popen[0].code = 2
    status = run.poll()
    assert status.state == "failed" and status.message == "--train_data_dir: folder not found: C:\\x"
    assert "Failed" in status_markdown(status) and "folder not found" in status_markdown(status)


def test_stop_sends_ctrl_c_and_an_end_without_events_is_interrupted(tmp_path, fake_popen):
    run = TrainingRun(tmp_path / "missing.toml", cwd=tmp_path)
    assert run.log_path == tmp_path / "output" / "last.gui.log"  # the config is read, not checked
    run.start()
    run.stop()
    expected = signal.CTRL_BREAK_EVENT if os.name == "nt" else signal.SIGINT
    assert fake_popen[0].signals == [expected]
    fake_popen[0].code = 130
    status = run.poll()
    assert status.state == "interrupted" and "nothing was saved" in status.message


def test_the_output_flags_after_the_config_decide_the_events_file(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('output_name = "a"\n', encoding="utf-8")
    run = TrainingRun(config, cwd=tmp_path, extra_args=["--output_name", "b", "--output_dir", "elsewhere"])
    assert run.events_path == tmp_path / "elsewhere" / "b.events.jsonl"


def test_error_from_log_takes_the_cli_error_or_the_end_of_a_traceback():
    assert R.error_from_log("INFO x\nerror: bad key 'a'\n  more\n") == "bad key 'a'\n  more"
    tail = "Traceback (most recent call last):\n  File x\nRuntimeError: boom"
    assert R.error_from_log(tail).endswith("RuntimeError: boom")


def test_status_markdown_before_a_run():
    assert status_markdown(RunStatus()) == "Not started."
    assert "Starting" in status_markdown(RunStatus(state="running"))


# ---- real runs of the demo model ----------------------------------------------------------------------

def demo_config(tmp_path, epochs: int):
    values = load_values(PRESETS_DIR / "demo.toml")
    values.update(train_data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "出力 out"),
                  max_train_epochs=epochs, save_every_n_epochs=None)
    return write_config(tmp_path / "configs" / "demo copy.toml", values)


def test_a_real_run_finishes_with_the_lora(tmp_path):
    run = TrainingRun(demo_config(tmp_path, epochs=1), cwd=tmp_path)
    run.start()
    status = run.wait(timeout=180)
    assert status.state == "finished", status.message + "\n" + status.log_tail
    final = tmp_path / "出力 out" / "demo-lora.safetensors"
    assert final.is_file() and status.output == str(final) and str(final) in status.saved
    assert status.step == status.total == 20 and status.exit_code == 0
    assert run.log_path.is_file() and "demo-lora" in run.log_path.read_text(encoding="utf-8")


def test_a_real_run_stopped_saves_the_lora_so_far(tmp_path):
    run = TrainingRun(demo_config(tmp_path, epochs=50), cwd=tmp_path)
    run.start()
    status = run.poll()
    while run.running and status.step == 0:
        status = run.wait(timeout=0.2, interval=0.05)
    run.stop()
    status = run.wait(timeout=120)
    assert status.state == "interrupted", status.message + "\n" + status.log_tail
    out = tmp_path / "出力 out"
    step_files = list(out.glob("demo-lora-step*.safetensors"))
    assert len(step_files) == 1 and str(step_files[0]) in status.message and status.saved == [str(step_files[0])]
    assert not (out / "demo-lora.safetensors").exists()
    assert 0 < status.step < status.total


def test_a_config_error_ends_failed_with_the_message(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(f'pretrained_model_name_or_path = "builtin:tiny-sd1"\ntrain_data_dir = "x"\n'
                      f'network_dimm = 8\noutput_dir = "{(tmp_path / "o").as_posix()}"\n', encoding="utf-8")
    run = TrainingRun(config, cwd=tmp_path)
    run.start()
    status = run.wait(timeout=120)
    assert status.state == "failed" and status.exit_code == 2
    assert "network_dimm" in status.message and 'did you mean "network_dim"' in status.message
    assert "bad.toml" in status.message
