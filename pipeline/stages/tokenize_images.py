"""`tokenize-images`: image shards -> Parquet shards of VQ codes, one per image shard, same id.

Shards run on a pool of Ray actors; each loads the tokenizer checkpoint once (on its GPU when it
has one) and keeps it across shards. Inside a shard a background thread streams and decodes the
JPEGs while the model encodes full batches. The tokenizer's digest is in this stage's
fingerprint: a new checkpoint makes every token shard stale, a new image shard adds one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pipeline.data import token_shards
from pipeline.data.image_shards import ImageSample, iter_samples, to_tensor
from pipeline.data.shard_stream import prefetched
from pipeline.stages.base import ActorStage, ShardInput, ShardOutput, TokenizeWork, tokenize_inputs
from pipeline.storage import Checkpoint
from pipeline.tokenizers import image_vq, model_files

SCHEMA = "image_tokens"


@dataclass
class TokenizeImagesConfig:
    tokenizer: str                       # a train-image-tokenizer stage
    batch_size: int = 64
    actors: int | None = None            # default: one per CPU, or one per GPU when the cluster has GPUs
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    prefetch: int = 256                  # decoded images kept ready per actor


CACHE_KIND = "image-tokenizers"  # the cache folder image tokenizer checkpoints are fetched into


@lru_cache(maxsize=2)
def load_tokenizer(tokenizer: Checkpoint, device: str = "cpu") -> image_vq.VQAutoencoder:
    """The checkpoint as a model in eval mode, fetched once per machine into the cache."""
    return image_vq.load(tokenizer.local(CACHE_KIND), device=device)


def tokenizer_config(tokenizer: Checkpoint) -> image_vq.VQConfig:
    """The checkpoint's config alone (its config.json), without building the model."""
    return model_files.load_config(image_vq.VQConfig, tokenizer.local(CACHE_KIND))


class TokenizeImages(ActorStage):
    kind = "tokenize-images"
    version = 1
    Config = TokenizeImagesConfig
    reference_keys = ("tokenizer",)
    execution_keys = frozenset({"batch_size", "actors", "gpus_per_actor", "prefetch"})

    def inputs(self, upstream: dict, references: dict | None = None) -> list[ShardInput]:
        return tokenize_inputs(upstream, references, "tokenizer")

    def build(self, item: ShardInput, workdir: Path) -> ShardOutput:
        import torch

        work: TokenizeWork = item.payload
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_tokenizer(work.checkpoint, device)
        size, grid = model.config.image_size, model.config.grid
        columns: dict[str, list] = {n: [] for n in token_shards.arrow_schema(SCHEMA).names}
        output = ShardOutput([], samples=0)
        batch: list[ImageSample] = []

        def flush():
            codes = model.encode(to_tensor([s.image for s in batch]).to(device))   # (B, h, w)
            codes = codes.flatten(1).to(torch.int32).cpu().numpy().astype("uint16")
            for sample, tokens in zip(batch, codes):
                columns["key"].append(sample.key)
                columns["tokens"].append(tokens)
                columns["shape"].append([grid, grid])
                columns["text"].append(sample.caption)
                columns["url"].append(sample.meta.get("url") or "")
                columns["source_shard"].append(item.shard)
                columns["source"].append(json.dumps(sample.meta, sort_keys=True))
            batch.clear()

        for tar in work.tars:
            for sample in prefetched(iter_samples(tar, size), depth=self.config.prefetch):
                if sample.image is None:
                    output.fail(sample.key, sample.error)
                    continue
                batch.append(sample)
                if len(batch) == self.config.batch_size:
                    flush()
        if batch:
            flush()
        output.files.append(token_shards.write(workdir / f"{item.shard}.parquet", SCHEMA, columns, {
            "kind": "image", "tokenizer": work.checkpoint.digest, "codebook_size": model.config.num_codes,
            "grid": [grid, grid], "image_size": size, "downsample": model.config.downsample}))
        output.samples = len(columns["key"])
        output.stats["tokens"] = output.samples * grid * grid
        return output

    def status_figures(self, markers: list) -> dict:
        return {"tokens": sum(m.stats.get("tokens", 0) for m in markers)}
