"""trainer.tools.argmap: every implemented argument is read somewhere, and docs/compatibility.md says where."""

import textwrap
from pathlib import Path

from trainer.config.args import ARGUMENTS, DONE
from trainer.tools.argmap import argument_readers
from trainer.tools.compat import DEFAULT_OUTPUT, compatibility_markdown, effect_modules


def test_every_implemented_argument_is_read_by_some_module():
    readers = argument_readers()
    unread = sorted(f.name for f in ARGUMENTS if f.metadata["status"] == DONE and not readers[f.name])
    assert not unread, (
        f"arguments marked implemented (status DONE) that no module under trainer/ reads: {', '.join(unread)}. "
        "Implement them, or re-mark their status (WARN / REFUSE) in trainer/config/args.py.")


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root


def test_scanner_rules_on_a_synthetic_package(tmp_path):
    package = _write(tmp_path / "pkg", {
        "__init__.py": "",
        "uses.py": """
            import dataclasses

            def run(cfg):
                print(cfg.network_dim)                              # attribute read: counts
                getattr(cfg, "seed", None)                          # getattr with a literal name: counts
                return dataclasses.replace(cfg, learning_rate=1.0)  # keyword: a write, not a read
        """,
        "names.py": """
            NAMES = ("shuffle_caption", "not_an_argument")

            def resolve(cfg):
                return {n: getattr(cfg, n) for n in NAMES}          # name list used with getattr: counts
        """,
        "settings.py": """
            from dataclasses import dataclass

            @dataclass
            class Settings:
                noise_offset: float | None
                unrelated: int = 0

                @classmethod
                def from_config(cls, cfg):
                    return cls(**{n: getattr(cfg, n) for n in cls.__dataclass_fields__})
        """,
        "loop.py": """
            def step(s):
                return s.noise_offset
        """,
        "config/args.py": """
            CHECKED = ("caption_tag_dropout_rate",)

            class TrainConfig:
                @property
                def train_unet(self):
                    return not self.network_train_text_encoder_only

            def check(v):
                return v["max_train_steps"] < 1 or v.get("flip_aug")  # validation: not an effect

            def aliases(values):
                if values["use_8bit_adam"]:
                    values["optimizer_type"] = "AdamW8bit"          # a rewrite: counts

            def write(cfg):
                return cfg.output_dir                               # a read outside the class: counts
        """,
        "view.py": """
            from pkg.config.args import CHECKED

            def show(cfg):
                return cfg.train_unet, CHECKED
        """,
        "gui/form.py": """
            PATHS = ("vae",)                                        # a front end's layout list: no effect

            def get(cfg, n):
                return getattr(cfg, n)
        """,
    })
    readers = argument_readers(package)
    assert readers["network_dim"] == ["pkg/uses.py"]
    assert readers["seed"] == ["pkg/uses.py"]
    assert readers["learning_rate"] == []
    assert readers["shuffle_caption"] == ["pkg/names.py"]
    assert readers["noise_offset"] == ["pkg/loop.py", "pkg/settings.py"]
    assert readers["network_train_text_encoder_only"] == ["pkg/view.py"]
    assert readers["caption_tag_dropout_rate"] == ["pkg/view.py"]
    assert readers["max_train_steps"] == [] and readers["flip_aug"] == []
    assert readers["use_8bit_adam"] == ["pkg/config/args.py"]
    assert readers["output_dir"] == ["pkg/config/args.py"]
    assert readers["vae"] == []
    assert set(readers) == {f.name for f in ARGUMENTS}


def test_compatibility_doc_is_generated_from_the_table():
    assert DEFAULT_OUTPUT.read_text(encoding="utf-8") == compatibility_markdown(), (
        "docs/compatibility.md is out of date with trainer/config/args.py or the modules that read the "
        "arguments; run python -m trainer args")


def test_effect_column_shortens_paths():
    assert effect_modules(["trainer/train/build.py", "trainer/cli.py"]) == "train/build.py, cli.py"
    assert effect_modules([]) == "-"
