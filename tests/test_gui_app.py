"""trainer.gui.app: the gradio page and `python -m trainer gui`.

The callbacks are plain functions, so most tests call them directly; a fake training run stands in for
the subprocess (trainer.gui.runner is tested on its own). One test serves the real page on a free port.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from trainer import cli  # noqa: E402
from trainer.config.args import parse_train_args  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.gui import app, form  # noqa: E402
from trainer.gui.runner import RunStatus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "presets"


@pytest.fixture(scope="module")
def fields():
    return app.form_fields()


def shown_for(fields, **changes):
    """The demo preset's form values, with some fields changed as a user would type them."""
    shown, _, _ = app.load_source(str(PRESETS / "demo.toml"), fields)
    index = {spec.name: i for i, spec in enumerate(fields)}
    for name, value in changes.items():
        shown[index[name]] = value
    return shown


def labels(blocks) -> dict[str, object]:
    """Components by label, and the main fields also by their sd-scripts name ("Epochs (max_train_epochs)")."""
    shown = {b.label: b for b in blocks.blocks.values() if getattr(b, "label", None)}
    for label, block in list(shown.items()):
        if label.endswith(")") and " (" in label:
            shown.setdefault(label.rsplit(" (", 1)[1][:-1], block)
    return shown


# ---------------------------------------------------------------------------------------------------
# The page


def test_build_app_shows_the_simple_fields_the_trigger_and_every_advanced_argument_once(tmp_path, fields):
    blocks = app.build_app(presets_dir=PRESETS, configs_dir=tmp_path / "configs", cwd=tmp_path)
    assert isinstance(blocks, gr.Blocks)
    shown = labels(blocks)
    for name in form.SIMPLE_FIELDS:
        assert name in shown
    assert "Trigger word" in shown and "Start from" in shown
    # The trigger box is metadata_trigger_phrase; it is not a second time among the advanced fields.
    assert app.TRIGGER_FIELD not in shown
    names = [spec.name for spec in fields]
    assert len(names) == len(set(names)) and set(form.SIMPLE_FIELDS) <= set(names)
    # Each advanced argument's help is its info line; the demo preset is loaded into the form.
    assert shown["network_dropout"].info == form.field_spec("network_dropout").help
    assert shown["pretrained_model_name_or_path"].value == "builtin:tiny-sd1"
    accordions = [b.label for b in blocks.blocks.values() if isinstance(b, gr.Accordion)]
    assert "Advanced: optimizer" in accordions and "Advanced: sampling" in accordions
    choices = dict((value, label) for label, value in shown["Start from"].choices)
    assert choices[str(PRESETS / "sd15-8gb.toml")] == "preset: sd15-8gb"
    assert not any("dataset-example" in value for value in choices)


def test_source_list_adds_the_configs_saved_from_the_page(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "mychar.toml").write_text("", encoding="utf-8")
    choices = app.source_choices(PRESETS, configs)
    assert choices[-1] == ("saved: mychar", str(configs / "mychar.toml"))
    assert app.default_source(choices) == str(PRESETS / "demo.toml")


def test_choosing_a_preset_fills_the_fields_from_it(fields):
    shown, trigger, add = app.load_source(str(PRESETS / "sd15-8gb.toml"), fields)
    values = form.load_values(PRESETS / "sd15-8gb.toml")
    by_name = dict(zip((spec.name for spec in fields), shown))
    for name in ("pretrained_model_name_or_path", "resolution"):
        assert by_name[name] == form.to_text(form.field_spec(name), values[name])
    assert by_name["network_dim"] == str(values["network_dim"])
    assert float(by_name["learning_rate"]) == values["learning_rate"]
    # Arguments the preset does not set show their defaults; an unset number is an empty box.
    assert by_name["max_grad_norm"] == str(form.field_spec("max_grad_norm").default)
    assert by_name["save_every_n_steps"] == "" and by_name["weighted_captions"] is False
    assert trigger == "" and add is False


@pytest.mark.parametrize("preset", ["demo", "sd15-8gb", "sdxl-12gb"])
def test_a_preset_saved_unchanged_from_the_form_has_exactly_the_preset_values(tmp_path, fields, preset):
    # What the browser sends back is what it was given; nothing unset may come back as 0 or "".
    shown, _, _ = app.load_source(str(PRESETS / f"{preset}.toml"), fields)
    path, _ = app.save_form(tmp_path, tmp_path, None, fields, shown, "", False)
    saved, original = form.load_values(path), form.load_values(PRESETS / f"{preset}.toml")
    for name, value in original.items():  # the file keeps only what differs from the defaults
        assert saved.get(name, form.field_spec(name).default) == value, name
    assert set(saved) <= set(original)


def test_number_fields_are_text_boxes_so_an_unset_number_stays_unset(tmp_path):
    blocks = app.build_app(presets_dir=PRESETS, configs_dir=tmp_path / "configs", cwd=tmp_path)
    shown = labels(blocks)
    assert not any(isinstance(b, gr.Number) for b in blocks.blocks.values())  # an empty one sends 0
    assert shown["unet_lr"].value == "" and shown["network_dim"].value == "8"


def test_a_broken_preset_is_a_config_error_naming_the_file(tmp_path, fields):
    bad = tmp_path / "bad.toml"
    bad.write_text("netwrk_dim = 8\n", encoding="utf-8")
    with pytest.raises(UserError, match="netwrk_dim"):
        app.load_source(str(bad), fields)


# ---------------------------------------------------------------------------------------------------
# Save and Check


def test_save_writes_configs_name_toml_that_train_reads_and_shows_the_console_command(tmp_path, fields,
                                                                                     train_data_dir):
    shown = shown_for(fields, output_name="my 猫 lora", train_data_dir=str(train_data_dir), network_dim="16",
                      learning_rate="0.0002")
    path, message = app.save_form(tmp_path / "configs", tmp_path, str(PRESETS / "demo.toml"), fields, shown,
                                  "sks", True)
    assert path == tmp_path / "configs" / "my 猫 lora.toml"
    cfg = parse_train_args(["--config_file", str(path)])
    assert cfg.train_data_dir == str(train_data_dir) and cfg.output_name == "my 猫 lora"
    assert cfg.network_dim == 16 and cfg.learning_rate == pytest.approx(2e-4)
    assert cfg.pretrained_model_name_or_path == "builtin:tiny-sd1"
    assert cfg.metadata_trigger_phrase == "sks" and cfg.caption_prefix == "sks, " and cfg.keep_tokens >= 1
    assert "./train.sh --config_file 'configs/my 猫 lora.toml'" in message or \
        '.\\train.ps1 -Config "configs\\my 猫 lora.toml"' in message
    # Loading it back gives the same form, with the prefix the tick added now visible in its own field.
    again, trigger, add = app.load_source(str(path), fields)
    prefix = [spec.name for spec in fields].index("caption_prefix")
    assert again[prefix] == "sks, " and again[:prefix] + again[prefix + 1:] == shown[:prefix] + shown[prefix + 1:]
    assert (trigger, add) == ("sks", True)


def test_console_command_fits_the_platform_and_quotes_spaces(tmp_path):
    config = tmp_path / "configs" / "a b.toml"
    assert app.console_command(config, tmp_path, windows=True) == '.\\train.ps1 -Config "configs\\a b.toml"'
    assert app.console_command(config, tmp_path, windows=False) == "./train.sh --config_file 'configs/a b.toml'"
    elsewhere = Path("/elsewhere/x.toml")
    assert app.console_command(elsewhere, tmp_path, windows=False) == f"./train.sh --config_file {elsewhere}"


def test_a_value_that_does_not_fit_its_argument_is_an_error_not_a_file(tmp_path, fields, slot):
    shown = shown_for(fields, resolution="big")
    with pytest.raises(UserError, match="resolution"):
        app.save_form(tmp_path / "configs", tmp_path, None, fields, shown, "", False)
    # On the page: the field named, what did not happen, and no run.
    message = app.guarded(lambda: app.start_training(slot, tmp_path / "configs", None, fields,
                                                     shown_for(fields, learning_rate="abc"), "", False),
                          "Nothing was saved or started.")
    assert message.startswith("**Error:** learning_rate: expected a number") and "Nothing was saved" in message
    assert FakeRun.made == []
    assert not (tmp_path / "configs").exists() or not list((tmp_path / "configs").iterdir())


def test_sample_prompts_from_the_main_page_go_to_a_file_the_saved_config_names(tmp_path, fields):
    from trainer.train.sample import load_prompts

    configs = tmp_path / "configs"
    shown = app.with_prompts(fields, shown_for(fields, output_name="my char", sample_every_n_epochs=""),
                             "mychar, smiling --w 64 --h 64\nmychar, full body", configs_dir=configs, cwd=tmp_path,
                             write=True)
    path, _ = app.save_form(configs, tmp_path, None, fields, shown, "", False)
    cfg = parse_train_args(["--config_file", str(path)])
    assert Path(cfg.sample_prompts) == configs / "my char.prompts.txt"
    assert cfg.sample_every_n_epochs == 1  # no cadence was set: a picture every epoch
    assert [p.prompt for p in load_prompts(cfg.sample_prompts)] == ["mychar, smiling", "mychar, full body"]
    # Loading that config shows the same text, and saving it again writes nothing new.
    loaded, _, _ = app.load_source(str(path), fields)
    assert app.prompts_of(fields, loaded, tmp_path) == "mychar, smiling --w 64 --h 64\nmychar, full body"
    again = app.with_prompts(fields, loaded, "mychar, smiling --w 64 --h 64\nmychar, full body",
                             configs_dir=configs, cwd=tmp_path, write=True)
    assert again == loaded


def test_emptying_the_sample_prompts_box_stops_the_samples_it_started(tmp_path, fields):
    configs = tmp_path / "configs"
    shown = app.with_prompts(fields, shown_for(fields, output_name="x", sample_every_n_epochs=""), "a cat",
                             configs_dir=configs, cwd=tmp_path, write=True)
    path, _ = app.save_form(configs, tmp_path, None, fields, shown, "", False)
    loaded, _, _ = app.load_source(str(path), fields)
    cleared = app.with_prompts(fields, loaded, "", configs_dir=configs, cwd=tmp_path, write=True)
    cfg = parse_train_args(["--config_file", str(app.save_form(configs, tmp_path, None, fields, cleared, "",
                                                               False)[0])])
    assert cfg.sample_prompts is None and not cfg.sample_every_n_epochs
    # A prompt file of the user's own, named under Advanced, is left alone by an empty box.
    own = tmp_path / "mine.txt"
    own.write_text("a dog\n", encoding="utf-8")
    kept = shown_for(fields, output_name="x", sample_prompts=str(own))
    assert app.with_prompts(fields, kept, "", configs_dir=configs, cwd=tmp_path, write=True) == list(kept)


def test_sample_prompts_keep_a_cadence_and_are_not_written_by_check(tmp_path, fields):
    configs = tmp_path / "configs"
    shown = shown_for(fields, output_name="x", sample_every_n_steps="50", sample_every_n_epochs="")
    index = {spec.name: i for i, spec in enumerate(fields)}
    written = app.with_prompts(fields, shown, "a cat", configs_dir=configs, cwd=tmp_path, write=True)
    assert written[index["sample_every_n_steps"]] == "50" and written[index["sample_every_n_epochs"]] == ""
    assert app.with_prompts(fields, shown, "a dog", configs_dir=tmp_path / "other", cwd=tmp_path,
                            write=False) == list(shown)
    assert app.with_prompts(fields, shown, "  ", configs_dir=tmp_path / "other", cwd=tmp_path,
                            write=True) == list(shown)
    assert not (tmp_path / "other").exists()


def test_fits_my_card_gives_the_memory_estimate_of_the_form_and_saves_nothing(tmp_path, fields, monkeypatch):
    monkeypatch.chdir(tmp_path)
    answer = app.fit_form(tmp_path, fields, shown_for(fields, train_batch_size="2"), "", False)
    # No NVIDIA GPU here: the estimate of these settings (the form's batch, not the preset's) is a note.
    assert "No NVIDIA GPU found; this form needs a card with about" in answer and "form.toml" not in answer
    assert "tiny-sd1 at 64x64, batch 2" in answer
    assert list(tmp_path.iterdir()) == []


def test_vram_answer_says_fits_or_what_to_step_down_to():
    from trainer.tools.doctor import Check

    fits = app.vram_markdown([Check("OK", "VRAM", "fits: needs about 3.5 GB; RTX 3070 has 8.0 GB")])
    assert fits == "- **Fits.** Fits: needs about 3.5 GB; RTX 3070 has 8.0 GB"
    too_big = app.vram_markdown([Check("WARN", "VRAM", "does not fit: needs about 9 GB",
                                       "use presets/sd15-6gb.toml (the 6 GB tier)")])
    assert too_big.startswith("- **Warning:** Does not fit") and "Fix: use presets/sd15-6gb.toml" in too_big


def test_check_reads_relative_paths_from_the_training_folder_and_saves_nothing(tmp_path, fields, monkeypatch):
    from conftest import make_dreambooth_folder

    make_dreambooth_folder(tmp_path / "imgs", "10_sks shape")
    monkeypatch.chdir(REPO)  # the GUI process may sit elsewhere; the run starts in cwd
    ok = app.check_form(tmp_path, fields, shown_for(fields, train_data_dir="imgs"), "sks", False)
    assert ok.startswith("**Ready to train.**") and "4 image(s)" in ok
    missing = app.check_form(tmp_path, fields, shown_for(fields, train_data_dir="nope",
                                                              pretrained_model_name_or_path="sd15.safetensors"),
                             "", False)  # (the built-in demo model would generate its pictures there)
    assert "**Ready to train.**" not in missing and "nope" in missing
    assert Path.cwd() == REPO and not (tmp_path / "configs").exists()


# ---------------------------------------------------------------------------------------------------
# Start, poll, stop (a fake run)


class FakeRun:
    made: list["FakeRun"] = []

    def __init__(self, config_path, *, cwd=None, **kwargs):
        self.config_path, self.cwd = Path(config_path), cwd
        self.started = self.stopped = False
        self.status = RunStatus(state="running", step=3, total=10, epoch=1, loss=0.25, it_per_s=2.0, eta_s=3.5,
                                vram_gb=None, samples=[], saved=[], warnings=[], message="", log_tail="step 3",
                                output=None)
        FakeRun.made.append(self)

    def start(self):
        self.started = True

    def poll(self):
        return self.status

    def stop(self):
        self.stopped = True

    @property
    def running(self):
        return self.started and self.status.state == "running"


@pytest.fixture
def slot(tmp_path):
    FakeRun.made.clear()
    return app.RunSlot(tmp_path, factory=FakeRun)


def test_start_saves_the_form_and_starts_one_run_in_the_training_folder(tmp_path, fields, slot):
    shown = shown_for(fields, output_name="first")
    message = app.start_training(slot, tmp_path / "configs", None, fields, shown, "", False)
    assert "Started" in message and (tmp_path / "configs" / "first.toml").is_file()
    run = FakeRun.made[-1]
    assert run.started and run.config_path == tmp_path / "configs" / "first.toml" and run.cwd == tmp_path
    # One run at a time: a second Start while it goes starts nothing and says why.
    again = app.start_training(slot, tmp_path / "configs", None, fields, shown_for(fields, output_name="second"),
                               "", False)
    assert "still going" in again and len(FakeRun.made) == 1
    assert not (tmp_path / "configs" / "second.toml").exists()
    with pytest.raises(UserError, match="still going"):
        slot.start(tmp_path / "configs" / "first.toml")


def test_poll_shows_status_and_sends_samples_only_when_they_change(tmp_path, fields, slot):
    assert app.poll_training(slot, []) == (app.IDLE_TEXT, "", None, [], False)
    app.start_training(slot, tmp_path / "configs", None, fields, shown_for(fields), "", False)
    run = FakeRun.made[-1]
    text, log, samples, paths, running = app.poll_training(slot, [])
    assert text == app.status_markdown(run.status) and log == "step 3" and running
    assert samples is None and paths == []  # nothing new: the gallery is left alone
    run.status.samples = [("a.png", "first prompt"), ("b.png", "second prompt")]
    _, _, samples, paths, _ = app.poll_training(slot, paths)
    assert samples == [("b.png", "second prompt"), ("a.png", "first prompt")] and paths == ["b.png", "a.png"]
    assert app.poll_training(slot, paths)[2] is None
    run.status.state = "finished"
    assert app.poll_training(slot, paths)[4] is False


def test_stop_asks_the_run_to_stop_and_a_new_start_works_after_it_ended(tmp_path, fields, slot):
    assert app.stop_training(slot) == "No training run is going."
    app.start_training(slot, tmp_path / "configs", None, fields, shown_for(fields), "", False)
    assert "saves the LoRA" in app.stop_training(slot) and FakeRun.made[-1].stopped
    FakeRun.made[-1].status.state = "interrupted"
    assert "Started" in app.start_training(slot, tmp_path / "configs", None, fields, shown_for(fields), "", False)
    assert len(FakeRun.made) == 2


def test_closing_the_server_stops_a_running_training_and_waits_for_it(tmp_path, fields, slot, capsys):
    app.stop_before_exit(slot)  # nothing going: nothing to do
    app.start_training(slot, tmp_path / "configs", None, fields, shown_for(fields), "", False)
    run = FakeRun.made[-1]
    run.stop = lambda: setattr(run.status, "state", "interrupted")
    run.status.message = "Saved the LoRA so far."
    app.stop_before_exit(slot, wait_s=5)
    assert "Saved the LoRA so far." in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# Serving it, and `python -m trainer gui`


def test_the_page_is_served_on_localhost(tmp_path):
    blocks = app.build_app(presets_dir=PRESETS, configs_dir=tmp_path / "configs", cwd=tmp_path)
    port = app.free_port("127.0.0.1", 17860)
    url = app.launch(blocks, "127.0.0.1", port, browser=False)
    try:
        assert url == f"http://127.0.0.1:{port}/"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200 and b"<html" in response.read().lower()
    finally:
        blocks.close()


def test_free_port_skips_a_port_in_use():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert app.free_port("127.0.0.1", port) == port + 1 or app.free_port("127.0.0.1", port) > port


@pytest.mark.skipif(sys.platform == "win32", reason="TIME_WAIT binding differs on Windows")
def test_free_port_reuses_the_port_a_closed_server_just_left():
    import socket

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gradio's server (uvicorn) binds
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            accepted.close()  # the server side closes first: its port waits in TIME_WAIT
            client.recv(1)
    assert app.free_port("127.0.0.1", port) == port  # restarting the GUI keeps its address


def test_a_missing_training_folder_is_a_message_and_the_next_button_still_works(tmp_path, fields):
    gone = tmp_path / "moved away"
    with pytest.raises(UserError, match="moved away"):
        with app.working_directory(gone):
            pass
    assert "**Error:**" in app.guarded(lambda: app.check_form(gone, fields, shown_for(fields), "", False))
    assert app._CWD_LOCK.acquire(timeout=1)  # released after the failure: later buttons do not hang
    app._CWD_LOCK.release()


def test_gui_command_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    assert cli.main(["gui", "--no_browser"]) == 2
    err = capsys.readouterr().err
    assert "gradio" in err and "setup.ps1" in err and "pip install" in err


def test_gui_command_refuses_to_listen_on_the_network(capsys):
    assert cli.main(["gui", "--host", "0.0.0.0", "--no_browser"]) == 2
    assert "this PC only" in capsys.readouterr().err
    app.check_local_host("127.0.0.1")
    app.check_local_host("::1")
    app.check_local_host("localhost")


def test_gui_main_serves_until_ctrl_c_then_stops_the_run_and_closes(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(app, "launch", lambda blocks, host, port, browser: calls.append((host, port, browser))
                        or f"http://{host}:{port}/")
    monkeypatch.setattr(app, "stop_before_exit", lambda slot: calls.append("stopped"))
    monkeypatch.setattr(app, "restore_ctrl_c", lambda: calls.append("ctrl-c restored"))

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(app.time, "sleep", interrupt)
    assert app.main(["--no_browser", "--port", "17990"]) == 0
    assert calls.pop(0) == "ctrl-c restored"  # before serving
    assert calls[0][0] == "127.0.0.1" and calls[0][1] >= 17990 and calls[0][2] is False
    assert calls[-1] == "stopped"
    assert "Ctrl-C" in capsys.readouterr().out


def test_usage_lists_the_gui_command():
    assert "\n  gui " in cli.USAGE and cli.COMMANDS["gui"] is cli.cmd_gui


# ---------------------------------------------------------------------------------------------------
# Stop on Windows: CTRL_BREAK_EVENT in the trainer acts as Ctrl-C


def test_train_routes_ctrl_c_and_ctrl_break_through_interrupts_while_it_runs(monkeypatch):
    from trainer import interrupts

    seen = []
    monkeypatch.setattr(cli, "quiet_libraries", lambda: None)
    import trainer.train.run as run

    monkeypatch.setattr(run, "run_training", lambda cfg: seen.append(interrupts.installed()) or True)
    assert cli.cmd_train(["--config_file", str(PRESETS / "demo.toml")]) == 0
    assert seen == [True] and not interrupts.installed()  # held while training, Python's own handler after


def test_gallery_items_read_samples_from_the_run_folder_and_skip_unreadable_ones(tmp_path):
    from conftest import make_image

    make_image(tmp_path / "output" / "sample" / "a.png")
    items = app.gallery_items([("output/sample/a.png", "a prompt"), ("output/sample/gone.png", "x")], tmp_path)
    assert len(items) == 1 and items[0][1] == "a prompt" and items[0][0].size == (64, 64)


# ---------------------------------------------------------------------------------------------------
# Found by using the page as a first-time user would


def test_main_fields_say_what_they_are_and_keep_their_sd_scripts_name(tmp_path):
    blocks = app.build_app(presets_dir=PRESETS, configs_dir=tmp_path / "configs", cwd=tmp_path)
    shown = labels(blocks)
    for name in form.SIMPLE_FIELDS:
        label = shown[name].label
        assert label.endswith(f" ({name})") and label != name, label  # words first, the tutorial's name kept
        assert shown[name].info and shown[name].info != form.field_spec(name).help
    assert shown["train_data_dir"].label == "Pictures folder (train_data_dir)"
    assert "10_mychar woman" in shown["train_data_dir"].info
    assert shown["network_dropout"].label == "network_dropout"  # advanced fields: the argument's own name
    assert shown["text_encoder_lr"].lines == 1  # a list of numbers fits one line ("5e-5, 1e-4")


def test_check_advice_about_the_trigger_names_the_tick_box_the_page_has(tmp_path, fields, train_data_dir):
    blocks = app.build_app(presets_dir=PRESETS, configs_dir=tmp_path / "configs", cwd=tmp_path)
    tick = next(b for b in blocks.blocks.values() if isinstance(b, gr.Checkbox) and "caption" in (b.label or "")
                and b.info and "caption_prefix" in b.info)
    report = app.check_form(tmp_path, fields, shown_for(fields, train_data_dir=str(train_data_dir)), "mychar", False)
    assert "will not be learned" in report and f"'{tick.label}'" in report


def test_a_reloaded_page_lists_configs_saved_since_the_server_started_and_shows_the_running_training(
        tmp_path, fields, slot):
    configs = tmp_path / "configs"
    app.build_app(presets_dir=PRESETS, configs_dir=configs, cwd=tmp_path)
    demo = str(PRESETS / "demo.toml")
    path, _ = app.save_form(configs, tmp_path, None, fields, shown_for(fields, output_name="later"), "", False)
    choices, source, tab = app.page_opened(slot, PRESETS, configs, demo)
    assert ("saved: later", str(path)) in choices and source == demo and tab == "settings"
    app.start_training(slot, configs, None, fields, shown_for(fields, output_name="going"), "", False)
    choices, source, tab = app.page_opened(slot, PRESETS, configs, demo)
    assert source == str(configs / "going.toml") and tab == "training"
    assert source in [value for _, value in choices]
    FakeRun.made[-1].status.state = "finished"  # over: a reload shows the form as it was built
    assert app.page_opened(slot, PRESETS, configs, demo)[1:] == (demo, "settings")


def test_start_checks_first_and_starts_nothing_that_would_fail_at_once(tmp_path, fields, slot):
    shown = shown_for(fields, output_name="broken", train_data_dir="no such folder",
                      pretrained_model_name_or_path="missing.safetensors")
    message = app.start_training(slot, tmp_path / "configs", None, fields, shown, "", False)
    assert message.startswith("**Not started:**") and "no such folder" in message and "missing.safetensors" in message
    assert FakeRun.made == [] and not slot.running
    assert (tmp_path / "configs" / "broken.toml").is_file()  # saved: the user may fix it by hand


def test_check_names_where_an_advanced_setting_it_blames_is_on_the_page(tmp_path, fields):
    from conftest import make_dreambooth_folder

    make_dreambooth_folder(tmp_path / "imgs", "10_sks shape")
    shown = shown_for(fields, train_data_dir=str(tmp_path / "imgs"), resolution="64", enable_bucket=True,
                      min_bucket_reso="256")
    report = app.check_form(tmp_path, fields, shown, "", False)
    problem = next(line for line in report.splitlines() if "min_bucket_reso (256)" in line)
    assert "(min_bucket_reso is under 'Advanced: dataset' below)" in problem
    assert "command line" not in report  # the console's word for arguments; here they are the page's fields
    assert app.page_problem("resolution too small", fields) == "resolution too small"  # main fields: no hint
    missing = "--train_data_dir: folder not found: C:\\my pics. Check the path (quote it if it has spaces)."
    assert app.page_problem(missing, fields).endswith("Check the path.")  # a form field needs no quotes


# ---------------------------------------------------------------------------------------------------
# The LoRA tools tab: a finished run's file


def test_a_finished_run_gives_its_lora_file_once_absolute(tmp_path, fields, slot):
    assert app.finished_lora(slot, None) is None  # no run
    app.start_training(slot, tmp_path / "configs", None, fields, shown_for(fields), "", False)
    run = FakeRun.made[-1]
    assert app.finished_lora(slot, None) is None  # still going
    run.status.state, run.status.output = "finished", "output/demo.safetensors"
    path = str(tmp_path / "output" / "demo.safetensors")
    assert app.finished_lora(slot, None) == path
    assert app.finished_lora(slot, path) is None  # already filled in: what the user types next stays
    run.status.state, run.status.output = "failed", None
    assert app.finished_lora(slot, path) is None


def test_the_page_fills_the_lora_tools_file_boxes_when_its_run_finishes(tmp_path, fields, slot):
    from trainer.gui import tools

    blocks = app.build_app(presets_dir=PRESETS, configs_dir=tmp_path / "configs", cwd=tmp_path, slot=slot)
    timer = next(b for b in blocks.blocks.values() if isinstance(b, gr.Timer))
    tick = next(f for f in blocks.fns.values() if any(t[0] == timer._id for t in f.targets))
    lora_tab = next(b for b in blocks.blocks.values() if isinstance(b, gr.Tab) and b.id == "lora_tools")
    in_lora_tab = set()
    stack = list(lora_tab.children)
    while stack:
        block = stack.pop()
        in_lora_tab.add(block._id)
        stack += getattr(block, "children", [])
    boxes = [i for i, block in enumerate(tick.outputs) if block._id in in_lora_tab]
    file_labels = {f"{s.label} (--{s.option})" if s.option else s.label
                   for t in tools.tools_of(tools.LORA_TAB) for s in t.fields if s.run_output}
    assert {tick.outputs[i].label for i in boxes} == file_labels
    assert len(boxes) == sum(s.run_output for t in tools.tools_of(tools.LORA_TAB) for s in t.fields) == 6
    remembered = max(i for i, block in enumerate(tick.outputs) if isinstance(block, gr.State))

    app.start_training(slot, tmp_path / "configs", None, fields, shown_for(fields), "", False)
    FakeRun.made[-1].status.state, FakeRun.made[-1].status.output = "finished", "output/demo.safetensors"
    result = tick.fn([], None)
    path = str(tmp_path / "output" / "demo.safetensors")
    assert [result[i] for i in boxes] == [path] * len(boxes) and result[remembered] == path
    again = tick.fn([], path)  # the next second: the boxes are left alone, so what the user types stays
    assert [again[i] for i in boxes] == [gr.skip()] * len(boxes)
