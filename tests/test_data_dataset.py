"""The training dataset: repeats, reg balancing, buckets, batches, items, epochs and metadata."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import make_dreambooth_folder, make_image

from trainer.data.config import DatasetSpec, SubsetSpec
from trainer.data.dataset import build_train_dataset, make_dataloader
from trainer.errors import DatasetError


def subset(folder: Path, repeats: int = 1, **values) -> SubsetSpec:
    return SubsetSpec(image_dir=str(folder), num_repeats=repeats, caption_extension=".txt", **values)


def dataset(*subsets: SubsetSpec, resolution=(32, 32), batch_size: int = 1, **values) -> DatasetSpec:
    return DatasetSpec(batch_size=batch_size, resolution=resolution, subsets=subsets, **values)


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "データ set"


def test_reg_images_are_balanced_to_the_train_count_as_sd_scripts_does(root, caplog):
    train = make_dreambooth_folder(root / "train", "10_sks", n=5, size=(32, 32))
    reg = make_dreambooth_folder(root / "reg", "1_dog", n=20, size=(32, 32), captions=False)
    data = build_train_dataset([dataset(subset(train, 10), subset(reg, 1, is_reg=True, class_tokens="dog"))],
                               seed=0, prior_loss_weight=0.7)
    reg_repeats = [r.num_repeats for r in data.records if r.is_reg]
    assert reg_repeats == [3] * 10 + [2] * 10  # 20 + 20 + 10 = 50 = 5 train x 10
    assert (data.num_train_images, data.num_reg_images) == (50, 20)  # reg count is before balancing
    assert len(data) == 100  # batch size 1: 50 train + 50 reg samples per epoch
    weights = Counter(round(float(data[i]["loss_weights"][0]), 3) for i in range(len(data)))
    assert weights == {1.0: 50, 0.7: 50}
    assert data.reg_dataset_dirs_info() == {"1_dog": {"n_repeats": 1, "img_count": 20}}


def test_surplus_reg_images_are_left_out_with_a_warning(root, caplog):
    train = make_dreambooth_folder(root / "train", "2_sks", n=2, size=(16, 16))
    reg = make_dreambooth_folder(root / "reg", "1_dog", n=6, size=(16, 16))
    with caplog.at_level(logging.WARNING):
        data = build_train_dataset([dataset(subset(train, 2), subset(reg, 1, is_reg=True), resolution=(16, 16))],
                                   seed=0)
    assert sum(r.is_reg for r in data.records) == 4 and "2 of 6 regularization images are not used" in caplog.text


def test_batches_never_mix_buckets_and_cover_every_repeat(root):
    folder = root / "3_mixed"
    sizes = [(64, 32), (64, 32), (32, 64), (48, 48), (64, 32), (32, 64), (40, 40)]
    for i, size in enumerate(sizes):
        make_image(folder / f"img_{i}.png", size=size, seed=i)
    spec = dataset(subset(folder, 3), resolution=(48, 48), batch_size=4, enable_bucket=True, min_bucket_reso=16,
                   max_bucket_reso=96, bucket_reso_steps=16)
    data = build_train_dataset([spec], seed=3)
    for epoch in (1, 2):
        data.set_epoch(epoch)
        seen = Counter()
        for i in range(len(data)):
            batch = data[i]
            assert len(batch["image_paths"]) <= 4
            assert len({tuple(hw) for hw in batch["target_sizes_hw"].tolist()}) == 1
            assert batch["images"].shape[2:] == tuple(batch["target_sizes_hw"][0].tolist())
            seen.update(batch["image_paths"])
        assert set(seen.values()) == {3} and len(seen) == len(sizes)
    counts = {tuple(b["resolution"]): b["count"] for b in data.bucket_info()["buckets"].values()}
    assert sum(counts.values()) == 21 and len(counts) >= 3


def test_item_contents_shapes_and_ranges(root):
    folder = make_dreambooth_folder(root, "2_sks shape", n=3, size=(40, 24))
    data = build_train_dataset([dataset(subset(folder, 2, flip_aug=True), resolution=(32, 32), batch_size=3)],
                               seed=1)
    batch = data[0]
    assert batch["images"].shape == (3, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1 and batch["images"].min() < 0
    assert batch["latents"] is None and batch["alpha_masks"] is None
    assert batch["loss_weights"].tolist() == [1.0, 1.0, 1.0]
    assert batch["original_sizes_hw"].tolist() == [[24, 40]] * 3 and batch["target_sizes_hw"].tolist() == [[32, 32]] * 3
    assert batch["original_sizes_hw"].dtype == torch.long and batch["crop_top_lefts"].shape == (3, 2)
    assert all(c.startswith("sks shape, red square, picture") for c in batch["captions"])
    assert all(Path(p).parent == folder for p in batch["image_paths"])
    assert len(batch["flipped"]) == 3 and batch["network_multipliers"].tolist() == [1.0] * 3


def test_flip_mirrors_the_image_and_the_crop_left(root):
    folder = root / "40_x"
    make_image(folder / "tall.png", size=(21, 32))
    data = build_train_dataset([dataset(subset(folder, 40, flip_aug=True), resolution=(32, 32))], seed=0)
    items = {}
    for i in range(len(data)):
        batch = data[i]
        items[batch["flipped"][0]] = batch
    plain, mirrored = items[False], items[True]
    assert torch.equal(mirrored["images"][0], torch.flip(plain["images"][0], dims=[2]))
    # crop_ltrb of 21x32 fitted in 32x32 is (5.0, 0, 26.0, 32); flipped left = 32 - right = 6, as in sd-scripts
    assert plain["crop_top_lefts"][0].tolist() == [0, 5] and mirrored["crop_top_lefts"][0].tolist() == [0, 6]


def test_epochs_reshuffle_deterministically(root):
    folder = make_dreambooth_folder(root, "1_many", n=12, size=(16, 16))
    specs = [dataset(subset(folder, 1), resolution=(16, 16), batch_size=3)]
    first, second = build_train_dataset(specs, seed=5), build_train_dataset(specs, seed=5)
    orders = {}
    for epoch in (1, 2, 3):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        orders[epoch] = [first[i]["image_paths"] for i in range(len(first))]
        assert orders[epoch] == [second[i]["image_paths"] for i in range(len(second))]
    assert orders[1] != orders[2] != orders[3]
    first.set_epoch(1)  # going back gives the same order again
    assert [first[i]["image_paths"] for i in range(len(first))] == orders[1]


def test_without_buckets_any_size_is_fitted_to_the_resolution(root):
    folder = root / "1_sizes"
    for i, size in enumerate([(32, 32), (50, 20), (10, 40)]):
        make_image(folder / f"{i}.png", size=size, seed=i)
    data = build_train_dataset([dataset(subset(folder, 1), resolution=(32, 32), batch_size=3)], seed=0)
    batch = data[0]
    assert len(data) == 1 and batch["images"].shape == (3, 3, 32, 32)
    originals = sorted(map(tuple, batch["original_sizes_hw"].tolist()))
    assert originals == [(20, 50), (32, 32), (40, 10)]


def test_dataloader_workers_follow_epoch_step_and_max_steps(root):
    folder = make_dreambooth_folder(root, "1_w", n=2, size=(16, 16))
    captions_rule = subset(folder, 1, caption_dropout_every_n_epochs=2, token_warmup_step=0.5, token_warmup_min=1)
    data = build_train_dataset([dataset(captions_rule, resolution=(16, 16))], seed=0, max_train_steps_hint=4)
    loader = make_dataloader(data, num_workers=1, persistent_workers=True, seed=0)
    data.set_epoch(1)
    data.set_current_step(0)
    assert {c for batch in loader for c in batch["captions"]} == {"sks shape"}  # warmup: 1 token at step 0
    data.set_current_step(2)  # warmup = floor(0.5 * max_train_steps 4) = 2 steps: all tokens now
    assert all(batch["captions"][0].count(",") == 2 for batch in loader)
    data.set_epoch(2)
    assert {c for batch in loader for c in batch["captions"]} == {""}  # dropped every 2nd epoch
    data.set_epoch(3)
    data.set_max_train_steps(100)  # warmup is now 50 steps; step 2 -> floor(2 * 2 / 50) + 1 = 1 token
    assert {c for batch in loader for c in batch["captions"]} == {"sks shape"}


def test_dataloader_batches_are_the_dataset_items_and_workers_are_capped(root):
    folder = make_dreambooth_folder(root, "1_w", n=3, size=(16, 16))
    data = build_train_dataset([dataset(subset(folder, 1), resolution=(16, 16), batch_size=2)], seed=0)
    loader = make_dataloader(data, num_workers=10_000, persistent_workers=False, seed=0)
    assert loader.num_workers == os.cpu_count()
    loader = make_dataloader(data, num_workers=0, persistent_workers=True, seed=0)
    batches = list(loader)
    assert sorted(len(b["image_paths"]) for b in batches) == [1, 2] and batches[0]["images"].dim() == 4


def test_corrupt_image_is_an_error_naming_the_file(root):
    folder = make_dreambooth_folder(root, "1_bad", n=1, size=(16, 16))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError) as caught:
        build_train_dataset([dataset(subset(folder, 1), resolution=(16, 16))], seed=0)
    assert str(folder / "broken.png") in str(caught.value) and "re-save" in str(caught.value)


def test_a_picture_cut_short_stops_the_build_and_a_sideways_one_is_a_warning(root, caplog):
    from PIL import Image

    folder = make_dreambooth_folder(root, "1_pics", n=2, size=(16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone photo: stored sideways, shown upright
    Image.new("RGB", (16, 16), (200, 10, 10)).save(folder / "phone.jpg", exif=exif)
    with caplog.at_level("WARNING"):
        build_train_dataset([dataset(subset(folder, 1), resolution=(16, 16))], seed=0)
    assert "stored sideways" in caplog.text and "phone.jpg" in caplog.text
    big = make_image(folder / "cut.png", size=(128, 128), seed=3)
    big.write_bytes(big.read_bytes()[:len(big.read_bytes()) // 2])
    with pytest.raises(DatasetError, match="1 picture\\(s\\) cannot be decoded") as caught:
        build_train_dataset([dataset(subset(folder, 1), resolution=(16, 16))], seed=0)
    assert str(big) in str(caught.value)


def test_no_upscale_image_thinner_than_a_step_is_an_error_naming_it(root):
    folder = root / "1_thin"
    make_image(folder / "細い.png", size=(100, 40))
    spec = dataset(subset(folder), resolution=(64, 64), enable_bucket=True, bucket_no_upscale=True,
                   min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=64)
    with pytest.raises(DatasetError, match="細い.png.*too small"):
        build_train_dataset([spec], seed=0)


def test_missing_and_empty_folders(root, caplog):
    with pytest.raises(DatasetError, match="Image folder not found"):
        build_train_dataset([dataset(subset(root / "nowhere"))], seed=0)
    (root / "empty" / "10_inner").mkdir(parents=True)
    with caplog.at_level(logging.WARNING), pytest.raises(DatasetError, match="No training images"):
        build_train_dataset([dataset(subset(root / "empty"))], seed=0)
    assert "not searched recursively" in caplog.text


def test_validation_split_holds_out_images_reproducibly(root):
    folder = make_dreambooth_folder(root, "2_v", n=10, size=(16, 16))
    spec = dataset(subset(folder, 2), resolution=(16, 16), validation_split=0.25, validation_seed=7)
    data = build_train_dataset([spec], seed=0)
    kept = {r.path for r in data.records}
    assert len(kept) == 8 and data.num_train_images == 16 and data.num_validation_images == 2
    assert {r.path for r in build_train_dataset([spec], seed=99).records} == kept


def test_metadata_information(root):
    train = make_dreambooth_folder(root / "a", "2_sks", n=2, size=(16, 16))
    same_name = make_dreambooth_folder(root / "b", "2_sks", n=1, size=(16, 16))
    reg = make_dreambooth_folder(root / "r", "1_dog", n=1, size=(16, 16))
    spec = dataset(subset(train, 2, class_tokens="sks"), subset(same_name, 2), subset(reg, 1, is_reg=True),
                   resolution=(16, 16), batch_size=2, enable_bucket=True, min_bucket_reso=16, max_bucket_reso=32,
                   bucket_reso_steps=16)
    data = build_train_dataset([spec], seed=0)
    assert data.dataset_dirs_info() == {"2_sks": {"n_repeats": 2, "img_count": 2},
                                        "2_sks (2)": {"n_repeats": 2, "img_count": 1}}
    assert data.tag_frequency()["2_sks"]["sks shape"] == 3  # same folder name: counted together
    [meta] = data.datasets_metadata()
    assert (meta["num_train_images"], meta["num_reg_images"], meta["batch_size_per_device"]) == (6, 1, 2)
    assert (meta["resolution"], meta["min_bucket_reso"], meta["enable_bucket"]) == ([16, 16], 16, True)
    assert [s["image_dir"] for s in meta["subsets"]] == ["2_sks", "2_sks", "1_dog"]
    assert meta["subsets"][0]["class_tokens"] == "sks" and meta["subsets"][2]["is_reg"] is True
    # 6 train samples + the reg image balanced up to 6 repeats
    assert data.bucket_info()["buckets"][0] == {"resolution": [16, 16], "count": 12}
    json.dumps(meta)  # ss_datasets must be JSON


def test_fine_tuning_metadata_captions_and_tags(root):
    images = root / "ft images"
    make_image(images / "a.png", size=(16, 16))
    make_image(images / "b.jpg", size=(16, 16), seed=1)
    meta = root / "meta.json"
    meta.write_text(json.dumps({"a.png": {"caption": "a cat", "tags": "cute, 猫"}, "b": {"tags": "dog"}},
                               ensure_ascii=False), encoding="utf-8")
    spec = DatasetSpec(resolution=(16, 16), is_dreambooth=False,
                       subsets=(SubsetSpec(image_dir=str(images), metadata_file=str(meta), num_repeats=3),))
    data = build_train_dataset([spec], seed=0)
    assert sorted(r.caption for r in data.records) == ["a cat,cute, 猫", "dog"]
    assert data.num_train_images == 6 and data.tag_frequency() == {"meta.json": {"cute": 1, "猫": 1, "dog": 1}}
    assert data.dataset_dirs_info() == {"meta.json": {"n_repeats": 3, "img_count": 2}}
    meta.write_text(json.dumps({"missing.png": {"caption": "x"}}), encoding="utf-8")
    with pytest.raises(DatasetError, match="missing.png"):
        build_train_dataset([spec], seed=0)


def test_spawned_workers_see_the_epoch_as_on_windows(root):
    folder = make_dreambooth_folder(root, "1_w", n=2, size=(16, 16))
    data = build_train_dataset([dataset(subset(folder, 1, caption_dropout_every_n_epochs=2), resolution=(16, 16))],
                               seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=1, shuffle=True, num_workers=1, persistent_workers=True,
                                         collate_fn=make_dataloader(data, num_workers=0, persistent_workers=False,
                                                                    seed=0).collate_fn,
                                         multiprocessing_context="spawn")
    data.set_epoch(1)
    assert all(batch["captions"][0] for batch in loader)
    data.set_epoch(2)
    assert all(batch["captions"][0] == "" for batch in loader)


def test_loader_workers_leave_ctrl_break_to_the_main_process(root, monkeypatch):
    import signal

    from trainer.data import dataset as dataset_module

    folder = make_dreambooth_folder(root, "1_w", n=2, size=(16, 16))
    data = build_train_dataset([dataset(subset(folder, 1), resolution=(16, 16))], seed=0)
    loader = make_dataloader(data, num_workers=1, persistent_workers=False, seed=0)
    assert loader.worker_init_fn is dataset_module.ignore_ctrl_break
    assert make_dataloader(data, num_workers=0, persistent_workers=False, seed=0).worker_init_fn is None
    installed = []
    monkeypatch.setattr(signal, "SIGBREAK", 21, raising=False)  # as on Windows
    monkeypatch.setattr(signal, "signal", lambda number, handler: installed.append((number, handler)))
    dataset_module.ignore_ctrl_break(0)
    assert installed == [(21, signal.SIG_IGN)]
