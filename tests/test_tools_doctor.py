"""trainer.tools.doctor: each check says OK / NOTE / WARN / FAIL with a fix, and the exit code follows FAIL only."""

from __future__ import annotations

import json
import types
from collections import namedtuple
from pathlib import Path

from trainer.tools import doctor
from trainer.tools.doctor import FAIL, NOTE, OK, WARN, Check


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
    checks = {c.name: c for c in doctor.check_modules(importer_without("xformers", "bitsandbytes", "gradio",
                                                                             "diffusers"))}
    assert checks["xformers"].level == NOTE and checks["bitsandbytes"].level == NOTE
    assert checks["gradio"].level == NOTE and "GUI" in checks["gradio"].detail
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


# --- doctor --config: does the config fit this card ------------------------------------------------------------

PRESETS = Path(__file__).resolve().parents[1] / "presets"


def test_stated_peak_is_read_from_the_preset_comment(tmp_path):
    assert doctor.stated_peak_gb(PRESETS / "sd15-6gb.toml") == 3.0  # "about 3.0 GB on the card (2.3 GB allocated ...)"
    measured = tmp_path / "p.toml"
    measured.write_text("# SD for a 6 GB card\n# Expected peak VRAM: 4.2 GB (measured on an RTX 2060)\n\n"
                        "[model]\n", encoding="utf-8")
    assert doctor.stated_peak_gb(measured) == 4.2
    plain = tmp_path / "plain.toml"
    plain.write_text("# for an 8 GB card\n[model]\n", encoding="utf-8")
    assert doctor.stated_peak_gb(plain) is None and doctor.stated_peak_gb(tmp_path / "missing.toml") is None


def test_config_that_fits_is_ok_and_low_free_memory_warns():
    config = str(PRESETS / "sd15-8gb.toml")
    card = doctor.Card("RTX 3070", total_gb=8.0, free_gb=7.6)
    (fits,) = doctor.check_vram(config, detect=lambda: card, estimate=lambda c: (4.2, "estimated"))
    assert fits.level == OK and "4.2 GB" in fits.detail and "RTX 3070" in fits.detail
    busy = doctor.Card("RTX 3070", total_gb=8.0, free_gb=3.0)
    checks = doctor.check_vram(config, detect=lambda: busy, estimate=lambda c: (4.2, "estimated"))
    assert [c.level for c in checks] == [OK, WARN] and "close GPU programs" in checks[1].fix


def test_config_too_big_for_the_card_names_the_tier_and_settings_to_step_down_to():
    card = doctor.Card("GTX 1660", total_gb=6.0, free_gb=5.8)
    (check,) = doctor.check_vram(str(PRESETS / "sd15-12gb.toml"), detect=lambda: card,
                                 estimate=lambda c: (9.0, "estimated"))
    assert check.level == WARN and "does not fit" in check.detail
    assert "presets/sd15-6gb.toml" in check.fix.replace("\\", "/") and "gradient_checkpointing = true" in check.fix


def test_without_estimate_the_stated_peak_is_used_and_without_gpu_it_is_a_note():
    def no_estimate(config):
        raise ImportError("no torch")

    (check,) = doctor.check_vram(str(PRESETS / "sd15-6gb.toml"), detect=lambda: None, estimate=no_estimate)
    assert check.level == NOTE and "no NVIDIA GPU" in check.detail and "3.0 GB" in check.detail  # "on the card": no second margin


def test_doctor_config_estimates_the_memory_of_a_real_config(capsys):
    assert doctor.main(["--config", str(PRESETS / "demo.toml")]) == 0
    out = capsys.readouterr().out
    assert "VRAM" in out and "tiny-sd1 at 64x64, batch 4" in out


def test_doctor_config_runs_the_same_pre_flight_as_the_gui_check(train_data_dir, tmp_path, tiny_sd1_dir):
    config = tmp_path / "my.toml"
    config.write_text(f'pretrained_model_name_or_path = "{tiny_sd1_dir.as_posix()}"\n'
                      f'train_data_dir = "{train_data_dir.as_posix()}"\ncaption_extension = ".txt"\n'
                      f'resolution = "64"\nmetadata_trigger_phrase = "mychar"\noutput_dir = "{(tmp_path / "out").as_posix()}"\n',
                      encoding="utf-8")
    checks = doctor.check_dataset(str(config))
    text = [c.detail for c in checks]
    assert [c for c in checks if c.level == FAIL] == []
    assert any("4 image(s) x 10 repeat(s)" in t for t in text), text
    assert any(c.level == WARN and "trigger word will not be learned" in c.detail for c in checks)
    missing = tmp_path / "missing.toml"
    missing.write_text(config.read_text(encoding="utf-8").replace(train_data_dir.as_posix(), "no/such/folder"),
                       encoding="utf-8")
    assert any(c.level == FAIL and "no/such/folder" in c.detail.replace("\\", "/")
               for c in doctor.check_dataset(str(missing)))


def test_picture_progress_shows_only_when_many_pictures_are_decoded():
    import io

    out = io.StringIO()
    line = doctor.ProgressLine(quiet_below=3, stream=out)
    for done in range(0, 5):
        line(done, 4)
    assert out.getvalue().endswith("checking pictures 4/4\n")
    quiet = io.StringIO()
    cached = doctor.ProgressLine(quiet_below=3, stream=quiet)
    for done in (3, 4):  # three of four came from the cache
        cached(done, 4)
    assert quiet.getvalue() == ""
