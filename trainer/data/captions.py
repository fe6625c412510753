"""Per-sample caption processing: prefix/suffix, dropout, wildcards, keep_tokens, token warmup, shuffle and
tag dropout, exactly in the order of sd-scripts' `BaseDataset.process_caption` (library/train_util.py).

Pure function of the caption, the rules and the given RNG, so a fixed seed gives a fixed caption.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, fields

_WILDCARD = re.compile(r"\{([^}]+)\}")


@dataclass(frozen=True)
class CaptionRules:
    """The subset settings that change captions (names as in the dataset config); SubsetSpec inherits them."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0

    @classmethod
    def from_subset(cls, subset) -> "CaptionRules":
        """Take the caption fields from a SubsetSpec (or any object with those attributes)."""
        return cls(**{f.name: getattr(subset, f.name) for f in fields(cls)})


def process_caption(caption: str, rules: CaptionRules, *, rng: random.Random, epoch: int, step: int,
                    max_train_steps: int) -> str:
    """The caption one sample trains with at this epoch (1-based) and step."""
    if rules.caption_prefix:
        caption = rules.caption_prefix + " " + caption
    if rules.caption_suffix:
        caption = caption + " " + rules.caption_suffix

    dropped = rules.caption_dropout_rate > 0 and rng.random() < rules.caption_dropout_rate
    every_n = rules.caption_dropout_every_n_epochs
    if dropped or (every_n > 0 and epoch % every_n == 0):
        return ""

    caption = _expand_wildcards(caption, rng) if rules.enable_wildcard else caption.split("\n")[0]
    if rules.shuffle_caption or rules.token_warmup_step > 0 or rules.caption_tag_dropout_rate > 0:
        caption = _rearrange_tokens(caption, rules, rng, step, max_train_steps)
    if rules.secondary_separator:
        caption = caption.replace(rules.secondary_separator, rules.caption_separator)
    return caption


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    """Pick one line, then one option of every `{a|b|c}`; `{{` and `}}` stand for literal braces."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    open_mark, close_mark = "⦅", "⦆"
    while open_mark in caption or close_mark in caption:  # markers must not occur in the text itself
        open_mark += "⦅"
        close_mark += "⦆"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda match: rng.choice(match.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def _split_tokens(caption: str, rules: CaptionRules) -> tuple[list[str], list[str], list[str]]:
    """(fixed prefix, flexible middle, fixed suffix) tokens."""
    separator = rules.caption_separator
    keep_separator = rules.keep_tokens_separator
    if keep_separator and keep_separator in caption:
        fixed_part, flex_part = caption.split(keep_separator, 1)
        suffix = []
        if keep_separator in flex_part:
            flex_part, suffix_part = flex_part.split(keep_separator, 1)
            suffix = [t.strip() for t in suffix_part.split(separator) if t.strip()]
        fixed = [t.strip() for t in fixed_part.split(separator) if t.strip()]
        flex = [t.strip() for t in flex_part.split(separator) if t.strip()]
        return fixed, flex, suffix
    tokens = [t.strip() for t in caption.strip().split(separator)]
    if rules.keep_tokens > 0:
        return tokens[:rules.keep_tokens], tokens[rules.keep_tokens:], []
    return [], tokens, []


def warmup_steps(rules: CaptionRules, max_train_steps: int) -> float:
    """token_warmup_step below 1 is a fraction of max_train_steps (sd-scripts converts it the same way)."""
    if rules.token_warmup_step < 1:
        return math.floor(rules.token_warmup_step * max_train_steps)
    return rules.token_warmup_step


def _rearrange_tokens(caption: str, rules: CaptionRules, rng: random.Random, step: int,
                      max_train_steps: int) -> str:
    fixed, flex, suffix = _split_tokens(caption, rules)
    warmup = warmup_steps(rules, max_train_steps)
    if warmup and step < warmup:
        count = math.floor(step * ((len(flex) - rules.token_warmup_min) / warmup)) + rules.token_warmup_min
        flex = flex[:count]
    if rules.shuffle_caption:
        rng.shuffle(flex)
    if rules.caption_tag_dropout_rate > 0:
        flex = [token for token in flex if rng.random() >= rules.caption_tag_dropout_rate]
    # sd-scripts joins with ", " whatever caption_separator is
    return ", ".join(fixed + flex + suffix)


def count_tags(frequency: dict[str, dict[str, int]], directory: str, captions: list[str]) -> None:
    """sd-scripts' tag frequency (metadata): split on ',' (always), stripped, lower-cased, per folder name."""
    counts = frequency.setdefault(directory, {})
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
