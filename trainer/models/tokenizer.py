"""CLIP tokenizers without a model hub.

A diffusers folder brings its own `tokenizer/`; a single-file checkpoint or the built-in demo model does
not. sd-scripts then fetches `openai/clip-vit-large-patch14` from the hub, which fails offline. We build the
same tokenizer from OpenAI's BPE merges file `bpe_simple_vocab_16e6.txt.gz`, which small PyPI packages ship
(`clip-anytorch`, `open_clip_torch`; setup installs the first with --no-deps).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

from trainer.errors import ModelLoadError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# (package, file inside it): importlib finds them without importing the package (clip's __init__ imports torch).
BPE_SOURCES = (("clip", BPE_FILE), ("open_clip", BPE_FILE))
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 48894  # the merges OpenAI's CLIP uses: lines 1..48894 of the file, after its header line


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def find_bpe_file() -> Path | None:
    """The CLIP BPE merges file from an installed package, or None."""
    for package, name in BPE_SOURCES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for location in spec.submodule_search_locations:
            candidate = Path(location) / name
            if candidate.is_file():
                return candidate
    return None


def clip_vocab_and_merges(bpe_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI CLIP's 49,408-entry vocabulary and its merges, rebuilt from the BPE file."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1:NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], *, pad_token: str = EOS):
    """A transformers CLIPTokenizer (fast) from an in-memory vocabulary; 77 tokens like every SD model.

    `pad_token` is EOS for SD1 and SDXL's first tokenizer, "!" (id 0) for SD2 and SDXL's second.
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges], model_max_length=77,
                         bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=pad_token)


def openai_clip_tokenizer(*, pad_token: str = EOS):
    """OpenAI's CLIP tokenizer, built offline; a clear error names the package to install when it cannot be."""
    bpe = find_bpe_file()
    if bpe is None:
        raise ModelLoadError(
            "The CLIP tokenizer vocabulary was not found, and this model does not bring a tokenizer/ folder.\n"
            "Fix: run setup again (it installs it), or: python -m pip install --no-deps clip-anytorch")
    vocab, merges = _cached_vocab(str(bpe))
    return build_clip_tokenizer(vocab, merges, pad_token=pad_token)


@functools.lru_cache(maxsize=2)
def _cached_vocab(bpe_path: str):
    return clip_vocab_and_merges(Path(bpe_path))
