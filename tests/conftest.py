"""Shared fixtures: one real local Ray per test session, real HTTP servers on 127.0.0.1."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline.demo import shapes
from pipeline.demo.server import LocalServer, QuietHandler
from pipeline.executor import WORKER_ENV

os.environ.update(WORKER_ENV)     # as executor.connect sets them: the session's Ray workers inherit them
RAY_CPUS = 2


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the session. Its endpoint and credentials go into the environment,
    as a user's shell would hold them, before the session's Ray starts, so its workers see them too."""
    import logging
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "tokenmill-test-key",
           "AWS_SECRET_ACCESS_KEY": f"secret-{os.urandom(8).hex()}", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    yield env
    server.stop()


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory, s3_server):
    """A local Ray cluster shared by the whole session; yields its address for subprocess drivers."""
    import ray

    os.environ["TOKENMILL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {**WORKER_ENV, "TOKENMILL_CACHE": os.environ["TOKENMILL_CACHE"], **s3_server}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def jpeg_bytes(size=(400, 300), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


class BrokenWebHandler(QuietHandler):
    """Good files from the folder plus the ways the web breaks, by path."""

    def do_GET(self):
        name = self.path.lstrip("/")
        if name.startswith("noai"):
            self._send(jpeg_bytes(), extra={"X-Robots-Tag": "noai"})
        elif name.startswith("slow"):
            time.sleep(6)           # beyond the test specs' timeout
            self._send(jpeg_bytes())
        elif name.startswith(("delay/", "gated/")):   # a good file, served slowly enough to kill a run mid-stage;
            if name.startswith("gated/"):               # gated: not before the test opens the server's gate
                self.server.gate.wait(120)
            time.sleep(0.3)
            self.path = "/" + name.split("/", 1)[1]
            super().do_GET()
        elif name.startswith("text"):
            self._send(b"<html>not an image</html>", "text/html")
        elif name.startswith("truncated"):
            self._send(jpeg_bytes()[:400])
        else:
            super().do_GET()   # counts the hit itself

    def _send(self, body: bytes, content_type="image/jpeg", extra=None):
        with self.server.lock:
            self.server.hits[self.path] += 1
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def web(tmp_path):
    """A loopback server with good JPEGs (good-N.jpg), a decompression bomb, tiny and wide images,
    and broken paths."""
    root = tmp_path / "www"
    root.mkdir()
    for i in range(40):
        (root / f"good-{i}.jpg").write_bytes(jpeg_bytes(color=(i * 6, 100, 200 - i * 4)))
    Image.new("1", (12000, 12000)).save(root / "bomb.png")   # 144 Mpx, a few KB on the wire
    (root / "tiny.jpg").write_bytes(jpeg_bytes(size=(16, 16)))
    (root / "wide.jpg").write_bytes(jpeg_bytes(size=(400, 50)))
    with LocalServer(root, BrokenWebHandler) as server:
        server.gate = server._httpd.gate = threading.Event()    # opened by tests that serve gated/ paths
        yield server


def write_url_list(path: Path, urls: list[str], **extra_columns) -> Path:
    """A LAION-style parquet: url, caption (and extra columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))], **extra_columns})
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="session")
def shapes_site(tmp_path_factory):
    """Base URL of 180 demo shape images served on 127.0.0.1."""
    folder = tmp_path_factory.mktemp("site")
    shapes.materialize(180, folder, size=64)
    with LocalServer(folder / "shapes") as server:
        yield server.base_url


@pytest.fixture(scope="session")
def token_models_job(ray_address, shapes_site, tmp_path_factory) -> Path:
    """The spec of a finished job with every token model (tests/token_models_job.py), built once."""
    from pipeline.spec import load_job
    from pipeline.workflow import run
    from token_models_job import write_job

    spec = write_job(tmp_path_factory.mktemp("token-models"), shapes_site)
    results = {r.name: r for r in run(load_job(spec), address=ray_address)}
    assert {n: (r.built, r.failed_shards) for n, r in results.items() if n in ("decoder", "valle", "parti")} == \
        {"decoder": (1, 0), "valle": (1, 0), "parti": (1, 0)}, results
    return spec


def shapes_url_list(path: Path, site: str, count: int) -> Path:
    """A URL list of the first `count` demo shapes on `site` (it grows by appending rows)."""
    rows = shapes.demo_rows(count)
    return write_url_list(path, [f"{site.rstrip('/')}/{r['index']:06d}.png" for r in rows],
                          caption=[r["caption"] for r in rows])


def write_job(path: Path, storage: Path, stages: str) -> Path:
    path.write_text(f"name: test\nstorage: {storage}\nstages:\n{stages}")
    return path


def assert_resumes_after_kill(spec: Path, stage: str, shard: str, address: str) -> None:
    """Run model stage `stage` of job `spec` in a driver process, SIGKILL it once Ray Train has recorded
    a checkpoint (not merely written its files), run it again: it must resume from a checkpoint (a
    multiple of its `checkpoint_every`) and finish all its `steps`, its metrics history whole."""
    from pipeline.ledger import StageLedger
    from pipeline.spec import load_job
    from pipeline.storage import Storage
    from pipeline.workflow import run

    job = load_job(spec)
    config = job.stages[stage].stage.config
    storage = Storage(job.storage)
    checkpoints = Path(storage.path(f"{stage}/checkpoints"))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(spec), "--stages", stage,
                             "--address", address], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not _recorded_checkpoint(checkpoints) and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(checkpoints.glob("run-*/checkpoint_*")), "no checkpoint before the kill"
    assert not StageLedger(storage, stage).read_markers(), "killed before any checkpoint? too late?"
    (result,) = run(job, stages=[stage], address=address)
    assert result.built == 1
    assert len(_finished_resumed_from(storage, stage, shard, config)) >= 1


def assert_recovers_after_worker_kill(spec: Path, stage: str, shard: str, address: str) -> None:
    """Run model stage `stage` of job `spec`, SIGKILL one of its Ray Train workers once a checkpoint is
    recorded: the same fit must restart its workers (FailureConfig) from that checkpoint and finish all
    its `steps`, its metrics history whole."""
    from pipeline.spec import load_job
    from pipeline.storage import Storage
    from pipeline.workflow import run

    job = load_job(spec)
    config = job.stages[stage].stage.config
    storage = Storage(job.storage)
    checkpoints = Path(storage.path(f"{stage}/checkpoints"))
    results: list = []
    driver = threading.Thread(target=lambda: results.extend(run(job, stages=[stage], address=address)))
    driver.start()
    deadline = time.time() + 240
    while not _recorded_checkpoint(checkpoints) and time.time() < deadline:
        time.sleep(0.2)
    workers = _ray_train_workers()
    assert workers, "no Ray Train worker to kill"
    os.kill(workers[0], signal.SIGKILL)
    driver.join(300)
    assert not driver.is_alive() and [r.built for r in results] == [1], results
    assert len(_finished_resumed_from(storage, stage, shard, config)) == 1, "the kill must land mid-run"


def _finished_resumed_from(storage, stage: str, shard: str, config) -> list[int]:
    """The steps a finished model stage resumed from, checked: all its `steps` trained, the first resume
    at a multiple of `checkpoint_every`, the metrics history 1..steps whole (carried by the checkpoint)."""
    from pipeline.ledger import StageLedger

    stats = StageLedger(storage, stage).read_markers()[shard].stats
    assert stats["steps"] == config.steps, stats
    assert stats["resumed_from"][:1] == [] or stats["resumed_from"][0] % config.checkpoint_every == 0, stats
    metrics = Path(storage.path(f"{stage}/shards/metrics.jsonl")).read_text().splitlines()
    assert [json.loads(m)["step"] for m in metrics] == list(range(1, config.steps + 1))
    return stats["resumed_from"]


def _ray_train_workers() -> list[int]:
    """PIDs of this session's Ray Train worker actors: processes Ray titles ray::RayTrainWorker whose
    environment holds the session's TOKENMILL_CACHE (another Ray on the machine is left alone)."""
    ours = f"TOKENMILL_CACHE={os.environ['TOKENMILL_CACHE']}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker")
                    and ours in (proc / "environ").read_bytes().split(b"\0")):
                pids.append(int(proc.name))
        except OSError:          # exited meanwhile
            pass
    return pids


def _recorded_checkpoint(checkpoints: Path) -> bool:
    """Whether Ray Train's controller has recorded a checkpoint of a run under `checkpoints`."""
    return any("checkpoint_" in p.read_text() for p in checkpoints.glob("run-*/checkpoint_manager_snapshot.json"))
