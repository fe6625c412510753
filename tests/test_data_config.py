"""Dataset config: sd-scripts' schema (every problem at once, with key paths) and value resolution
subset > dataset > [general] > argument > default, the first value that is not None winning. Expected values
follow config_util's rules."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import make_dreambooth_folder

from trainer.data.config import load_dataset_config, resolve_datasets, verify_bucket_reso_steps
from trainer.errors import ConfigError, DatasetError

# What sd-scripts' argparse gives when nothing is passed (the values that act as global defaults).
CLI_DEFAULTS = dict(
    train_batch_size=1, dataset_repeats=1, resolution=None, enable_bucket=False, min_bucket_reso=256,
    max_bucket_reso=1024, bucket_reso_steps=64, bucket_no_upscale=False, caption_extension=".caption",
    shuffle_caption=False, caption_separator=",", keep_tokens=0, keep_tokens_separator="", secondary_separator=None,
    enable_wildcard=False, caption_prefix=None, caption_suffix=None, caption_dropout_rate=0.0,
    caption_dropout_every_n_epochs=0, caption_tag_dropout_rate=0.0, token_warmup_min=1, token_warmup_step=0,
    color_aug=False, flip_aug=False, random_crop=False, face_crop_aug_range=None, cache_info=False, alpha_mask=False,
    resize_interpolation=None, validation_seed=None, validation_split=0.0, train_data_dir=None, reg_data_dir=None,
    in_json=None, dataset_config=None,
)


def cli(**overrides) -> SimpleNamespace:
    return SimpleNamespace(**{**CLI_DEFAULTS, **overrides})


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def config_dir(tmp_path) -> Path:
    return tmp_path / "設定 files"


def test_general_section_fills_subsets_and_subset_values_win(config_dir):
    path = write(config_dir / "dataset.toml", """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1
flip_aug = true

[[datasets]]
resolution = 512
batch_size = 4

  [[datasets.subsets]]
  image_dir = 'C:\\train data\\img'
  num_repeats = 10
  class_tokens = 'sks dog'

  [[datasets.subsets]]
  image_dir = 'C:\\train data\\reg'
  is_reg = true
  class_tokens = 'dog'
  keep_tokens = 2
  flip_aug = false
""")
    [dataset] = resolve_datasets(cli(dataset_config=str(path)), load_dataset_config(path))
    train, reg = dataset.subsets
    assert (dataset.batch_size, dataset.resolution, dataset.is_dreambooth) == (4, (512, 512), True)
    assert (train.image_dir, train.num_repeats, train.class_tokens, train.is_reg) == \
        ("C:\\train data\\img", 10, "sks dog", False)
    assert (train.shuffle_caption, train.caption_extension, train.keep_tokens, train.flip_aug) == \
        (True, ".txt", 1, True)
    assert (reg.is_reg, reg.num_repeats, reg.keep_tokens, reg.flip_aug, reg.shuffle_caption) == (True, 1, 2, False, True)
    # not set anywhere: argparse defaults, then dataclass defaults
    assert (train.caption_separator, train.token_warmup_min, train.custom_attributes) == (",", 1, None)
    assert (dataset.min_bucket_reso, dataset.max_bucket_reso, dataset.enable_bucket) == (256, 1024, False)


def test_command_line_values_are_defaults_that_the_file_overrides(config_dir):
    path = write(config_dir / "dataset.toml", """
[[datasets]]
  [[datasets.subsets]]
  image_dir = '/data/a'

  [[datasets.subsets]]
  image_dir = '/data/b'
  num_repeats = 3
  caption_extension = 'caption'
""")
    args = cli(resolution=(768, 512), train_batch_size=2, dataset_repeats=5, caption_extension="txt",
               color_aug=True, face_crop_aug_range="2.0,4.0", caption_extention=None, alpha_mask=True)
    [dataset] = resolve_datasets(args, load_dataset_config(path))
    a, b = dataset.subsets
    assert (dataset.resolution, dataset.batch_size) == ((768, 512), 2)
    assert a.alpha_mask and b.alpha_mask  # a subset-only key, but --alpha_mask still reaches it
    assert (a.num_repeats, a.caption_extension, a.color_aug, a.face_crop_aug_range) == (5, ".txt", True, (2.0, 4.0))
    assert (b.num_repeats, b.caption_extension) == (3, ".caption")  # leading dot added


def test_legacy_misspelled_caption_extention_argument_is_honoured(config_dir):
    path = write(config_dir / "d.toml", "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'x'\n")
    [dataset] = resolve_datasets(cli(caption_extention=".tags"), load_dataset_config(path))
    assert dataset.subsets[0].caption_extension == ".tags"


def test_two_datasets_resolution_pairs_buckets_and_duplicate_subsets(config_dir, caplog):
    path = write(config_dir / "dataset.toml", """
[general]
resolution = [768, 512]
enable_bucket = true
min_bucket_reso = 300
max_bucket_reso = 1000

[[datasets]]
  [[datasets.subsets]]
  image_dir = '/data/same dir'
  [[datasets.subsets]]
  image_dir = '/data/same dir'
  num_repeats = 7

[[datasets]]
resolution = 1024
bucket_no_upscale = true
  [[datasets.subsets]]
  image_dir = '/data/same dir'
""")
    with caplog.at_level(logging.WARNING):
        first, second = resolve_datasets(cli(), load_dataset_config(path))
    assert first.resolution == (768, 512)
    assert (first.min_bucket_reso, first.max_bucket_reso) == (256, 1024)  # snapped: min down, max up
    assert len(first.subsets) == 1 and first.subsets[0].num_repeats == 1  # later duplicate ignored
    assert "duplicate" in caplog.text and "adjusted" in caplog.text
    assert (second.resolution, second.bucket_no_upscale, len(second.subsets)) == ((1024, 1024), True, 1)


def test_json_config_and_fine_tuning_dataset(config_dir):
    path = write(config_dir / "dataset.json", json.dumps({
        "general": {"caption_dropout_rate": 0.1},
        "datasets": [{"resolution": 512, "subsets": [{"metadata_file": "meta.json", "image_dir": "imgs"}]}],
    }))
    [dataset] = resolve_datasets(cli(), load_dataset_config(path))
    [subset] = dataset.subsets
    assert dataset.is_dreambooth is False
    assert (subset.metadata_file, subset.image_dir, subset.caption_dropout_rate) == ("meta.json", "imgs", 0.1)


def test_typo_names_the_full_key_path_the_file_and_the_nearest_key(config_dir):
    path = write(config_dir / "dataset.toml", """
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = 'a'
  num_repeat = 10
""")
    with pytest.raises(ConfigError) as caught:
        load_dataset_config(path)
    message = str(caught.value)
    assert "datasets[0].subsets[0].num_repeat" in message
    assert 'did you mean "num_repeats"' in message
    assert str(path) in message


def test_every_problem_is_reported_at_once_with_expected_and_given_types(config_dir):
    path = write(config_dir / "dataset.toml", """
[general]
image_dir = 'x'
shuffle_caption = 'yes'

[[datasets]]
resolution = '512'
validation_split = 0
prior_loss_weight = 1.0
  [[datasets.subsets]]
  num_repeats = 2
  enable_bucket = true
""")
    with pytest.raises(ConfigError) as caught:
        load_dataset_config(path)
    problems = caught.value.problems
    joined = "\n".join(problems)
    assert len(problems) == 7, joined
    assert "general.image_dir" in joined and "only allowed inside a [[datasets.subsets]]" in joined
    assert "general.shuffle_caption: expected true or false, given string 'yes'" in joined
    assert "datasets[0].resolution: expected a whole number or [width, height], given string '512'" in joined
    assert "datasets[0].validation_split: expected a decimal number (write 1.0, not 1)" in joined
    assert "datasets[0].prior_loss_weight" in joined and "--prior_loss_weight" in joined
    assert "datasets[0].subsets[0].image_dir: required key is missing" in joined
    assert "datasets[0].subsets[0].enable_bucket: 'enable_bucket' is a dataset setting" in joined


def test_dataset_key_inside_a_subset_says_where_it_belongs(config_dir):
    path = write(config_dir / "d.toml", "[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\nbatch_size=2\n")
    with pytest.raises(ConfigError, match=r"subsets\[0\]\.batch_size: 'batch_size' is a dataset setting"):
        load_dataset_config(path)


def test_mixing_dreambooth_and_fine_tuning_subsets_is_rejected(config_dir):
    path = write(config_dir / "d.toml", """
[[datasets]]
  [[datasets.subsets]]
  image_dir = 'a'
  [[datasets.subsets]]
  metadata_file = 'm.json'
""")
    with pytest.raises(ConfigError, match="cannot be mixed"):
        load_dataset_config(path)


def test_toml_syntax_error_names_the_file_and_line(config_dir):
    path = write(config_dir / "broken.toml", "[general]\nshuffle_caption = true\nresolution = 512,\n")
    with pytest.raises(ConfigError) as caught:
        load_dataset_config(path)
    assert str(path) in str(caught.value) and "line 3" in str(caught.value)


def test_unsupported_extension_and_missing_file(config_dir):
    with pytest.raises(ConfigError, match="file not found"):
        load_dataset_config(config_dir / "nope.toml")
    with pytest.raises(ConfigError, match=r"\.toml or \.json"):
        load_dataset_config(write(config_dir / "d.yaml", "a: 1"))


def test_missing_resolution_names_the_argument(config_dir):
    path = write(config_dir / "d.toml", "[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\n")
    with pytest.raises(ConfigError, match="--resolution"):
        resolve_datasets(cli(), load_dataset_config(path))


def test_resolution_outside_bucket_limits_is_a_config_error_not_an_assert(config_dir):
    path = write(config_dir / "d.toml", """
[[datasets]]
resolution = 512
enable_bucket = true
min_bucket_reso = 640
max_bucket_reso = 448
[[datasets.subsets]]
image_dir = 'a'
""")
    with pytest.raises(ConfigError) as caught:
        resolve_datasets(cli(), load_dataset_config(path))
    assert len(caught.value.problems) == 2
    assert "min_bucket_reso (640)" in str(caught.value) and "max_bucket_reso (448)" in str(caught.value)


def test_min_bucket_reso_below_the_step_is_a_config_error_not_a_zero_bucket(tmp_path):
    """--resolution 64 --enable_bucket --min_bucket_reso 32 used to snap the minimum to 0 and divide by it."""
    train = tmp_path / "学習 data"
    make_dreambooth_folder(train, "2_sks", n=1, size=(64, 64))
    args = cli(train_data_dir=str(train), resolution="64", enable_bucket=True, min_bucket_reso=32)
    with pytest.raises(ConfigError) as caught:
        resolve_datasets(args, None)
    message = str(caught.value)
    assert "--min_bucket_reso 32 is below --bucket_reso_steps 64" in message
    assert "--min_bucket_reso to at least 64" in message and "--bucket_reso_steps to 32 (SDXL" in message
    [spec] = resolve_datasets(cli(train_data_dir=str(train), resolution="64", enable_bucket=True,
                                  min_bucket_reso=32, bucket_reso_steps=32), None)  # the SDXL fix works
    assert (spec.min_bucket_reso, spec.bucket_reso_steps) == (32, 32)


def test_min_bucket_reso_below_the_step_is_checked_per_dataset_in_the_file(config_dir):
    path = write(config_dir / "d.toml", """
[general]
resolution = 64
enable_bucket = true
max_bucket_reso = 128
[[datasets]]
min_bucket_reso = 64
  [[datasets.subsets]]
  image_dir = 'a'
[[datasets]]
min_bucket_reso = 16
  [[datasets.subsets]]
  image_dir = 'b'
[[datasets]]
min_bucket_reso = 16
bucket_no_upscale = true
  [[datasets.subsets]]
  image_dir = 'c'
""")
    with pytest.raises(ConfigError) as caught:
        resolve_datasets(cli(dataset_config=str(path)), load_dataset_config(path))
    [problem] = caught.value.problems  # only datasets[1]: buckets are not made with bucket_no_upscale
    assert str(path) in problem and "datasets[1]: min_bucket_reso 16 is below bucket_reso_steps 64" in problem
    assert "min_bucket_reso to at least 64" in problem and "--" not in problem


def test_bucket_reso_steps_must_suit_the_model(config_dir):
    path = write(config_dir / "d.toml", "[[datasets]]\nresolution=512\nenable_bucket=true\nbucket_reso_steps=32\n"
                                        "[[datasets.subsets]]\nimage_dir='a'\n")
    specs = resolve_datasets(cli(), load_dataset_config(path))
    verify_bucket_reso_steps(specs, 32)
    with pytest.raises(ConfigError, match="divisible by 64"):
        verify_bucket_reso_steps(specs, 64)


def test_without_a_config_the_folders_make_one_dreambooth_dataset(tmp_path, caplog):
    train = tmp_path / "学習 data" / "train"
    make_dreambooth_folder(train, "10_sks dog", n=1)
    make_dreambooth_folder(train, "5_my_char", n=1)
    reg = tmp_path / "学習 data" / "reg"
    make_dreambooth_folder(reg, "1_dog", n=1)
    [dataset] = resolve_datasets(cli(train_data_dir=str(train), reg_data_dir=str(reg), resolution=(512, 512),
                                     caption_extension=".txt"), None)
    found = [(Path(s.image_dir).name, s.num_repeats, s.class_tokens, s.is_reg, s.caption_extension)
             for s in dataset.subsets]
    assert found == [("10_sks dog", 10, "sks dog", False, ".txt"), ("5_my_char", 5, "my_char", False, ".txt"),
                     ("1_dog", 1, "dog", True, ".txt")]


def test_in_json_makes_a_fine_tuning_dataset():
    [dataset] = resolve_datasets(cli(in_json="meta.json", train_data_dir="imgs", dataset_repeats=3,
                                     resolution=(512, 512)), None)
    assert dataset.is_dreambooth is False
    assert (dataset.subsets[0].metadata_file, dataset.subsets[0].image_dir, dataset.subsets[0].num_repeats) == \
        ("meta.json", "imgs", 3)


def test_no_images_argument_at_all_is_explained():
    with pytest.raises(ConfigError, match="--train_data_dir"):
        resolve_datasets(cli(resolution=(512, 512)), None)


def test_folder_arguments_are_ignored_with_a_warning_when_a_config_is_given(config_dir, caplog):
    path = write(config_dir / "d.toml", "[[datasets]]\nresolution=64\n[[datasets.subsets]]\nimage_dir='a'\n")
    with caplog.at_level(logging.WARNING):
        resolve_datasets(cli(train_data_dir="somewhere"), load_dataset_config(path))
    assert "--train_data_dir is ignored" in caplog.text


def test_bad_train_data_dir_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="folder not found"):
        resolve_datasets(cli(train_data_dir=str(tmp_path / "missing"), resolution=(64, 64)), None)


def test_unknown_resize_interpolation_is_reported_once_with_a_suggestion(config_dir):
    path = write(config_dir / "d.toml", "[[datasets]]\nresolution=64\nresize_interpolation='lanczoss'\n"
                                        "[[datasets.subsets]]\nimage_dir='a'\n[[datasets.subsets]]\nimage_dir='b'\n")
    with pytest.raises(ConfigError) as caught:
        resolve_datasets(cli(), load_dataset_config(path))
    assert len(caught.value.problems) == 1 and 'did you mean "lanczos"' in str(caught.value)


def test_keys_above_the_first_table_are_pointed_to_general(config_dir):
    path = write(config_dir / "d.toml", "resolution = 512\ndatasetz = 1\n[[datasets]]\n[[datasets.subsets]]\n"
                                        "image_dir = 'a'\n")
    with pytest.raises(ConfigError) as caught:
        load_dataset_config(path)
    assert "resolution: 'resolution' must be inside a table: write it under [general]" in str(caught.value)
    assert 'datasetz: unknown key (did you mean "datasets"?)' in str(caught.value)


@pytest.mark.parametrize("where, key_path", [
    ("[general]\nprior_loss_weight = 1.0\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n",
     "general.prior_loss_weight"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nprior_loss_weight = 1.0\n",
     "datasets[0].subsets[0].prior_loss_weight"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nmax_token_length = 150\n",
     "datasets[0].subsets[0].max_token_length"),
])
def test_command_line_only_keys_are_rejected_at_every_level(config_dir, where, key_path):
    path = write(config_dir / "d.toml", where)
    with pytest.raises(ConfigError, match=re.escape(key_path) + ": .* command-line"):
        load_dataset_config(path)


def test_num_repeats_below_one_names_the_key_and_what_it_means(tmp_path):
    from trainer.config.args import parse_train_args

    toml_file = tmp_path / "dataset.toml"
    toml_file.write_text('[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\n'
                         f'image_dir = "{tmp_path.as_posix()}"\nnum_repeats = -1\n', encoding="utf-8")
    cfg = parse_train_args(["--pretrained_model_name_or_path", "m", "--dataset_config", str(toml_file)])
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.subsets\[0\]\.num_repeats: must be at least 1"):
        resolve_datasets(cfg, load_dataset_config(toml_file))
