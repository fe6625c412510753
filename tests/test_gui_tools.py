"""The Dataset tools and LoRA tools tabs: each form's values become the command line a console user would
type, and the Run button runs exactly that command."""

from __future__ import annotations

import pytest

from trainer.cli import COMMANDS
from trainer.gui import tools


def by_command(name: str) -> tools.Tool:
    return next(t for t in tools.TOOLS if t.command == name)


@pytest.mark.parametrize("tool", tools.TOOLS, ids=lambda t: t.command)
def test_every_field_is_an_option_of_its_command(tool, capsys):
    assert tool.command in COMMANDS
    with pytest.raises(SystemExit):
        COMMANDS[tool.command](["--help"])
    help_text = capsys.readouterr().out
    for spec in tool.fields:
        assert not spec.option or f"--{spec.option}" in help_text, (tool.command, spec.option)


def test_values_become_the_console_command_line():
    tool = by_command("regimages")
    values = ['"D:\\models\\my model.safetensors" ', "woman", 20.0, "", None, ""]
    assert tools.tool_argv(tool, values) == ["--model", "D:\\models\\my model.safetensors", "--class", "woman",
                                             "--count", "20"]
    captions = by_command("caption")
    assert tools.tool_argv(captions, ['"D:\\lora\\img\\10_me"', "blip", "", ".txt", 0.35, True, False]) == [
        "D:\\lora\\img\\10_me", "--model", "blip", "--caption_extension", ".txt", "--thresh", "0.35", "--recursive"]
    merge = by_command("merge")
    assert tools.tool_argv(merge, ["base", "a.safetensors:0.8", "out.safetensors", True])[-1] == "--overwrite"
    assert "--overwrite" not in tools.tool_argv(merge, ["base", "a", "o", False])


def test_run_streams_the_output_and_says_how_it_ended(tmp_path):
    tool = by_command("regimages")
    values = ["builtin:tiny-sd1", "shape", 1, str(tmp_path / "reg"), "a shape --s 1 --w 64 --h 64", ""]
    shown = list(tools.run_tool(tool, values, tmp_path))
    assert shown[0].startswith("> python -m trainer regimages --model builtin:tiny-sd1")
    assert shown[-1].endswith("[done]") and "1_shape" in shown[-1]
    assert (tmp_path / "reg" / "1_shape" / "reg_0000.png").is_file()
    failed = list(tools.run_tool(tool, ["", "shape", 1, "", "", ""], tmp_path))
    assert "--model" in failed[-1] and failed[-1].endswith("[stopped with exit code 2]")


def test_the_page_has_the_tools_tab(tmp_path):
    gr = pytest.importorskip("gradio")
    from trainer.gui import app

    blocks = app.build_app(cwd=tmp_path)
    labels = {b.label for b in blocks.blocks.values() if isinstance(b, gr.Accordion)}
    assert {t.title for t in tools.TOOLS} <= labels


# ---------------------------------------------------------------------------------------------------
# The LoRA tools tab: every after-training tool, each form the console command line


LORA_COMMANDS = ["check_lora", "show_metadata", "resize_lora", "merge_lora", "extract_lora", "merge", "compare"]


def test_the_lora_tab_has_every_after_training_tool_and_the_dataset_tab_the_rest():
    assert [t.command for t in tools.tools_of(tools.LORA_TAB)] == LORA_COMMANDS
    assert [t.command for t in tools.tools_of(tools.DATASET_TAB)] == ["doctor", "caption", "regimages"]
    assert set(tools.tools_of(tools.LORA_TAB)) | set(tools.tools_of(tools.DATASET_TAB)) == set(tools.TOOLS)


@pytest.mark.parametrize("command, values, argv", [
    ("check_lora", ['"D:\\out\\my char.safetensors"', "builtin:tiny-sd1", False],
     ["D:\\out\\my char.safetensors", "--base", "builtin:tiny-sd1"]),
    ("check_lora", ["a.safetensors", "", True], ["a.safetensors", "--json"]),
    ("show_metadata", ["a.safetensors", True, False], ["a.safetensors", "--full"]),
    ("show_metadata", ["a.safetensors", False, True], ["a.safetensors", "--json"]),
    ("resize_lora", ["a.safetensors", "a-r4.safetensors", 4.0, "sv_fro", 0.9, "fp16", False, True],
     ["--model", "a.safetensors", "--save_to", "a-r4.safetensors", "--new_rank", "4", "--dynamic_method", "sv_fro",
      "--dynamic_param", "0.9", "--save_precision", "fp16", "--overwrite"]),
    ("merge_lora", ["a.safetensors:0.7", "b.safetensors", "ab.safetensors", "", False],
     ["--lora", "a.safetensors:0.7", "--lora", "b.safetensors", "--save_to", "ab.safetensors"]),
    ("extract_lora", ["base.safetensors", "tuned.safetensors", "x.safetensors", "16", "", False],
     ["--model_org", "base.safetensors", "--model_tuned", "tuned.safetensors", "--save_to", "x.safetensors",
      "--dim", "16"]),
    ("merge", ["base.safetensors", "a.safetensors:0.8", "merged.safetensors", False],
     ["--model", "base.safetensors", "--lora", "a.safetensors:0.8", "--output", "merged.safetensors"]),
    ("compare", ["builtin:tiny-sd1", "output", "", "a shape --s 2", "0.5,1.0", ""],
     ["--model", "builtin:tiny-sd1", "--loras", "output", "--prompt", "a shape --s 2", "--strengths", "0.5,1.0"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_each_lora_form_makes_its_console_command_line(command, values, argv):
    tool = by_command(command)
    assert len(values) == len(tool.fields)
    assert tools.tool_argv(tool, values) == argv


def test_the_lora_file_boxes_are_the_ones_a_finished_run_fills():
    filled = {t.command: [s.label for s in t.fields if s.run_output] for t in tools.tools_of(tools.LORA_TAB)}
    assert filled == {"check_lora": ["LoRA file"], "show_metadata": ["LoRA file"], "resize_lora": ["LoRA file"],
                      "merge_lora": ["First LoRA file[:strength]"], "extract_lora": [],
                      "merge": ["LoRA file[:strength]"], "compare": ["LoRA file or folder"]}
    assert not any(s.run_output for t in tools.tools_of(tools.DATASET_TAB) for s in t.fields)


def write_lora(path, metadata):
    import torch
    from safetensors.torch import save_file

    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{name}.lora_down.weight": torch.ones(2, 32), f"{name}.lora_up.weight": torch.ones(32, 2),
               f"{name}.alpha": torch.tensor(1.0)}, str(path), metadata=metadata)
    return path


def test_show_metadata_and_check_lora_forms_run_the_commands(tmp_path):
    lora = write_lora(tmp_path / "my char.safetensors", {"ss_output_name": "mychar", "ss_network_dim": "2"})
    shown = list(tools.run_tool(by_command("show_metadata"), [f'"{lora}"', False, False], tmp_path))
    assert shown[0].startswith('> python -m trainer show_metadata "') and shown[-1].endswith("[done]")
    assert "ss_output_name" in shown[-1] and "mychar" in shown[-1]
    report = list(tools.run_tool(by_command("check_lora"), [str(lora), "", False], tmp_path))[-1]
    assert "ComfyUI" in report and "A1111" in report and "diffusers" in report


def test_a_picture_tool_shows_the_picture_its_output_says_it_wrote(tmp_path, monkeypatch):
    from PIL import Image

    (tmp_path / "out").mkdir()
    Image.new("RGB", (8, 4), "red").save(tmp_path / "out" / "compare_grid.png")
    assert tools.written_picture("drawing 1 prompt(s)\nwrote out/compare_grid.png\n[done]", tmp_path) == (
        tmp_path / "out" / "compare_grid.png")
    assert tools.written_picture("wrote out/missing.png\n[done]", tmp_path) is None
    assert tools.written_picture("wrote out/x.safetensors", tmp_path) is None

    def fake_run(tool, values, cwd, python=None):
        yield "> python -m trainer compare"
        yield "> python -m trainer compare\nwrote out/compare_grid.png\n[done]"

    monkeypatch.setattr(tools, "run_tool", fake_run)
    shown = list(tools.run_tool_with_picture(by_command("compare"), [], tmp_path))
    assert [picture for _, picture in shown[:-1]] == [None, None]  # an old grid is cleared while it runs
    text, picture = shown[-1]
    assert text.endswith("[done]") and picture.size == (8, 4)


def test_the_page_has_the_lora_tools_tab_beside_the_dataset_tools(tmp_path):
    gr = pytest.importorskip("gradio")
    from trainer.gui import app

    blocks = app.build_app(cwd=tmp_path)
    tabs = {b.id: b for b in blocks.blocks.values() if isinstance(b, gr.Tab)}
    assert tabs["tools"].label == "Dataset tools" and tabs["lora_tools"].label == "LoRA tools"

    def accordions(tab):
        return [c.label for c in tab.children if isinstance(c, gr.Accordion)]
    assert accordions(tabs["lora_tools"]) == [t.title for t in tools.tools_of(tools.LORA_TAB)]
    assert accordions(tabs["tools"]) == [t.title for t in tools.tools_of(tools.DATASET_TAB)]
    compare = next(c for c in tabs["lora_tools"].children if getattr(c, "label", "") == by_command("compare").title)
    assert any(isinstance(c, gr.Image) for c in compare.children)
