"""The GUI's form logic (trainer.gui.form): presets, form values, the written TOML, the pre-flight check."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from conftest import make_dreambooth_folder, make_image
from trainer.config.args import ARGUMENTS, REFUSE, TrainConfig, default_values, parse_train_args
from trainer.errors import ConfigError
from trainer.gui import form as F


def parse(path) -> TrainConfig:
    """The config `train` would run, less the name of the file it came from."""
    return dataclasses.replace(parse_train_args(["--config_file", str(path)]), config_file=None)


def test_importing_the_gui_logic_loads_no_heavy_library():
    code = ("import sys, trainer.gui.form, trainer.gui.runner; "
            "print([m for m in ('torch', 'diffusers', 'transformers', 'gradio') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- presets and the written TOML -----------------------------------------------------------------------

def test_every_preset_is_listed_but_not_the_dataset_example():
    names = [p.name for p in F.list_presets()]
    assert "demo.toml" in names and "sd15-8gb.toml" in names and "sdxl-12gb.toml" in names
    assert "dataset-example.toml" not in names


@pytest.mark.parametrize("preset", F.list_presets(), ids=lambda p: p.stem)
def test_every_preset_loads_writes_and_parses_back_to_the_same_config(preset, tmp_path):
    values = F.load_values(preset)
    written = F.write_config(tmp_path / "configs" / "mine.toml", values, source=str(preset))
    assert parse(written) == parse(preset)
    assert F.load_values(written) == {k: v for k, v in values.items() if v != default_values()[k]}


def test_written_config_is_sectioned_with_a_header_that_says_how_to_run_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    preset = F.PRESETS_DIR / "sd15-8gb.toml"
    path = F.write_config(F.config_path_for("my lora", tmp_path / "configs"), F.load_values(preset),
                          source=str(preset))
    text = path.read_text(encoding="utf-8")
    assert path.name == "my lora.toml"
    assert "sd15-8gb.toml" in text.splitlines()[0]
    assert '.\\train.ps1 -Config "configs\\my lora.toml"' in text
    assert "./train.sh --config_file 'configs/my lora.toml'" in text
    assert "[model]" in text and "[network]" in text and "[optimizer]" in text
    assert text.index("[model]") < text.index("[dataset]") < text.index("[network]")
    assert "network_dim = 32" in text and "# LoRA rank" in text
    assert "network_module" not in text  # the default: only changed values are written


def test_windows_paths_with_spaces_and_japanese_survive(tmp_path):
    values = {"pretrained_model_name_or_path": r"D:\AI モデル\v1-5 pruned.safetensors",
              "train_data_dir": r"C:\Users\太郎\lora img\train", "output_name": "キャラ it's",
              "caption_prefix": 'say "hi"\\, ', "network_args": [r"conv_dim=4"], "resolution": "512,768"}
    path = F.write_config(tmp_path / "w.toml", values)
    cfg = parse(path)
    assert cfg.pretrained_model_name_or_path == r"D:\AI モデル\v1-5 pruned.safetensors"
    assert cfg.train_data_dir == r"C:\Users\太郎\lora img\train"
    assert cfg.output_name == "キャラ it's" and cfg.caption_prefix == 'say "hi"\\, '
    assert cfg.resolution == (512, 768)
    assert r"'D:\AI モデル\v1-5 pruned.safetensors'" in path.read_text(encoding="utf-8")  # as typed


def test_a_config_without_toml_suffix_gets_one(tmp_path):
    assert F.write_config(tmp_path / "name", {"output_name": "x"}).name == "name.toml"


def test_writing_an_unknown_or_wrong_value_names_it(tmp_path):
    with pytest.raises(ConfigError) as e:
        F.write_config(tmp_path / "x.toml", {"network_dimm": 4, "train_batch_size": "four"})
    assert 'did you mean "network_dim"' in str(e.value) and "train_batch_size" in str(e.value)
    assert not (tmp_path / "x.toml").exists()


def test_load_values_names_the_file_and_key_of_a_typo(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[network]\nnetwork_dimm = 4\n', encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        F.load_values(bad)
    assert "bad.toml" in str(e.value) and "network_dim" in str(e.value)


def test_the_legacy_caption_extention_key_is_kept_under_its_real_name(tmp_path):
    legacy = tmp_path / "old.toml"
    legacy.write_text('pretrained_model_name_or_path = "builtin:tiny-sd1"\ntrain_data_dir = "img"\n'
                      'caption_extention = ".txt"\n', encoding="utf-8")
    values = F.load_values(legacy)
    assert values["caption_extension"] == ".txt" and "caption_extention" not in values
    assert parse(F.write_config(tmp_path / "new.toml", values)).caption_extension == ".txt"


def test_config_path_for_replaces_characters_windows_forbids(tmp_path):
    assert F.config_path_for('a:b/c*?"', tmp_path).name == "a_b_c___.toml"
    assert F.config_path_for("", tmp_path).name == "my-lora.toml"


# ---- fields -------------------------------------------------------------------------------------------

def test_advanced_fields_cover_every_usable_argument_not_on_the_main_page():
    shown = [spec.name for spec in F.advanced_fields()]
    expected = {f.name for f in ARGUMENTS if f.metadata["status"] != REFUSE} - set(F.SIMPLE_FIELDS) - F.HIDDEN_FIELDS
    assert set(shown) == expected and len(shown) == len(expected)
    assert not {f.name for f in ARGUMENTS if f.metadata["status"] == REFUSE} & set(shown)
    sections = [spec.section for spec in F.advanced_fields()]
    assert sections == sorted(sections, key=F._section_rank)  # grouped, so each section is one block
    assert all(F.field_spec(name).status != REFUSE for name in F.SIMPLE_FIELDS)


def test_field_spec_kinds_and_choices():
    assert F.field_spec("network_dim").kind == "int"
    assert F.field_spec("learning_rate").kind == "float"
    assert F.field_spec("enable_bucket").kind == "bool"
    assert F.field_spec("text_encoder_lr").kind == "list"
    assert F.field_spec("resolution").kind == "str"
    assert F.field_spec("mixed_precision").choices == ("no", "fp16", "bf16")
    assert F.field_spec("save_precision").choices[0] == ""  # not set
    assert F.field_spec("train_data_dir").is_path and not F.field_spec("output_name").is_path
    assert F.field_spec("lowram").status == "warn" and F.field_spec("lowram").note
    with pytest.raises(ConfigError, match="network_dim"):
        F.field_spec("network_dimm")


@pytest.mark.parametrize("name, value", [
    ("network_dim", 32), ("network_dim", None), ("learning_rate", 1e-4), ("network_alpha", 16),
    ("network_alpha", 0.5), ("enable_bucket", True), ("enable_bucket", False), ("output_name", "キャラ"),
    ("caption_prefix", "sks, "), ("resolution", "512"), ("resolution", "512,768"), ("lr_warmup_steps", 0.05),
    ("lr_warmup_steps", 100), ("text_encoder_lr", [5e-05]), ("network_args", ["conv_dim=4", "conv_alpha=1"]),
    ("mixed_precision", "bf16"), ("save_precision", None), ("max_token_length", 225), ("seed", 42),
    ("train_data_dir", r"C:\lora\img"), ("base_weights", [r"C:\a b\x.safetensors"]),
])
def test_to_text_and_from_text_round_trip(name, value):
    spec = F.field_spec(name)
    back = F.from_text(spec, F.to_text(spec, value))
    assert back == value and type(back) is type(value)


def test_from_text_reads_what_widgets_and_users_type():
    assert F.from_text(F.field_spec("network_alpha"), 16.0) == 16 and \
        type(F.from_text(F.field_spec("network_alpha"), 16.0)) is int  # saved as "16", like sd-scripts
    assert F.from_text(F.field_spec("network_dim"), "16") == 16
    assert F.from_text(F.field_spec("network_dim"), 16.0) == 16
    assert F.from_text(F.field_spec("lr_warmup_steps"), "10%") == 0.1
    assert F.from_text(F.field_spec("resolution"), " 1024 ") == "1024"
    assert F.from_text(F.field_spec("resolution"), "768,768") == "768"
    assert F.from_text(F.field_spec("train_data_dir"), '"C:\\my pics\\img" ') == "C:\\my pics\\img"  # Copy as path
    assert F.from_text(F.field_spec("network_args"), "conv_dim=4\n\n conv_alpha=1 \n") == ["conv_dim=4", "conv_alpha=1"]
    assert F.from_text(F.field_spec("text_encoder_lr"), "") is None
    assert F.from_text(F.field_spec("enable_bucket"), "true") is True
    for name, bad in (("network_dim", "abc"), ("resolution", "big"), ("mixed_precision", "fp8"),
                      ("text_encoder_lr", "fast")):
        with pytest.raises(ConfigError, match=name):
            F.from_text(F.field_spec(name), bad)


def test_a_number_that_is_not_one_says_what_to_type_not_pythons_words():
    with pytest.raises(ConfigError) as error:
        F.from_text(F.field_spec("learning_rate"), "abc")
    assert "learning_rate" in str(error.value) and "0.0001" in str(error.value)
    assert "could not convert" not in str(error.value)
    with pytest.raises(ConfigError, match=r"dot as the decimal point \(0\.0001\)"):  # a European decimal comma
        F.from_text(F.field_spec("learning_rate"), "0,0001")
    with pytest.raises(ConfigError, match="network_alpha: expected a number such as 1, got 'x'"):
        F.from_text(F.field_spec("network_alpha"), "x")


def test_a_list_of_numbers_is_one_line_and_accepts_commas():
    spec = F.field_spec("text_encoder_lr")
    assert F.to_text(spec, [5e-05, 1e-4]) == "5e-05, 0.0001"
    assert F.from_text(spec, "5e-5, 1e-4") == [5e-05, 1e-4]
    assert F.from_text(spec, "5e-5\n1e-4") == [5e-05, 1e-4]
    assert F.to_text(F.field_spec("network_args"), ["a=1", "b=2"]) == "a=1\nb=2"  # other lists: one a line


def test_apply_trigger():
    values = {"keep_tokens": 0, "output_name": "x"}
    tagged = F.apply_trigger(values, " mychar ", add_to_captions=True)
    assert tagged["metadata_trigger_phrase"] == "mychar"
    assert tagged["caption_prefix"] == "mychar, " and tagged["keep_tokens"] == 1
    assert values == {"keep_tokens": 0, "output_name": "x"}  # a new dict
    assert F.apply_trigger({"keep_tokens": 2}, "mychar", True)["keep_tokens"] == 2
    untagged = F.apply_trigger(tagged, "mychar", add_to_captions=False)
    assert untagged["caption_prefix"] is None and untagged["metadata_trigger_phrase"] == "mychar"
    own = F.apply_trigger({"caption_prefix": "photo of "}, "mychar", add_to_captions=False)
    assert own["caption_prefix"] == "photo of "  # a prefix the user wrote stays
    assert F.apply_trigger(tagged, "", add_to_captions=False)["metadata_trigger_phrase"] is None


def test_trigger_reaches_the_trained_config(tmp_path):
    values = F.apply_trigger(F.load_values(F.PRESETS_DIR / "demo.toml"), "shp", add_to_captions=True)
    cfg = parse(F.write_config(tmp_path / "t.toml", values))
    assert cfg.metadata_trigger_phrase == "shp" and cfg.caption_prefix == "shp, " and cfg.keep_tokens == 1


# ---- check_config --------------------------------------------------------------------------------------

def write_settings(tmp_path, **values):
    base = {"pretrained_model_name_or_path": "builtin:tiny-sd1", "resolution": "64", "caption_extension": ".txt",
            "output_dir": str(tmp_path / "out"), "output_name": "lora", "max_train_epochs": 2, "train_batch_size": 2}
    return F.write_config(tmp_path / "settings.toml", {**base, **values})


def test_check_good_dataset_counts_images_captions_repeats_and_trigger(train_data_dir, tmp_path):
    reg = tmp_path / "reg"
    make_dreambooth_folder(reg, folder="1_shape", n=3, captions=False)
    (train_data_dir / "10_sks shape" / "img_3.txt").unlink()  # falls back to the class tokens, which hold "sks"
    report = F.check_config(write_settings(tmp_path, train_data_dir=str(train_data_dir), reg_data_dir=str(reg)),
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
    report = F.check_config(write_settings(tmp_path, train_data_dir=str(train_data_dir),
                                           metadata_trigger_phrase="mychar"))
    assert report.ok
    assert any("0 of 4 caption(s) contain the trigger 'mychar'" in n and "caption_prefix" in n for n in report.notes)
    prefixed = F.apply_trigger(F.load_values(tmp_path / "settings.toml"), "mychar", add_to_captions=True)
    report = F.check_config(F.write_config(tmp_path / "settings.toml", prefixed))
    assert any("'mychar' is added to every caption" in n for n in report.notes)


def test_check_missing_folder_names_it(tmp_path):
    missing = tmp_path / "no such" / "img"  # (with the built-in demo model it would be generated on Start)
    report = F.check_config(write_settings(tmp_path, train_data_dir=str(missing), pretrained_model_name_or_path="x"))
    assert not report.ok
    assert any(str(missing) in p and "folder not found" in p for p in report.problems)


def test_check_demo_before_its_pictures_exist_is_ready_with_a_note(tmp_path):
    report = F.check_config(write_settings(tmp_path, train_data_dir=str(tmp_path / "demo pictures")))
    assert report.ok, report.problems
    assert any("generated in" in note and "demo pictures" in note for note in report.notes)
    not_demo = F.check_config(write_settings(tmp_path, train_data_dir=str(tmp_path / "demo pictures"),
                                             pretrained_model_name_or_path=str(tmp_path)))
    assert any("demo pictures" in problem for problem in not_demo.problems)


def test_check_pointing_at_the_repeats_folder_says_use_the_parent(train_data_dir, tmp_path):
    report = F.check_config(write_settings(tmp_path, train_data_dir=str(train_data_dir / "10_sks shape")))
    assert not report.ok
    assert any("PARENT" in p and f'"{train_data_dir}"' in p for p in report.problems)


def test_check_folder_without_repeat_prefix_says_how_to_name_it(tmp_path):
    parent = tmp_path / "img"
    make_dreambooth_folder(parent, folder="sks shape", n=2)
    report = F.check_config(write_settings(tmp_path, train_data_dir=str(parent)))
    assert any("sks shape" in p and "10_sks dog" in p for p in report.problems)
    assert "problem(s) to fix" in report.to_markdown()


def test_check_empty_repeats_folder_is_no_training_images(tmp_path):
    parent = tmp_path / "img"
    (parent / "10_sks" / "nested").mkdir(parents=True)
    make_image(parent / "10_sks" / "nested" / "a.png")
    report = F.check_config(write_settings(tmp_path, train_data_dir=str(parent)))
    assert any("No training images" in p for p in report.problems)
    assert any("10_sks" in n and "nested" in n for n in report.notes)


def test_check_reports_config_errors_and_still_scans_the_dataset(train_data_dir, tmp_path):
    report = F.check_config(write_settings(tmp_path, train_data_dir=str(train_data_dir),
                                           pretrained_model_name_or_path=str(tmp_path / "nope.safetensors"),
                                           network_args=["conv_dimm=4"], lowram=True))
    problems = "\n".join(report.problems)
    assert "conv_dimm" in problems and 'did you mean "conv_dim"' in problems
    assert "nope.safetensors" in problems and "does not exist" in problems
    assert any("train 10_sks shape: 4 image(s)" in n for n in report.notes)
    assert any("--lowram is ignored" in n for n in report.notes)


def test_check_a_missing_config_file(tmp_path):
    report = F.check_config(tmp_path / "none.toml")
    assert not report.ok and "no such file" in report.problems[0]


def test_check_dataset_config_toml(train_data_dir, tmp_path):
    dataset = tmp_path / "dataset.toml"
    image_dir = str(train_data_dir / "10_sks shape").replace("\\", "/")
    dataset.write_text(f'[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = "{image_dir}"\n'
                       f'num_repeats = 3\ncaption_extension = ".txt"\n', encoding="utf-8")
    report = F.check_config(write_settings(tmp_path, dataset_config=str(dataset)))
    assert report.ok, report.problems
    assert any("10_sks shape: 4 image(s) x 3 repeat(s) = 12, 4 caption file(s)" in n for n in report.notes)
    dataset.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dirr = "x"\n', encoding="utf-8")
    report = F.check_config(tmp_path / "settings.toml")
    assert any("image_dirr" in p for p in report.problems)
    missing = tmp_path / "gone"
    dataset.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{missing.as_posix()}"\n', encoding="utf-8")
    report = F.check_config(tmp_path / "settings.toml")
    assert any("Image folder not found" in p and "gone" in p for p in report.problems)


def test_check_sdxl_preset_with_an_sd_model(train_data_dir, tmp_path):
    values = F.load_values(F.PRESETS_DIR / "sdxl-8gb.toml")
    values.update(pretrained_model_name_or_path="builtin:tiny-sd1", train_data_dir=str(train_data_dir))
    report = F.check_config(F.write_config(tmp_path / "x.toml", values))
    assert any("cache_text_encoder_outputs works for SDXL models only" in p for p in report.problems)
    assert any("sd15-* preset" in n for n in report.notes)
