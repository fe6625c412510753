"""A sentence per photo from a transformers image-to-text model: BLIP (Salesforce/blip-image-captioning-large,
the model sd-scripts' finetune/make_captions.py uses) or Florence-2 (transformers' own Florence2 classes, so
the hub's native-format copies such as florence-community/Florence-2-large; no remote code is run).

As in make_captions.py: nucleus sampling (`--top_p`) unless `--beam_search` (`--num_beams`), captions of
`--min_length` to `--max_length` tokens, the random generator seeded once with `--seed`. Each model's own
processor resizes the picture to its square input (BLIP: 384 px, as make_captions.py does)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from trainer.errors import ConfigError

log = logging.getLogger(__name__)

FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")


@dataclass(frozen=True)
class SentenceModel:
    name: str                   # --model
    default_repo: str
    files: tuple[str, ...]      # must be in the folder
    patterns: tuple[str, ...]   # fetched with them: the processor's and tokenizer's files (names vary)


BLIP = SentenceModel("blip", "Salesforce/blip-image-captioning-large", ("config.json", "model.safetensors"),
                     ("*.json", "vocab.txt"))
FLORENCE = SentenceModel("florence2", "florence-community/Florence-2-large", ("config.json", "model.safetensors"),
                         ("*.json", "*.txt"))
MODELS = {model.name: model for model in (BLIP, FLORENCE)}


@dataclass(frozen=True)
class SentenceRules:
    beam_search: bool = False
    num_beams: int = 1
    top_p: float = 0.9
    max_length: int = 75
    min_length: int = 5
    sampling_seed: int = 42
    task: str = "<DETAILED_CAPTION>"  # Florence-2's prompt


class SentenceCaptioner:
    """A loaded image-to-text model: `sentences(images)` gives one caption per picture."""

    def __init__(self, model: SentenceModel, folder: Path, rules: SentenceRules):
        import torch
        import transformers

        transformers.utils.logging.set_verbosity_error()  # e.g. the note that torchvision is not installed
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" would garble our bar
        self.model_kind, self.rules = model, rules
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        if model is BLIP:
            processor_class, model_class = transformers.BlipProcessor, transformers.BlipForConditionalGeneration
        else:
            processor_class, model_class = transformers.AutoProcessor, transformers.Florence2ForConditionalGeneration
        try:
            self.processor = processor_class.from_pretrained(folder)
            self.model = model_class.from_pretrained(folder, dtype=self.dtype)
        except Exception as e:  # a wrong folder fails in many ways (missing file, foreign config, custom code)
            raise ConfigError(f"{folder}: not a {model.name} model transformers can load ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'}). The folder holds "
                              "config.json, model.safetensors and its processor's files (a copy in transformers' "
                              "own format: no custom code); pass --force_download to fetch them again.") from None
        self.model.to(self.device).eval()
        torch.manual_seed(rules.sampling_seed)
        log.info("%s %s on %s", model.name, folder, self.device)

    def sentences(self, images: Sequence[Image.Image]) -> list[str]:
        import torch

        rules = self.rules
        if self.model_kind is BLIP:
            inputs = self.processor(images=list(images), return_tensors="pt")
        else:
            inputs = self.processor(text=[rules.task] * len(images), images=list(images), return_tensors="pt")
        inputs = {k: v.to(self.device, self.dtype) if k == "pixel_values" else v.to(self.device)
                  for k, v in inputs.items() if k in ("pixel_values", "input_ids", "attention_mask")}
        if rules.beam_search:
            options = dict(do_sample=False, num_beams=rules.num_beams)
        else:
            options = dict(do_sample=True, top_p=rules.top_p)
        with torch.no_grad():
            tokens = self.model.generate(**inputs, max_length=rules.max_length, min_length=rules.min_length,
                                         **options)
        return [text.strip() for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]
