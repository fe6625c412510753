"""A sentence per photo from BLIP (Salesforce/blip-image-captioning-large, the model sd-scripts'
finetune/make_captions.py uses), through transformers' BlipForConditionalGeneration.

As in make_captions.py: nucleus sampling (`--top_p`) unless `--beam_search` (`--num_beams`), captions of
`--min_length` to `--max_length` tokens, the random generator seeded once with `--seed`. The picture is
resized to the model's square input (384 px) by its own processor, as make_captions.py does."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from trainer.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_REPO = "Salesforce/blip-image-captioning-large"
FILES = ("config.json", "model.safetensors")
PATTERNS = ("*.json", "vocab.txt")  # the processor's and tokenizer's files (their names vary between versions)


@dataclass(frozen=True)
class SentenceRules:
    beam_search: bool = False
    num_beams: int = 1
    top_p: float = 0.9
    max_length: int = 75
    min_length: int = 5
    sampling_seed: int = 42


class BlipCaptioner:
    """A loaded BLIP captioning model: `sentences(images)` gives one caption per picture."""

    def __init__(self, folder: Path, rules: SentenceRules):
        import torch
        import transformers
        from transformers import BlipForConditionalGeneration, BlipProcessor

        transformers.utils.logging.set_verbosity_error()  # e.g. the note that torchvision is not installed
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" would garble our bar
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        try:
            self.processor = BlipProcessor.from_pretrained(folder)
            self.model = BlipForConditionalGeneration.from_pretrained(folder, dtype=self.dtype)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{folder}: not a BLIP captioning model transformers can load ({e}). A BLIP folder "
                              "holds config.json, model.safetensors and its processor's files; pass "
                              "--force_download to fetch them again.") from None
        self.model.to(self.device).eval()
        self.rules = rules
        torch.manual_seed(rules.sampling_seed)
        log.info("BLIP %s on %s", folder, self.device)

    def sentences(self, images: Sequence[Image.Image]) -> list[str]:
        import torch

        rules = self.rules
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        if rules.beam_search:
            options = dict(do_sample=False, num_beams=rules.num_beams)
        else:
            options = dict(do_sample=True, top_p=rules.top_p)
        with torch.no_grad():
            tokens = self.model.generate(pixel_values=pixels.to(self.device, self.dtype), max_length=rules.max_length,
                                         min_length=rules.min_length, **options)
        return [text.strip() for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]
