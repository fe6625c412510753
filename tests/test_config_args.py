"""The argument table: sd-scripts names and defaults, --config_file merging, status handling, errors."""

import logging

import pytest

from trainer.config.args import (
    ARGUMENTS,
    REFUSE,
    TrainConfig,
    non_default_values,
    parse_network_args,
    parse_train_args,
    write_output_config,
)
from trainer.errors import ConfigError
from trainer.tools.compat import compatibility_markdown

BASE = ["--pretrained_model_name_or_path", "model.safetensors", "--train_data_dir", "data"]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_sd_scripts_defaults_are_kept():
    cfg = parse_train_args(BASE)
    assert cfg.learning_rate == 2e-6 and cfg.max_train_steps == 1600 and cfg.train_batch_size == 1
    assert cfg.caption_extension == ".caption" and cfg.min_bucket_reso == 256 and cfg.max_bucket_reso == 1024
    assert cfg.lr_scheduler == "constant" and cfg.mixed_precision == "no" and cfg.save_model_as == "safetensors"
    # argparse does not convert defaults: the default alpha is the int 1 (saved as int64 by sd-scripts)
    assert cfg.network_alpha == 1 and isinstance(cfg.network_alpha, int)
    assert isinstance(parse_train_args(BASE + ["--network_alpha", "1"]).network_alpha, float)


def test_cli_values_are_typed():
    cfg = parse_train_args(BASE + ["--resolution", "512,768", "--text_encoder_lr", "5e-5", "--network_args",
                                   "conv_dim=4", "conv_alpha=1", "--lr_warmup_steps", "10%"])
    assert cfg.resolution == (512, 768)
    assert cfg.text_encoder_lr == [5e-5] and cfg.text_encoder_lr_value == 5e-5
    assert cfg.network_args == ["conv_dim=4", "conv_alpha=1"]
    assert cfg.lr_warmup_steps == 0.1
    assert parse_train_args(BASE + ["--lr_warmup_steps", "100"]).lr_warmup_steps == 100
    assert parse_train_args(BASE + ["--resolution", "512"]).resolution == (512, 512)


def test_config_file_sections_are_flattened_and_cli_wins(tmp_path):
    toml = write(tmp_path / "my config 設定.toml", """
[model]
pretrained_model_name_or_path = 'C:\\models\\v1-5 pruned.safetensors'  # a literal string: backslashes as typed
[dataset]
train_data_dir = "D:/training/data"
resolution = "512,512"
[training]
learning_rate = 1e-4
network_args = ["conv_dim=8"]
text_encoder_lr = 5e-5
lr_warmup_steps = 0.05
""")
    cfg = parse_train_args(["--config_file", str(toml), "--learning_rate", "3e-4"])
    assert cfg.pretrained_model_name_or_path == "C:\\models\\v1-5 pruned.safetensors"
    assert cfg.train_data_dir == "D:/training/data" and cfg.resolution == (512, 512)
    assert cfg.learning_rate == 3e-4  # explicit CLI value beats the file
    assert cfg.network_args == ["conv_dim=8"] and cfg.text_encoder_lr == [5e-5]  # scalar accepted like sd-scripts
    assert cfg.lr_warmup_steps == 0.05


def test_config_file_without_extension_gets_toml_appended(tmp_path):
    write(tmp_path / "run.toml", 'pretrained_model_name_or_path = "m"\ntrain_data_dir = "d"\n')
    assert parse_train_args(["--config_file", str(tmp_path / "run")]).train_data_dir == "d"


def test_typo_in_config_file_names_key_file_and_suggestion(tmp_path):
    toml = write(tmp_path / "bad.toml", '[training]\nlearning_rat = 1e-4\nmax_train_steps = "many"\n')
    with pytest.raises(ConfigError) as e:
        parse_train_args(BASE + ["--config_file", str(toml)])
    message = str(e.value)
    assert "learning_rat" in message and 'did you mean "learning_rate"' in message and "bad.toml" in message
    assert "max_train_steps" in message and "whole number" in message


def test_toml_syntax_error_names_line(tmp_path):
    toml = write(tmp_path / "broken.toml", 'learning_rate = 1e-4\nresolution = 512,512\n')
    with pytest.raises(ConfigError, match=r"broken.toml: TOML syntax error at line 2"):
        parse_train_args(["--config_file", str(toml)])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        parse_train_args(["--config_file", str(tmp_path / "nope.toml")])


def test_unknown_cli_argument_fails_like_argparse(capsys):
    with pytest.raises(SystemExit) as e:
        parse_train_args(BASE + ["--learning_rat", "1"])
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_every_refused_argument_stops_with_not_supported_message():
    refused = [f for f in ARGUMENTS if f.metadata["status"] == REFUSE]
    assert refused, "the table must mark what is not supported"
    with pytest.raises(ConfigError) as e:
        parse_train_args(BASE + ["--deepspeed", "--fp16_master_weights_and_gradients", "--zero3_init_flag"])
    assert len(e.value.problems) == 3
    assert all("not supported yet" in p for p in e.value.problems)


def test_warned_arguments_are_accepted_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="trainer"):
        cfg = parse_train_args(BASE + ["--highvram"])
    assert cfg.highvram
    assert any("--highvram is ignored" in r.getMessage() for r in caplog.records)


def test_cross_argument_rules_are_gathered():
    with pytest.raises(ConfigError) as e:
        parse_train_args(BASE + ["--adaptive_noise_scale", "0.1", "--scale_v_pred_loss_like_noise_pred",
                                 "--network_train_unet_only", "--network_train_text_encoder_only"])
    assert len(e.value.problems) == 3


def test_required_inputs_are_named():
    with pytest.raises(ConfigError) as e:
        parse_train_args([])
    text = str(e.value)
    assert "--pretrained_model_name_or_path" in text and "--train_data_dir" in text


def test_legacy_aliases():
    assert parse_train_args(BASE + ["--use_8bit_adam"]).optimizer_type == "AdamW8bit"
    assert parse_train_args(BASE + ["--caption_extention", ".txt"]).caption_extension == ".txt"
    assert parse_train_args(BASE + ["--cache_latents_to_disk"]).cache_latents is True
    with pytest.raises(ConfigError):
        parse_train_args(BASE + ["--use_8bit_adam", "--optimizer_type", "Lion"])


def test_network_args_parsing():
    assert parse_network_args(["conv_dim=8", "conv_alpha=1"]) == {"conv_dim": "8", "conv_alpha": "1"}
    with pytest.raises(ConfigError, match='did you mean "conv_dim"'):
        parse_network_args(["conv_dims=8"])



def test_block_and_loraplus_network_args_are_checked_per_model_family():
    sd_dims, sdxl_dims = ",".join(["4"] * 25), ",".join(["4"] * 23)
    options = ["block_dims=" + sd_dims, "down_lr_weight=cosine+0.1", "mid_lr_weight=0", "up_lr_weight=1,,0.5",
               "block_lr_zero_threshold=0.2", "loraplus_lr_ratio=16"]
    assert parse_network_args(options, sdxl=False)["down_lr_weight"] == "cosine+0.1"
    assert parse_network_args(["block_dims=" + sdxl_dims], sdxl=True)
    # The family is only known once the model is read: before that, either count passes.
    assert parse_network_args(["block_dims=" + sdxl_dims]) and parse_network_args(["block_dims=" + sd_dims])
    with pytest.raises(ConfigError, match="block_dims has 23 values, but needs 25 values for SD1.x/SD2.x"):
        parse_network_args(["block_dims=" + sdxl_dims], sdxl=False)
    with pytest.raises(ConfigError, match="conv_block_alphas has 25 values, but needs 23 values for SDXL"):
        parse_network_args(["conv_block_alphas=" + sd_dims], sdxl=True)
    with pytest.raises(ConfigError, match="needs 25 values for SD1.x/SD2.x or 23 for SDXL"):
        parse_network_args(["block_alphas=2,2,2"])
    with pytest.raises(ConfigError) as e:
        parse_network_args(["block_dims=" + sd_dims.replace("4", "4.5", 1), "down_lr_weight=wavy",
                            "mid_lr_weight=x", "loraplus_unet_lr_ratio=0", "conv_dim=-1", "rank_dropout=1.5"])
    text = str(e.value)
    assert len(e.value.problems) == 6
    assert "'4.5' is not a number" in text and "cosine, sine, linear, reverse_linear, zeros" in text
    assert "must be above 0" in text and "conv_dim=-1: must be at least 1" in text and "rank_dropout" in text


def test_weights_arguments_are_implemented_and_checked(tmp_path):
    lora = tmp_path / "base lora.safetensors"
    lora.write_bytes(b"x")
    cfg = parse_train_args(BASE + ["--base_weights", str(lora), "--base_weights_multiplier", "0.5",
                                   "--network_weights", str(lora), "--dim_from_weights"])
    assert cfg.base_weights == [str(lora)] and cfg.base_weights_multiplier == [0.5] and cfg.dim_from_weights
    with pytest.raises(ConfigError) as e:
        parse_train_args(BASE + ["--dim_from_weights", "--base_weights", str(tmp_path / "missing.safetensors")])
    assert "--dim_from_weights takes the LoRA shape from --network_weights" in str(e.value)
    assert "missing.safetensors: file not found" in str(e.value)


def test_other_network_modules_are_refused():
    with pytest.raises(ConfigError, match="Supported: networks.lora .*networks.loha .*networks.lokr .*lycoris.kohya"):
        parse_train_args(BASE + ["--network_module", "networks.dylora"])


def test_output_config_writes_non_defaults_and_never_overwrites(tmp_path):
    target = tmp_path / "out.toml"
    cfg = parse_train_args(BASE + ["--learning_rate", "1e-4", "--resolution", "512,768", "--config_file",
                                   str(target), "--output_config"])
    written = write_output_config(cfg)
    text = written.read_text(encoding="utf-8")
    assert "learning_rate = 0.0001" in text and 'resolution = "512,768"' in text
    assert "max_train_steps" not in text  # defaults are left out
    again = parse_train_args(["--config_file", str(target)])
    assert again.learning_rate == 1e-4 and again.resolution == (512, 768)
    with pytest.raises(ConfigError, match="already exists"):
        write_output_config(cfg)


def test_non_default_values_round_trip():
    cfg = parse_train_args(BASE + ["--network_dim", "16"])
    assert non_default_values(cfg)["network_dim"] == 16
    assert isinstance(cfg, TrainConfig)


def test_compatibility_table_lists_every_argument():
    table = compatibility_markdown()
    for f in ARGUMENTS:
        assert f"`--{f.name}`" in table


@pytest.mark.parametrize("value", ["0", "abc", "512,0"])
def test_a_bad_resolution_on_the_command_line_says_the_accepted_form(value, capsys):
    with pytest.raises(SystemExit):
        parse_train_args(BASE + ["--resolution", value])
    assert "expected '512' or 'W,H'" in capsys.readouterr().err
