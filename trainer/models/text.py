"""Captions -> token ids -> text-encoder states, the sd-scripts way (library/strategy_sd.py, strategy_sdxl.py).

Long captions (`--max_token_length 150/225`) are cut into 77-token chunks that each start with BOS and end
with EOS/PAD, encoded separately and stitched back: BOS of the first chunk, the 75 content positions of
every chunk, the last position of the last chunk -> n*75 + 2 positions.

SDXL (two encoders) conditions the UNet on more than the cross-attention states; see `encode_sdxl_tokens`
and `sdxl_conditioning`.

`--weighted_captions` (`(word:1.2)` syntax, trainer.models.prompt_weights): each caption is tokenized run by
run with a weight per token; after encoding, the states at content positions (1..75 of every chunk) are
multiplied by their token's weight. As in sd-scripts' strategies there is no mean restoration afterwards, and
SDXL's pooled output is not weighted."""

from __future__ import annotations

import logging

import torch

from trainer.models.prompt_weights import parse_weighted_caption

log = logging.getLogger(__name__)

CHUNK = 77  # CLIP's context length; every SD text encoder has it


def tokenize_captions(tokenizer, captions: list[str], max_token_length: int | None = None) -> torch.Tensor:
    """Token ids of shape (batch, n_chunks, 77); n_chunks = max_token_length / 75 (1 by default)."""
    max_length = (max_token_length or 75) + 2
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt").input_ids
    if max_length == CHUNK:
        return ids.unsqueeze(1)
    return torch.stack([_chunk(row, tokenizer.eos_token_id, tokenizer.pad_token_id) for row in ids])


def tokenize_weighted_captions(tokenizer, captions: list[str],
                               max_token_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, weights), both (batch, n_chunks, 77): the attention syntax removed from the ids, each token's
    weight at its position, 1.0 at BOS/EOS/padding."""
    pairs = [_weighted_ids(tokenizer, caption, (max_token_length or 75) + 2) for caption in captions]
    return torch.stack([ids for ids, _ in pairs]), torch.stack([weights for _, weights in pairs])


def _weighted_ids(tokenizer, caption: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens: list[int] = []
    weights: list[float] = []
    for text, weight in parse_weighted_caption(caption):
        ids = tokenizer(text, verbose=False).input_ids[1:-1]  # each run on its own, without BOS/EOS
        tokens += ids
        weights += [weight] * len(ids)
    if len(tokens) > max_length - 2:
        log.debug("caption longer than %d tokens, cut: %s", max_length - 2, caption)
        tokens, weights = tokens[:max_length - 2], weights[:max_length - 2]
    padding = max_length - 2 - len(tokens)
    ids = torch.tensor([tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding)
    flat = torch.tensor([1.0, *weights] + [1.0] * (padding + 1))
    if max_length == CHUNK:
        return ids.unsqueeze(0), flat.unsqueeze(0)
    n_chunks = (max_length - 2) // (CHUNK - 2)
    chunk_weights = torch.ones(n_chunks, CHUNK)
    for i in range(n_chunks):
        chunk_weights[i, 1:CHUNK - 1] = flat[1 + i * (CHUNK - 2):1 + (i + 1) * (CHUNK - 2)]
    return _chunk(ids, tokenizer.eos_token_id, tokenizer.pad_token_id), chunk_weights


def apply_token_weights(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply stitched states (batch, n*75 + 2, D) by the content weights of (batch, n, 77): position
    1 + i*75 + j gets chunk i's weight at j + 1; the first and last positions keep 1."""
    content = weights[:, :, 1:CHUNK - 1].reshape(weights.shape[0], -1)
    ones = torch.ones_like(content[:, :1])
    per_position = torch.cat([ones, content, ones], dim=1).to(states.device, states.dtype, non_blocking=True)
    return states * per_position.unsqueeze(-1)


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
            # time_ids stay float32: sizes above 2048 are not exact in fp16, and the UNet turns them into
            # float32 sinusoids itself before casting the embedding to its own dtype.
            kwargs["added_cond_kwargs"] = {k: v if k == "time_ids" else v.to(dtype) for k, v in self.added.items()}
        return kwargs


def encode_batch(models, batch: dict, *, max_token_length: int | None, clip_skip: int | None, device,
                 weighted: bool = False) -> Conditioning:
    """The batch's captions through the model's text encoder(s): SD1/SD2 one encoder, SDXL two (clip_skip
    does not apply to SDXL, whose layer choice is fixed). `weighted`: --weighted_captions."""
    states = encode_captions(models, batch["captions"], max_token_length=max_token_length, clip_skip=clip_skip,
                             device=device, weighted=weighted)
    if len(states) == 3:
        return sdxl_conditioning(*states, batch)
    return Conditioning(states[0])


def encode_captions(models, captions: list[str], *, max_token_length: int | None, clip_skip: int | None, device,
                    weighted: bool = False) -> tuple[torch.Tensor, ...]:
    """SD1/SD2: (states,); SDXL: (hidden1, hidden2, pool2). With `weighted`, the attention syntax is parsed
    and the cross-attention states weighted per token (pool2 is not)."""
    def tokenize(tokenizer):
        if weighted:
            return tokenize_weighted_captions(tokenizer, captions, max_token_length)
        return tokenize_captions(tokenizer, captions, max_token_length), None

    if len(models.text_encoders) == 2:
        (ids1, weights1), (ids2, weights2) = (tokenize(tok) for tok in models.tokenizers)
        hidden1, hidden2, pool2 = encode_sdxl_tokens(models.text_encoders, ids1.to(device, non_blocking=True),
                                                     ids2.to(device, non_blocking=True),
                                                     eos_token_id=models.tokenizers[1].eos_token_id)
        if weighted:
            hidden1, hidden2 = apply_token_weights(hidden1, weights1), apply_token_weights(hidden2, weights2)
        return hidden1, hidden2, pool2
    ids, weights = tokenize(models.tokenizers[0])
    # non_blocking: a copy from the CPU need not wait for the GPU's queued work (one per step otherwise)
    states = encode_tokens(models.text_encoders[0], ids.to(device, non_blocking=True), clip_skip)
    return (apply_token_weights(states, weights),) if weighted else (states,)


def encode_sdxl_tokens(text_encoders, ids1: torch.Tensor, ids2: torch.Tensor, *, eos_token_id: int):
    """SDXL's text states, as sd-scripts' strategy_sdxl.py computes them:

    hidden1 (B, n*75+2, 768): CLIP-L's hidden_states[11], i.e. the output of layer 11 of 12, no final norm;
    hidden2 (B, n*75+2, 1280): bigG's penultimate layer, no final norm;
    pool2 (B, 1280): bigG's text_projection of its final (normed) state at the first EOS of the first chunk.
    `[-2]` is written instead of `[11]` so that smaller test encoders work the same way; for CLIP-L (12 layers,
    13 hidden states) the two are the same tensor."""
    te1, te2 = text_encoders
    batch, n_chunks, _ = ids1.shape
    flat1 = ids1.reshape(batch * n_chunks, CHUNK).to(te1.device)
    flat2 = ids2.reshape(batch * n_chunks, CHUNK).to(te2.device)
    hidden1 = te1(flat1, output_hidden_states=True).hidden_states[-2]
    out2 = te2(flat2, output_hidden_states=True)
    hidden2 = out2.hidden_states[-2]
    first_eos = (flat2 == eos_token_id).int().argmax(dim=-1)  # sd-scripts' "pool workaround": first EOS
    pooled = out2.last_hidden_state[torch.arange(flat2.shape[0], device=flat2.device), first_eos]
    pool2 = te2.text_projection(pooled.to(te2.text_projection.weight.dtype))
    pool2 = pool2.reshape(batch, n_chunks, -1)[:, 0]
    hidden1, hidden2 = (h.reshape(batch, n_chunks * CHUNK, -1) for h in (hidden1, hidden2))
    if n_chunks > 1:
        hidden1, hidden2 = stitch_chunks(hidden1, n_chunks), stitch_chunks(hidden2, n_chunks)
    return hidden1, hidden2, pool2


def size_time_ids(batch: dict) -> torch.Tensor:
    """(B, 6) float32: original (h, w), crop (top, left), target (h, w) of each sample, from the dataset.

    diffusers' SDXL UNet embeds each of the 6 numbers with 256 sinusoids (`add_time_proj`: Timesteps with
    flip_sin_to_cos=True, downscale_freq_shift=0 -> frequencies exp(-ln(10000)*k/128), laid out [cos..., sin...])
    and puts pool2 first: concat(pool2, emb) -> 1280 + 6*256 = 2816. That is exactly sd-scripts' `y`
    (sdxl_train_network.py), so the numbers are passed as `time_ids` and the UNet makes the embedding itself."""
    parts = [batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]]
    return torch.cat([torch.as_tensor(p).reshape(-1, 2) for p in parts], dim=1).float()


def sdxl_conditioning(hidden1: torch.Tensor, hidden2: torch.Tensor, pool2: torch.Tensor, batch: dict) -> Conditioning:
    """Cross-attention context concat(CLIP-L 768, bigG 1280) = 2048 channels, plus pool2 and the size ids."""
    context = torch.cat([hidden1, hidden2.to(hidden1.dtype)], dim=-1)
    time_ids = size_time_ids(batch).to(context.device, non_blocking=True)
    return Conditioning(context, {"text_embeds": pool2, "time_ids": time_ids})
