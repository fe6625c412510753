"""DreamBooth folders (`<repeats>_<class tokens>` under --train_data_dir), image listing and caption files as
sd-scripts reads them, and the folder mistakes users make (pointing at `10_name`, forgetting the `N_` prefix)
ending in messages that say what to do."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import make_dreambooth_folder, make_image

from trainer.data.folders import (
    find_dreambooth_subsets,
    list_images,
    parse_repeats_folder,
    read_caption,
    read_folder_captions,
)
from trainer.errors import DatasetError


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "データ set"


@pytest.mark.parametrize("name, expected", [
    ("10_sks dog", (10, "sks dog")), ("5_my_char", (5, "my_char")), ("1_", (1, "")), ("3", (3, "")),
    ("0_skip", (0, "skip")), ("sks dog", None), ("x10_dog", None), ("_10_dog", None),
])
def test_parse_repeats_folder(name, expected):
    assert parse_repeats_folder(name) == expected


def test_list_images_is_flat_sorted_and_ignores_letter_case(root):
    for name in ("b.PNG", "a.jpg", "c.Jpeg", "d.webp", "e.bmp"):
        make_image(root / name, size=(8, 8))
    (root / "a.txt").write_text("caption", encoding="utf-8")
    make_image(root / "sub" / "deep.png", size=(8, 8))
    assert [p.name for p in list_images(root)] == ["a.jpg", "b.PNG", "c.Jpeg", "d.webp", "e.bmp"]


def test_find_subsets_reads_repeats_and_class_tokens(root):
    make_dreambooth_folder(root, "10_sks dog", n=1)
    make_dreambooth_folder(root, "5_my_char", n=1)
    subsets = find_dreambooth_subsets(root, is_reg=True)
    assert subsets == [
        {"image_dir": str(root / "10_sks dog"), "num_repeats": 10, "is_reg": True, "class_tokens": "sks dog"},
        {"image_dir": str(root / "5_my_char"), "num_repeats": 5, "is_reg": True, "class_tokens": "my_char"},
    ]


def test_missing_folder_names_the_option_and_path(root):
    with pytest.raises(DatasetError) as caught:
        find_dreambooth_subsets(root / "nope", is_reg=True)
    assert "--reg_data_dir" in str(caught.value) and str(root / "nope") in str(caught.value)


def test_empty_folder_explains_the_naming_convention(root):
    root.mkdir(parents=True)
    with pytest.raises(DatasetError) as caught:
        find_dreambooth_subsets(root, is_reg=False)
    message = str(caught.value)
    assert "--train_data_dir" in message and "10_sks dog" in message and "<repeats>_<class tokens>" in message


def test_pointing_at_the_repeats_folder_itself_says_to_use_its_parent(root):
    folder = make_dreambooth_folder(root, "10_sks dog", n=2)
    with pytest.raises(DatasetError) as caught:
        find_dreambooth_subsets(folder, is_reg=False)
    message = str(caught.value)
    assert str(folder) in message and f'--train_data_dir "{root}"' in message and "PARENT" in message


def test_folder_of_loose_images_without_prefix_suggests_a_subfolder(root):
    make_image(root / "pics" / "a.png", size=(8, 8))
    with pytest.raises(DatasetError, match="subfolders named '<repeats>_<class tokens>'") as caught:
        find_dreambooth_subsets(root / "pics", is_reg=False)
    assert str(root / "pics" / "10_pics") in str(caught.value)


def test_unnumbered_folders_are_listed_in_a_warning_and_skipped(root, caplog):
    make_dreambooth_folder(root, "10_good", n=1)
    make_dreambooth_folder(root, "forgot prefix", n=1)
    make_dreambooth_folder(root, "0_zero", n=1)
    with caplog.at_level(logging.WARNING):
        subsets = find_dreambooth_subsets(root, is_reg=False)
    assert [Path(s["image_dir"]).name for s in subsets] == ["10_good"]
    assert "forgot prefix" in caplog.text and "10_forgot prefix" in caplog.text
    assert "0_zero" in caplog.text and "less than 1" in caplog.text


def test_only_unnumbered_folders_is_an_error_with_an_example(root):
    make_dreambooth_folder(root, "my dog", n=1)
    with pytest.raises(DatasetError) as caught:
        find_dreambooth_subsets(root, is_reg=False)
    assert "my dog" in str(caught.value) and "'10_sks dog'" in str(caught.value)


def test_read_caption_first_line_bom_and_wildcard_lines(root):
    image = make_image(root / "img 1.png", size=(8, 8))
    (root / "img 1.txt").write_bytes("\ufeff1girl, 笑顔 \nsecond line\n\n third \n".encode("utf-8"))
    assert read_caption(image, ".txt") == "1girl, 笑顔"
    assert read_caption(image, ".txt", enable_wildcard=True) == "1girl, 笑顔\nsecond line\nthird"
    assert read_caption(image, ".caption") is None


def test_face_crop_file_names_fall_back_to_the_base_caption(root):
    image = make_image(root / "face_10_20_30_40.png", size=(8, 8))
    (root / "face.txt").write_text("base caption", encoding="utf-8")
    assert read_caption(image, ".txt") == "base caption"
    (root / "face_10_20_30_40.txt").write_text("own caption", encoding="utf-8")
    assert read_caption(image, ".txt") == "own caption"


def test_empty_or_non_utf8_caption_file_is_an_error_naming_it(root):
    image = make_image(root / "a.png", size=(8, 8))
    (root / "a.txt").write_text("", encoding="utf-8")
    with pytest.raises(DatasetError, match="empty") as caught:
        read_caption(image, ".txt")
    assert str(root / "a.txt") in str(caught.value)
    (root / "a.txt").write_bytes("笑顔".encode("shift_jis"))
    with pytest.raises(DatasetError, match="UTF-8"):
        read_caption(image, ".txt")


def test_missing_captions_use_class_tokens_with_one_warning(root, caplog):
    folder = make_dreambooth_folder(root, "10_sks dog", n=3, captions=False)
    (folder / "img_0.txt").write_text("own", encoding="utf-8")
    images = list_images(folder)
    with caplog.at_level(logging.WARNING):
        captions = read_folder_captions(images, ".caption", "sks dog", False, folder)
    assert captions == ["sks dog"] * 3
    assert "3 of 3 images" in caplog.text and str(folder) in caplog.text
    assert "--caption_extension .txt" in caplog.text  # the files that do exist are pointed out
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        captions = read_folder_captions(images, ".txt", None, False, folder)
    assert captions == ["own", "", ""] and "an empty caption" in caplog.text
