"""Training documents in the unified vocabulary, and their packing into fixed-length rows.

Document layouts (global ids; `target` is where the part a model learns to produce begins):

    t2i   <bos> <t2i> text <boi> image <eoi> <eos>                   target: the image
    i2t   <bos> <i2t> <boi> image <eoi> text <eos>                   target: the text
    tts   <bos> <tts> phonemes <sep> prompt <boa> speech <eoa> <eos>  target: the speech
    asr   <bos> <asr> <boa> speech[0] <eoa> text <eos>                target: the text

Speech in tts is codebook-major over every codebook (n_q x T: all of codebook 0, then 1, ...), each
codebook in its own `audio:q` range, so the VALL-E AR model (codebook 0) and NAR model (the rest)
both train from the same rows; the prompt (<= prompt_seconds of another utterance of the speaker)
is laid out the same way. ASR reads codebook 0 only (75 tokens/s carry the content; all codebooks
would be 8x longer). The CM3 causal-masked variant of a document moves random spans of its body to
the end behind mask sentinels: `<bos> <task> a <mask:0> c <mask:0> b <eos>` for body `a b c`.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from pipeline.tokenizers.vocab import Vocab


@dataclass
class Document:
    key: str
    task: str                 # "t2i", ..., with a "cm3:" prefix for the causal-masked variant
    tokens: np.ndarray        # (L,) int32 global ids
    target: int               # index in tokens where the target part begins


TASK_MODALITIES = {"t2i": ("text", "image"), "i2t": ("text", "image"), "tts": ("phoneme", "audio:"),
                   "asr": ("audio:0", "text")}     # the ranges a document's body holds ("audio:": every codebook)


def task_ranges(vocab: Vocab, tasks) -> list[tuple[int, int]]:
    """The id ranges [lo, hi) that documents of `tasks` ("cm3:" variants alike: their target is the
    whole body) can hold where a model predicts: the specials and the tasks' modalities, adjacent
    ranges merged, in id order."""
    wanted = {"special"} | {m for t in tasks for m in TASK_MODALITIES[t.removeprefix("cm3:")]}
    merged: list[tuple[int, int]] = []
    for r in vocab.ranges:
        if r.name in wanted or (r.name.startswith("audio:") and "audio:" in wanted):
            if merged and merged[-1][1] == r.offset:
                merged[-1] = (merged[-1][0], r.offset + r.size)
            else:
                merged.append((r.offset, r.offset + r.size))
    return merged


def t2i(vocab: Vocab, key: str, text: list[int], image: np.ndarray) -> Document:
    head = _ids(vocab, "<bos>", "<t2i>"), vocab.to_global("text", text), _ids(vocab, "<boi>")
    return _document(key, "t2i", head, (vocab.to_global("image", image), _ids(vocab, "<eoi>", "<eos>")))


def i2t(vocab: Vocab, key: str, text: list[int], image: np.ndarray) -> Document:
    head = _ids(vocab, "<bos>", "<i2t>", "<boi>"), vocab.to_global("image", image), _ids(vocab, "<eoi>")
    return _document(key, "i2t", head, (vocab.to_global("text", text), _ids(vocab, "<eos>")))


def tts(vocab: Vocab, key: str, phonemes: list[int], prompt: np.ndarray, speech: np.ndarray) -> Document:
    """prompt and speech: codes (n_q, frames)."""
    head = (_ids(vocab, "<bos>", "<tts>"), vocab.to_global("phoneme", phonemes), _ids(vocab, "<sep>"),
            audio(vocab, prompt), _ids(vocab, "<boa>"))
    return _document(key, "tts", head, (audio(vocab, speech), _ids(vocab, "<eoa>", "<eos>")))


def asr(vocab: Vocab, key: str, speech: np.ndarray, text: list[int]) -> Document:
    head = _ids(vocab, "<bos>", "<asr>", "<boa>"), audio(vocab, speech[:1]), _ids(vocab, "<eoa>")
    return _document(key, "asr", head, (vocab.to_global("text", text), _ids(vocab, "<eos>")))


def audio(vocab: Vocab, codes: np.ndarray) -> np.ndarray:
    """Codes (n_q, T) -> global ids, codebook-major, codebook q in range audio:q."""
    return np.concatenate([vocab.to_global(f"audio:{q}", row) for q, row in enumerate(codes)])


def causal_masked(vocab: Vocab, doc: Document, rng: np.random.Generator, max_spans: int) -> Document:
    """The CM3 variant: 1..max_spans random non-overlapping spans of the body (between the task
    token and <eos>) replaced by <mask:i> and appended after the body as `<mask:i> span`. The whole
    rearranged body is the target. A body too short for a span is returned unchanged."""
    body = doc.tokens[2:-1]
    most = min(max_spans, (len(body) - 1) // 2)      # 2 cuts per span, strictly inside the body
    if most < 1:
        return doc
    spans = int(rng.integers(1, most + 1))
    cuts = np.sort(rng.choice(np.arange(1, len(body)), size=2 * spans, replace=False))
    kept, moved = [body[:cuts[0]]], []
    for i in range(spans):
        start, end = cuts[2 * i], cuts[2 * i + 1]
        sentinel = _ids(vocab, f"<mask:{i}>")
        kept += [sentinel, body[end:cuts[2 * i + 2]] if i + 1 < spans else body[end:]]
        moved += [sentinel, body[start:end]]
    tokens = np.concatenate([doc.tokens[:2], *kept, *moved, doc.tokens[-1:]]).astype(np.int32)
    return Document(doc.key, f"cm3:{doc.task}", tokens, 2)


def rng_for(seed: int, key: str, salt: str = "") -> np.random.Generator:
    """A generator that depends only on (seed, key, salt): the same document always draws the same."""
    return np.random.default_rng([seed, zlib.crc32(key.encode()), zlib.crc32(salt.encode())])


@dataclass
class Row:
    """One packed row: documents laid end to end, padded to seq_len with <pad>."""
    documents: list[Document] = field(default_factory=list)
    used: int = 0


def pack(documents, seq_len: int, open_rows: int = 16):
    """Rows of whole documents (a document never spans rows), first fit over up to `open_rows` rows
    still open; the fullest is closed when a document fits none and all are open. Yields `Row`s in
    a deterministic order; a document longer than seq_len must be filtered out before."""
    rows: list[Row] = []
    for doc in documents:
        row = next((r for r in rows if r.used + len(doc.tokens) <= seq_len), None)
        if row is None:
            if len(rows) == open_rows:
                fullest = max(range(len(rows)), key=lambda i: rows[i].used)
                yield rows.pop(fullest)
            row = Row()
            rows.append(row)
        row.documents.append(doc)
        row.used += len(doc.tokens)
    yield from rows


def row_tokens(row: Row, seq_len: int, pad: int) -> np.ndarray:
    """(seq_len,) int32: the row's documents end to end, then padding."""
    out = np.full(seq_len, pad, dtype=np.int32)
    position = 0
    for doc in row.documents:
        out[position:position + len(doc.tokens)] = doc.tokens
        position += len(doc.tokens)
    return out


def _ids(vocab: Vocab, *tokens: str) -> np.ndarray:
    return np.array([vocab.special(t) for t in tokens], dtype=np.int32)


def _document(key: str, task: str, head: tuple, tail: tuple) -> Document:
    head_tokens = np.concatenate(head)
    return Document(key, task, np.concatenate([head_tokens, *tail]).astype(np.int32), len(head_tokens))


def restore(vocab: Vocab, doc: np.ndarray) -> np.ndarray:
    """A CM3 causal-masked document back in its original order (other documents unchanged)."""
    sentinel = vocab.special("<mask:0>")
    marks = np.flatnonzero(doc == sentinel)
    if len(marks) < 2:
        return doc
    kept, moved = doc[:marks[1]], doc[marks[1]:-1]
    specials = vocab.range("special")
    spans, span = {}, None
    for token in moved:                      # <mask:i> span_i <mask:j> span_j ...
        name = specials.tokens[token - specials.offset] if specials.offset <= token < specials.offset + specials.size else ""
        if name.startswith("<mask:"):
            span = spans.setdefault(int(token), [])
        else:
            span.append(int(token))
    out = [t for token in kept for t in (spans[int(token)] if int(token) in spans else [int(token)])]
    return np.array(out + [int(doc[-1])], dtype=np.int32)


def parse(vocab: Vocab, doc: np.ndarray) -> dict:
    """A document's parts as local ids: {"task", "text", "image", "phonemes", "prompt", "speech"}
    (those its task has; audio as (n_q, T) arrays; asr's speech is codebook 0 only, (1, T)),
    the inverse of the builders above."""
    doc = restore(vocab, np.asarray(doc))
    special = vocab.range("special")
    task = special.tokens[doc[1] - special.offset].strip("<>")

    def between(start: str | None, end: str) -> np.ndarray:   # after `start` (or the task token), up to `end`
        first = 2 if start is None else int(np.flatnonzero(doc == vocab.special(start))[0]) + 1
        return doc[first:first + int(np.flatnonzero(doc[first:] == vocab.special(end))[0])]

    if task in ("t2i", "i2t"):
        text = between(None, "<boi>") if task == "t2i" else between("<eoi>", "<eos>")
        return {"task": task, "text": vocab.to_local("text", text), "image": vocab.to_local("image", between("<boi>", "<eoi>"))}
    if task == "tts":
        return {"task": task, "phonemes": vocab.to_local("phoneme", between(None, "<sep>")),
                "prompt": audio_codes(vocab, between("<sep>", "<boa>")), "speech": audio_codes(vocab, between("<boa>", "<eoa>"))}
    return {"task": task, "speech": vocab.to_local("audio:0", between("<boa>", "<eoa>"))[None],
            "text": vocab.to_local("text", between("<eoa>", "<eos>"))}


def audio_codes(vocab: Vocab, ids: np.ndarray) -> np.ndarray:
    """Codebook-major global audio ids over every codebook -> local codes (n_q, T)."""
    n_q = sum(1 for r in vocab.ranges if r.name.startswith("audio:"))
    return np.stack([vocab.to_local(f"audio:{q}", row) for q, row in enumerate(ids.reshape(n_q, -1))])
