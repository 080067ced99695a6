"""Fingerprints, completion markers and the planner: what is done and fresh.

Rules (DESIGN.md, "Storage layout and the ledger"):
- stage fingerprint = sha256(canonical JSON of kind, normalized config, STAGE_VERSION,
  fingerprints of referenced stages, output-relevant library versions);
- shard fingerprint = sha256(stage fingerprint, digest of the shard's input);
- a shard is done iff its marker exists, says "done", carries the expected fingerprint, and
  every output it names exists with the recorded size. Nothing else is trusted.
"""
from __future__ import annotations

import hashlib
import json
import socket
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pipeline.storage import Storage

MARKER_VERSION = 1


def canonical_json(obj) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_of(obj) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def stage_fingerprint(kind: str, config: dict, version: int, references: dict[str, str],
                      libraries: dict[str, str]) -> str:
    """Fingerprint of everything that decides a stage's outputs, given the same inputs."""
    return sha256_of({"kind": kind, "config": config, "version": version,
                      "references": references, "libraries": libraries})


def stage_digest(shard_digests: dict[str, str]) -> str:
    """Digest of a whole stage's outputs from its shards' digests: what a referencing stage
    (one that uses a tokenizer) puts in its fingerprint."""
    return sha256_of(dict(sorted(shard_digests.items())))


def shard_fingerprint(stage_fp: str, input_digest: str) -> str:
    return sha256_of({"stage": stage_fp, "input": input_digest})


@dataclass
class OutputFile:
    name: str      # relative to the stage's shards/ folder
    size: int
    sha256: str


@dataclass
class Marker:
    """One shard's completion record: `_state/{shard}.json`, written after its outputs."""
    shard: str
    status: str                       # "done" | "failed"
    fingerprint: str
    input_digest: str
    outputs: list[OutputFile] = field(default_factory=list)
    samples: int = 0                  # samples successfully written
    failures: dict[str, int] = field(default_factory=dict)   # per-sample failure reason -> count
    error: str | None = None          # why the whole shard failed (status "failed")
    stats: dict = field(default_factory=dict)               # stage-specific figures
    started: float = 0.0
    finished: float = 0.0
    host: str = field(default_factory=socket.gethostname)
    version: int = MARKER_VERSION

    @property
    def digest(self) -> str:
        """Digest of this shard's outputs: the input digest of downstream shards."""
        return sha256_of([[o.name, o.sha256] for o in self.outputs])

    @property
    def failure_count(self) -> int:
        return sum(self.failures.values())

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Marker":
        data = dict(data)
        data["outputs"] = [OutputFile(**o) for o in data.get("outputs", [])]
        return cls(**data)


class State(str, Enum):
    DONE = "done"
    STALE = "stale"        # marker from another fingerprint, or input not built yet
    MISSING = "missing"    # no marker, or the marker names an output that is gone or truncated
    FAILED = "failed"      # the last attempt failed as a whole
    ORPHAN = "orphan"      # built from a source shard that no longer exists


@dataclass
class ShardPlan:
    shard: str
    state: State
    reason: str = ""
    marker: Marker | None = None


@dataclass
class Plan:
    """Every shard of a stage, classified (orphans included)."""
    shards: dict[str, ShardPlan]

    def todo(self) -> list[str]:
        """Shards to (re)build: everything that is neither done nor an orphan."""
        return [s for s, p in self.shards.items() if p.state not in (State.DONE, State.ORPHAN)]

    def orphans(self) -> list[Marker]:
        return [p.marker for p in self.shards.values() if p.state is State.ORPHAN]

    def done_markers(self) -> list[Marker]:
        return [p.marker for p in self.shards.values() if p.state is State.DONE]

    def count(self, state: State) -> int:
        return sum(1 for p in self.shards.values() if p.state is state)

    def totals(self) -> "Totals":
        """Samples written and failed, with reasons, over the done shards."""
        totals = Totals()
        for marker in self.done_markers():
            totals.samples += marker.samples
            for reason, count in marker.failures.items():
                totals.failures += count
                totals.reasons[reason] = totals.reasons.get(reason, 0) + count
        totals.reasons = dict(sorted(totals.reasons.items(), key=lambda kv: -kv[1]))
        return totals


@dataclass
class Totals:
    samples: int = 0
    failures: int = 0
    reasons: dict[str, int] = field(default_factory=dict)   # most frequent first

    def failure_share(self) -> float:
        attempted = self.samples + self.failures
        return self.failures / attempted if attempted else 0.0


class StageLedger:
    """Markers and outputs of one stage under `{storage}/{stage}/`."""

    def __init__(self, storage: Storage, stage: str):
        self.storage = storage
        self.stage = stage

    def rel(self, *parts: str) -> str:
        return "/".join((self.stage,) + parts)

    def marker_rel(self, shard: str) -> str:
        return self.rel("_state", f"{shard}.json")

    def output_rel(self, name: str) -> str:
        return self.rel("shards", name)

    def read_markers(self) -> dict[str, Marker]:
        """All markers of the stage (one listing plus one read per marker)."""
        markers = {}
        for name in self.storage.sizes(self.rel("_state")):
            if not name.endswith(".json"):
                continue
            data = self.storage.read_json(self.rel("_state", name))
            if data is not None and data.get("version") == MARKER_VERSION:
                marker = Marker.from_json(data)
                markers[marker.shard] = marker
        return markers

    def write_marker(self, marker: Marker) -> None:
        self.storage.write_json(self.marker_rel(marker.shard), marker.to_json())

    def forget(self, shard: str) -> None:
        """Drop a shard's marker, the first step of rebuilding it."""
        self.storage.remove(self.marker_rel(shard))

    def remove_shard(self, marker: Marker) -> None:
        """Delete a shard's marker and outputs (pruning an orphan)."""
        self.forget(marker.shard)
        for out in marker.outputs:
            self.storage.remove(self.output_rel(out.name))

    def plan(self, inputs: dict[str, str | None], stage_fp: str) -> Plan:
        """Classify every shard; `inputs` maps shard -> input digest (None: input not done)."""
        markers = self.read_markers()
        sizes = self.storage.sizes(self.rel("shards"))
        shards = {shard: _classify(shard, markers.get(shard), digest, stage_fp, sizes)
                  for shard, digest in sorted(inputs.items())}
        for shard in sorted(set(markers) - set(inputs)):
            shards[shard] = ShardPlan(shard, State.ORPHAN, "source shard no longer exists", markers[shard])
        return Plan(shards)


def _classify(shard: str, marker: Marker | None, input_digest: str | None, stage_fp: str,
              sizes: dict[str, int]) -> ShardPlan:
    if marker is None:
        return ShardPlan(shard, State.MISSING, "no marker")
    if marker.status != "done":
        return ShardPlan(shard, State.FAILED, marker.error or "failed", marker)
    if input_digest is None:
        return ShardPlan(shard, State.STALE, "input shard is not built", marker)
    if marker.fingerprint != shard_fingerprint(stage_fp, input_digest):
        return ShardPlan(shard, State.STALE, "fingerprint changed", marker)
    for out in marker.outputs:
        if out.name not in sizes:
            return ShardPlan(shard, State.MISSING, f"output {out.name} is gone", marker)
        if sizes[out.name] != out.size:
            return ShardPlan(shard, State.MISSING,
                             f"output {out.name} has {sizes[out.name]} bytes, marker says {out.size}", marker)
    return ShardPlan(shard, State.DONE, "", marker)


def new_marker(shard: str, fingerprint: str, input_digest: str) -> Marker:
    return Marker(shard=shard, status="running", fingerprint=fingerprint,
                  input_digest=input_digest, started=time.time())
