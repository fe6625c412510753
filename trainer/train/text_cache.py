"""SDXL `--cache_text_encoder_outputs` (+ `_to_disk`): both text encoders run once per image before training
(as sd-scripts' library/strategy_sdxl.py does), so they can leave the GPU and each step skips them.

As in sd-scripts, the caption is encoded as it was read (caption file or class tokens): no shuffling, dropout,
prefix/suffix or wildcard choice, which is why options that change captions per step are refused. With
`_to_disk` the outputs go to `<image stem>_te_outputs.npz` (keys hidden_state1, hidden_state2, pool2), shared
with sd-scripts: an existing valid file is reused, so a file is only as fresh as its caption was.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from trainer import interrupts
from trainer.config.args import PER_STEP_CAPTION_OPTIONS
from trainer.data import cache as cache_files
from trainer.errors import ConfigError
from trainer.models.text import Conditioning, encode_sdxl_tokens, sdxl_conditioning, tokenize_captions

log = logging.getLogger(__name__)

_NOT_APPLIED_OPTIONS = ("caption_prefix", "caption_suffix", "enable_wildcard", "secondary_separator")


class TextEncoderOutputCache:
    """Per image path: (hidden1, hidden2, pool2) in RAM, or the .npz file that holds them."""

    def __init__(self) -> None:
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.files: dict[str, Path] = {}

    def outputs(self, image_path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if image_path in self.memory:
            return self.memory[image_path]
        arrays = cache_files.load_te_outputs_npz(self.files[image_path])
        return tuple(torch.from_numpy(np.asarray(a)) for a in arrays)  # type: ignore[return-value]

    def conditioning(self, batch: dict, device) -> Conditioning:
        """The batch's conditioning from the cache; the size ids still come from the batch."""
        rows = [self.outputs(path) for path in batch["image_paths"]]
        hidden1, hidden2, pool2 = (torch.stack([row[i] for row in rows]).to(device, non_blocking=True)
                                   for i in range(3))
        return sdxl_conditioning(hidden1, hidden2, pool2, batch)


def check_cacheable(dataset) -> None:
    """Refuse subsets whose captions change per step; warn about options the cache does not see."""
    problems, ignored = [], set()
    for used in dataset.subsets:
        subset = used.spec
        where = subset.image_dir or subset.metadata_file
        for name in PER_STEP_CAPTION_OPTIONS:  # sd-scripts' is_text_encoder_output_cacheable
            if getattr(subset, name):
                problems.append(f"--cache_text_encoder_outputs cannot be used with {name} (set for {where}): "
                                f"cached text-encoder outputs are made once, but {name} changes the caption "
                                f"every step. Remove {name} or do not cache text-encoder outputs.")
        ignored.update(name for name in _NOT_APPLIED_OPTIONS if getattr(subset, name))
    if problems:
        raise ConfigError(problems)
    if ignored:
        log.warning("With --cache_text_encoder_outputs the captions are encoded as read from the files, as in "
                    "sd-scripts: %s not applied.", ", ".join(sorted(ignored)))


def cache_text_encoder_outputs(dataset, models, *, max_token_length: int | None, to_disk: bool, batch_size: int,
                               device, autocast=None) -> TextEncoderOutputCache:
    """Encode every image's caption once with both encoders; returns the lookup the loop uses.

    `autocast` is a context-manager factory (the accelerator's), so the encoders run as in training.
    Call `check_cacheable(dataset)` first, before anything slow."""
    cache = TextEncoderOutputCache()
    expected_length = (max_token_length or 75) + 2
    todo: dict[str, str] = {}
    for record in dataset.records:
        key = str(record.path)
        if to_disk:
            npz = cache_files.te_outputs_npz_path(record.path)
            cache.files[key] = npz
            if _disk_cache_fits(npz, expected_length):
                continue
        todo[key] = record.caption
    log.info("caching text-encoder outputs: %d captions to encode, %d reused from disk", len(todo),
             len({str(r.path) for r in dataset.records}) - len(todo))
    items = list(todo.items())
    for start in range(0, len(items), max(1, batch_size)):
        interrupts.check()  # a safe point for a Ctrl-C held during start-up
        chunk = items[start:start + max(1, batch_size)]
        hidden1, hidden2, pool2 = _encode(models, [caption for _, caption in chunk], max_token_length, device,
                                          autocast)
        for i, (key, _) in enumerate(chunk):
            if to_disk:
                cache_files.save_te_outputs_npz(cache.files[key], hidden1[i], hidden2[i], pool2[i])
            else:
                cache.memory[key] = (hidden1[i].clone(), hidden2[i].clone(), pool2[i].clone())
    for encoder in models.text_encoders:  # not needed until sampling: free the GPU for the UNet
        encoder.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return cache


def _encode(models, captions: list[str], max_token_length: int | None, device, autocast):
    ids1, ids2 = (tokenize_captions(tok, captions, max_token_length).to(device) for tok in models.tokenizers)
    with torch.no_grad(), (autocast() if autocast else nullcontext()):
        hidden1, hidden2, pool2 = encode_sdxl_tokens(models.text_encoders, ids1, ids2,
                                                     eos_token_id=models.tokenizers[1].eos_token_id)
    return hidden1.cpu(), hidden2.cpu(), pool2.cpu()


def _disk_cache_fits(npz: Path, expected_length: int) -> bool:
    """sd-scripts' validity check (the three keys), plus the token length: a file made with another
    --max_token_length would not stack with the others."""
    if not cache_files.te_outputs_npz_is_valid(npz):
        return False
    hidden1, _, _ = cache_files.load_te_outputs_npz(npz)
    return hidden1.shape[0] == expected_length
