"""Caption processing per sample, in the order of sd-scripts' BaseDataset.process_caption, with fixed seeds."""

from __future__ import annotations

import random

from trainer.data.captions import CaptionRules, process_caption
from trainer.data.config import SubsetSpec


def run(caption: str, seed: int = 0, *, epoch: int = 1, step: int = 0, max_train_steps: int = 100, **rules) -> str:
    return process_caption(caption, CaptionRules(**rules), rng=random.Random(seed), epoch=epoch, step=step,
                           max_train_steps=max_train_steps)


def test_rules_come_from_a_subset_spec():
    rules = CaptionRules.from_subset(SubsetSpec(keep_tokens=2, shuffle_caption=True, caption_separator=";"))
    assert (rules.keep_tokens, rules.shuffle_caption, rules.caption_separator) == (2, True, ";")


def test_without_token_rules_the_caption_is_unchanged_apart_from_prefix_and_suffix():
    assert run("a,b ,  c") == "a,b ,  c"
    assert run("dog", caption_prefix="photo of", caption_suffix="best quality") == "photo of dog best quality"


def test_shuffle_keeps_the_first_keep_tokens_and_rejoins_with_comma_space():
    caption = "sks dog, red, blue, green, tall, small"
    results = {run(caption, seed, shuffle_caption=True, keep_tokens=2) for seed in range(20)}
    assert len(results) > 5
    for result in results:
        tokens = result.split(", ")
        assert tokens[:2] == ["sks dog", "red"]
        assert sorted(tokens[2:]) == ["blue", "green", "small", "tall"]
    assert run(caption, 3, shuffle_caption=True, keep_tokens=2) == run(caption, 3, shuffle_caption=True, keep_tokens=2)


def test_keep_tokens_separator_fixes_a_prefix_and_a_suffix():
    caption = "sks, dog ||| a, b, c, d ||| masterpiece, best"
    for seed in range(10):
        tokens = run(caption, seed, shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=1).split(", ")
        assert tokens[:2] == ["sks", "dog"] and tokens[-2:] == ["masterpiece", "best"]
        assert sorted(tokens[2:-2]) == ["a", "b", "c", "d"]
    # without any token rule the separator stays in the caption, as in sd-scripts
    assert run(caption, keep_tokens_separator="|||") == caption


def test_custom_separator_still_joins_with_comma_space_then_secondary_becomes_separator():
    result = run("a; b$$c; d", 1, shuffle_caption=True, caption_separator=";", secondary_separator="$$")
    assert sorted(result.split(", ")) == ["a", "b;c", "d"]
    assert run("x$$y", secondary_separator="$$") == "x,y"


def test_wildcards_pick_options_and_lines_and_keep_escaped_braces():
    outcomes = {run("{red|blue|green} ball, {{literal}}", seed, enable_wildcard=True) for seed in range(30)}
    assert outcomes == {f"{colour} ball, {{literal}}" for colour in ("red", "blue", "green")}
    lines = {run("first line\nsecond line", seed, enable_wildcard=True) for seed in range(30)}
    assert lines == {"first line", "second line"}
    assert run("first line\nsecond line") == "first line"  # without wildcards only the first line


def test_dropout_every_n_epochs_empties_the_caption_on_those_epochs():
    rules = dict(caption_dropout_every_n_epochs=2, caption_prefix="p")
    assert [run("dog", epoch=e, **rules) for e in (1, 2, 3, 4)] == ["p dog", "", "p dog", ""]


def test_caption_and_tag_dropout_rates():
    assert run("a, b", caption_dropout_rate=1.0) == ""
    assert run("a, b", caption_dropout_rate=0.0) == "a, b"
    assert run("keep, x, y, z", caption_tag_dropout_rate=1.0, keep_tokens=1) == "keep"
    kept = [len(run("a, b, c, d, e, f, g, h", seed, caption_tag_dropout_rate=0.5).split(", ")) for seed in range(30)]
    assert min(kept) < 8 and max(kept) > 1


def test_token_warmup_grows_the_flexible_tokens_with_steps():
    caption = "t0, t1, t2, t3, t4"
    count = lambda step, **rules: len(run(caption, step=step, **rules).split(", "))  # noqa: E731
    rules = dict(token_warmup_step=10, token_warmup_min=1)
    assert [count(s, **rules) for s in (0, 5, 9, 10, 50)] == [1, 3, 4, 5, 5]  # floor(s * 4 / 10) + 1
    assert run(caption, step=5, **rules) == "t0, t1, t2"  # the first tokens, in order (no shuffle)
    # a fraction means that share of max_train_steps: 0.5 * 20 = 10 steps
    assert count(5, token_warmup_step=0.5, max_train_steps=20) == 3
    # keep_tokens are not counted in the warmup
    assert run(caption, step=0, token_warmup_step=10, keep_tokens=2) == "t0, t1, t2"
