"""The CM3Leon-style decoder: one causal transformer over the unified vocabulary.

Training rows are packed documents (pipeline.data.packing). Given `doc_ids`, each document attends
only to itself and its rotary positions restart at 0, so a document gets the same logits whether it
is packed or alone. Generation feeds new tokens through a KVCache (pipeline.models.sampling).

Shapes: B batch, T new positions, V vocab_size, C d_model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models.layers import Block, KVCache, RMSNorm, TransformerConfig, document_mask, init_weights, rotary
from pipeline.tokenizers.config_checks import require


def transformer_checks(c) -> list[tuple[str, bool, str]]:
    """The field checks shared by every config that builds a layers.TransformerConfig."""
    heads_ok = c.n_head > 0 and c.d_model > 0 and c.d_model % c.n_head == 0
    return [
        ("vocab_size", c.vocab_size >= 0, f"must be >= 0 (0: set later from the vocabulary), not {c.vocab_size}"),
        ("n_head", c.n_head > 0, f"must be positive, not {c.n_head}"),
        ("d_model", heads_ok, f"must be a positive multiple of n_head={c.n_head}, not {c.d_model}"),
        ("d_model", heads_ok and (c.d_model // c.n_head) % 2 == 0,
         f"/ n_head must be an even head size for rotary positions, not {c.d_model} / {c.n_head}"),
        ("mlp_ratio", c.mlp_ratio > 0, f"must be positive, not {c.mlp_ratio}"),
        ("dropout", 0 <= c.dropout < 1, f"must be in [0, 1), not {c.dropout}"),
        ("rope_base", c.rope_base > 1, f"must be > 1, not {c.rope_base}"),
    ]


def require_vocab_size(owner: str, vocab_size: int) -> None:
    require(owner, [("vocab_size", vocab_size > 0, "must be set to the vocabulary's size (Vocab.size), not 0")])


@dataclass
class DecoderConfig:
    vocab_size: int = 0                 # Vocab.size; 0 until set from the vocabulary
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    mlp_ratio: float = 8 / 3
    dropout: float = 0.0
    tie_embeddings: bool = True         # the lm head is the embedding table
    rope_base: float = 10000.0
    image_positions: int = 0            # learned embeddings of the first N slots after <boi> (an image's
                                        # grid, e.g. 64 for 8x8 codes), so a code knows its row and column
                                        # without counting; 0: none
    image_grid: int = 0                 # the side of a square grid of image_positions slots (8 for 64): learned
                                        # row and column embeddings join each slot's, so what "top" or "left"
                                        # means is learned once for a whole row or column; 0: none
    boi_id: int = -1                    # the <boi> id, set from the vocabulary when image_positions > 0
    image_code_digits: bool = False     # an FSQ image code's embedding (and, tied, its output row) also sums one
                                        # learned embedding per digit of the code, so codes that share a level
                                        # (a hue, an edge) share what is learned about it, rare codes included
    image_code_levels: tuple[int, ...] = ()   # the FSQ levels (8, 5, 5, 5), set from the image tokenizer
    image_code_start: int = -1          # the first image-code id, set from the vocabulary
    output_ranges: tuple[tuple[int, int], ...] = ()   # the id ranges [lo, hi) it predicts, set from the vocabulary
                                        # and its tasks (packing.task_ranges): its softmax is over them alone,
                                        # every other id gets MASKED_LOGIT; (): every id

    def __post_init__(self):
        require("DecoderConfig", [("n_layer", self.n_layer > 0, f"must be positive, not {self.n_layer}"),
                                  ("image_positions", self.image_positions >= 0,
                                   f"must be >= 0 (0: none), not {self.image_positions}"),
                                  ("image_grid", self.image_grid == 0 or self.image_grid ** 2 == self.image_positions,
                                   f"must be 0 or the side of the image_positions={self.image_positions} slots' square "
                                   f"grid, not {self.image_grid}"),
                                  ("image_code_levels", all(n > 1 for n in self.image_code_levels),
                                   f"must be FSQ levels (each > 1), not {self.image_code_levels}"),
                                  ("output_ranges", ranges_ok(self.output_ranges, self.vocab_size),
                                   f"must be ascending, disjoint id ranges [lo, hi) inside the vocabulary of "
                                   f"{self.vocab_size}, not {self.output_ranges}"),
                                  *transformer_checks(self)])

    @property
    def transformer(self) -> TransformerConfig:
        return TransformerConfig(self.d_model, self.n_head, self.mlp_ratio, self.dropout, self.rope_base)


MASKED_LOGIT = -1e4                     # an id outside output_ranges: exp() is 0 in any float, and guidance's
                                        # differences of two such logits stay finite (0), unlike -inf's


def ranges_ok(ranges, vocab_size: int) -> bool:
    """Whether `ranges` are ascending, disjoint, non-empty [lo, hi) inside [0, vocab_size)."""
    ends = [0] + [x for lo_hi in ranges for x in lo_hi]
    return all(a <= b for a, b in zip(ends, ends[1:])) and all(lo < hi for lo, hi in ranges) and \
        (not ranges or ends[-1] <= vocab_size)


def column_index(columns: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each id's index in the ascending ids `columns` (forward's `columns`: where its logit is);
    ValueError naming an id outside them."""
    index = torch.searchsorted(columns, ids).clamp(max=len(columns) - 1)
    outside = columns[index] != ids
    if outside.any():
        raise ValueError(f"target id {int(ids[outside][0])} is outside the ids the model predicts "
                         f"(its output_ranges); {int(outside.sum())} such targets in this batch")
    return index


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) index of each position within its document (a run of equal ids in doc_ids (B, T))."""
    index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def causal_inputs(tokens: torch.Tensor, cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask (1, 1, T, past + T) and positions (B, T) for tokens (B, T) that follow the cache's
    `past` positions: each sees every cached position and the new ones up to itself."""
    B, T = tokens.shape
    past = 0 if cache is None else cache.length
    mask = torch.ones(T, past + T, dtype=torch.bool, device=tokens.device).tril(diagonal=past)
    return mask[None, None], torch.arange(past, past + T, device=tokens.device).expand(B, T)


def init_residual_projections(blocks: nn.ModuleList) -> None:
    """nanoGPT's scaled init: the n projections that add into the residual stream get std
    0.02 / sqrt(n), so the stream's variance does not grow with depth (n = 2 * layers here)."""
    outputs = [m for name, m in blocks.named_modules() if name.endswith((".proj", ".down"))]
    for module in outputs:
        nn.init.normal_(module.weight, std=0.02 / math.sqrt(len(outputs)))


def lm_head(embed: nn.Embedding, tie: bool) -> nn.Linear:
    """C -> V logits; with `tie` its weight is the embedding table itself."""
    head = nn.Linear(embed.embedding_dim, embed.num_embeddings, bias=False)
    if tie:
        head.weight = embed.weight
    return head


class CodeDigits(nn.Module):
    """(V, C) additions to the embedding table: on each FSQ image code the sum of one learned embedding
    per digit of it (mixed radix, first level least significant, as vector_quantize_pytorch's FSQ
    numbers codes); zero on every other id."""

    def __init__(self, levels: tuple[int, ...], start: int, vocab_size: int, d_model: int):
        super().__init__()
        codes = math.prod(levels)
        require("DecoderConfig", [("image_code_levels", len(levels) > 0, "must be set (from an FSQ image tokenizer) "
                                   "with image_code_digits"),
                                  ("image_code_start", 0 <= start and start + codes <= vocab_size,
                                   f"must place {codes} image codes inside the vocabulary of {vocab_size}, not {start}")])
        self.start, self.vocab_size = start, vocab_size
        self.embed = nn.Embedding(sum(levels), d_model)
        code = torch.arange(codes)[:, None]
        basis = torch.tensor([math.prod(levels[:d]) for d in range(len(levels))])
        offsets = torch.tensor([sum(levels[:d]) for d in range(len(levels))])
        self.register_buffer("digit_ids", code // basis % torch.tensor(levels) + offsets, persistent=False)

    def forward(self) -> torch.Tensor:
        sums = self.embed(self.digit_ids).sum(dim=1)            # (codes, C)
        after = self.vocab_size - self.start - len(sums)
        return F.pad(sums, (0, 0, self.start, after))


class Decoder(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        require_vocab_size("DecoderConfig", config.vocab_size)
        self.config, c = config, config.transformer
        self.embed = nn.Embedding(config.vocab_size, c.d_model)
        if config.image_positions:
            require("DecoderConfig", [("boi_id", 0 <= config.boi_id < config.vocab_size,
                                       f"must be the vocabulary's <boi> id when image_positions > 0, not {config.boi_id}")])
            self.image_slots = nn.Embedding(config.image_positions, c.d_model)
        if config.image_grid:
            self.image_rows = nn.Embedding(config.image_grid, c.d_model)
            self.image_cols = nn.Embedding(config.image_grid, c.d_model)
        if config.image_code_digits:
            self.code_digits = CodeDigits(config.image_code_levels, config.image_code_start, config.vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(config.n_layer))
        self.norm = RMSNorm(c.d_model)
        self.head = lm_head(self.embed, config.tie_embeddings)
        outputs = [torch.arange(lo, hi) for lo, hi in config.output_ranges]
        self.register_buffer("outputs", torch.cat(outputs) if outputs else None, persistent=False)   # (K,) or None
        self.apply(init_weights)
        init_residual_projections(self.blocks)

    def forward(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: KVCache | None = None,
                only: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) for tokens (B, T).

        doc_ids None: each row is one document. doc_ids (B, T) (-1: padding): each position sees
        only its own document, positions restart at each document. cache: tokens follow the
        cached positions (and are added to the cache); doc_ids cannot be combined with it.
        only (B, T) bool: logits (N, V) of those N positions alone (training skips the lm head, a
        third of the compute with a large vocabulary, where no target is). columns (K,) ids: logits over
        those ids alone, (..., K) (training passes `outputs`; VALL-E's AR, its codebook 0 and <eoa>).
        Without columns, a model with output_ranges scores those ids alone and gives the rest MASKED_LOGIT."""
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids cannot be used with a cache: a cache continues one document a row")
            mask, default_positions = document_mask(doc_ids), document_positions(doc_ids)
        else:
            mask, default_positions = causal_inputs(tokens, cache)
        positions = default_positions if positions is None else positions
        rope = rotary(positions, self.config.transformer.head_size, self.config.rope_base)
        table = self.token_table()                              # (V, C)
        x = F.embedding(tokens, table)                          # (B, T, C)
        if self.config.image_positions:
            x = x + self.image_slot_embedding(tokens, doc_ids, cache)
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, mask, rope, cache, layer)
        x = self.norm(x if only is None else x[only])
        weight = table if self.config.tie_embeddings else self.head.weight            # (V, C)
        if columns is not None:
            return F.linear(x, weight[columns])                                        # (B, T, K) or (N, K)
        if self.outputs is None:
            return F.linear(x, weight)                                                 # (B, T, V) or (N, V)
        logits = F.linear(x, weight[self.outputs])
        return logits.new_full((*logits.shape[:-1], len(weight)), MASKED_LOGIT).index_copy(-1, self.outputs, logits)

    def token_table(self) -> torch.Tensor:
        """(V, C) every id's embedding: the embedding table, plus the digits' sums on image codes."""
        if not self.config.image_code_digits:
            return self.embed.weight
        return self.embed.weight + self.code_digits()

    def image_slot_embedding(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None,
                             cache: KVCache | None) -> torch.Tensor:
        """(B, T, C): at <boi> the embedding of slot 0, after image code k that of slot k + 1 (the slot
        each position predicts; plus its row's and column's with image_grid), within image_positions of
        the last <boi> of the same document; 0 elsewhere. With a cache the last <boi> is carried over
        from the cached positions."""
        B, T = tokens.shape
        past = 0 if cache is None else cache.length
        index = torch.arange(past, past + T, device=tokens.device).expand(B, T)
        boi = torch.where(tokens == self.config.boi_id, index, -1)
        if cache is not None and cache.image_start is not None:
            boi[:, 0] = torch.maximum(boi[:, 0], cache.image_start)
        last = boi.cummax(dim=1).values                         # (B, T) position of the last <boi>, -1: none
        if doc_ids is not None:                                 # a <boi> of an earlier document does not count
            last = torch.where(last >= index - document_positions(doc_ids), last, -1)
        if cache is not None:
            cache.image_start = last[:, -1]
        slot = index - last
        used = (last >= 0) & (slot < self.config.image_positions)
        slot = slot.clamp(0, self.config.image_positions - 1)
        embedding = self.image_slots(slot)
        grid = self.config.image_grid
        if grid:
            embedding = embedding + self.image_rows(slot // grid) + self.image_cols(slot % grid)
        return embedding * used[..., None]

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layer)
