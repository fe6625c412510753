"""The page's Tools tab: each form's values become the command line a console user would type, and the Run
button runs exactly that command."""

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
