"""trainer.train.grid: the comparison picture, a row per epoch/step/strength and a column per prompt."""

from PIL import Image

from trainer.train.grid import (
    LABEL_HEIGHT,
    MAX_CELL,
    MIN_CELL,
    MISSING,
    ROW_LABEL_WIDTH,
    GridRow,
    column_label,
    draw_grid,
    row_label,
    training_grid,
    training_samples,
)
from trainer.train.sample import SamplePrompt, sample_file_name

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def solid(path, colour, size=(64, 48)):
    Image.new("RGB", size, colour).save(path)
    return path


def test_sample_names_are_read_per_label_and_prompt_newest_first(tmp_path):
    solid(tmp_path / "me_e000002_00_20260101000000_7.png", COLOURS[0])
    solid(tmp_path / "me_e000002_00_20260102000000_7.png", COLOURS[1])  # a resumed run drew epoch 2 again
    solid(tmp_path / "me_e000001_01_20260101000000.png", COLOURS[2])
    solid(tmp_path / "other_e000001_00_20260101000000.png", COLOURS[3])  # another run in the same folder
    (tmp_path / "notes.png").write_bytes(b"")
    found = training_samples(tmp_path, "me")
    assert list(found) == ["e000001", "e000002"]
    assert found["e000002"][0].name == "me_e000002_00_20260102000000_7.png"
    assert list(found["e000001"]) == [1]
    assert list(training_samples(tmp_path, "other")) == ["e000001"]


def test_unnamed_runs_and_step_labels_sort_by_number(tmp_path):
    for label in ("000010", "000002", "000000"):
        solid(tmp_path / sample_file_name(None, label, 0, None), COLOURS[0])
    assert list(training_samples(tmp_path, None)) == ["000000", "000002", "000010"]
    assert [row_label(x) for x in ("000000", "000010", "e000000", "e000003")] == [
        "before training", "step 10", "before training", "epoch 3"]


def test_grid_layout_puts_each_picture_in_its_row_and_column(tmp_path):
    a, b = solid(tmp_path / "a.png", COLOURS[0]), solid(tmp_path / "b.png", COLOURS[1])
    c = Image.new("RGB", (64, 48), COLOURS[2])
    grid = draw_grid([GridRow("epoch 1", [a, b]), GridRow("epoch 2", [c, None])], ["red", "green"], title="t")
    width, height = MIN_CELL, MIN_CELL * 48 // 64  # small samples are scaled up: room for the labels
    top = 2 * LABEL_HEIGHT  # the title and one header line
    assert grid.size == (ROW_LABEL_WIDTH + 2 * width, top + 2 * height)

    def centre(row, column):
        return grid.getpixel((ROW_LABEL_WIDTH + column * width + width // 2, top + row * height + height // 2))

    assert [centre(0, 0), centre(0, 1), centre(1, 0), centre(1, 1)] == [COLOURS[0], COLOURS[1], COLOURS[2], MISSING]


def test_big_samples_are_shrunk_and_long_prompts_wrapped():
    big = Image.new("RGB", (1024, 768), COLOURS[0])
    grid = draw_grid([GridRow("x", [big])], ["p"])
    assert grid.size == (ROW_LABEL_WIDTH + MAX_CELL, LABEL_HEIGHT + 288)
    long = draw_grid([GridRow("x", [big])], [column_label("a very long prompt " * 20, 42)])
    assert long.height == 3 * LABEL_HEIGHT + 288  # three header lines at most
    assert column_label("two  words", 42) == "two words  (seed 42)"


def test_training_grid_has_a_column_per_prompt_and_a_row_per_epoch(tmp_path):
    folder = tmp_path / "sample"
    folder.mkdir()
    for epoch in (1, 2, 3):
        for index in (0, 1):
            solid(folder / sample_file_name("me", f"e{epoch:06d}", index, 5), COLOURS[index])
    prompts = [SamplePrompt("red thing", seed=5), SamplePrompt("green thing", seed=5)]
    path = training_grid(tmp_path, "me", prompts)
    assert path == tmp_path / "me_samples_grid.png"
    grid = Image.open(path).convert("RGB")
    width, height = MIN_CELL, MIN_CELL * 48 // 64
    top = grid.height - 3 * height
    assert grid.width == ROW_LABEL_WIDTH + 2 * width and top >= 2 * LABEL_HEIGHT
    assert grid.getpixel((ROW_LABEL_WIDTH + width + width // 2, top + 2 * height + height // 2)) == COLOURS[1]
    assert training_grid(tmp_path, "nobody", prompts) is None
