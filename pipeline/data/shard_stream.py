"""What every WebDataset shard reader shares: members grouped into samples, lenient JSON metadata,
one media member decoded per sample, a background thread that decodes ahead of the consumer, the
held-out split by key, and endless shuffled training batches over shards.
"""
from __future__ import annotations

import json
import queue
import random
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import fsspec

from pipeline.data import tar_stream


def iter_members(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a WebDataset tar, streamed in file order."""
    with fsspec.open(url, "rb") as raw:
        key, parts = None, {}
        for path, data in tar_stream.iter_files(raw):
            stem, _, ext = path.rsplit("/", 1)[-1].partition(".")
            if stem != key and parts:
                yield key, parts
                parts = {}
            key = stem
            parts[ext.lower()] = data
        if parts:
            yield key, parts


def member_json(parts: dict[str, bytes]) -> dict:
    """A sample's key.json as a dict; empty when absent or not JSON."""
    try:
        return json.loads(parts["json"]) if parts.get("json") else {}
    except ValueError:
        return {}


def decoded_samples(url: str, extensions: tuple[str, ...], decode: Callable[[bytes], Any], text_key: str,
                    kind: str) -> Iterator[tuple[str, Any, str, dict, str | None]]:
    """(key, decoded media, text, metadata, error) per sample of a shard: the first member with one of
    `extensions` goes through `decode`, whose ValueError becomes the sample's error (media None);
    the text is key.txt, else the JSON's `text_key`."""
    for key, parts in iter_members(url):
        meta = member_json(parts)
        text = parts["txt"].decode("utf-8", "replace") if "txt" in parts else meta.get(text_key) or ""
        data = next((parts[e] for e in extensions if e in parts), None)
        if data is None:
            yield key, None, text, meta, f"no {kind} in sample"
            continue
        try:
            yield key, decode(data), text, meta, None
        except ValueError as exc:
            yield key, None, text, meta, str(exc)


def is_held_out(key: str, holdout_share: float) -> bool:
    """Deterministic train / held-out split by key: the same key always lands on the same side."""
    return zlib.crc32(key.encode()) % 10_000 < holdout_share * 10_000


def shuffled_batches(files: list[str], items: Callable[[str], Iterable], collate: Callable[[list], Any], *,
                     batch_size: int, buffer: int, rng: random.Random, rank: int, world: int,
                     what: str = "samples") -> Iterator:
    """Endless training batches of one rank. Each epoch shuffles the shard order and gives every rank
    its own slice of it; what `items(url)` yields for those shards passes a shuffle buffer of `buffer`
    items, and `collate` turns each `batch_size` of them into a batch. An epoch smaller than the buffer
    still trains; one that yields nothing raises ValueError naming `what`."""
    pool: list = []
    batch: list = []
    while True:
        order = sorted(files)
        rng.shuffle(order)
        mine = order[rank::world] if len(order) >= world else order
        seen = 0
        for item in (item for url in mine for item in items(url)):
            seen += 1
            pool.append(item)
            if len(pool) < buffer:
                continue
            batch.append(pool.pop(rng.randrange(len(pool))))
            if len(batch) == batch_size:
                yield collate(batch)
                batch = []
        if not seen:
            raise ValueError(f"no trainable {what} in {len(mine)} shard(s): all unusable or held out")
        while pool:
            batch.append(pool.pop(rng.randrange(len(pool))))
            if len(batch) == batch_size:
                yield collate(batch)
                batch = []


def prefetched(samples: Iterable, depth: int = 256) -> Iterator:
    """Iterate `samples` with a background thread running ahead by up to `depth` items, so that
    decoding overlaps the consumer's work (PIL and libsndfile release the GIL while decoding)."""
    box: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in samples:
                if stop.is_set():
                    return
                box.put(item)
        except BaseException as exc:   # re-raised in the consumer
            box.put(_Raised(exc))
            return
        box.put(done)

    thread = threading.Thread(target=produce, daemon=True, name="prefetch")
    thread.start()
    try:
        while (item := box.get()) is not done:
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        while thread.is_alive():   # unblock a producer waiting on a full queue
            try:
                box.get_nowait()
            except queue.Empty:
                thread.join(0.05)


@dataclass
class _Raised:
    exc: BaseException
