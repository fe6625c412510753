"""Captions -> token ids -> text-encoder states, the sd-scripts way (spec §4.3).

Long captions (`--max_token_length 150/225`) are cut into 77-token chunks that each start with BOS and end
with EOS/PAD, encoded separately and stitched back: BOS of the first chunk, the 75 content positions of
every chunk, the last position of the last chunk -> n*75 + 2 positions."""

from __future__ import annotations

import torch

CHUNK = 77  # CLIP's context length; every SD text encoder has it


def tokenize_captions(tokenizer, captions: list[str], max_token_length: int | None = None) -> torch.Tensor:
    """Token ids of shape (batch, n_chunks, 77); n_chunks = max_token_length / 75 (1 by default)."""
    max_length = (max_token_length or 75) + 2
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt").input_ids
    if max_length == CHUNK:
        return ids.unsqueeze(1)
    return torch.stack([_chunk(row, tokenizer.eos_token_id, tokenizer.pad_token_id) for row in ids])


def _chunk(ids: torch.Tensor, eos: int, pad: int) -> torch.Tensor:
    chunks = []
    for start in range(1, ids.numel() - 2, CHUNK - 2):
        chunk = torch.cat([ids[:1], ids[start:start + CHUNK - 2], ids[-1:]])
        if pad != eos:  # SD2 / SDXL-2 tokenizers pad with "!": keep each chunk closed by an EOS
            if chunk[-2] not in (eos, pad):
                chunk[-1] = eos
            if chunk[1] == pad:
                chunk[1] = eos
        chunks.append(chunk)
    return torch.stack(chunks)


def encode_tokens(text_encoder, ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
    """(batch, n_chunks, 77) ids -> (batch, n_chunks*75 + 2, hidden) states for the UNet's cross-attention.

    clip_skip=k takes the k-th last layer's output through the final layer norm (k=1 is the default output)."""
    batch, n_chunks, _ = ids.shape
    flat = ids.reshape(batch * n_chunks, CHUNK).to(text_encoder.device)
    if clip_skip is None or clip_skip <= 1:
        states = text_encoder(flat).last_hidden_state
    else:
        hidden = text_encoder(flat, output_hidden_states=True).hidden_states[-clip_skip]
        states = final_layer_norm(text_encoder)(hidden)
    states = states.reshape(batch, n_chunks * CHUNK, -1)
    if n_chunks == 1:
        return states
    return stitch_chunks(states, n_chunks)


def stitch_chunks(states: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """(batch, n*77, D) -> (batch, n*75 + 2, D): first BOS, each chunk's content, the last chunk's end."""
    parts = [states[:, :1]]
    for i in range(n_chunks):
        parts.append(states[:, i * CHUNK + 1:(i + 1) * CHUNK - 1])
    parts.append(states[:, -1:])
    return torch.cat(parts, dim=1)


def final_layer_norm(text_encoder):
    """transformers 5 dropped CLIPTextModel's `text_model.` level; CLIPTextModelWithProjection keeps it."""
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


class Conditioning:
    """What the UNet is conditioned on for one batch: cross-attention states, plus SDXL's added inputs."""

    def __init__(self, context: torch.Tensor, added: dict | None = None):
        self.context = context
        self.added = added

    def unet_kwargs(self, dtype: torch.dtype) -> dict:
        kwargs = {"encoder_hidden_states": self.context.to(dtype)}
        if self.added is not None:
            kwargs["added_cond_kwargs"] = {k: v.to(dtype) for k, v in self.added.items()}
        return kwargs


def encode_batch(models, batch: dict, *, max_token_length: int | None, clip_skip: int | None, device) -> Conditioning:
    """The batch's captions through the model's text encoder(s) (SD1/SD2: one encoder)."""
    ids = tokenize_captions(models.tokenizers[0], batch["captions"], max_token_length)
    return Conditioning(encode_tokens(models.text_encoders[0], ids.to(device), clip_skip))
