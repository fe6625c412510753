"""--weighted_captions as in sd-scripts: A1111 attention syntax parsed, tokens weighted, text-encoder states
scaled."""

import json

import pytest
import torch
from conftest import make_image

from trainer.models.prompt_weights import parse_weighted_caption, strip_weights
from trainer.models.text import (
    apply_token_weights,
    encode_batch,
    encode_tokens,
    tokenize_captions,
    tokenize_weighted_captions,
)
from trainer.models.tokenizer import openai_clip_tokenizer

W = 1.1


@pytest.mark.parametrize("caption, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("a (cat) dog", [("a ", 1.0), ("cat", W), (" dog", 1.0)]),
    ("((cat))", [("cat", W * W)]),
    ("[cat]", [("cat", 1 / W)]),
    ("[[cat]]", [("cat", 1 / W / W)]),
    ("(cat:1.5), dog", [("cat", 1.5), (", dog", 1.0)]),
    ("(a, (b:2)), c", [("a, ", W), ("b", 2 * W), (", c", 1.0)]),
    ("(cat:.5)", [("cat", 0.5)]),
    (r"\(cat\) \[dog\] a\\b", [("(cat) [dog] a\\b", 1.0)]),  # escapes are literal text
    ("(cat", [("cat", W)]),              # never closed: applies to the rest
    ("cat) dog]", [("cat) dog]", 1.0)]),  # closing without opening: plain text
    ("x :1.5) y", [("x :1.5) y", 1.0)]),  # an explicit weight outside round brackets: plain text
    ("(cat: 1.5)", [("cat: 1.5", W)]),    # A1111 allows no space before the number
    ("a (b) (c)", [("a ", 1.0), ("b", W), (" ", 1.0), ("c", W)]),  # equal neighbours join only when adjacent
    ("", [("", 1.0)]),
])
def test_parse_like_a1111(caption, expected):
    parsed = parse_weighted_caption(caption)
    assert [text for text, _ in parsed] == [text for text, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected])


def test_strip_weights_keeps_the_words():
    assert strip_weights(r"(masterpiece:1.2), [blurry], 1girl, \(smile\)") == "masterpiece, blurry, 1girl, (smile)"


def test_weighted_ids_are_the_plain_ids_of_the_stripped_caption():
    tokenizer = openai_clip_tokenizer()
    ids, weights = tokenize_weighted_captions(tokenizer, ["a photo of a (cat:1.5), [dog]"])
    plain = tokenize_captions(tokenizer, ["a photo of a cat, dog"])
    assert ids.shape == weights.shape == (1, 1, 77)
    assert torch.equal(ids, plain)
    cat, dog = 2368, 1929
    row_ids, row_weights = ids[0, 0].tolist(), weights[0, 0]
    assert row_weights[row_ids.index(cat)] == pytest.approx(1.5)
    assert row_weights[row_ids.index(dog)] == pytest.approx(1 / W)
    others = [w for i, w in zip(row_ids, row_weights.tolist()) if i not in (cat, dog)]
    assert others == [1.0] * 75  # BOS, the other words, EOS and padding


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])  # SD1/SDXL-1 and SD2/SDXL-2 padding
def test_long_captions_chunk_ids_and_weights_together(pad_token):
    tokenizer = openai_clip_tokenizer(pad_token=pad_token)
    tags = [f"tag{i}" for i in range(40)]  # two tokens each: well past 75
    weighted = ", ".join(f"({t}:2)" if t == "tag35" else t for t in tags)
    ids, weights = tokenize_weighted_captions(tokenizer, [weighted, "short"], max_token_length=150)
    plain = tokenize_captions(tokenizer, [", ".join(tags), "short"], max_token_length=150)
    assert ids.shape == weights.shape == (2, 2, 77)
    assert torch.equal(ids, plain)  # same chunking and BOS/EOS/PAD fix-ups as unweighted captions
    heavy = (weights == 2).nonzero().tolist()
    assert heavy and all(b == 0 and chunk == 1 for b, chunk, _ in heavy)  # tag35 lies in the second chunk
    assert (weights[:, :, 0] == 1).all() and (weights[:, :, -1] == 1).all() and (weights[1] == 1).all()


def test_weights_scale_content_positions_of_each_chunk():
    states = torch.ones(1, 152, 2)
    weights = torch.ones(1, 2, 77)
    weights[0, 0, 1], weights[0, 1, 75], weights[0, 0, 0], weights[0, 1, 76] = 2.0, 3.0, 9.0, 9.0
    out = apply_token_weights(states, weights)
    assert out[0, 1, 0] == 2 and out[0, 150, 0] == 3  # chunk 0 content start, chunk 1 content end
    assert out[0, 0, 0] == 1 and out[0, -1, 0] == 1  # BOS and the final position are never weighted
    assert out.sum() == 2 * (152 + 1 + 2)


def test_encode_batch_weighted_multiplies_the_sd1_states(tiny_sd1):
    models = type("M", (), {"text_encoders": [tiny_sd1["text_encoder"].eval()],
                            "tokenizers": [tiny_sd1["tokenizer"]]})
    with torch.no_grad():
        weighted = encode_batch(models, {"captions": ["(sks:2) shape"]}, max_token_length=None, clip_skip=None,
                                device="cpu", weighted=True).context
        plain = encode_tokens(models.text_encoders[0], tokenize_captions(models.tokenizers[0], ["sks shape"]))
        unchanged = encode_batch(models, {"captions": ["sks shape"]}, max_token_length=None, clip_skip=None,
                                 device="cpu", weighted=True).context
    n = 3  # the byte-level test tokenizer: s, k, s</w>
    torch.testing.assert_close(weighted[0, 1:1 + n], 2 * plain[0, 1:1 + n])
    torch.testing.assert_close(weighted[0, 1 + n:], plain[0, 1 + n:])
    torch.testing.assert_close(weighted[0, 0], plain[0, 0])
    torch.testing.assert_close(unchanged, plain)  # no syntax, no change (no mean restoration either)


def test_encode_batch_weighted_sdxl_weights_both_encoders_not_the_pool():
    from test_sdxl import HIDDEN, size_batch, tiny_models

    m = tiny_models()
    with torch.no_grad():
        weighted = encode_batch(m, size_batch(["(sks:2) shape"]), max_token_length=150, clip_skip=None,
                                device="cpu", weighted=True)
        plain = encode_batch(m, size_batch(["sks shape"]), max_token_length=150, clip_skip=None, device="cpu")
    w, p = weighted.context, plain.context
    assert w.shape == p.shape == (1, 152, 2 * HIDDEN)
    torch.testing.assert_close(w[0, 1:4], 2 * p[0, 1:4])  # TE1 and TE2 halves alike
    torch.testing.assert_close(w[0, 4:], p[0, 4:])
    torch.testing.assert_close(weighted.added["text_embeds"], plain.added["text_embeds"])


def test_weighted_captions_cannot_use_cached_text_encoder_outputs():
    from trainer.config.args import parse_train_args
    from trainer.errors import ConfigError

    base = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--weighted_captions"]
    assert parse_train_args(base).weighted_captions
    with pytest.raises(ConfigError, match="--weighted_captions cannot be used with --cache_text_encoder_outputs"):
        parse_train_args(base + ["--sdxl", "--cache_text_encoder_outputs"])


def test_cli_run_with_weighted_captions(tiny_sd1_dir, tmp_path, monkeypatch):
    from test_train_run import base_args

    from trainer.cli import main
    from trainer.models import text

    folder = tmp_path / "data" / "5_sks shape"
    for i in range(2):
        make_image(folder / f"img_{i}.png", seed=i)
        (folder / f"img_{i}.txt").write_text(f"(sks:1.3) shape, [red] square, (picture {i})", encoding="utf-8")
    seen = []
    real = text.apply_token_weights

    def spy(states, weights):
        seen.append(weights)
        return real(states, weights)

    monkeypatch.setattr(text, "apply_token_weights", spy)
    out = tmp_path / "out"
    assert main(["train", *base_args(tiny_sd1_dir, tmp_path / "data", out, "--weighted_captions",
                                     "--max_train_steps", "2")]) == 0
    assert len(seen) == 2 and all(((w - 1.3).abs() < 1e-6).any() and (w < 1).any() for w in seen)
    events = [json.loads(line) for line in (out / "my lora.events.jsonl").read_text(encoding="utf-8").splitlines()]
    assert events[-1]["kind"] == "finished" and (out / "my lora.safetensors").exists()
