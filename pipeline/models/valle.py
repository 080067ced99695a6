"""VALL-E: phonemes and a ~3 s speaker prompt -> codec tokens, as two transformers over one tts document.

    AR   a Decoder over global ids  <bos> <tts> phonemes <sep> prompt[0] <boa> speech[0] <eoa>, learning
         speech[0] and <eoa> (codebook 0 carries the content, one token a frame) by a softmax over those ids alone
    NAR  a bidirectional transformer over [phonemes ; prompt frames ; target frames] that predicts codebook q
         of the target frames from their codebooks < q; synthesis runs it for q = 1..n_q-1, one level at a time

A frame's NAR input is the sum of its codebooks' embeddings (prompt frames: all n_q; target frames: those
< q), plus a segment embedding (phonemes, prompt, target) and an embedding of q added at every position
(not a prefix token, so every level sees the same layout and positions). NAR inputs are global ids (one
table of vocab_size rows); its output is codebook_size logits from one head shared by every q, so each
parameter gets a gradient every step and DDP needs no find_unused_parameters. In a batch each segment
is padded on its own; positions count real tokens only and padding is masked out of attention, so a
sample's logits do not depend on what it is batched with.

Shapes: B batch, L AR length, V vocab_size, n_q codebooks, K codebook_size, P phonemes, Tp prompt
frames, T target frames, C d_model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.decoder import (Decoder, DecoderConfig, column_index, init_residual_projections,
                                     require_vocab_size, transformer_checks)
from pipeline.models.layers import Block, RMSNorm, TransformerConfig, document_mask, init_weights, rotary
from pipeline.models.sampling import generate
from pipeline.tokenizers.config_checks import require
from pipeline.tokenizers.vocab import Vocab

IGNORE = -100
# NARModel.forward's arguments, in order; a batch holds each as "nar_<name>"
NAR_INPUTS = ("phonemes", "phoneme_mask", "prompt", "prompt_mask", "codes", "frame_mask", "q")


@dataclass
class ValleConfig:
    vocab_size: int = 0          # the unified vocabulary's size; set by the trainer
    n_q: int = 0                 # codebooks (the vocabulary's audio:q ranges); set by the trainer
    codebook_size: int = 0       # codes per codebook; set by the trainer
    ar_layers: int = 4
    nar_layers: int = 4
    n_head: int = 4
    d_model: int = 256
    mlp_ratio: float = 8 / 3
    dropout: float = 0.0
    rope_base: float = 10000.0

    def __post_init__(self):
        require("ValleConfig", [
            *((name, getattr(self, name) >= 0, f"must be >= 0 (0: set later from the vocabulary), not {getattr(self, name)}")
              for name in ("n_q", "codebook_size")),
            ("ar_layers", self.ar_layers > 0, f"must be positive, not {self.ar_layers}"),
            ("nar_layers", self.nar_layers > 0, f"must be positive, not {self.nar_layers}"),
            *transformer_checks(self)])

    @property
    def transformer(self) -> TransformerConfig:
        return TransformerConfig(self.d_model, self.n_head, self.mlp_ratio, self.dropout, self.rope_base)


class NARModel(nn.Module):
    def __init__(self, c: ValleConfig):
        super().__init__()
        require_vocab_size("ValleConfig", c.vocab_size)
        require("ValleConfig", [
            ("n_q", c.n_q >= 2, f"must be >= 2 (the NAR predicts codebooks 1..n_q-1), not {c.n_q}"),
            ("codebook_size", c.codebook_size > 0, "must be set to the codec's codebook size, not 0")])
        self.c, self.t = c, c.transformer
        self.tokens = nn.Embedding(c.vocab_size, c.d_model)      # phonemes and codes, by global id
        self.level = nn.Embedding(c.n_q, c.d_model)              # q, the codebook predicted (row 0 unused)
        self.segment = nn.Embedding(3, c.d_model)                # phonemes, prompt, target
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(self.t) for _ in range(c.nar_layers))
        self.norm = RMSNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.codebook_size, bias=False)
        self.apply(init_weights)
        init_residual_projections(self.blocks)

    def forward(self, phonemes: torch.Tensor, phoneme_mask: torch.Tensor, prompt: torch.Tensor, prompt_mask: torch.Tensor,
                codes: torch.Tensor, frame_mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """phonemes (B, P), prompt (B, n_q, Tp), codes (B, n_q, T): global ids; masks (B, P|Tp|T) True on real
        tokens; q (B,) in 1..n_q-1. Logits (B, T, K) for codebook q of the target frames (codes >= q unread)."""
        below = (torch.arange(self.c.n_q, device=q.device) < q[:, None])[:, :, None, None]          # (B, n_q, 1, 1)
        seg = self.segment.weight
        x = torch.cat((self.tokens(phonemes) + seg[0],                                              # (B, P, C)
                       self.tokens(prompt).sum(1) + seg[1],                                         # (B, Tp, C)
                       (self.tokens(codes) * below).sum(1) + seg[2]), dim=1)                        # (B, T, C)
        x = self.drop(x + self.level(q)[:, None])                                                   # (B, P+Tp+T, C)
        real = torch.cat((phoneme_mask, prompt_mask, frame_mask), dim=1)                            # (B, P+Tp+T)
        rope = rotary(real.long().cumsum(1) - 1, self.t.head_size, self.c.rope_base)   # padding takes no position
        mask = document_mask(torch.where(real, 0, -1), causal=False)                                # (B, 1, S, S)
        for block in self.blocks:
            x = block(x, mask, rope)
        return self.head(self.norm(x[:, x.shape[1] - codes.shape[2]:]))                           # (B, T, K)


class Valle(nn.Module):
    def __init__(self, config: ValleConfig):
        super().__init__()
        self.config = config
        self.nar = NARModel(config)            # first: its checks name the fields the vocabulary sets
        self.ar = Decoder(DecoderConfig(vocab_size=config.vocab_size, n_layer=config.ar_layers, n_head=config.n_head,
                                        d_model=config.d_model, mlp_ratio=config.mlp_ratio, dropout=config.dropout,
                                        tie_embeddings=True, rope_base=config.rope_base))

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """A `collate` batch -> AR + NAR loss, and their stats."""
        targets, columns = batch["ar_targets"], batch["ar_columns"]                                # (B, L), (K,)
        scored = targets != IGNORE
        logits = self.ar(batch["ar_tokens"], only=scored, columns=columns)                         # (N, K)
        choice = column_index(columns, targets[scored])                                            # (N,) in 0..K-1
        loss_ar = F.cross_entropy(logits.float(), choice)
        nar_logits = self.nar(*(batch[f"nar_{k}"] for k in NAR_INPUTS))                            # (B, T, K)
        nar_targets = batch["nar_targets"]                                                          # (B, T)
        loss_nar = F.cross_entropy(nar_logits.flatten(0, 1).float(), nar_targets.flatten(), ignore_index=IGNORE)
        acc = (logits.detach().argmax(-1) == choice).float().mean()
        stats = {"loss_tts_ar": loss_ar.item(), "loss_tts_nar": loss_nar.item(), "acc_tts_ar": acc.item()}
        return loss_ar + loss_nar, stats


def collate(vocab: Vocab, docs: list[dict], q_generator: torch.Generator) -> dict[str, torch.Tensor]:
    """tts documents (`packing.parse` outputs) -> a batch of CPU tensors:

        ar_tokens  (B, L)          <bos> <tts> phonemes <sep> prompt[0] <boa> speech[0] (<pad> after)
        ar_targets (B, L)          the next token where it is speech[0] or <eoa>, else -100
        ar_columns (K,)            the ids the AR can predict, sorted: <eoa> and audio:0's (its softmax is
                                   over them alone, as sampling restricts it to them)
        nar_<NAR_INPUTS>           NARModel.forward's inputs; nar_q (B,) uniform in 1..n_q-1 from q_generator
        nar_targets (B, T)         codebook q of the speech, local codes (-100 on padding)
    """
    rows, targets = [], []
    for d in docs:
        speech0 = vocab.to_global("audio:0", d["speech"][0])
        row = np.concatenate((_ar_head(vocab, d["phonemes"], d["prompt"]), speech0, [vocab.special("<eoa>")]))
        target = row[1:].astype(np.int64)
        target[:len(target) - len(speech0) - 1] = IGNORE                     # score speech[0] and <eoa> only
        rows.append(row[:-1])
        targets.append(target)
    (lo, hi), eoa = _ar_outputs(vocab)
    columns = torch.cat((torch.tensor([eoa]), torch.arange(lo, hi)))
    batch = {"ar_tokens": _pad(rows, vocab.special("<pad>")), "ar_targets": _pad(targets, IGNORE),
             "ar_columns": columns.sort().values, **_nar_inputs(vocab, docs)}
    n_q = batch["nar_codes"].shape[1]
    q = torch.randint(1, n_q, (len(docs),), generator=q_generator)                                 # (B,)
    batch["nar_q"] = q
    speech = _pad([d["speech"] for d in docs], IGNORE)                                             # (B, n_q, T) local
    batch["nar_targets"] = speech[torch.arange(len(docs)), q]                                      # (B, T)
    return batch


@torch.no_grad()
def synthesize(model: Valle, vocab: Vocab, phonemes: list[int], prompt: torch.Tensor, *, max_frames: int,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Local codes (n_q, T <= max_frames) saying `phonemes` (local ids) in the voice of `prompt` (n_q, Tp) local
    codes: the AR samples codebook 0 with its KV cache until <eoa>, then the NAR fills codebooks 1..n_q-1
    greedily, one level at a time."""
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompt = np.asarray(torch.as_tensor(prompt).cpu())
    allowed, eoa = _ar_outputs(vocab)
    head = torch.as_tensor(_ar_head(vocab, phonemes, prompt), dtype=torch.long, device=device)[None]     # (1, L0)
    new = generate(model.ar, head, max_frames, allowed=allowed, stop=eoa,
                   temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)[0]     # (n <= max_frames,)
    first = new[new != eoa].tolist()                               # generate ends at <eoa> (batch of one)
    codes = np.zeros((len(prompt), len(first)), dtype=np.int64)
    codes[0] = vocab.to_local("audio:0", first)
    doc = {"phonemes": phonemes, "prompt": prompt, "speech": codes}
    nar = {k: v.to(device) for k, v in _nar_inputs(vocab, [doc]).items()}
    offsets = torch.tensor([vocab.range(f"audio:{q}").offset for q in range(len(prompt))], device=device)
    for q in range(1, len(prompt)):
        logits = model.nar(*(nar[f"nar_{k}"] for k in NAR_INPUTS[:-1]), torch.tensor([q], device=device))  # (1, T, K)
        nar["nar_codes"][0, q] = logits[0].argmax(-1) + offsets[q]
    model.train(training)
    return (nar["nar_codes"][0] - offsets[:, None]).cpu()                                           # (n_q, T)


def _ar_outputs(vocab: Vocab) -> tuple[tuple[int, int], int]:
    """What the AR predicts, in training (its softmax) and sampling alike: codebook 0's ids [lo, hi), and <eoa>."""
    audio0 = vocab.range("audio:0")
    return (audio0.offset, audio0.offset + audio0.size), vocab.special("<eoa>")


def _ar_head(vocab: Vocab, phonemes, prompt: np.ndarray) -> np.ndarray:
    """<bos> <tts> phonemes <sep> prompt[0] <boa>, global ids."""
    return np.concatenate(([vocab.special("<bos>"), vocab.special("<tts>")], vocab.to_global("phoneme", phonemes),
                           [vocab.special("<sep>")], vocab.to_global("audio:0", prompt[0]), [vocab.special("<boa>")]))


def _nar_inputs(vocab: Vocab, docs: list[dict]) -> dict[str, torch.Tensor]:
    """NARModel.forward's inputs but q, global ids padded with <pad>, as "nar_<name>"."""
    pad = vocab.special("<pad>")

    def audio(codes: np.ndarray) -> np.ndarray:                                        # (n_q, T) local -> global
        return np.stack([vocab.to_global(f"audio:{q}", row) for q, row in enumerate(codes)])

    phonemes = [vocab.to_global("phoneme", d["phonemes"]) for d in docs]
    prompts, speech = [audio(d["prompt"]) for d in docs], [audio(d["speech"]) for d in docs]
    return {"nar_phonemes": _pad(phonemes, pad), "nar_phoneme_mask": _mask(phonemes),
            "nar_prompt": _pad(prompts, pad), "nar_prompt_mask": _mask(prompts),
            "nar_codes": _pad(speech, pad), "nar_frame_mask": _mask(speech)}


def _pad(arrays: list[np.ndarray], value: int) -> torch.Tensor:
    """Arrays (..., L_i) -> (B, ..., max L_i) long, padded with `value` at the end."""
    longest = max(a.shape[-1] for a in arrays)
    out = torch.full((len(arrays), *arrays[0].shape[:-1], longest), value, dtype=torch.long)
    for i, a in enumerate(arrays):
        out[i, ..., :a.shape[-1]] = torch.as_tensor(np.asarray(a, dtype=np.int64))
    return out


def _mask(arrays: list[np.ndarray]) -> torch.Tensor:
    """(B, max L_i) bool, True on each array's L_i real positions (last axis)."""
    lengths = torch.tensor([a.shape[-1] for a in arrays])
    return torch.arange(int(lengths.max())) < lengths[:, None]
