"""Byte-level BPE for captions and transcripts, trained with Hugging Face `tokenizers`.

All 256 bytes are in the initial alphabet, so any text encodes, and decodes back to itself (to
its lower case with `lowercase`). No special tokens live here: the unified vocabulary adds them.
Training is deterministic for fixed input: the trainer counts words, then merges the most
frequent pair, ties broken by the pair's ids; tokenizer.json came out byte-identical across processes,
thread counts (RAYON_NUM_THREADS 1, 2, 8) and input orders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import fsspec
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

FILE = "tokenizer.json"
MIN_VOCAB = 257          # the 256 bytes and at least one merge
MAX_VOCAB = 65535        # token ids are stored as uint16


class TextBPE:
    """A trained tokenizer: text <-> ids."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))


def train(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2, lowercase: bool = False) -> TextBPE:
    """Train on `texts` (streamed once). The vocabulary stops short of `vocab_size` when no pair
    left occurs `min_frequency` times."""
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size must be in {MIN_VOCAB}..{MAX_VOCAB}, not {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    if lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return TextBPE(tokenizer)


def load(url: str | Path) -> TextBPE:
    """From a tokenizer.json path or fsspec URL."""
    with fsspec.open(str(url), "r", encoding="utf-8") as f:
        return TextBPE(Tokenizer.from_str(f.read()))
