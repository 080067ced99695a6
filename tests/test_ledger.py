"""Planner rules on real files: what counts as done, stale, missing, failed or orphan."""
from __future__ import annotations

import jsonschema
import pytest

from pipeline.ledger import Marker, OutputFile, StageLedger, State, shard_fingerprint, stage_fingerprint
from pipeline.schemas import schema
from pipeline.storage import Storage, file_digest

STAGE_FP = stage_fingerprint("ingest-images", {"image_size": 64}, 1, {}, {"img2dataset": "1.47.0"})
INPUT = "a" * 64


@pytest.fixture
def ledger(tmp_path):
    return StageLedger(Storage(str(tmp_path)), "images")


def build(ledger: StageLedger, shard: str, data: bytes = b"payload", input_digest: str = INPUT,
          status: str = "done") -> Marker:
    """Commit one output file and its marker the way build_shard does."""
    local = ledger.storage.path(f"scratch-{shard}")
    ledger.storage.write_bytes(f"scratch-{shard}", data)
    size, digest = ledger.storage.commit(local, ledger.output_rel(f"{shard}.tar"))
    marker = Marker(shard=shard, status=status, fingerprint=shard_fingerprint(STAGE_FP, input_digest),
                    input_digest=input_digest, outputs=[OutputFile(f"{shard}.tar", size, digest)], samples=3)
    ledger.write_marker(marker)
    return marker


def test_fingerprint_changes_with_every_ingredient():
    base = dict(kind="k", config={"a": 1}, version=1, references={"tok": "x"}, libraries={"lib": "1"})
    fps = {stage_fingerprint(**base)}
    for key, value in [("kind", "j"), ("config", {"a": 2}), ("version", 2), ("references", {"tok": "y"}),
                       ("libraries", {"lib": "2"})]:
        fps.add(stage_fingerprint(**{**base, key: value}))
    assert len(fps) == 6
    assert stage_fingerprint(**base) == stage_fingerprint(**{**base, "config": {"a": 1}})
    # key order does not matter: canonical JSON
    assert stage_fingerprint("k", {"a": 1, "b": 2}, 1, {}, {}) == stage_fingerprint("k", {"b": 2, "a": 1}, 1, {}, {})


def test_built_shard_is_done_and_marker_matches_schema(ledger):
    marker = build(ledger, "00000")
    plan = ledger.plan({"00000": INPUT}, STAGE_FP)
    assert plan.shards["00000"].state is State.DONE
    jsonschema.validate(ledger.storage.read_json(ledger.marker_rel("00000")), schema("marker"))
    assert marker.outputs[0].size == len(b"payload")


def test_no_marker_is_missing(ledger):
    assert ledger.plan({"00000": INPUT}, STAGE_FP).shards["00000"].state is State.MISSING


def test_deleted_output_is_not_done(ledger):
    build(ledger, "00000")
    ledger.storage.remove(ledger.output_rel("00000.tar"))
    entry = ledger.plan({"00000": INPUT}, STAGE_FP).shards["00000"]
    assert entry.state is State.MISSING and "gone" in entry.reason


def test_truncated_output_is_not_done(ledger):
    build(ledger, "00000", data=b"0123456789")
    path = ledger.storage.path(ledger.output_rel("00000.tar"))
    with open(path, "r+b") as f:
        f.truncate(4)
    entry = ledger.plan({"00000": INPUT}, STAGE_FP).shards["00000"]
    assert entry.state is State.MISSING and "4 bytes" in entry.reason


def test_changed_input_or_stage_makes_shard_stale(ledger):
    build(ledger, "00000")
    assert ledger.plan({"00000": "b" * 64}, STAGE_FP).shards["00000"].state is State.STALE
    other_fp = stage_fingerprint("ingest-images", {"image_size": 128}, 1, {}, {"img2dataset": "1.47.0"})
    assert ledger.plan({"00000": INPUT}, other_fp).shards["00000"].state is State.STALE


def test_unbuilt_input_makes_shard_stale(ledger):
    build(ledger, "00000")
    entry = ledger.plan({"00000": None}, STAGE_FP).shards["00000"]
    assert entry.state is State.STALE and "not built" in entry.reason


def test_failed_marker_is_failed_and_redone(ledger):
    build(ledger, "00000", status="failed")
    plan = ledger.plan({"00000": INPUT}, STAGE_FP)
    assert plan.shards["00000"].state is State.FAILED
    assert plan.todo() == ["00000"]


def test_marker_of_vanished_source_is_orphan_and_prunable(ledger):
    build(ledger, "00000")
    orphan = build(ledger, "00007")
    plan = ledger.plan({"00000": INPUT}, STAGE_FP)
    assert plan.shards["00007"].state is State.ORPHAN
    assert plan.todo() == [] and [m.shard for m in plan.orphans()] == ["00007"]
    ledger.remove_shard(orphan)
    assert not ledger.storage.exists(ledger.output_rel("00007.tar"))
    assert "00007" not in ledger.plan({"00000": INPUT}, STAGE_FP).shards


def test_torn_marker_is_not_trusted(ledger):
    build(ledger, "00000")
    with open(ledger.storage.path(ledger.marker_rel("00000")), "w") as f:
        f.write('{"shard": "00000", "status": "do')   # what a non-atomic writer could leave
    assert ledger.plan({"00000": INPUT}, STAGE_FP).shards["00000"].state is State.MISSING


def test_commit_is_a_rename_and_leaves_no_temporary(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    local = tmp_path / "root" / "_tmp" / "x.bin"
    local.parent.mkdir(parents=True)
    local.write_bytes(b"x" * 1000)
    size, digest = storage.commit(local, "stage/shards/x.bin")
    assert (size, digest) == file_digest(tmp_path / "root" / "stage" / "shards" / "x.bin")
    assert not local.exists()
    assert sorted(p.name for p in (tmp_path / "root" / "stage" / "shards").iterdir()) == ["x.bin"]
