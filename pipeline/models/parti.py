"""Parti-style text-to-image: a bidirectional text encoder and an image-token decoder that
cross-attends to it, both over the unified vocabulary (one embedding table of vocab_size rows).

    encoder input    <bos> text <pad>...          (text_mask True on <bos> and text)
    decoder input    <boi> image <pad>...
    targets          image <eoi> -100...

The leading <bos> keeps a caption of no tokens (classifier-free guidance's unconditional input,
and `caption_dropout` in training) one token to attend to.

Shapes: B batch, S text positions, T image positions, V vocab_size, C d_model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.decoder import (causal_inputs, init_residual_projections, lm_head, require_vocab_size,
                                     transformer_checks)
from pipeline.models.layers import Block, KVCache, RMSNorm, TransformerConfig, init_weights, rotary
from pipeline.models.sampling import sample_loop
from pipeline.tokenizers.config_checks import require
from pipeline.tokenizers.vocab import Vocab

IGNORE = -100       # target of padding positions (F.cross_entropy's ignore_index)


@dataclass
class PartiConfig:
    vocab_size: int = 0                 # Vocab.size; 0 until set from the vocabulary
    encoder_layers: int = 2
    decoder_layers: int = 4
    n_head: int = 4
    d_model: int = 256
    mlp_ratio: float = 8 / 3
    dropout: float = 0.0
    tie_embeddings: bool = True         # the lm head is the (shared) embedding table
    rope_base: float = 10000.0

    def __post_init__(self):
        require("PartiConfig", [
            ("encoder_layers", self.encoder_layers > 0, f"must be positive, not {self.encoder_layers}"),
            ("decoder_layers", self.decoder_layers > 0, f"must be positive, not {self.decoder_layers}"),
            *transformer_checks(self)])

    @property
    def transformer(self) -> TransformerConfig:
        return TransformerConfig(self.d_model, self.n_head, self.mlp_ratio, self.dropout, self.rope_base)


class Parti(nn.Module):
    def __init__(self, config: PartiConfig):
        super().__init__()
        require_vocab_size("PartiConfig", config.vocab_size)
        self.config, c = config, config.transformer
        self.embed = nn.Embedding(config.vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList(Block(c) for _ in range(config.encoder_layers))
        self.encoder_norm = RMSNorm(c.d_model)
        self.decoder = nn.ModuleList(Block(c, cross=True) for _ in range(config.decoder_layers))
        self.norm = RMSNorm(c.d_model)
        self.head = lm_head(self.embed, config.tie_embeddings)
        self.apply(init_weights)
        init_residual_projections(self.encoder)
        init_residual_projections(self.decoder)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary(positions, self.config.transformer.head_size, self.config.rope_base)

    def encode(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Memory (B, S, C) of text (B, S); text_mask (B, S) True on real tokens, at least one a row."""
        B, S = text.shape
        mask = text_mask[:, None, None, :]                      # (B, 1, 1, S): every position sees the real tokens
        rope = self._rope(torch.arange(S, device=text.device).expand(B, S))
        x = self.drop(self.embed(text))
        for block in self.encoder:
            x = block(x, mask, rope)
        return self.encoder_norm(x)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, image_in: torch.Tensor,
                cache: KVCache | None = None, memory: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) for the decoder input image_in (B, T) (`<boi> image...`, causal). With a
        cache, image_in follows the cached positions; pass `memory` to skip encoding the text again."""
        memory = self.encode(text, text_mask) if memory is None else memory
        mask, positions = causal_inputs(image_in, cache)
        rope = self._rope(positions)
        x = self.drop(self.embed(image_in))                     # (B, T, C)
        for layer, block in enumerate(self.decoder):
            x = block(x, mask, rope, cache, layer, memory, text_mask[:, None, None, :])
        return self.head(self.norm(x))                          # (B, T, V)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.decoder_layers)


def caption(vocab: Vocab, text_local) -> torch.Tensor:
    """Encoder input (S,) global ids: <bos> then the caption's text ids."""
    return torch.as_tensor(np.concatenate([[vocab.special("<bos>")], vocab.to_global("text", text_local)]), dtype=torch.long)


def collate(vocab: Vocab, docs: list[dict], caption_dropout: float = 0.0,
            rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
    """A batch from t2i documents as packing.parse gives them ({"text", "image"}, local ids):
    text (B, S) and text_mask (B, S), image_in (B, T) and targets (B, T), T = longest image + 1.
    Each caption is dropped (left empty) with probability caption_dropout, to train the
    unconditional model that classifier-free guidance needs."""
    rng = np.random.default_rng() if rng is None else rng
    pad, boi, eoi = vocab.special("<pad>"), vocab.special("<boi>"), vocab.special("<eoi>")
    texts = [caption(vocab, [] if rng.random() < caption_dropout else doc["text"]) for doc in docs]
    images = [torch.as_tensor(vocab.to_global("image", np.ravel(doc["image"])), dtype=torch.long) for doc in docs]
    B, S, T = len(docs), max(len(t) for t in texts), max(len(i) for i in images) + 1
    text = torch.full((B, S), pad, dtype=torch.long)
    image_in, targets = torch.full((B, T), pad, dtype=torch.long), torch.full((B, T), IGNORE, dtype=torch.long)
    for b, (words, image) in enumerate(zip(texts, images)):
        text[b, :len(words)] = words
        image_in[b, :len(image) + 1] = torch.cat([torch.tensor([boi]), image])
        targets[b, :len(image) + 1] = torch.cat([image, torch.tensor([eoi])])
    lengths = torch.tensor([len(t) for t in texts])
    text_mask = torch.arange(S)[None] < lengths[:, None]
    return {"text": text, "text_mask": text_mask, "image_in": image_in, "targets": targets}


def training_loss(net: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy of the targets (image codes, then <eoi>); `net` may be DDP-wrapped."""
    logits = net(batch["text"], batch["text_mask"], batch["image_in"])           # (B, T, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE)
    return loss, {"loss_t2i": loss.item()}


@torch.no_grad()
def generate_image(model: Parti, vocab: Vocab, text_local: list[int], tokens: int, *, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, cfg_scale: float = 1.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """`tokens` local image codes (tokens,) for one caption, sampled from the image range only;
    cfg_scale != 1 guides with the empty caption as the unconditional text."""
    device = model.embed.weight.device

    def stream(text_ids):         # a Step over the decoder with this caption's memory and its own cache
        text = caption(vocab, text_ids)[None].to(device)                         # (1, S)
        mask = torch.ones_like(text, dtype=torch.bool)
        memory, cache = model.encode(text, mask), model.new_cache()
        return lambda new: model(text, mask, new, cache=cache, memory=memory)[:, -1]

    image = vocab.range("image")
    boi = torch.tensor([[vocab.special("<boi>")]], device=device)
    uncond = (stream([]), boi) if cfg_scale != 1.0 else None
    codes = sample_loop(stream(text_local), boi, tokens, uncond=uncond, cfg_scale=cfg_scale,
                        allowed=(image.offset, image.offset + image.size), temperature=temperature,
                        top_k=top_k, top_p=top_p, generator=generator)
    return codes[0] - image.offset
