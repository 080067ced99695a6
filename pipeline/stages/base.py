"""The contract between a stage and the machinery that runs it.

A stage knows how to turn one input shard into output files; it knows nothing about Ray,
markers or other stages. The workflow plans which shards to build and hands `build_shard`
to the executor, the way DataTrove's executors run steps they don't know.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

from pipeline.ledger import sha256_of, stage_digest
from pipeline.storage import Checkpoint

FAILED_KEYS_KEPT = 100   # per shard marker: enough to find bad samples, small enough to read


@dataclass(frozen=True)
class ShardInput:
    """What one output shard is built from: its id, the input's digest, and a stage payload."""
    shard: str
    digest: str | None        # None: the upstream shard is not built (yet)
    payload: Any = None


@dataclass(frozen=True)
class UpstreamShard:
    """A built shard of an input stage: its output digest and the URLs of its files."""
    digest: str
    files: tuple[str, ...]


@dataclass
class ShardOutput:
    """What building one shard produced: files in the work folder plus per-sample counts."""
    files: list[Path]
    samples: int
    failures: Counter = field(default_factory=Counter)   # reason -> count
    stats: dict = field(default_factory=dict)

    def fail(self, key: str, reason: str) -> None:
        """Count a sample that failed; the first FAILED_KEYS_KEPT keys go to stats["failed_keys"]."""
        self.failures[reason] += 1
        kept = self.stats.setdefault("failed_keys", [])
        if len(kept) < FAILED_KEYS_KEPT:
            kept.append(key)


@dataclass(frozen=True)
class SpecProblem:
    """A spec error found by a stage's own checks, at a YAML path relative to the stage."""
    path: tuple
    message: str


class Stage:
    """Base of all shard stages. Subclasses set the ClassVars and implement the methods."""

    kind: ClassVar[str]
    version: ClassVar[int]                 # bump when output semantics change
    Config: ClassVar[type]                 # dataclass of the stage's keys, with defaults
    execution_keys: ClassVar[frozenset[str]] = frozenset()   # keys that change how, not what
    reference_keys: ClassVar[tuple[str, ...]] = ()           # keys naming stages used whole (tokenizers);
                                                             # "a.b": key b of mapping a (codec.stage)
    num_cpus: ClassVar[float] = 1.0

    def __init__(self, name: str, config: Any, storage_root: str = ""):
        self.name = name
        self.config = config
        self.storage_root = storage_root   # the job's storage: model stages keep checkpoints there

    def placement(self, cluster: dict[str, float], shards: int) -> dict:
        """How shards run, as executor options, given the cluster's resources ({"CPU": n, "GPU": m}).

        Default: one Ray task per shard with `num_cpus`. Model-holding stages return
        {"actors": n, "num_cpus": c, "num_gpus": g} to run on a pool of n actors instead.
        """
        return {"num_cpus": self.num_cpus}

    def references(self) -> dict[str, str]:
        """{key: referenced stage name} for the reference_keys that are set."""
        found = {}
        for key in self.reference_keys:
            value = self.config
            for part in key.split("."):
                value = getattr(value, part, None)
            if value:
                found[key] = value
        return found

    @classmethod
    def json_schema(cls) -> dict:
        """The JSON schema of this kind's keys: `$defs/<kind>` of schemas/job.schema.json."""
        from pipeline.schemas import schema
        return schema("job")["$defs"][cls.kind]

    @classmethod
    def check(cls, config: Any) -> list[SpecProblem]:
        """Deeper checks than the JSON schema can express (readable inputs, columns)."""
        return []

    def check_references(self, referenced: dict[str, "Stage"]) -> list[SpecProblem]:
        """Checks against the stages this one references, {reference key: stage} (their kind, a
        codec's levels), made once every reference names a stage."""
        return []

    def fingerprint_config(self) -> dict:
        """The normalized config that enters the fingerprint."""
        return {k: v for k, v in asdict(self.config).items() if k not in self.execution_keys}

    def libraries(self) -> dict[str, str]:
        """Versions of libraries whose upgrade changes this stage's outputs."""
        return {}

    def inputs(self, upstream: dict[str, dict[str, UpstreamShard | None]],
               references: dict[str, dict[str, UpstreamShard]] | None = None) -> list[ShardInput]:
        """The shards this stage builds, given {input stage: {shard: built shard, or None}} and
        {reference key: the referenced stage's built shards} (only passed once all are built).

        Default: one output shard per shard of the (single) input stage, same shard id, with
        the input shard's file URLs as payload.
        """
        (shards,) = upstream.values()
        return [ShardInput(shard, up.digest if up else None, up.files if up else ())
                for shard, up in sorted(shards.items())]

    def prepare(self, parallel: Callable) -> list[str]:
        """Fetch what planning needs (corpus archives) before shards are listed.

        `parallel(fn, shared, items)` runs fn(shared, item) for each item on the cluster and
        returns (item, result, error) triples. Returns one message per thing that failed.
        """
        return []

    def artifacts(self, items: list[ShardInput]) -> dict[str, bytes]:
        """Stage-level files derived from the planned shards (e.g. pack's vocab.json), written by
        the workflow to `{stage}/{name}` before any shard is built. Default: none."""
        return {}

    def status_figures(self, markers: list) -> dict:
        """Stage-specific totals shown by `status` beside the standard ones (e.g. hours)."""
        return {}

    @contextmanager
    def session(self) -> Iterator["Stage"]:
        """Driver-side resources held while shards are built (e.g. a local server)."""
        yield self

    def build(self, item: ShardInput, workdir: Path) -> ShardOutput:
        """Build one shard into files under `workdir`; per-sample errors are counted, not raised."""
        raise NotImplementedError


class ActorStage(Stage):
    """A stage whose shards run on a pool of actors holding a model; its Config has `actors`
    (None: as many as fit) and `gpus_per_actor` (None: 1 when the cluster has GPUs, else 0)."""

    def placement(self, cluster: dict[str, float], shards: int) -> dict:
        gpus = self.config.gpus_per_actor if self.config.gpus_per_actor is not None else float(cluster["GPU"] >= 1)
        fitting = int(cluster["GPU"] // gpus) if gpus else int(cluster["CPU"] // self.num_cpus)
        actors = self.config.actors or fitting
        return {"actors": max(1, min(actors, shards)), "num_cpus": self.num_cpus, "num_gpus": gpus}


def training_input(upstream: dict[str, dict[str, UpstreamShard | None]], limit: int | None = None,
                   suffix: str = ".tar") -> tuple[str | None, tuple[str, ...]]:
    """What a model stage trains on: the built shards among the first `limit` shards (by id) of
    each input stage (all when None), as (their digest, their file URLs ending in `suffix`), so shards
    appended to any input leave a pinned training set alone. The digest is None while none is built:
    the stage waits."""
    listed = [(stage, shard, up) for stage, shards in sorted(upstream.items())
              for shard, up in sorted(shards.items())[:limit]]
    built = {(stage, shard): up for stage, shard, up in listed if up is not None}
    files = tuple(url for up in built.values() for url in up.files if url.endswith(suffix))
    return (sha256_of([[*key, up.digest] for key, up in built.items()]) if built else None), files


@dataclass(frozen=True)
class TokenizeWork:
    """What a shard of a tokenizing stage is built from: the input shard's tars and the checkpoint of
    the model stage it references (None where it references none, e.g. EnCodec)."""
    tars: tuple[str, ...]
    checkpoint: Checkpoint | None


def tokenize_inputs(upstream: dict[str, dict[str, UpstreamShard | None]], references: dict | None,
                    key: str) -> list[ShardInput]:
    """A tokenizing stage's shards: one per shard of its single input stage, same id, each with a
    TokenizeWork whose checkpoint is what reference `key` built."""
    (shards,) = upstream.values()
    checkpoint = checkpoint_of(references[key]) if references and key in references else None
    return [ShardInput(shard, up.digest if up else None,
                       TokenizeWork(tuple(u for u in up.files if u.endswith(".tar")) if up else (), checkpoint))
            for shard, up in sorted(shards.items())]


def checkpoint_of(shards: dict[str, UpstreamShard]) -> Checkpoint:
    """What a model stage built, from its built shards: the digest of the whole stage and its files."""
    return Checkpoint(stage_digest({s: up.digest for s, up in shards.items()}),
                      tuple(u for up in shards.values() for u in up.files))
