"""The phoneme symbol table: every phone in the data plus the word boundary "|", sorted; a
symbol's id is its position. Phoneme strings are the ingest stages' (phonemes.WORD_SEPARATOR):
phones separated by spaces, words by " | ", so a string is its symbols joined by spaces.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable

import fsspec

from pipeline.tokenizers.phonemes import WORD_SEPARATOR

FILE = "phonemes.json"
WORD_BOUNDARY = WORD_SEPARATOR.strip()


@dataclass(frozen=True)
class PhonemeTable:
    symbols: tuple[str, ...]

    @classmethod
    def build(cls, phonemes: Iterable[str]) -> "PhonemeTable":
        """The table of every symbol in the phoneme strings `phonemes`."""
        return cls(tuple(sorted({WORD_BOUNDARY}.union(*(p.split() for p in phonemes)))))

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, phonemes: str) -> list[int]:
        """Ids of a phoneme string; ValueError names a phone that is not in the table."""
        try:
            return [self._ids[s] for s in phonemes.split()]
        except KeyError as exc:
            raise ValueError(f"phone {exc.args[0]!r} is not in the phoneme table") from None

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.symbols[i] for i in ids)

    @cached_property
    def _ids(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.symbols)}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"symbols": list(self.symbols)}, ensure_ascii=False, indent=1) + "\n")


def load(url: str | Path) -> PhonemeTable:
    """From a phonemes.json path or fsspec URL."""
    with fsspec.open(str(url), "r", encoding="utf-8") as f:
        return PhonemeTable(tuple(json.load(f)["symbols"]))
