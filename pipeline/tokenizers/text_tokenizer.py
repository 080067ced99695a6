"""A built text tokenizer as the stages and models using it see it: byte-level BPE for captions and
transcripts, and the phoneme table, by URL (TextTokenizer, picklable) or loaded (TextCodec)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from pipeline.tokenizers import phoneme_table, text_bpe
from pipeline.tokenizers.phoneme_table import PhonemeTable
from pipeline.tokenizers.text_bpe import TextBPE


@dataclass(frozen=True)
class TextTokenizer:
    """A built train-text-tokenizer stage: its digest, file URLs, and what a vocabulary needs."""
    digest: str
    bpe: str                       # tokenizer.json URL
    phoneme_table: str             # phonemes.json URL
    vocab_size: int
    phonemes: tuple[str, ...]      # the phoneme symbols, in id order


@dataclass(frozen=True)
class TextCodec:
    """A loaded text tokenizer: BPE ids for captions and transcripts, table ids for phonemes."""
    bpe: TextBPE
    table: PhonemeTable

    def encode(self, text: str) -> list[int]:
        return self.bpe.encode(text)

    def encode_phonemes(self, phonemes: str) -> list[int]:
        """ValueError names a phone the table lacks (phonemes of data it was not built from)."""
        return self.table.encode(phonemes)


@lru_cache(maxsize=2)
def load_text_tokenizer(tokenizer: TextTokenizer) -> TextCodec:
    return TextCodec(text_bpe.load(tokenizer.bpe), phoneme_table.load(tokenizer.phoneme_table))
