"""Caption tokenisation and text-encoder states, including long-caption chunking, as in sd-scripts."""

import torch

from trainer.models.text import encode_tokens, stitch_chunks, tokenize_captions
from trainer.models.tokenizer import openai_clip_tokenizer


def test_real_clip_tokenizer_offline_matches_openai_ids():
    tokenizer = openai_clip_tokenizer()
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_sd2_style_tokenizer_pads_with_id_zero():
    tokenizer = openai_clip_tokenizer(pad_token="!")
    ids = tokenizer("a cat", padding="max_length", max_length=8).input_ids
    assert ids == [49406, 320, 2368, 49407, 0, 0, 0, 0]


def test_default_tokenisation_is_one_chunk_of_77(tiny_sd1):
    ids = tokenize_captions(tiny_sd1["tokenizer"], ["a cat", "a dog"])
    assert ids.shape == (2, 1, 77)


def test_long_captions_make_chunks_with_bos_and_eos():
    tokenizer = openai_clip_tokenizer()
    caption = ", ".join(f"tag{i}" for i in range(60))  # well over 75 tokens
    ids = tokenize_captions(tokenizer, [caption], max_token_length=225)
    assert ids.shape == (1, 3, 77)
    assert (ids[0, :, 0] == 49406).all() and (ids[0, :, -1] == 49407).all()


def test_sd2_chunk_fixups():
    tokenizer = openai_clip_tokenizer(pad_token="!")
    ids = tokenize_captions(tokenizer, ["a short caption"], max_token_length=150)
    assert ids.shape == (1, 2, 77)
    assert ids[0, 1, 1] == 49407  # an empty chunk reads BOS, EOS, PAD...
    assert ids[0, 1, 2] == 0


def test_stitching_keeps_bos_contents_and_last_end():
    states = torch.arange(2 * 77).float().view(1, 154, 1)
    stitched = stitch_chunks(states, 2)
    assert stitched.shape == (1, 152, 1)
    assert stitched[0, 0, 0] == 0 and stitched[0, 1, 0] == 1 and stitched[0, 75, 0] == 75
    assert stitched[0, 76, 0] == 78 and stitched[0, -1, 0] == 153


def test_encode_shapes_and_clip_skip(tiny_sd1):
    encoder, tokenizer = tiny_sd1["text_encoder"], tiny_sd1["tokenizer"]
    ids = tokenize_captions(tokenizer, ["a cat"] * 2, max_token_length=150)
    states = encode_tokens(encoder, ids)
    assert states.shape == (2, 152, 32)
    one = tokenize_captions(tokenizer, ["a cat"])
    default, skip1, skip2 = (encode_tokens(encoder, one, k) for k in (None, 1, 2))
    assert torch.equal(default, skip1)
    expected = encoder.final_layer_norm(encoder(one[:, 0], output_hidden_states=True).hidden_states[-2])
    assert torch.allclose(skip2, expected)
