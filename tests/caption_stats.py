"""A small downstream stage kind used by tests to exercise DAGs: caption lengths per image shard."""
from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.stages import ShardInput, ShardOutput, Stage


@dataclass
class CaptionStatsConfig:
    inputs: list[str] = field(default_factory=list)
    min_length: int = 0


class CaptionStats(Stage):
    kind = "caption-stats"
    version = 1
    Config = CaptionStatsConfig

    @classmethod
    def json_schema(cls) -> dict:
        return {"type": "object", "$ref": "#/$defs/execution", "required": ["inputs"],
                "unevaluatedProperties": False,
                "properties": {"inputs": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
                               "min_length": {"type": "integer", "minimum": 0}}}

    def build(self, item: ShardInput, workdir: Path) -> ShardOutput:
        keys, lengths = [], []
        (tar_url,) = [f for f in item.payload if f.endswith(".tar")]
        with fsspec.open(tar_url, "rb") as f, tarfile.open(fileobj=f) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".txt"):
                    text = tar.extractfile(member).read().decode()
                    if len(text) >= self.config.min_length:
                        keys.append(member.name[:-4])
                        lengths.append(len(text))
        out = workdir / f"{item.shard}.parquet"
        pq.write_table(pa.table({"key": keys, "length": lengths}), out)
        return ShardOutput(files=[out], samples=len(keys))
