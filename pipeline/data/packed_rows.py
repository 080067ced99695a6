"""Reading packed shards (schemas/packed.arrow.json): their vocabulary, their rows and the documents
in them, in a deterministic order that a training run can resume at any position.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from pipeline.data import token_shards
from pipeline.tokenizers.vocab import Vocab

COLUMNS = ("tokens", "doc_starts", "doc_lengths", "doc_targets", "doc_tasks", "doc_keys")


class VocabMismatch(ValueError):
    """Packed shards whose vocabulary is not the expected one; the message names both fingerprints."""


@dataclass(frozen=True)
class PackedDocument:
    key: str
    task: str                 # t2i | i2t | tts | asr, "cm3:" prefixed for the causal-masked variant
    tokens: np.ndarray        # (L,) global ids
    target: int               # where its target part begins
    where: str                # "{shard url}#row" for error messages


def shard_vocab(url: str) -> Vocab:
    """The vocabulary recorded in a packed shard's metadata."""
    return Vocab.from_json(token_shards.metadata(url)["vocab"])


def common_vocab(urls: list[str], expected: str | None = None) -> Vocab:
    """The one vocabulary of `urls` (every shard's fingerprint equal, and equal to `expected` when given);
    VocabMismatch names the shard and both fingerprints otherwise."""
    vocab = None
    for url in urls:
        fingerprint = token_shards.metadata(url)["vocab_fingerprint"]
        wanted = expected or (vocab.fingerprint if vocab else None)
        if wanted and fingerprint != wanted:
            raise VocabMismatch(f"packed shard {url} has vocabulary {fingerprint[:16]}, the model's is {wanted[:16]}")
        vocab = vocab or shard_vocab(url)
    if vocab is None:
        raise ValueError("no packed shards to read a vocabulary from")
    return vocab


def _rows(url: str, columns) -> Iterator[dict]:
    """The rows of a packed shard, `columns` only, read 64 at a time."""
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=64, columns=list(columns)):
            yield from batch.to_pylist()


def iter_rows(url: str, vocab_size: int | None = None) -> Iterator[dict]:
    """Rows of a packed shard as dicts of COLUMNS (tokens as an int64 array); with `vocab_size`, an id
    outside [0, vocab_size) raises a ValueError naming the shard and row."""
    for index, row in enumerate(_rows(url, COLUMNS)):
        tokens = np.asarray(row["tokens"], dtype=np.int64)
        if vocab_size is not None and tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
            bad = int(tokens[(tokens < 0) | (tokens >= vocab_size)][0])
            raise ValueError(f"packed shard {url} row {index}: token id {bad} outside the vocabulary "
                             f"[0, {vocab_size})")
        yield {**row, "tokens": tokens, "row": index}


def document_index(url: str) -> Iterator[tuple[str, str, int]]:
    """(key, task, length) of every document of a packed shard, read from the index columns alone."""
    for row in _rows(url, ("doc_keys", "doc_tasks", "doc_lengths")):
        yield from zip(row["doc_keys"], row["doc_tasks"], row["doc_lengths"])


def documents(url: str, row: dict) -> Iterator[PackedDocument]:
    """The documents of one row."""
    for start, length, target, task, key in zip(row["doc_starts"], row["doc_lengths"], row["doc_targets"],
                                                 row["doc_tasks"], row["doc_keys"]):
        yield PackedDocument(key, task, row["tokens"][start:start + length], target, f"{url}#{row['row']}")


def epoch_stream(urls: list[str], items: Callable[[str], Iterator], *, seed: int, rank: int, world: int,
                 shuffle_buffer: int = 256) -> Iterator:
    """Endless items of this rank: each epoch visits the shards in an order drawn from (seed, epoch),
    item i of the epoch going to rank i % world, shuffled within a `shuffle_buffer` window drawn from
    (seed, epoch, rank). A function of its arguments alone, so a run resumes at item n by skipping n."""
    for epoch in itertools.count():
        order = list(urls)
        random.Random(f"{seed}/{epoch}").shuffle(order)
        mine = itertools.islice((item for url in order for item in items(url)), rank, None, world)
        count = 0
        for count, item in enumerate(_window_shuffled(mine, shuffle_buffer, random.Random(f"{seed}/{epoch}/{rank}")), 1):
            yield item
        if not count:
            raise ValueError(f"rank {rank} of {world} has nothing to train on in {len(urls)} packed shard(s): "
                             "no documents of the model's tasks, or all held out")


def _window_shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    window: list = []
    for item in items:
        window.append(item)
        if len(window) >= size:
            yield window.pop(rng.randrange(len(window)))
    rng.shuffle(window)
    yield from window
