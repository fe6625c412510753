"""sd-scripts' Hugging Face hub options: uploads of saved files and states, async uploads, failures as warnings,
--resume_from_huggingface, and the token kept secret. huggingface_hub is faked: no network."""

import json
import logging
import shutil
import threading
import time
from pathlib import Path

import huggingface_hub
import pytest
from safetensors import safe_open
from test_train_run import base_args

from trainer.cli import main
from trainer.config.args import non_default_values, parse_train_args
from trainer.errors import ConfigError
from trainer.train.hub import parse_resume_spec

TOKEN = "hf_SECRETtoken123"


class FakeHub:
    """Records what would reach the hub; the repo is missing until created."""

    def __init__(self, monkeypatch, upload_delay=0.0, fail=False):
        self.created, self.uploads, self.repo_exists = [], [], False
        self.lock = threading.Lock()
        hub = self

        def repo_info(api, repo_id, repo_type=None, **kw):
            if not hub.repo_exists:
                raise RuntimeError(f"404 {repo_id} not found")

        def create_repo(api, repo_id, repo_type=None, private=None, exist_ok=False, **kw):
            hub.created.append(dict(repo_id=repo_id, repo_type=repo_type, private=private, token=api.token))
            hub.repo_exists = True

        def upload(api, repo_id, path_in_repo, repo_type=None, path_or_fileobj=None, folder_path=None, **kw):
            local = Path(path_or_fileobj or folder_path)
            exists = local.exists()
            time.sleep(upload_delay)
            if fail:
                raise RuntimeError("503 Service Unavailable")
            with hub.lock:
                hub.uploads.append(dict(repo_id=repo_id, repo_type=repo_type, path_in_repo=path_in_repo,
                                        local=local, folder=folder_path is not None, existed=exists,
                                        thread=threading.current_thread().name, token=api.token))

        monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_file", upload)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload)


def events(out):
    return (out / "my lora.events.jsonl").read_text(encoding="utf-8")


def test_each_saved_file_and_state_is_uploaded_to_the_repo_and_the_token_stays_secret(
        tiny_sd1_dir, train_data_dir, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    out = tmp_path / "out"
    assert main(["train", *base_args(tiny_sd1_dir, train_data_dir, out, "--save_every_n_steps", "2",
                                     "--save_state", "--save_state_to_huggingface",
                                     "--huggingface_repo_id", "me/my-lora", "--huggingface_repo_type", "dataset",
                                     "--huggingface_path_in_repo", "runs/v1", "--huggingface_repo_visibility",
                                     "public", "--huggingface_token", TOKEN)]) == 0
    assert hub.created == [dict(repo_id="me/my-lora", repo_type="dataset", private=False, token=TOKEN)]
    got = [(u["path_in_repo"], u["folder"]) for u in hub.uploads]
    assert got == [("runs/v1/my lora-step00000002.safetensors", False), ("runs/v1/my lora-step00000002-state", True),
                   ("runs/v1/my lora.safetensors", False), ("runs/v1/my lora-state", True)]
    assert all(u["repo_id"] == "me/my-lora" and u["repo_type"] == "dataset" and u["existed"] and u["token"] == TOKEN
               for u in hub.uploads)
    assert all(u["thread"] == "MainThread" for u in hub.uploads)  # without --async_upload
    # the token is never written out: events, LoRA metadata, --output_config
    assert TOKEN not in events(out)
    with safe_open(str(out / "my lora.safetensors"), "pt") as f:
        assert TOKEN not in json.dumps(f.metadata())
    cfg = parse_train_args(base_args(tiny_sd1_dir, train_data_dir, out, "--huggingface_token", TOKEN,
                                       "--huggingface_repo_id", "me/my-lora"))
    assert "huggingface_token" not in non_default_values(cfg) and "huggingface_repo_id" in non_default_values(cfg)


def test_private_repo_at_root_by_default_and_states_only_on_request(tiny_sd1_dir, train_data_dir, tmp_path,
                                                                     monkeypatch):
    hub = FakeHub(monkeypatch)
    assert main(["train", *base_args(tiny_sd1_dir, train_data_dir, tmp_path, "--save_state",
                                     "--huggingface_repo_id", "me/my-lora")]) == 0
    assert [c["private"] for c in hub.created] == [True]
    assert [(u["path_in_repo"], u["repo_type"]) for u in hub.uploads] == [("my lora.safetensors", None)]


def test_async_uploads_run_in_the_background_and_are_waited_for(tiny_sd1_dir, train_data_dir, tmp_path,
                                                                monkeypatch):
    hub = FakeHub(monkeypatch, upload_delay=0.5)
    out = tmp_path / "out"
    assert main(["train", *base_args(tiny_sd1_dir, train_data_dir, out, "--save_every_n_steps", "1",
                                     "--huggingface_repo_id", "me/my-lora", "--async_upload")]) == 0
    names = sorted(u["path_in_repo"] for u in hub.uploads)  # every upload finished before main returned
    assert names == ["my lora-step00000001.safetensors", "my lora-step00000002.safetensors",
                     "my lora-step00000003.safetensors", "my lora.safetensors"]
    threads = {u["path_in_repo"]: u["thread"] for u in hub.uploads}
    assert threads["my lora.safetensors"] == "MainThread"  # the final file is uploaded before the run ends
    assert all(t != "MainThread" for n, t in threads.items() if "step" in n)
    kinds = [json.loads(line)["kind"] for line in events(out).splitlines()]
    assert kinds[-1] == "finished"


@pytest.mark.parametrize("async_upload", [False, True])
def test_a_failing_upload_warns_and_training_finishes(tiny_sd1_dir, train_data_dir, tmp_path, monkeypatch,
                                                      async_upload):
    FakeHub(monkeypatch, fail=True)
    out = tmp_path / "out"
    assert main(["train", *base_args(tiny_sd1_dir, train_data_dir, out, "--save_every_n_steps", "2",
                                     "--huggingface_repo_id", "me/my-lora", "--huggingface_token", TOKEN,
                                     *(["--async_upload"] if async_upload else []))]) == 0
    assert (out / "my lora.safetensors").is_file()
    warnings = [e["message"] for e in map(json.loads, events(out).splitlines()) if e["kind"] == "warning"]
    failed = [w for w in warnings if "Could not upload" in w]
    assert len(failed) == 2 and all("me/my-lora" in w and "503" in w for w in failed)
    assert any("my lora-step00000002.safetensors" in w for w in failed)
    assert any("my lora.safetensors" in w for w in failed)
    assert TOKEN not in events(out)


def test_resume_from_huggingface_downloads_the_state_then_resumes(tiny_sd1_dir, train_data_dir, tmp_path,
                                                                  monkeypatch):
    first = tmp_path / "first"
    assert main(["train", *base_args(tiny_sd1_dir, train_data_dir, first, "--save_state",
                                     "--max_train_steps", "2")]) == 0
    calls = []

    def snapshot_download(repo_id, **kw):
        calls.append(dict(repo_id=repo_id, **kw))
        root = tmp_path / "hub cache"
        shutil.copytree(first / "my lora-state", root / "runs" / "my lora-state", dirs_exist_ok=True)
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    messages = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    monkeypatch.setattr(logging.getLogger("trainer.train.build"), "handlers", [handler])
    out = tmp_path / "resumed"
    assert main(["train", *base_args(tiny_sd1_dir, train_data_dir, out, "--resume_from_huggingface",
                                     "--resume", "me/my-lora/runs/my lora-state:v1:dataset",
                                     "--huggingface_token", TOKEN, "--skip_until_initial_step")]) == 0
    assert calls == [dict(repo_id="me/my-lora", repo_type="dataset", revision="v1", token=TOKEN,
                          allow_patterns=["runs/my lora-state/*"])]
    restored = str(tmp_path / "hub cache" / "runs" / "my lora-state")
    assert f"Restored the training state of {restored} (saved after step 2)." in messages
    steps = [json.loads(line) for line in events(out).splitlines() if '"kind": "step"' in line]
    assert steps and all(s["step"] > 2 for s in steps)  # continued after the downloaded state's step


def test_resume_spec_format():
    assert parse_resume_spec("me/repo/a/b-state") == ("me/repo", "a/b-state", None, None)
    assert parse_resume_spec("me/repo/s:main") == ("me/repo", "s", "main", "model")
    assert parse_resume_spec("me/repo/s:main:dataset") == ("me/repo", "s", "main", "dataset")
    for bad in ("me/repo", "repo/s", "me/repo/s:a:b:c"):
        with pytest.raises(ConfigError, match="resume"):
            parse_resume_spec(bad)
