"""Token shards: Parquet files (zstd) whose columns are described in schemas/*.arrow.json.

Values of the file metadata are JSON, under keys such as `tokenmill.codebook_size`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.schemas import arrow_description

_SCALARS = {"string": pa.string(), "int32": pa.int32(), "int64": pa.int64(), "uint16": pa.uint16(),
            "float32": pa.float32(), "float64": pa.float64()}


def _arrow_type(name: str) -> pa.DataType:
    match = re.fullmatch(r"list<(\w+)>", name)
    return pa.list_(_SCALARS[match.group(1)]) if match else _SCALARS[name]


def arrow_schema(name: str) -> pa.Schema:
    """The Arrow schema of a described token shard, e.g. "image_tokens"."""
    return pa.schema([pa.field(f["name"], _arrow_type(f["type"])) for f in arrow_description(name)["fields"]])


def write(path: str | Path, name: str, columns: dict[str, list], metadata: dict) -> Path:
    """Write one token shard: `columns` must be exactly the described ones; metadata keys are the
    described `tokenmill.*` keys without the prefix."""
    schema = arrow_schema(name)
    described = set(arrow_description(name)["metadata"])
    extra = {f"tokenmill.{k}" for k in metadata} - described
    if set(columns) != set(schema.names) or extra:
        raise ValueError(f"{name}: columns {sorted(set(columns) ^ set(schema.names))} or metadata {sorted(extra)} "
                         "do not match the description")
    table = pa.table({n: pa.array(columns[n], schema.field(n).type) for n in schema.names}, schema=schema)
    table = table.replace_schema_metadata({f"tokenmill.{k}": json.dumps(v) for k, v in metadata.items()})
    pq.write_table(table, str(path), compression="zstd")
    return Path(path)


def metadata(url: str) -> dict:
    """A token shard's file metadata, keys without the `tokenmill.` prefix."""
    import fsspec

    with fsspec.open(url, "rb") as f:
        raw = pq.ParquetFile(f).schema_arrow.metadata or {}
    return {k.decode()[len("tokenmill."):]: json.loads(v) for k, v in raw.items() if k.startswith(b"tokenmill.")}


def read_row(url: str, *, key: str | None = None, row: int | None = None) -> dict | None:
    """One row of a token shard as a dict, by key or by index; None when absent."""
    import fsspec

    with fsspec.open(url, "rb") as f:
        table = pq.read_table(f, filters=[("key", "=", key)] if key is not None else None)
    if key is None:
        if row is None or not 0 <= row < table.num_rows:
            return None
        table = table.slice(row, 1)
    return table.slice(0, 1).to_pylist()[0] if table.num_rows else None
