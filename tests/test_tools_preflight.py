"""The pre-flight check (trainer.tools.preflight, the GUI's Check and doctor --config): the settings as `train` reads them, the base model and the
picture folders, on datasets made in the test."""

from __future__ import annotations

from conftest import make_dreambooth_folder, make_image

from trainer.gui import form as F
from trainer.tools.preflight import check_config


def write_settings(tmp_path, **values):
    base = {"pretrained_model_name_or_path": "builtin:tiny-sd1", "resolution": "64", "caption_extension": ".txt",
            "output_dir": str(tmp_path / "out"), "output_name": "lora", "max_train_epochs": 2, "train_batch_size": 2}
    return F.write_config(tmp_path / "settings.toml", {**base, **values})


def test_check_good_dataset_counts_images_captions_repeats_and_trigger(train_data_dir, tmp_path):
    reg = tmp_path / "reg"
    make_dreambooth_folder(reg, folder="1_shape", n=3, captions=False)
    (train_data_dir / "10_sks shape" / "img_3.txt").unlink()  # falls back to the class tokens, which hold "sks"
    report = check_config(write_settings(tmp_path, train_data_dir=str(train_data_dir), reg_data_dir=str(reg)),
                            trigger="sks")
    assert report.ok, report.problems
    notes = "\n".join(report.notes)
    assert "train 10_sks shape: 4 image(s) x 10 repeat(s) = 40, 3 caption file(s) (.txt)" in notes
    assert "4 of 4 caption(s) contain the trigger 'sks'" in notes
    assert "reg 1_shape: 3 image(s) x 1 repeat(s) = 3, 0 caption file(s)" in notes
    assert "img_3.png" in notes  # the trainer's own warning about the image without a caption file
    assert "SD 1.x" in notes and "40 steps per epoch, 80 steps (2 epoch(s))" in notes  # 40 train + 40 reg, batch 2
    assert "Ready to train" in report.to_markdown()


def test_check_warns_when_no_caption_holds_the_trigger(train_data_dir, tmp_path):
    report = check_config(write_settings(tmp_path, train_data_dir=str(train_data_dir),
                                           metadata_trigger_phrase="mychar"))
    assert report.ok
    assert any("0 of 4 caption(s) contain the trigger 'mychar'" in n and "caption_prefix" in n for n in report.notes)
    prefixed = F.apply_trigger(F.load_values(tmp_path / "settings.toml"), "mychar", add_to_captions=True)
    report = check_config(F.write_config(tmp_path / "settings.toml", prefixed))
    assert any("'mychar' is added to every caption" in n for n in report.notes)


def test_check_missing_folder_names_it(tmp_path):
    missing = tmp_path / "no such" / "img"  # (with the built-in demo model it would be generated on Start)
    report = check_config(write_settings(tmp_path, train_data_dir=str(missing), pretrained_model_name_or_path="x"))
    assert not report.ok
    assert any(str(missing) in p and "folder not found" in p for p in report.problems)


def test_check_demo_before_its_pictures_exist_is_ready_with_a_note(tmp_path):
    report = check_config(write_settings(tmp_path, train_data_dir=str(tmp_path / "demo pictures")))
    assert report.ok, report.problems
    assert any("generated in" in note and "demo pictures" in note for note in report.notes)
    not_demo = check_config(write_settings(tmp_path, train_data_dir=str(tmp_path / "demo pictures"),
                                             pretrained_model_name_or_path=str(tmp_path)))
    assert any("demo pictures" in problem for problem in not_demo.problems)


def test_check_pointing_at_the_repeats_folder_says_use_the_parent(train_data_dir, tmp_path):
    report = check_config(write_settings(tmp_path, train_data_dir=str(train_data_dir / "10_sks shape")))
    assert not report.ok
    assert any("PARENT" in p and f'"{train_data_dir}"' in p for p in report.problems)


def test_check_folder_without_repeat_prefix_says_how_to_name_it(tmp_path):
    parent = tmp_path / "img"
    make_dreambooth_folder(parent, folder="sks shape", n=2)
    report = check_config(write_settings(tmp_path, train_data_dir=str(parent)))
    assert any("sks shape" in p and "10_sks dog" in p for p in report.problems)
    assert "problem(s) to fix" in report.to_markdown()


def test_check_empty_repeats_folder_is_no_training_images(tmp_path):
    parent = tmp_path / "img"
    (parent / "10_sks" / "nested").mkdir(parents=True)
    make_image(parent / "10_sks" / "nested" / "a.png")
    report = check_config(write_settings(tmp_path, train_data_dir=str(parent)))
    assert any("No training images" in p for p in report.problems)
    assert any("10_sks" in n and "nested" in n for n in report.notes)


def test_check_reports_config_errors_and_still_scans_the_dataset(train_data_dir, tmp_path):
    report = check_config(write_settings(tmp_path, train_data_dir=str(train_data_dir),
                                           pretrained_model_name_or_path=str(tmp_path / "nope.safetensors"),
                                           network_args=["conv_dimm=4"], lowram=True))
    problems = "\n".join(report.problems)
    assert "conv_dimm" in problems and 'did you mean "conv_dim"' in problems
    assert "nope.safetensors" in problems and "does not exist" in problems
    assert any("train 10_sks shape: 4 image(s)" in n for n in report.notes)
    assert any("--lowram is ignored" in n for n in report.notes)


def test_check_a_missing_config_file(tmp_path):
    report = check_config(tmp_path / "none.toml")
    assert not report.ok and "no such file" in report.problems[0]


def test_check_dataset_config_toml(train_data_dir, tmp_path):
    dataset = tmp_path / "dataset.toml"
    image_dir = str(train_data_dir / "10_sks shape").replace("\\", "/")
    dataset.write_text(f'[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = "{image_dir}"\n'
                       f'num_repeats = 3\ncaption_extension = ".txt"\n', encoding="utf-8")
    report = check_config(write_settings(tmp_path, dataset_config=str(dataset)))
    assert report.ok, report.problems
    assert any("10_sks shape: 4 image(s) x 3 repeat(s) = 12, 4 caption file(s)" in n for n in report.notes)
    dataset.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dirr = "x"\n', encoding="utf-8")
    report = check_config(tmp_path / "settings.toml")
    assert any("image_dirr" in p for p in report.problems)
    missing = tmp_path / "gone"
    dataset.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{missing.as_posix()}"\n', encoding="utf-8")
    report = check_config(tmp_path / "settings.toml")
    assert any("Image folder not found" in p and "gone" in p for p in report.problems)


def test_check_sdxl_preset_with_an_sd_model(train_data_dir, tmp_path):
    values = F.load_values(F.PRESETS_DIR / "sdxl-8gb.toml")
    values.update(pretrained_model_name_or_path="builtin:tiny-sd1", train_data_dir=str(train_data_dir))
    report = check_config(F.write_config(tmp_path / "x.toml", values))
    assert any("cache_text_encoder_outputs works for SDXL models only" in p for p in report.problems)
    assert any("sd15-* preset" in n for n in report.notes)


def test_eta_comes_from_the_speed_the_last_run_measured(train_data_dir, tmp_path):
    import json

    settings = write_settings(tmp_path, train_data_dir=str(train_data_dir))
    before = "\n".join(check_config(settings).notes)
    assert "ETA: known once a run has measured the speed" in before
    events = tmp_path / "out" / "lora.events.jsonl"
    events.parent.mkdir()
    lines = [{"kind": "run_started"}, {"kind": "step", "step": 1, "it_per_s": None},
             {"kind": "step", "step": 2, "it_per_s": 0.5}, {"kind": "finished"}]
    events.write_text("\n".join(json.dumps(line) for line in lines) + "\n{\"kind\": \"st", encoding="utf-8")
    notes = "\n".join(check_config(settings).notes)
    assert "40 steps (2 epoch(s))" in notes and "ETA: about 80 s at 0.50 it/s" in notes  # 40 steps / 0.5 = 80 s
