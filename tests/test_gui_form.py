"""The GUI's form logic (trainer.gui.form): presets, form values, the written TOML."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from trainer.config.args import ARGUMENTS, REFUSE, TrainConfig, default_values, parse_train_args
from trainer.errors import ConfigError
from trainer.gui import form as F


def parse(path) -> TrainConfig:
    """The config `train` would run, less the name of the file it came from."""
    return dataclasses.replace(parse_train_args(["--config_file", str(path)]), config_file=None)


def test_importing_the_gui_logic_loads_no_heavy_library():
    code = ("import sys, trainer.gui.form, trainer.tools.preflight, trainer.gui.runner; "
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
