"""The unified vocabulary: one id space for text, phonemes, image codes and audio codes.

Ranges come in a fixed order, each contiguous, starting where the previous one ends:

    special   <pad> <bos> <eos> <boi> <eoi> <boa> <eoa> <sep>, task tokens <t2i> <i2t> <tts> <asr>,
              then the CM3 mask sentinels <mask:0> ... <mask:n-1>
    text      byte-level BPE ids                       (source: the text tokenizer's digest)
    phoneme   phoneme symbols, in the table's order
    image     VQ codes 0..K-1                          (source: the image tokenizer's digest)
    audio:q   codes of codebook q, one range per q     (source: the codec's digest)

A model's embedding table has `size` rows. Layout and JSON form: schemas/vocab.schema.json; the
fingerprint hashes the ranges, so any change of a tokenizer, codebook or special token changes it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np

SPECIALS = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<boa>", "<eoa>", "<sep>")
TASKS = ("t2i", "i2t", "tts", "asr")
VERSION = 1


class VocabError(ValueError):
    """A token or id outside the vocabulary; the message names the range."""


@dataclass(frozen=True)
class Range:
    name: str
    offset: int
    size: int
    tokens: tuple[str, ...] = ()     # special and phoneme ranges: the token of each local id
    source: str = ""                 # digest of what defines the ids (tokenizer, codec)


@dataclass(frozen=True)
class Vocab:
    ranges: tuple[Range, ...]
    _by_name: dict = field(init=False, repr=False, compare=False)
    _specials: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        expected = 0
        for r in self.ranges:
            if r.offset != expected or r.size < 1:
                raise VocabError(f"range {r.name} starts at {r.offset} with size {r.size}; expected offset "
                                 f"{expected} and a positive size (ranges are contiguous)")
            expected += r.size
        object.__setattr__(self, "_by_name", {r.name: r for r in self.ranges})
        special = self._by_name["special"]
        object.__setattr__(self, "_specials", {t: special.offset + i for i, t in enumerate(special.tokens)})

    @property
    def size(self) -> int:
        return self.ranges[-1].offset + self.ranges[-1].size

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps([_range_json(r) for r in self.ranges], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def has(self, name: str) -> bool:
        return name in self._by_name

    def range(self, name: str) -> Range:
        if name not in self._by_name:
            raise VocabError(f"no {name!r} range in this vocabulary (ranges: {', '.join(self._by_name)})")
        return self._by_name[name]

    def special(self, token: str) -> int:
        """Global id of a special, task (`<t2i>`) or sentinel (`<mask:0>`) token."""
        if token not in self._specials:
            raise VocabError(f"{token!r} is not a special token of this vocabulary")
        return self._specials[token]

    def to_global(self, name: str, ids) -> np.ndarray:
        """Local ids of range `name` -> global ids (int32); raises when an id is outside the range."""
        r = self.range(name)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= r.size):
            raise VocabError(f"{name} ids must be in [0, {r.size}), got [{ids.min()}, {ids.max()}]")
        return (ids + r.offset).astype(np.int32)

    def to_local(self, name: str, ids) -> np.ndarray:
        """Global ids that all lie in range `name` -> its local ids."""
        r = self.range(name)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < r.offset or ids.max() >= r.offset + r.size):
            raise VocabError(f"ids outside the {name} range [{r.offset}, {r.offset + r.size})")
        return ids - r.offset

    def range_of(self, ids) -> np.ndarray:
        """Index into `ranges` of each global id (so ranges[i].name says what a token is)."""
        starts = np.array([r.offset for r in self.ranges])
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise VocabError(f"ids must be in [0, {self.size})")
        return np.searchsorted(starts, ids, side="right") - 1

    def to_json(self) -> dict:
        return {"version": VERSION, "size": self.size, "fingerprint": self.fingerprint,
                "ranges": [_range_json(r) for r in self.ranges]}

    @classmethod
    def from_json(cls, data: dict) -> "Vocab":
        vocab = cls(tuple(Range(r["name"], r["offset"], r["size"], tuple(r.get("tokens", ())), r.get("source", ""))
                          for r in data["ranges"]))
        if data.get("fingerprint") not in (None, vocab.fingerprint):
            raise VocabError("vocab fingerprint does not match its ranges (the file was edited or is corrupt)")
        return vocab


def _range_json(r: Range) -> dict:
    return {k: list(v) if k == "tokens" else v for k, v in asdict(r).items() if v not in ((), "")}


def special_tokens(sentinels: int) -> tuple[str, ...]:
    """Specials, task tokens, then `sentinels` CM3 mask sentinels."""
    return SPECIALS + tuple(f"<{t}>" for t in TASKS) + tuple(f"<mask:{i}>" for i in range(sentinels))


def build(*, text_size: int = 0, text_source: str = "", phonemes: tuple[str, ...] = (), image_codes: int = 0,
          image_source: str = "", audio_codebooks: int = 0, audio_codebook_size: int = 0, audio_source: str = "",
          sentinels: int = 8) -> Vocab:
    """The vocabulary for the given tokenizers; a modality of size 0 gets no range."""
    parts = [("special", len(special_tokens(sentinels)), special_tokens(sentinels), ""),
             ("text", text_size, (), text_source), ("phoneme", len(phonemes), tuple(phonemes), ""),
             ("image", image_codes, (), image_source)]
    parts += [(f"audio:{q}", audio_codebook_size, (), audio_source) for q in range(audio_codebooks)]
    ranges, offset = [], 0
    for name, size, tokens, source in parts:
        if size:
            ranges.append(Range(name, offset, size, tokens, source))
            offset += size
    return Vocab(tuple(ranges))
