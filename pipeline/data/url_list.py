"""LAION-style URL lists (parquet, csv/tsv, or a glob of them) cut into fixed-size slices.

Slice i holds rows [i*n, (i+1)*n) of the files concatenated in sorted order, so appending
rows (or files that sort last) only adds slices. Each slice's digest covers every column of
its rows; it is what decides whether the image shard built from it is fresh.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from pipeline.storage import cache_dir, write_atomically

FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}


class UrlListError(ValueError):
    """A URL list that cannot be used; the message names the file and column."""


@dataclass(frozen=True)
class Slice:
    """Rows of one shard: (file, start, stop) ranges in file order."""
    shard: str
    ranges: tuple[tuple[str, int, int], ...]


def list_files(url_list: str) -> list[str]:
    """Files named by a path, URL or glob, sorted; raises UrlListError when there are none."""
    fs, path = fsspec.core.url_to_fs(url_list)
    paths = [path] if fs.isfile(path) else sorted(fs.glob(path))
    if not paths:
        raise UrlListError(f"url_list {url_list!r} matches no file")
    files = [fs.unstrip_protocol(p) for p in paths]
    for f in files:
        _format(f)
    return files


def check_columns(files: list[str], columns: list[str]) -> list[tuple[str | None, str]]:
    """(missing column or None if unreadable, message naming the file) for every problem."""
    errors = []
    for f in files:
        try:
            names = _column_names(f)
        except Exception as exc:  # any reader error means the same thing here
            errors.append((None, f"cannot read url list {f}: {exc}"))
            continue
        errors += [(c, f"url list {f} has no column {c!r} (columns: {', '.join(names)})")
                   for c in columns if c not in names]
    return errors


def slices(files: list[str], samples_per_shard: int) -> Iterator[tuple[Slice, str]]:
    """Stream every row once; yield (slice, digest of its rows) in order."""
    index, ranges, hasher, filled = 0, [], hashlib.sha256(), 0
    for f in files:
        row = 0
        for batch in _batches(f):
            names = sorted(batch.schema.names)
            columns = [batch.column(n).to_pylist() for n in names]
            start = 0
            while start < batch.num_rows:
                take = min(samples_per_shard - filled, batch.num_rows - start)
                hasher.update(repr(names).encode())
                for values in zip(*(c[start:start + take] for c in columns)):
                    hasher.update(repr(values).encode())
                ranges.append((f, row + start, row + start + take))
                filled += take
                start += take
                if filled == samples_per_shard:
                    yield Slice(shard_id(index), _merge(ranges)), hasher.hexdigest()
                    index, ranges, hasher, filled = index + 1, [], hashlib.sha256(), 0
            row += batch.num_rows
    if filled:
        yield Slice(shard_id(index), _merge(ranges)), hasher.hexdigest()


def cached_slices(files: list[str], samples_per_shard: int) -> list[tuple[Slice, str]]:
    """slices(), remembered in the local cache while no file changes (size, mtime or ETag).

    Hashing every row of a LAION-scale list takes minutes; planning and `status` run often.
    """
    identities = [_identity(f) for f in files]
    if None in identities:
        return list(slices(files, samples_per_shard))
    key = hashlib.sha256(json.dumps([files, identities, samples_per_shard]).encode()).hexdigest()
    path = cache_dir() / "url-lists" / f"{key}.json"
    try:
        cached = json.loads(path.read_text())
        return [(Slice(shard, tuple(tuple(r) for r in ranges)), digest) for shard, ranges, digest in cached]
    except (OSError, ValueError):
        pass
    result = list(slices(files, samples_per_shard))
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps([[p.shard, p.ranges, d] for p, d in result])))
    return result


def iter_rows(path: str) -> Iterator[dict]:
    """Every row of one parquet/csv/tsv file as a dict, streaming."""
    for batch in _batches(path):
        yield from batch.to_pylist()


def read_slice(piece: Slice) -> pa.Table:
    """The rows of one slice as a table (reads only the row groups it needs from parquet)."""
    tables = [_read_range(f, start, stop) for f, start, stop in piece.ranges]
    return pa.concat_tables(tables, promote_options="default")


def shard_id(index: int) -> str:
    return f"{index:05d}"


def _merge(ranges: list[tuple[str, int, int]]) -> tuple[tuple[str, int, int], ...]:
    merged: list[tuple[str, int, int]] = []
    for f, start, stop in ranges:
        if merged and merged[-1][0] == f and merged[-1][2] == start:
            merged[-1] = (f, merged[-1][1], stop)
        else:
            merged.append((f, start, stop))
    return tuple(merged)


def _identity(path: str) -> list | None:
    """What changes when a file changes, without reading it; None if the filesystem can't tell."""
    fs, p = fsspec.core.url_to_fs(path)
    info = fs.info(p)
    version = info.get("mtime") or info.get("ETag") or info.get("LastModified") or info.get("etag")
    return None if version is None else [info.get("size"), str(version)]


def _format(path: str) -> str:
    for ext, fmt in FORMATS.items():
        if path.endswith(ext):
            return fmt
    raise UrlListError(f"url list {path} is not .parquet, .csv or .tsv")


def _column_names(path: str) -> list[str]:
    if _format(path) == "parquet":
        with fsspec.open(path, "rb") as f:
            return pq.read_schema(f).names
    return next(_batches(path)).schema.names


def _batches(path: str) -> Iterator[pa.RecordBatch]:
    fmt = _format(path)
    with fsspec.open(path, "rb") as f:
        if fmt == "parquet":
            yield from pq.ParquetFile(f).iter_batches(batch_size=65536)
        else:
            parse = pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")
            convert = pcsv.ConvertOptions(strings_can_be_null=False)
            yield from pcsv.open_csv(f, parse_options=parse, convert_options=convert)


def _read_range(path: str, start: int, stop: int) -> pa.Table:
    if _format(path) == "parquet":
        with fsspec.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            groups, first, offset = [], None, 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if offset + n > start and offset < stop:
                    groups.append(g)
                    first = offset if first is None else first
                offset += n
            return pf.read_row_groups(groups).slice(start - first, stop - start)
    batches, offset = [], 0
    for batch in _batches(path):
        lo, hi = max(start - offset, 0), min(stop - offset, batch.num_rows)
        if hi > lo:
            batches.append(batch.slice(lo, hi - lo))
        offset += batch.num_rows
        if offset >= stop:
            break
    return pa.Table.from_batches(batches)
