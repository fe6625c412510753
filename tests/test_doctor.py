"""trainer.doctor: each check says OK / NOTE / WARN / FAIL with a fix, and the exit code follows FAIL only."""

from __future__ import annotations

import json
import types
from collections import namedtuple
from pathlib import Path

from trainer import doctor
from trainer.doctor import FAIL, NOTE, OK, WARN, Check


def importer_without(*missing):
    import importlib

    def load(name):
        if name in missing:
            raise ImportError(f"No module named '{name}'")
        return importlib.import_module(name)
    return load


def test_main_in_a_working_environment_exits_0(capsys):
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    assert "[OK  ] torch" in out and "Ready to train." in out


def test_missing_torch_fails_and_says_to_run_setup():
    (check,) = doctor.check_torch(importer_without("torch"))
    assert check.level == FAIL and "setup.sh" in check.fix and "setup.ps1" in check.fix


def test_cpu_torch_is_a_note_not_a_failure():
    checks = doctor.check_torch()
    assert all(c.level != FAIL for c in checks)


def test_missing_optional_modules_are_notes_and_essentials_fail():
    checks = {c.name: c for c in doctor.check_modules(importer_without("xformers", "bitsandbytes", "diffusers"))}
    assert checks["xformers"].level == NOTE and checks["bitsandbytes"].level == NOTE
    assert checks["diffusers"].level == FAIL and "setup" in checks["diffusers"].fix
    assert checks["safetensors"].level == OK


def test_clip_vocabulary_found_or_explained(tmp_path):
    assert doctor.check_clip_vocab(lambda: tmp_path / "bpe.txt.gz")[0].level == OK
    (missing,) = doctor.check_clip_vocab(lambda: None)
    assert missing.level == WARN and "clip-anytorch" in missing.fix
    assert doctor.check_clip_vocab()[0].level == OK  # the real package is installed here


def test_paths_with_spaces_and_japanese_are_noted_as_fine():
    (check,) = doctor.check_paths({"data": Path("/home/me/学習 データ")})
    assert check.level == NOTE and "spaces and non-ASCII" in check.detail and "fine" in check.detail


def test_python_outside_the_window_fails():
    assert doctor.check_python((3, 13))[0].level == FAIL
    assert doctor.check_python((3, 11))[0].level == OK


def test_venv_and_setup_record(tmp_path):
    assert doctor.check_venv("/usr", "/usr")[0].level == WARN
    (tmp_path / "trainer-setup.json").write_text(json.dumps(
        {"finished": "2026-11-25 10:00:00", "choice": {"variant": "cu128", "reason": "RTX 4090"}}), encoding="utf-8")
    venv, setup = doctor.check_venv(str(tmp_path), "/usr")
    assert venv.level == OK and setup.level == OK and "cu128" in setup.detail


def test_low_disk_warns():
    usage = namedtuple("usage", "total used free")
    (check,) = doctor.check_disk(Path("."), lambda p: usage(100, 99, 2 * 2**30))
    assert check.level == WARN and "2.0 GiB" in check.detail


def test_config_check_is_tolerant_and_reports_a_bad_file():
    def module_with(parse):
        return lambda name: types.SimpleNamespace(parse_train_args=parse)

    def reject(argv):
        raise ValueError(f"unknown key in {argv[1]}")

    assert doctor.check_config("x.toml", importer_without("trainer.config.args"))[0].level == NOTE
    assert doctor.check_config("x.toml", lambda name: types.SimpleNamespace())[0].level == NOTE
    assert doctor.check_config("x.toml", module_with(lambda argv: None))[0].level == OK
    (bad,) = doctor.check_config("x.toml", module_with(reject))
    assert bad.level == FAIL and "unknown key in x.toml" in bad.detail


def test_report_exit_code_follows_failures_only():
    lines = []
    assert doctor.report([Check(OK, "a", "x"), Check(WARN, "b", "y", "do z")], lines.append) == 0
    assert any("fix: do z" in line for line in lines)
    assert doctor.report([Check(FAIL, "c", "broken", "fix it")], lines.append) == 1
