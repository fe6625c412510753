"""sd-scripts' Hugging Face hub options: upload each saved LoRA file (and, with --save_state_to_huggingface,
each state folder) to --huggingface_repo_id, and --resume_from_huggingface.

Behaviour follows sd-scripts (library/huggingface_util.py): the repo is created when missing, private unless
--huggingface_repo_visibility is "public"; a file lands at `<--huggingface_path_in_repo>/<file name>`; with
--async_upload periodic uploads run in a background thread while the final file is uploaded before the run
ends. An upload failure is a warning naming the file and the repo, never the end of the training.
Differences on purpose: without --huggingface_path_in_repo a file goes to the repo root under its own name
(sd-scripts passes no path, so a file upload fails and a state folder spills its files into the root), and
every background upload is waited for before the run reports that it finished.

The token is only handed to huggingface_hub: it is kept out of reprs, messages, metadata and --output_config."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError
from trainer.train.events import Event

log = logging.getLogger(__name__)

RESUME_FORMAT = "{repo_id}/{path_in_repo}[:{revision}[:{repo_type}]]"


@dataclass(frozen=True)
class HubTarget:
    repo_id: str
    repo_type: str | None = None
    path_in_repo: str | None = None
    private: bool = True
    upload_states: bool = False
    async_upload: bool = False
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, cfg: Any) -> "HubTarget":
        visibility = cfg.huggingface_repo_visibility
        if visibility not in (None, "public", "private"):
            log.warning('--huggingface_repo_visibility %s: expected "public" or "private"; the repo is created '
                        "private (as in sd-scripts).", visibility)
        return cls(repo_id=cfg.huggingface_repo_id, repo_type=cfg.huggingface_repo_type,
                   path_in_repo=cfg.huggingface_path_in_repo, private=visibility != "public",
                   upload_states=cfg.save_state_to_huggingface, async_upload=cfg.async_upload,
                   token=cfg.huggingface_token)

    def remote_path(self, local: Path) -> str:
        prefix = (self.path_in_repo or "").strip("/")
        return f"{prefix}/{local.name}" if prefix else local.name


class HubUploader:
    """A listener on "saved" events. Background threads never log (the event file is written by the main
    thread): their failures are collected and reported as warnings at the next event."""

    def __init__(self, target: HubTarget, final_paths: tuple[Path, ...] = (), api: Any = None):
        self.target = target
        self._final = {Path(p) for p in final_paths}
        self._api = api
        self._repo_checked = False
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._failures: list[str] = []

    def handle(self, event: Event) -> None:
        if event.kind == "saved":
            self.saved(Path(event.data["path"]))
        elif event.kind in ("finished", "interrupted", "failed"):
            self.wait()
        self._report()

    def close(self) -> None:
        self.wait()
        self._report()

    def saved(self, path: Path) -> None:
        if path.is_dir() and not self.target.upload_states:
            return
        if self.target.async_upload and path not in self._final:
            thread = threading.Thread(target=self._upload, args=(path,), name=f"hub upload {path.name}")
            self._threads.append(thread)
            thread.start()
        else:  # sd-scripts uploads the final file synchronously even with --async_upload
            self.wait()
            self._upload(path)

    def wait(self) -> None:
        """Block until every background upload is done."""
        while self._threads:
            self._threads.pop(0).join()

    def _upload(self, path: Path) -> None:
        t = self.target
        try:
            self._ensure_repo()
            api = self.api()
            if path.is_dir():
                api.upload_folder(repo_id=t.repo_id, repo_type=t.repo_type, folder_path=str(path),
                                  path_in_repo=t.remote_path(path))
            else:
                api.upload_file(repo_id=t.repo_id, repo_type=t.repo_type, path_or_fileobj=str(path),
                                path_in_repo=t.remote_path(path))
        except Exception as e:  # network, auth, a folder removed by --save_last_n_*: the training goes on
            self._fail(f"Could not upload {path} to the Hugging Face repo {t.repo_id}: {self._redact(e)}. "
                       "The file is kept locally; upload it yourself (huggingface-cli upload) or check "
                       "--huggingface_repo_id / --huggingface_token.")

    def _ensure_repo(self) -> None:
        """Once per run: create the repo when it cannot be seen (private unless the visibility is public)."""
        t = self.target
        with self._lock:
            if self._repo_checked:
                return
            self._repo_checked = True
            api = self.api()
            try:
                api.repo_info(repo_id=t.repo_id, repo_type=t.repo_type)
                return
            except Exception:  # missing, or not visible with this token: try to create it, as sd-scripts does
                pass
            try:
                api.create_repo(repo_id=t.repo_id, repo_type=t.repo_type, private=t.private, exist_ok=True)
            except Exception as e:
                self._fail(f"Could not create the Hugging Face repo {t.repo_id}: {self._redact(e)}.")

    def api(self):
        if self._api is None:
            import huggingface_hub

            self._api = huggingface_hub.HfApi(token=self.target.token)
        return self._api

    def _fail(self, message: str) -> None:
        with self._lock:
            self._failures.append(message)

    def _report(self) -> None:
        with self._lock:
            failures, self._failures = self._failures, []
        for message in failures:
            log.warning(message)

    def _redact(self, error: Exception) -> str:
        text = str(error) or type(error).__name__
        return text.replace(self.target.token, "***") if self.target.token else text


def hub_uploader(cfg: Any, final_paths: tuple[Path, ...]) -> HubUploader | None:
    """The listener for --huggingface_repo_id, or None (with a warning for hub options that need it)."""
    if not cfg.huggingface_repo_id:
        if cfg.save_state_to_huggingface or cfg.async_upload:
            log.warning("--save_state_to_huggingface / --async_upload do nothing without --huggingface_repo_id.")
        return None
    return HubUploader(HubTarget.from_config(cfg), final_paths)


def parse_resume_spec(spec: str) -> tuple[str, str, str | None, str | None]:
    """sd-scripts' --resume with --resume_from_huggingface: `owner/name/path[:revision[:repo_type]]`.
    Returns (repo_id, path_in_repo, revision, repo_type)."""
    parts = spec.strip().strip("/").split("/")
    if len(parts) < 3 or not parts[0] or not parts[1]:
        raise ConfigError(f"--resume {spec} with --resume_from_huggingface: expected {RESUME_FORMAT}, e.g. "
                          "--resume me/my-lora/my lora-step00000100-state:main")
    repo_id, rest = f"{parts[0]}/{parts[1]}", "/".join(parts[2:])
    pieces = rest.split(":")
    if len(pieces) > 3:
        raise ConfigError(f"--resume {spec}: too many ':' (expected {RESUME_FORMAT}).")
    path, revision, repo_type = (pieces + [None, None])[:3]
    if revision is not None and repo_type is None:
        repo_type = "model"  # as in sd-scripts
    return repo_id, path.strip("/"), revision or None, repo_type or None


def download_resume_state(spec: str, token: str | None) -> Path:
    """Download the state folder named by `spec` into the hub cache; returns the local folder."""
    import huggingface_hub

    repo_id, path, revision, repo_type = parse_resume_spec(spec)
    where = f"{path} in the Hugging Face repo {repo_id}" + (f" at revision {revision}" if revision else "")
    log.info("Downloading the training state %s.", where)
    try:
        root = huggingface_hub.snapshot_download(repo_id, repo_type=repo_type, revision=revision, token=token,
                                                 allow_patterns=[f"{path}/*"] if path else None)
    except Exception as e:
        text = str(e).replace(token, "***") if token else str(e)
        raise ConfigError(f"--resume {spec}: could not download {where}: {text or type(e).__name__}. "
                          "Check the repo id, the path, the revision and --huggingface_token.") from None
    folder = Path(root) / path
    if not folder.is_dir() or not any(folder.iterdir()):
        raise ConfigError(f"--resume {spec}: no files found under {where}. Give the state folder's path in "
                          f"the repo ({RESUME_FORMAT}).")
    return folder


def resolve_hub_resume(cfg: Any) -> str | None:
    """The --resume state folder: as given, or downloaded first with --resume_from_huggingface."""
    if not cfg.resume_from_huggingface:
        return cfg.resume
    if not cfg.resume:
        log.warning("--resume_from_huggingface does nothing without --resume %s.", RESUME_FORMAT)
        return None
    return str(download_resume_state(cfg.resume, cfg.huggingface_token))
