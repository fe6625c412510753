"""The launchers: setup/train/gui .ps1, .cmd and .sh.

The PowerShell scripts cannot run here (Linux CI), so they are parsed with tree-sitter-powershell and their
argument path is checked in the syntax tree; their bytes (BOM, CRLF, ASCII) are checked as bytes. The bash
twins really run, in a temporary copy of the repo whose path has a space and Japanese characters, with a
fake Python that records what it receives.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PS1 = ("setup.ps1", "train.ps1", "gui.ps1", "scripts/launcher.ps1")
LAUNCHERS_PS1 = ("setup.ps1", "train.ps1", "gui.ps1")
CMD = ("setup.cmd", "train.cmd", "gui.cmd")
SH = ("setup.sh", "train.sh", "gui.sh")
BOM = b"\xef\xbb\xbf"


# ---------------------------------------------------------------------------------------------------
# Bytes


@pytest.mark.parametrize("name", PS1)
def test_ps1_is_utf8_with_bom_crlf_and_ascii(name):
    data = (REPO / name).read_bytes()
    assert data.startswith(BOM), "Windows PowerShell 5.1 reads a .ps1 without BOM as the ANSI code page"
    body = data[len(BOM):]
    assert body.isascii()
    assert body.count(b"\n") == body.count(b"\r\n") > 10 and b"\r\r" not in body


@pytest.mark.parametrize("name", CMD)
def test_cmd_shim_is_crlf_ascii_without_bom_and_bypasses_policy_for_its_process_only(name):
    data = (REPO / name).read_bytes()
    # A BOM would make cmd.exe read its bytes as part of "@echo off" and print an error, so none here.
    assert data.isascii() and not data.startswith(BOM)
    assert data.count(b"\n") == data.count(b"\r\n") > 2
    text = data.decode()
    script = name.replace(".cmd", ".ps1")
    assert f'powershell -NoProfile -ExecutionPolicy Bypass -File "%~dp0{script}" %*' in text
    assert "exit /b %ERRORLEVEL%" in text
    assert "Set-ExecutionPolicy" not in text


@pytest.mark.parametrize("name", SH)
def test_sh_is_lf_executable_and_passes_bash_n(name):
    path = REPO / name
    assert b"\r" not in path.read_bytes()
    assert path.stat().st_mode & stat.S_IXUSR
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_gitattributes_keeps_line_endings():
    rules = (REPO / ".gitattributes").read_text(encoding="utf-8").splitlines()
    for rule in ("*.ps1 text eol=crlf", "*.cmd text eol=crlf", "*.sh text eol=lf"):
        assert rule in rules


# ---------------------------------------------------------------------------------------------------
# PowerShell syntax trees


@pytest.fixture(scope="module")
def parse():
    ts = pytest.importorskip("tree_sitter")
    tsp = pytest.importorskip("tree_sitter_powershell")
    language = ts.Language(tsp.language())
    parser = ts.Parser(language)
    return lambda name: parser.parse((REPO / name).read_bytes()[len(BOM):]).root_node


def nodes(root, kind):
    found, stack = [], [root]
    while stack:
        node = stack.pop()
        if node.type == kind:
            found.append(node)
        stack.extend(reversed(node.children))
    return found


def text(node) -> str:
    return node.text.decode()


def command_names(root) -> set[str]:
    return {text(n) for c in nodes(root, "command") for n in c.children if n.type == "command_name"}


@pytest.mark.parametrize("name", PS1)
def test_ps1_parses_without_errors(parse, name):
    root = parse(name)
    assert not root.has_error, [(e.start_point, text(e)[:60]) for e in nodes(root, "ERROR")]


@pytest.mark.parametrize("name", PS1)
def test_ps1_is_powershell_51_compatible_and_never_changes_the_policy(parse, name):
    source = (REPO / name).read_text(encoding="utf-8-sig")
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("#"))
    assert "&&" not in code and "||" not in code  # pipeline chains are PowerShell 7 only
    names = command_names(parse(name))
    assert "Set-ExecutionPolicy" not in names
    assert not any("Activate" in n for n in names)


def test_train_ps1_param_block_takes_config_and_all_remaining_arguments(parse):
    root = parse("train.ps1")
    block = nodes(root, "param_block")[0]
    assert "PositionalBinding = $false" in text(block)  # else "--config_file" would bind to -Config
    params = {text(v): text(p) for p in nodes(block, "script_parameter") for v in p.children if v.type == "variable"}
    assert set(params) == {"$Config", "$Rest"}
    assert params["$Config"].startswith("[string]")
    assert "ValueFromRemainingArguments = $true" in params["$Rest"]


def test_train_ps1_passes_config_and_rest_to_the_venv_python_and_returns_its_exit_code(parse):
    root = parse("train.ps1")
    source = text(root)
    # -Config becomes --config_file, then every remaining argument in order, into one array ...
    assert '$PyArgs += "--config_file"' in source and "$PyArgs += $configPath" in source
    loop = next(f for f in nodes(root, "foreach_statement") if "@($Rest)" in text(f))
    assert "$PyArgs += ConvertTo-ArgText $item" in text(loop)
    # ... which is splatted onto the venv's python, whose exit code the script returns.
    call = next(c for c in nodes(root, "command") if text(c).startswith("& $VenvPy"))
    elements = [text(n) for n in nodes(call, "generic_token")] + [text(n) for n in nodes(call, "variable")]
    assert ["trainer", "train"] == elements[:2] and "@PyArgs" in elements
    assert_python_call_in_child_environment(source, text(call))
    assert 'Join-Path $Root ".venv\\Scripts\\python.exe"' in source


def assert_python_call_in_child_environment(source: str, call: str) -> None:
    """The shared helper sets the child's environment just before the call and restores it in `finally`;
    the exit code is taken right after the call and returned."""
    before, after = source[:source.index(call)], source[source.index(call):]
    assert before.rstrip().endswith("$saved = Set-ChildEnvironment $Root\r\ntry {")
    assert after.index("$code = $LASTEXITCODE") < after.index("} finally {") < \
        after.index("Restore-ChildEnvironment $saved") < after.index("exit $code")


@pytest.mark.parametrize("name", LAUNCHERS_PS1)
def test_launchers_share_one_helper_for_arguments_and_the_child_environment(parse, name):
    source = text(parse(name))
    assert '. (Join-Path $Root "scripts\\launcher.ps1")' in source
    defined = {text(n) for f in nodes(parse(name), "function_statement") for n in f.children
               if n.type == "function_name"}
    assert not defined & {"ConvertTo-ArgText", "Set-ChildEnvironment", "Restore-ChildEnvironment"}
    assert "$env:PYTHON" not in source  # only the helper touches the child's environment


def test_launcher_helper_sets_utf8_and_the_repo_on_pythonpath_and_restores_them(parse):
    root = parse("scripts/launcher.ps1")
    source = text(root)
    functions = {text(n): text(f) for f in nodes(root, "function_statement") for n in f.children
                 if n.type == "function_name"}
    assert set(functions) == {"ConvertTo-ArgText", "Assert-VenvExists", "Set-ChildEnvironment",
                              "Restore-ChildEnvironment"}
    body = functions["Set-ChildEnvironment"]
    for name, value in (("PYTHONUTF8", '"1"'), ("PYTHONIOENCODING", '"utf-8"')):
        assert f"$env:{name} = {value}" in body
    assert "$env:PYTHONPATH = $Root" in body and "return $saved" in body
    assert "SetEnvironmentVariable($name, $Saved[$name], \"Process\")" in functions["Restore-ChildEnvironment"]
    assert "run .\\setup.ps1" in functions["Assert-VenvExists"]
    # Loading it must run nothing: only function definitions (and comments) at its top level.
    top = [c for c in nodes(root, "statement_list")[0].children if c.type not in ("comment",)]
    assert all(text(c).startswith("function ") for c in top)


def test_gui_ps1_passes_every_argument_to_trainer_gui_and_returns_its_exit_code(parse):
    root = parse("gui.ps1")
    source = text(root)
    block = nodes(root, "param_block")[0]
    assert "PositionalBinding = $false" in text(block)  # else "--port" would bind to a parameter
    params = {text(v): text(p) for p in nodes(block, "script_parameter") for v in p.children if v.type == "variable"}
    assert set(params) == {"$Rest"} and "ValueFromRemainingArguments = $true" in params["$Rest"]
    loop = next(f for f in nodes(root, "foreach_statement") if "@($Rest)" in text(f))
    # The helper's argument conversion, as train.ps1, so both launchers treat 7861 or "D:\my dir\" alike.
    assert "$PyArgs += ConvertTo-ArgText $item" in text(loop)
    call = next(c for c in nodes(root, "command") if text(c).startswith("& $VenvPy"))
    assert text(call) == "& $VenvPy -m trainer gui @PyArgs"
    assert_python_call_in_child_environment(source, text(call))
    assert "$Root = $PSScriptRoot" in source and 'Join-Path $Root ".venv\\Scripts\\python.exe"' in source
    assert "Assert-VenvExists $VenvPy" in source


def test_train_ps1_without_arguments_shows_usage_with_presets(parse):
    source = text(parse("train.ps1"))
    assert "if (-not $Config -and -not $hasRest) {\r\n    Show-Usage\r\n    exit 1" in source
    assert '(Join-Path $Root "presets") -Filter "*.toml"' in source
    assert source.index("Show-Usage\r\n    exit 1") < source.index("Assert-VenvExists $VenvPy")


def test_setup_ps1_finds_python_safely_and_hands_over_to_trainer_setup(parse):
    root = parse("setup.ps1")
    source = text(root)
    params = {text(v) for p in nodes(nodes(root, "param_block")[0], "script_parameter")
              for v in p.children if v.type == "variable"}
    assert params == {"$Dev", "$Cpu", "$Force", "$Python"}
    assert 'Get-PythonInfo "py" @("-$v")' in source  # the version is its own argument
    assert 'foreach ($v in @("3.12", "3.11", "3.10"))' in source
    assert '-like "*\\WindowsApps\\*"' in source
    assert "Unblock-File" in command_names(root)
    call = next(c for c in nodes(root, "command") if text(c).startswith("& $VenvPy"))
    assert text(call) == "& $VenvPy -m trainer setup @setupArgs"
    assert_python_call_in_child_environment(source, text(call))
    assert source.index("Unblock-Tree\r\n") < source.index('. (Join-Path $Root "scripts\\launcher.ps1")')
    for flag, arg in (("$Dev", "--dev"), ("$Cpu", "--cpu"), ("$Force", "--force")):
        assert f'if ({flag}) {{ $setupArgs += "{arg}" }}' in source
    assert "$code = $LASTEXITCODE" in source and source.rstrip().endswith("exit $code")
    assert "$Root = $PSScriptRoot" in source


# ---------------------------------------------------------------------------------------------------
# The bash twins, really run

FAKE_VENV_PYTHON = """#!/usr/bin/env bash
# Stands in for .venv/bin/python: answers the version probe, records everything else.
if [ "$1" = "-c" ]; then echo "${FAKE_VENV_VERSION:-3.11} $0"; exit 0; fi
log="$(dirname "$0")/../calls"
{ printf 'PYTHONPATH=%s\\n' "$PYTHONPATH"; printf 'PYTHONUTF8=%s\\n' "${PYTHONUTF8:-}"; } > "$log.env"
printf '%s\\0' "$@" > "$log"
exit "${FAKE_RC:-0}"
"""

FAKE_BASE_PYTHON = """#!/usr/bin/env bash
# Stands in for a system python3.x: answers the version probe and makes a venv with the fake above.
if [ "$1" = "-c" ]; then echo "${FAKE_BASE_VERSION:-3.11} $0"; exit 0; fi
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin" && cp "$(dirname "$0")/fake-venv-python" "$3/bin/python" && touch "$3/pyvenv.cfg"
    echo "made venv" >> "$(dirname "$0")/venv-made"
    exit 0
fi
exit 99
"""


@pytest.fixture
def repo_copy(tmp_path):
    root = tmp_path / "my 学習 folder"
    root.mkdir()
    for name in SH:
        shutil.copy2(REPO / name, root / name)
    (root / "presets").mkdir()
    (root / "presets" / "demo.toml").write_text("", encoding="utf-8")
    (root / "presets" / "sdxl_12gb.toml").write_text("", encoding="utf-8")
    tools = tmp_path / "tools"
    tools.mkdir()
    for name, body in (("fake-venv-python", FAKE_VENV_PYTHON), ("python3-fake", FAKE_BASE_PYTHON)):
        (tools / name).write_text(body, encoding="utf-8")
        (tools / name).chmod(0o755)
    return root


def make_venv(root: Path) -> None:
    (root / ".venv" / "bin").mkdir(parents=True)
    shutil.copy2(root.parent / "tools" / "fake-venv-python", root / ".venv" / "bin" / "python")
    (root / ".venv" / "pyvenv.cfg").write_text("", encoding="utf-8")


def received(root: Path) -> list[str]:
    return (root / ".venv" / "calls").read_bytes().decode().split("\0")[:-1]


def run(root: Path, script: str, *args: str, env: dict | None = None, cwd: Path | None = None):
    full_env = {**os.environ, **(env or {})}
    full_env.pop("PYTHONPATH", None)
    return subprocess.run(["bash", str(root / script), *args], cwd=cwd or root.parent, env=full_env,
                          capture_output=True, text=True, timeout=60)


def test_train_sh_passes_arguments_unchanged_and_returns_the_exit_code(repo_copy):
    make_venv(repo_copy)
    args = ["--config_file", "presets/demo.toml", "--output_name", "my lora 猫", "--caption_prefix", "",
            "--resolution", "512,768", "--sample_prompts", "a 'quoted' \"prompt\" $HOME * ?"]
    done = run(repo_copy, "train.sh", *args, env={"FAKE_RC": "7"})
    assert done.returncode == 7
    assert received(repo_copy) == ["-m", "trainer", "train", *args]
    env = (repo_copy / ".venv" / "calls.env").read_text(encoding="utf-8")
    assert f"PYTHONPATH={repo_copy}\n" in env and "PYTHONUTF8=1" in env


def test_train_sh_without_arguments_prints_usage_with_the_presets(repo_copy):
    make_venv(repo_copy)
    done = run(repo_copy, "train.sh")
    assert done.returncode == 1
    assert "presets/demo.toml" in done.stdout and "presets/sdxl_12gb.toml" in done.stdout
    assert not (repo_copy / ".venv" / "calls").exists()


def test_train_sh_without_venv_says_to_run_setup(repo_copy):
    done = run(repo_copy, "train.sh", "--config_file", "presets/demo.toml")
    assert done.returncode == 1 and "./setup.sh" in done.stderr


def test_gui_sh_passes_arguments_unchanged_and_returns_the_exit_code(repo_copy, tmp_path):
    make_venv(repo_copy)
    done = run(repo_copy, "gui.sh", "--port", "7861", "--no_browser", env={"FAKE_RC": "5"}, cwd=tmp_path)
    assert done.returncode == 5
    assert received(repo_copy) == ["-m", "trainer", "gui", "--port", "7861", "--no_browser"]
    env = (repo_copy / ".venv" / "calls.env").read_text(encoding="utf-8")
    assert f"PYTHONPATH={repo_copy}\n" in env and "PYTHONUTF8=1" in env
    # No arguments is the usual way to open the page: no usage text, straight to Python.
    assert run(repo_copy, "gui.sh").returncode == 0
    assert received(repo_copy) == ["-m", "trainer", "gui"]


def test_gui_sh_without_venv_says_to_run_setup(repo_copy):
    done = run(repo_copy, "gui.sh")
    assert done.returncode == 1 and "./setup.sh" in done.stderr


def test_setup_sh_makes_the_venv_and_hands_over_flags_from_any_directory(repo_copy, tmp_path):
    fake = str(tmp_path / "tools" / "python3-fake")
    done = run(repo_copy, "setup.sh", "--dev", "--cpu", "--python", fake, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert received(repo_copy) == ["-m", "trainer", "setup", "--dev", "--cpu"]
    assert f"PYTHONPATH={repo_copy}\n" in (repo_copy / ".venv" / "calls.env").read_text(encoding="utf-8")
    # Second run: the venv is fine, so it is reused, not rebuilt.
    assert run(repo_copy, "setup.sh", "--python", fake).returncode == 0
    assert (tmp_path / "tools" / "venv-made").read_text().count("made venv") == 1


def test_setup_sh_propagates_a_failure_and_never_claims_success(repo_copy, tmp_path):
    fake = str(tmp_path / "tools" / "python3-fake")
    done = run(repo_copy, "setup.sh", "--python", fake, env={"FAKE_RC": "3"})
    assert done.returncode == 3
    assert "did not finish" in done.stderr and "finished." not in done.stdout


def test_setup_sh_rebuilds_a_venv_whose_python_is_out_of_range(repo_copy, tmp_path):
    make_venv(repo_copy)
    fake = str(tmp_path / "tools" / "python3-fake")
    # The existing venv's python says 3.9: it is deleted and made again from the 3.11 base, then used.
    done = run(repo_copy, "setup.sh", "--python", fake, env={"FAKE_VENV_VERSION": "3.9"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Rebuilding .venv" in done.stdout
    assert (tmp_path / "tools" / "venv-made").exists()
    assert received(repo_copy) == ["-m", "trainer", "setup"]


def test_setup_sh_refuses_a_python_outside_the_window(repo_copy, tmp_path):
    fake = str(tmp_path / "tools" / "python3-fake")
    done = run(repo_copy, "setup.sh", "--python", fake, env={"FAKE_BASE_VERSION": "3.13"})
    assert done.returncode == 1 and "3.10-3.12" in done.stderr
    assert not (repo_copy / ".venv").exists()


def test_setup_sh_rejects_unknown_options(repo_copy):
    done = run(repo_copy, "setup.sh", "--gpu")
    assert done.returncode == 2 and "unknown option" in done.stderr
