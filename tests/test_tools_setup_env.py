"""trainer.tools.setup_env: nvidia-smi -> torch build, the pip plan, the idempotency stamp, the index fallback.

Nothing here runs pip, nvidia-smi or the network: a FakeWorld stands in for all of them.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from trainer.tools import setup_env
from trainer.tools.setup_env import (
    GPU,
    TORCH_VERSION,
    Context,
    arch_supported,
    choose_torch,
    detect_gpus,
    judge_verification,
    parse_nvidia_smi,
    plan_steps,
    probe_index,
)

REPO = Path(__file__).resolve().parents[1]

SMI_NONE = ""
SMI_OLD_DRIVER = "NVIDIA GeForce GTX 1080, 470.82.01, 6.1, 8192 MiB\n"
SMI_4090 = "NVIDIA GeForce RTX 4090, 575.57.08, 8.9, 24564 MiB\n"
SMI_4090_560 = "NVIDIA GeForce RTX 4090, 560.94, 8.9, 24564 MiB\n"
SMI_5090 = "NVIDIA GeForce RTX 5090, 576.02, 12.0, 32607 MiB\n"
SMI_5090_580 = "NVIDIA GeForce RTX 5090, 581.57, 12.0, 32607 MiB\n"
SMI_5090_OLD = "NVIDIA GeForce RTX 5090, 560.94, 12.0, 32607 MiB\n"
SMI_1080_NEW = "NVIDIA GeForce GTX 1080 Ti, 581.57, 6.1, 11264 MiB\n"
SMI_1660 = "NVIDIA GeForce GTX 1660 SUPER, 566.36, 7.5, 6144 MiB\n"
SMI_3060_5090 = ("NVIDIA GeForce RTX 3060, 575.57.08, 8.6, 12288 MiB\n"
                 "NVIDIA GeForce RTX 5090, 575.57.08, 12.0, 32607 MiB\n")
SMI_1080_5090 = ("NVIDIA GeForce GTX 1080, 575.57.08, 6.1, 8192 MiB\n"
                 "NVIDIA GeForce RTX 5090, 575.57.08, 12.0, 32607 MiB\n")


def choose(smi_text: str, *, system: str = "Linux", force_cpu: bool = False):
    gpus = parse_nvidia_smi(smi_text)
    return choose_torch(gpus, gpus[0].driver_version if gpus else None, force_cpu, system=system)


# ---------------------------------------------------------------------------------------------------
# nvidia-smi -> choice


def test_parse_nvidia_smi_reads_every_gpu_and_skips_junk():
    text = SMI_3060_5090 + "No devices were found\n" + "Tesla T4, 535.104.05, 7.5, [N/A]\n"
    gpus = parse_nvidia_smi(text)
    assert [g.name for g in gpus] == ["NVIDIA GeForce RTX 3060", "NVIDIA GeForce RTX 5090", "Tesla T4"]
    assert gpus[1] == GPU("NVIDIA GeForce RTX 5090", "575.57.08", (12, 0), 32607)
    assert gpus[2].memory_mib is None


def test_no_gpu_gives_the_cpu_build():
    choice = choose(SMI_NONE)
    assert choice.variant == "cpu" and choice.index_url.endswith("/whl/cpu")
    assert choice.xformers is None and choice.bitsandbytes is None
    assert "no NVIDIA GPU" in choice.reason
    assert choice.torch_requirement == f"torch=={TORCH_VERSION}+cpu"


@pytest.mark.parametrize("system, minimum", [("Linux", "525.60.13"), ("Windows", "528.33")])
def test_driver_too_old_for_any_cuda_build_gives_cpu_and_says_update(system, minimum):
    choice = choose(SMI_OLD_DRIVER, system=system)
    assert choice.variant == "cpu"
    assert "470.82.01" in choice.reason and minimum in choice.reason and "update the driver" in choice.reason


def test_new_driver_gets_cu128_with_a_matching_xformers_wheel():
    choice = choose(SMI_4090)
    assert choice.variant == "cu128"
    assert choice.index_url == "https://download.pytorch.org/whl/cu128"
    assert choice.torch_requirement == f"torch=={TORCH_VERSION}+cu128"
    assert choice.version == TORCH_VERSION == "2.13.0"
    assert choice.xformers == "xformers>=0.0.35"  # 0.0.35+ are the wheels built for torch>=2.10
    assert choice.bitsandbytes


def test_driver_between_builds_gets_the_older_build_and_says_what_the_newer_needs():
    choice = choose(SMI_4090_560, system="Windows")
    assert choice.variant == "cu126"
    assert "cu128 needs driver >= 570.65" in choice.reason


@pytest.mark.parametrize("smi, system, variant", [(SMI_5090, "Windows", "cu128"), (SMI_5090_580, "Linux", "cu130"),
                                                  (SMI_5090_580, "Windows", "cu130")])
def test_rtx_50_series_sm120_never_gets_a_build_older_than_cu128(smi, system, variant):
    choice = choose(smi, system=system)
    assert choice.variant == variant
    assert "sm_120" in choice.reason


def test_rtx_50_series_with_a_driver_too_old_for_cu128_gets_cpu_and_the_driver_to_install():
    choice = choose(SMI_5090_OLD, system="Windows")
    assert choice.variant == "cpu"
    assert "cu128" in choice.reason and "570.65" in choice.reason


def test_gtx_10xx_stays_on_cu126_even_with_a_new_driver_and_gets_a_note():
    choice = choose(SMI_1080_NEW)
    assert choice.variant == "cu126"  # cu128/cu130 ship no Pascal kernels
    assert any("Pascal" in note for note in choice.notes)


def test_gtx_16xx_note_mentions_fp16_nan():
    choice = choose(SMI_1660)
    assert choice.variant == "cu126"
    assert any("--mixed_precision no" in note for note in choice.notes)


def test_multiple_gpus_get_a_build_that_covers_all_of_them():
    assert choose(SMI_3060_5090).variant == "cu128"


def test_multiple_gpus_no_build_covers_all_prefers_the_big_card_and_names_the_other():
    choice = choose(SMI_1080_5090)
    assert choice.variant == "cu128"
    assert any("GTX 1080" in note and "CUDA_VISIBLE_DEVICES" in note for note in choice.notes)


def test_force_cpu_wins_over_a_gpu():
    choice = choose(SMI_4090, force_cpu=True)
    assert choice.variant == "cpu" and "--cpu" in choice.reason


def test_macos_uses_plain_pypi_torch():
    choice = choose(SMI_NONE, system="Darwin")
    assert choice.index_url is None and choice.torch_requirement == f"torch=={TORCH_VERSION}"


def test_arch_supported_follows_cuda_binary_compatibility():
    assert arch_supported((8, 9), ["sm_80", "sm_86"])  # Ada runs Ampere sm_86 kernels
    assert not arch_supported((12, 0), ["sm_50", "sm_90"])  # no Blackwell kernels
    assert not arch_supported((6, 1), ["sm_70", "sm_120"])
    assert arch_supported((12, 0), ["sm_90", "compute_90"])  # PTX is compiled by the driver
    assert arch_supported(None, [])


class FakeCapture:
    def __init__(self, answers):
        self.answers, self.calls = list(answers), []

    def __call__(self, cmd):
        self.calls.append(list(cmd))
        return self.answers.pop(0)


def test_detect_gpus_missing_or_failing_nvidia_smi_means_no_gpu():
    assert detect_gpus(FakeCapture([]), None) == []
    assert detect_gpus(FakeCapture([(9, "NVIDIA-SMI has failed"), (9, "failed")]), "nvidia-smi") == []


def test_detect_gpus_asks_old_drivers_without_compute_cap():
    capture = FakeCapture([(6, 'Field "compute_cap" is not a valid field to query.'),
                           (0, "GeForce GTX 970, 390.77, 4096 MiB\n")])
    gpus = detect_gpus(capture, "nvidia-smi")
    assert gpus == [GPU("GeForce GTX 970", "390.77", None, 4096)]
    assert "compute_cap" in capture.calls[0][1] and "compute_cap" not in capture.calls[1][1]
    assert choose_torch(gpus, "390.77", False).variant == "cpu"


# ---------------------------------------------------------------------------------------------------
# The pip plan


def commands(choice, *, dev=False, use_index=True):
    steps = plan_steps(choice, python="PY", repo_root=Path("/repo"), constraints=Path("/venv/c.txt"), dev=dev,
                       use_index=use_index)
    return {s.name: s for s in steps}


def test_plan_installs_torch_from_the_chosen_index_first_and_everything_under_the_constraints():
    steps = commands(choose(SMI_4090), dev=True)
    names = list(steps)
    assert names[0] == "torch"
    torch_cmd = steps["torch"].cmd
    assert f"torch=={TORCH_VERSION}+cu128" in torch_cmd
    assert torch_cmd[torch_cmd.index("--index-url") + 1] == "https://download.pytorch.org/whl/cu128"
    reqs = steps["requirements"].cmd
    assert "/repo/requirements.txt" in reqs and "/repo/requirements-dev.txt" in reqs
    assert reqs[reqs.index("-c") + 1] == "/venv/c.txt"
    assert "--only-binary=:all:" in steps["xformers"].cmd and "-c" in steps["xformers"].cmd
    assert not steps["xformers"].required and not steps["bitsandbytes"].required
    assert steps["CLIP vocabulary"].cmd[-2:] == ("--no-deps", "clip-anytorch==2.6.0")
    every_word = " ".join(" ".join(s.cmd) for s in steps.values())
    assert "torchvision" not in every_word


def test_plan_for_cpu_has_no_xformers_and_no_dev_file_without_dev():
    steps = commands(choose(SMI_NONE))
    assert "xformers" not in steps and "bitsandbytes" not in steps
    assert "/repo/requirements-dev.txt" not in steps["requirements"].cmd


@pytest.mark.parametrize("smi", [SMI_NONE, SMI_4090])
def test_plan_installs_the_gui_as_an_optional_wheels_only_step_on_every_build(smi):
    names = list(commands(choose(smi)))
    gradio = commands(choose(smi))["gradio"]
    assert not gradio.required
    assert gradio.cmd[-4:] == ("--only-binary=:all:", setup_env.GRADIO_SPEC, "-c", "/venv/c.txt")
    assert names.index("gradio") > names.index("requirements")  # after torch is pinned
    assert "GUI" in gradio.fix and "pip install" in gradio.fix and "training works without it" in gradio.fix


def test_plan_without_the_index_is_plain_pinned_torch():
    torch_cmd = commands(choose(SMI_NONE), use_index=False)["torch"].cmd
    assert "--index-url" not in torch_cmd and torch_cmd[-1] == f"torch=={TORCH_VERSION}"


# ---------------------------------------------------------------------------------------------------
# main(): a fake world


def verify_output(*, cuda=False, devices=(), arch_list=(), missing=(), gradio=True):
    modules = {m: "1.0" for m in setup_env.REQUIRED_MODULES if m not in missing}
    report = {"modules": modules, "errors": {m: "ImportError: nope" for m in missing},
              "optional": {"xformers": "0.0.35" if cuda else None, "bitsandbytes": None,
                           "gradio": "6.31.0" if gradio else None}, "cuda": cuda,
              "devices": [list(d) for d in devices], "arch_list": list(arch_list)}
    return "some warning from a library\n" + setup_env.VERIFY_MARKER + json.dumps(report) + "\n"


class FakeWorld:
    """pip, nvidia-smi, the index and the installed packages, all recorded."""

    def __init__(self, tmp_path: Path, *, smi: str = SMI_NONE, index_up: bool = False, fail_step: str = "",
                 verify: str | None = None):
        self.repo = tmp_path / "repo"
        self.repo.mkdir(exist_ok=True)
        for name in ("requirements.txt", "requirements-dev.txt"):
            if not (self.repo / name).exists():
                shutil.copy(REPO / name, self.repo / name)
        self.venv = tmp_path / "venv"
        self.venv.mkdir(exist_ok=True)
        self.smi, self.index_up, self.fail_step = smi, index_up, fail_step
        self.verify = verify if verify is not None else verify_output()
        self.pip_calls: list[list[str]] = []
        self.probed: list[str] = []
        self.lines: list[str] = []
        self.installed = {d: "2.13.0+cpu" if d == "torch" else "1.0"
                          for d in setup_env.REQUIRED_DISTS + setup_env.DEV_DISTS}

    def run(self, cmd):
        self.pip_calls.append(list(cmd))
        return 1 if self.fail_step and self.fail_step in " ".join(cmd) else 0

    def capture(self, cmd):
        if cmd[0] == "nvidia-smi":
            return (0, self.smi) if self.smi else (9, "NVIDIA-SMI has failed")
        assert cmd[1] == "-c"
        return 0, self.verify

    def probe(self, url):
        self.probed.append(url)
        return self.index_up

    def context(self, **overrides) -> Context:
        values = dict(run=self.run, capture=self.capture, probe=self.probe, version_of=self.installed.get,
                      python="PY", venv_dir=self.venv, repo_root=self.repo, system="Linux", in_venv=True,
                      smi="nvidia-smi", out=self.lines.append)
        values.update(overrides)
        return Context(**values)

    def main(self, *argv, **overrides) -> int:
        self.pip_calls.clear()
        self.lines.clear()
        return setup_env.main(list(argv), self.context(**overrides))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def stamp(self) -> dict:
        return json.loads((self.venv / setup_env.STAMP_NAME).read_text(encoding="utf-8"))


def test_first_run_installs_records_and_second_run_calls_no_pip(tmp_path):
    world = FakeWorld(tmp_path)
    assert world.main() == 0
    assert world.pip_calls[0][-1] == f"torch=={TORCH_VERSION}"
    assert len(world.pip_calls) == 5  # torch, requirements, CLIP vocabulary, gradio, then the doctor
    assert world.pip_calls[-1] == ["PY", "-m", "trainer", "doctor"]
    assert world.stamp["choice"]["variant"] == "cpu" and world.stamp["dev"] is False
    assert "Setup finished." in world.text

    start = time.perf_counter()
    assert world.main() == 0
    assert world.pip_calls == []
    assert "Nothing changed" in world.text and "SETUP FAILED" not in world.text
    assert time.perf_counter() - start < 2


def test_changed_requirements_force_or_a_missing_package_reinstall(tmp_path):
    world = FakeWorld(tmp_path)
    assert world.main() == 0
    assert world.main("--force") == 0 and world.pip_calls
    assert world.main() == 0 and not world.pip_calls
    with open(world.repo / "requirements.txt", "a", encoding="utf-8") as f:
        f.write("tqdm>=4\n")
    assert world.main() == 0 and world.pip_calls
    del world.installed["diffusers"]
    assert world.main() == 0 and world.pip_calls


def test_dev_extras_install_once_and_stay_part_of_the_target(tmp_path):
    world = FakeWorld(tmp_path)
    assert world.main() == 0
    assert world.main("--dev") == 0
    assert any(str(world.repo / "requirements-dev.txt") in c for c in world.pip_calls)
    assert world.main() == 0 and world.pip_calls == []  # plain setup after --dev: nothing to do
    assert world.stamp["dev"] is True


def test_unreachable_index_falls_back_to_plain_pip_and_says_so(tmp_path):
    world = FakeWorld(tmp_path, index_up=False)
    assert world.main() == 0
    assert world.probed == ["https://download.pytorch.org/whl/cpu"]
    torch_cmd = world.pip_calls[0]
    assert "--index-url" not in torch_cmd and torch_cmd[-1] == f"torch=={TORCH_VERSION}"
    assert "cannot be reached" in world.text and "falling back" in world.text
    assert (world.venv / setup_env.CONSTRAINTS_NAME).read_text().splitlines()[-1] == f"torch=={TORCH_VERSION}"


def test_reachable_index_is_used_for_torch_and_xformers(tmp_path):
    verify = verify_output(cuda=True, devices=[("RTX 4090", (8, 9))], arch_list=["sm_80", "sm_86", "sm_90"])
    world = FakeWorld(tmp_path, smi=SMI_4090, index_up=True, verify=verify)
    assert world.main() == 0
    torch_cmd = world.pip_calls[0]
    assert torch_cmd[torch_cmd.index("--index-url") + 1].endswith("/cu128")
    xformers = next(c for c in world.pip_calls if "xformers>=0.0.35" in c)
    assert "--only-binary=:all:" in xformers
    constraints = (world.venv / setup_env.CONSTRAINTS_NAME).read_text()
    assert f"torch=={TORCH_VERSION}+cu128" in constraints
    assert world.stamp["cuda"] is True


def test_gpu_choice_with_unreachable_index_and_no_cuda_fails_closed(tmp_path):
    world = FakeWorld(tmp_path, smi=SMI_4090, index_up=False, verify=verify_output(cuda=False))
    assert world.main() == 1
    assert "SETUP FAILED" in world.text and "--cpu" in world.text
    assert "Setup finished" not in world.text
    assert not (world.venv / setup_env.STAMP_NAME).exists()


def test_required_step_failure_stops_at_once_with_the_next_action(tmp_path):
    world = FakeWorld(tmp_path, fail_step="requirements.txt")
    assert world.main() == 1
    assert len(world.pip_calls) == 2  # torch, then the failing requirements step; nothing after it
    assert "SETUP FAILED at step 'requirements'" in world.text and "Next:" in world.text
    assert "Setup finished" not in world.text
    assert not (world.venv / setup_env.STAMP_NAME).exists()


def test_a_failed_rerun_removes_the_old_stamp(tmp_path):
    world = FakeWorld(tmp_path)
    assert world.main() == 0
    world.fail_step = "torch=="
    assert world.main("--force") == 1
    assert not (world.venv / setup_env.STAMP_NAME).exists()


def test_optional_step_failure_is_a_warning(tmp_path):
    verify = verify_output(cuda=True, devices=[("RTX 4090", (8, 9))], arch_list=["sm_86"])
    world = FakeWorld(tmp_path, smi=SMI_4090, index_up=True, fail_step="bitsandbytes", verify=verify)
    assert world.main() == 0
    assert "WARNING: bitsandbytes did not install" in world.text


def test_gui_install_failure_is_a_warning_that_says_how_to_get_it_and_setup_still_finishes(tmp_path):
    world = FakeWorld(tmp_path, fail_step="gradio", verify=verify_output(gradio=False))
    assert world.main() == 0
    assert "WARNING: gradio did not install" in world.text and "pip install" in world.text
    assert "Setup finished." in world.text
    assert world.stamp["optional"]["gradio"] is None
    assert any("gradio" in w for w in world.stamp["warnings"])
    assert "gradio        not installed (only the GUI needs it)" in world.text
    assert world.main() == 0 and world.pip_calls == []  # idempotent: the failed optional step is not retried


def test_a_venv_set_up_before_the_gui_existed_installs_it_on_the_next_run(tmp_path, monkeypatch):
    world = FakeWorld(tmp_path)
    monkeypatch.setattr(setup_env, "GRADIO_SPEC", "gradio>=5,<6")
    assert world.main() == 0
    monkeypatch.undo()
    assert world.main() == 0
    assert any(setup_env.GRADIO_SPEC in c for c in world.pip_calls)


def test_the_import_check_reports_gradio_as_optional():
    report = json.loads(verify_output(gradio=False).splitlines()[-1][len(setup_env.VERIFY_MARKER):])
    problems, warnings = judge_verification(report, choose(SMI_NONE), used_index=False)
    assert problems == [] and any("gradio" in w and "GUI" in w for w in warnings)
    assert '"gradio"' in setup_env.VERIFY_SCRIPT


def test_missing_import_after_install_fails(tmp_path):
    world = FakeWorld(tmp_path, verify=verify_output(missing=("diffusers",)))
    assert world.main() == 1
    assert "diffusers does not import" in world.text


def test_outside_a_venv_setup_refuses_and_installs_nothing(tmp_path):
    world = FakeWorld(tmp_path)
    assert world.main(in_venv=False) == 1
    assert world.pip_calls == [] and "virtual environment" in world.text


def test_dry_run_installs_nothing(tmp_path):
    world = FakeWorld(tmp_path, smi=SMI_5090)
    assert world.main("--dry-run") == 0
    assert world.pip_calls == [] and "cu128" in world.text


def test_judge_verification_flags_a_gpu_missing_from_the_arch_list():
    choice = choose(SMI_5090)
    report = json.loads(verify_output(cuda=True, devices=[("RTX 5090", (12, 0))],
                                      arch_list=["sm_80", "sm_90"]).splitlines()[-1][len(setup_env.VERIFY_MARKER):])
    problems, _ = judge_verification(report, choice, used_index=True)
    assert any("sm_120" in p and "no kernel image" in p for p in problems)


# ---------------------------------------------------------------------------------------------------
# The real probe and the real module


def test_probe_index_gives_up_on_a_silent_server_within_the_timeout():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)  # accepts connections, never answers
    try:
        start = time.perf_counter()
        assert probe_index(f"http://127.0.0.1:{server.getsockname()[1]}/whl/cpu", timeout=0.5) is False
        assert time.perf_counter() - start < 3
    finally:
        server.close()


def test_probe_index_sees_an_answering_index():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200 if self.path == "/whl/cpu/torch/" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        assert probe_index(f"http://127.0.0.1:{httpd.server_port}/whl/cpu", timeout=2) is True
        assert probe_index(f"http://127.0.0.1:{httpd.server_port}/whl/nope", timeout=2) is False
    finally:
        httpd.shutdown()


def test_setup_module_imports_no_heavy_library():
    code = ("import sys, trainer.tools.setup_env, trainer.tools.doctor; "
            "print([m for m in ('torch', 'diffusers', 'transformers', 'rich') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_requirements_leave_torch_to_setup_and_dev_has_the_test_tools():
    runtime = (REPO / "requirements.txt").read_text(encoding="utf-8")
    names = [line.split(">")[0].split("=")[0].split("<")[0].strip() for line in runtime.splitlines()
             if line.strip() and not line.startswith("#")]
    assert set(names) >= {"diffusers", "transformers", "accelerate", "safetensors", "toml", "rich", "numpy",
                          "pillow"}
    assert "torch" not in names and "torchvision" not in names
    assert not any("==" in line for line in runtime.splitlines() if not line.startswith("#"))
    dev = (REPO / "requirements-dev.txt").read_text(encoding="utf-8")
    for pin in ("pytest", "peft", "tree-sitter==0.26.1", "tree-sitter-powershell==0.26.4", setup_env.GRADIO_SPEC):
        assert pin in dev
    assert "gradio" not in runtime  # optional for users: setup installs it in its own step
