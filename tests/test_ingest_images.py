"""ingest-images end to end: real Ray, real img2dataset, a real HTTP server on 127.0.0.1."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from ray import cloudpickle

import caption_stats
from conftest import write_job, write_url_list
from pipeline.ledger import State
from pipeline.monitor.status import job_status
from pipeline.spec import load_job
from pipeline.stages import STAGES
from pipeline.workflow import Planner, run

BROKEN = ["missing.jpg", "text.jpg", "truncated.jpg", "bomb.png", "noai.jpg", "slow.jpg", "tiny.jpg", "wide.jpg"]
EXPECTED_REASONS = {"http 404": 1, "not a decodable image": 2, "over the pixel limit": 1,
                    "disallowed by X-Robots-Tag": 1, "timeout": 1, "connection refused": 1,
                    "under the minimum size": 1, "aspect ratio over the limit": 1}


@pytest.fixture
def with_caption_stats(monkeypatch):
    monkeypatch.setitem(STAGES, caption_stats.CaptionStats.kind, caption_stats.CaptionStats)
    cloudpickle.register_pickle_by_value(caption_stats)   # Ray workers cannot import tests/
    yield
    cloudpickle.unregister_pickle_by_value(caption_stats)


def ingest(name: str, url_list: Path, **keys) -> str:
    options = {"samples_per_shard": 10, "image_size": 64, "timeout": 3, "retries": 0, **keys}
    return f"  {name}: {{kind: ingest-images, url_list: {url_list}, " + \
        ", ".join(f"{k}: {v}" for k, v in options.items()) + "}\n"


def tar_members(storage: Path, stage: str) -> dict[str, bytes]:
    members = {}
    for tar_path in sorted((storage / stage / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                members[member.name] = tar.extractfile(member).read()
    return members


def good_urls(web, start: int, stop: int, prefix: str = "") -> list[str]:
    return [web.url(f"{prefix}good-{i}.jpg") for i in range(start, stop)]


def test_broken_web_is_counted_per_reason_and_good_samples_kept(ray_address, web, tmp_path):
    urls = good_urls(web, 0, 20) + [web.url(p) for p in BROKEN] + ["http://127.0.0.1:9/refused.jpg"]
    url_list = write_url_list(tmp_path / "list.parquet", urls, license=[f"cc-{i}" for i in range(len(urls))])
    job = load_job(write_job(tmp_path / "job.yaml", tmp_path / "out",
                             ingest("images", url_list, min_image_size=32, max_aspect_ratio=3)))

    (result,) = run(job)

    assert (result.built, result.totals.samples, result.totals.failures) == (3, 20, 9)
    assert result.totals.reasons == EXPECTED_REASONS
    assert not result.failed(job.stages["images"].execution.max_failure_share)
    members = tar_members(tmp_path / "out", "images")
    jpgs = [n for n in members if n.endswith(".jpg")]
    assert len(jpgs) == 20
    meta = json.loads(members[jpgs[0].replace(".jpg", ".json")])
    assert meta["status"] == "success" and meta["width"] == 64 and meta["license"].startswith("cc-")
    assert {"url", "caption", "sha256", "height"} <= set(meta)
    assert members[jpgs[0].replace(".jpg", ".txt")].decode().startswith("caption ")
    status = job_status(job)["stages"]["images"]
    assert (status["state"], status["shards_done"], status["shards_total"]) == ("done", 3, 3)
    assert (status["samples"], status["failures"], status["failure_reasons"]) == (20, 9, EXPECTED_REASONS)
    assert list((tmp_path / "out" / "images" / "shards").glob("*_stats.json"))   # img2dataset's stats kept


def test_rerun_downloads_nothing_appending_downloads_only_new_shards(ray_address, web, tmp_path):
    url_list = write_url_list(tmp_path / "list.parquet", good_urls(web, 0, 20))
    spec = write_job(tmp_path / "job.yaml", tmp_path / "out", ingest("images", url_list))
    (first,) = run(load_job(spec))
    assert (first.built, first.totals.samples) == (2, 20)
    hits = dict(web.hits)

    (again,) = run(load_job(spec))
    assert again.built == 0 and dict(web.hits) == hits          # not one request

    write_url_list(url_list, good_urls(web, 0, 30))              # ten rows appended
    (appended,) = run(load_job(spec))
    assert (appended.built, appended.totals.samples) == (1, 30)
    new_hits = {path: n - hits.get(path, 0) for path, n in web.hits.items() if n != hits.get(path, 0)}
    assert new_hits == {f"/good-{i}.jpg": 1 for i in range(20, 30)}

    write_url_list(url_list, good_urls(web, 0, 10))              # rows removed: two orphan shards
    job = load_job(spec)
    plan = Planner(job).plan("images").plan
    assert [m.shard for m in plan.orphans()] == ["00001", "00002"]
    assert job_status(job)["stages"]["images"]["orphans"] == 2
    run(job, prune=True)
    assert sorted(p.name for p in (tmp_path / "out" / "images" / "shards").glob("*.tar")) == ["00000.tar"]
    assert job_status(job)["stages"]["images"]["orphans"] == 0


def test_config_changes_reach_downstream_only(ray_address, web, tmp_path, with_caption_stats):
    list_a = write_url_list(tmp_path / "a.parquet", good_urls(web, 0, 20))
    list_b = write_url_list(tmp_path / "b.parquet", good_urls(web, 20, 30))
    stats = "  stats: {kind: caption-stats, inputs: [a]}\n"
    spec = write_job(tmp_path / "job.yaml", tmp_path / "out", ingest("a", list_a) + ingest("b", list_b) + stats)
    results = run(load_job(spec))
    assert [(r.name, r.built) for r in results] == [("a", 2), ("b", 1), ("stats", 2)]
    assert {r.name: r.totals.samples for r in results}["stats"] == 20

    def states(text: str) -> dict[str, set[State]]:
        planner = Planner(load_job(write_job(tmp_path / "job2.yaml", tmp_path / "out", text)))
        return {n: {p.state for p in planner.plan(n).plan.shards.values()} for n in ("a", "b", "stats")}

    assert states(ingest("a", list_a) + ingest("b", list_b) + stats) == \
        {"a": {State.DONE}, "b": {State.DONE}, "stats": {State.DONE}}
    assert states(ingest("a", list_a, image_size=32) + ingest("b", list_b) + stats) == \
        {"a": {State.STALE}, "b": {State.DONE}, "stats": {State.STALE}}
    assert states(ingest("a", list_a) + ingest("b", list_b) + stats.replace("}", ", min_length: 3}")) == \
        {"a": {State.DONE}, "b": {State.DONE}, "stats": {State.STALE}}
    assert states(ingest("a", list_a) + ingest("b", list_b, image_size=32) + stats) == \
        {"a": {State.DONE}, "b": {State.STALE}, "stats": {State.DONE}}
    # an execution-only key (threads) changes nothing
    assert states(ingest("a", list_a, thread_count=4) + ingest("b", list_b) + stats)["a"] == {State.DONE}

    hits = dict(web.hits)
    forced = run(load_job(spec), force=["b"], stages=["b"])
    assert [(r.name, r.built) for r in forced] == [("b", 1)]
    refetched = {p for p, n in web.hits.items() if n != hits.get(p, 0)}
    assert refetched == {f"/good-{i}.jpg" for i in range(20, 30)}


def test_sigkill_mid_stage_then_resume(ray_address, web, tmp_path):
    urls = good_urls(web, 0, 40, prefix="delay/")
    url_list = write_url_list(tmp_path / "list.parquet", urls)
    spec = write_job(tmp_path / "job.yaml", tmp_path / "out",
                     ingest("images", url_list, samples_per_shard=4, thread_count=2))
    state = tmp_path / "out" / "images" / "_state"
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(spec), "--address", ray_address]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(state.glob("*.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    job = load_job(spec)
    plan = Planner(job).plan("images").plan
    done = plan.count(State.DONE)
    assert 2 <= done < 10, "the kill must land mid-stage"
    for entry in plan.shards.values():   # every shard listed as done has all its outputs, whole
        if entry.state is State.DONE:
            for out in entry.marker.outputs:
                assert (tmp_path / "out" / "images" / "shards" / out.name).stat().st_size == out.size

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = job_status(job)["stages"]["images"]
    assert (status["state"], status["shards_done"], status["samples"]) == ("done", 10, 40)
    keys = {n.split(".")[0] for n in tar_members(tmp_path / "out", "images") if n.endswith(".jpg")}
    assert keys == {f"{shard:05d}{i}" for shard in range(10) for i in range(4)}
    assert not (tmp_path / "out" / "images" / "_tmp").exists() or not any((tmp_path / "out" / "images" / "_tmp").iterdir())


def test_status_json_cli_shape(ray_address, web, tmp_path):
    url_list = write_url_list(tmp_path / "list.parquet", good_urls(web, 0, 10) + [web.url("missing.jpg")])
    spec = write_job(tmp_path / "job.yaml", tmp_path / "out", ingest("images", url_list))
    pending = json.loads(subprocess.run([sys.executable, "-m", "pipeline.cli", "status", str(spec), "--json"],
                                        capture_output=True, text=True, check=True).stdout)
    assert pending["stages"]["images"]["state"] == "pending"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(spec), "--address", ray_address],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "images: ok: built 2 shard(s), 10 samples, 1 failed samples (http 404: 1)" in proc.stdout
    assert "[images]" in proc.stderr and "samples/s" in proc.stderr          # plain log lines off a terminal
    report = json.loads(subprocess.run([sys.executable, "-m", "pipeline.cli", "status", str(spec), "--json"],
                                       capture_output=True, text=True, check=True).stdout)
    assert report["job"] == "test"
    assert {k: report["stages"]["images"][k] for k in ("state", "shards_done", "shards_total", "samples", "failures")} \
        == {"state": "done", "shards_done": 2, "shards_total": 2, "samples": 10, "failures": 1}


def test_stage_over_failure_share_fails_the_run(ray_address, web, tmp_path):
    urls = good_urls(web, 0, 2) + [web.url(f"missing-{i}.jpg") for i in range(8)]
    url_list = write_url_list(tmp_path / "list.parquet", urls)
    spec = write_job(tmp_path / "job.yaml", tmp_path / "out", ingest("images", url_list))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(spec), "--address", ray_address],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "images: FAILED" in proc.stdout
    assert job_status(load_job(spec))["stages"]["images"]["state"] == "failed"


def test_demo_corpus_is_downloaded_over_loopback(ray_address, tmp_path):
    from pipeline.demo import shapes

    spec = write_job(tmp_path / "job.yaml", tmp_path / "out",
                     "  images: {kind: ingest-images, url_list: 'demo://shapes?count=30', image_size: 64, "
                     "samples_per_shard: 20}\n")
    job = load_job(spec)
    (result,) = run(job)
    assert (result.built, result.totals.samples, result.totals.failures) == (2, 30, 0)
    members = tar_members(tmp_path / "out", "images")
    captions = sorted(v.decode() for k, v in members.items() if k.endswith(".txt"))
    assert captions == sorted(row["caption"] for row in shapes.demo_rows(30))
    meta = json.loads(next(v for k, v in members.items() if k.endswith(".json")))
    assert meta["url"].startswith("http://127.0.0.1:")                   # really fetched over HTTP
    assert job_status(job)["stages"]["images"]["state"] == "done"
