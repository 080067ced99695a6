"""`tokenmill submit` / `tokenmill jobs` against a real Ray head started here, and the ray up configs."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import jsonschema
import pytest
import yaml

from pipeline.shipping import ShippingError, shipped_spec
from pipeline.spec import load_job

REPO = Path(__file__).resolve().parent.parent
PORT_OPTIONS = ("--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port",
                "--object-manager-port", "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port",
                "--metrics-export-port", "--runtime-env-agent-port")


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}   # the head wants it, as Ray 2.6x does


def tokenmill(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **AUTH, **env})


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head of its own (2 CPUs, every port free-picked), its jobs endpoint on 127.0.0.1."""
    ports = dict(zip(PORT_OPTIONS, free_ports(len(PORT_OPTIONS))))
    temp_dir = tempfile.mkdtemp(prefix="tmh", dir="/tmp")    # Ray's socket paths must stay short
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, **AUTH, "PATH": f"{bin_dir}:{os.environ['PATH']}", "NO_ALBUMENTATIONS_UPDATE": "1",
           "TOKENMILL_CACHE": str(tmp_path_factory.mktemp("head-cache"))}   # a job's `python` is the venv's
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([f"{bin_dir}/ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--temp-dir", temp_dir,
                             "--include-dashboard", "true", *[f"{k}={v}" for k, v in ports.items()]],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(f"{temp_dir}/start.err", "wb"))      # a file: a full pipe would block Ray
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        _wait_for_jobs_endpoint(address, proc, Path(temp_dir, "start.err"))
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:     # GCS and raylet linger ~30 s after SIGTERM
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_jobs_endpoint(address: str, proc: subprocess.Popen, errors: Path) -> None:
    deadline = time.time() + 90
    while (listed := tokenmill("jobs", "--address", address, timeout=60)).returncode != 0:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited {proc.returncode}: {errors.read_text()[-2000:]}")
        assert time.time() < deadline, listed.stderr
        time.sleep(1)


def write_spec(folder: Path, name: str, images: str) -> Path:
    """A job whose storage is relative to its spec, as users write them."""
    spec = folder / f"{name}.yaml"
    spec.write_text(f"name: {name}\nstorage: runs/{name}\nray: {{address: null, num_cpus: 1}}\n"
                    f"stages:\n  images: {images}\n")
    return spec


def test_submit_waits_for_the_job_and_lists_it(head, tmp_path):
    spec = write_spec(tmp_path, "shapes", "{kind: ingest-images, url_list: 'demo://shapes?count=40', "
                                          "image_size: 32, samples_per_shard: 20}")
    result = tokenmill("submit", str(spec), "--address", head, "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    submission_id = result.stdout.split("submitted ", 1)[1].split()[0]
    assert submission_id.startswith("shapes-")
    assert "images: ok: built 2 shard(s), 40 samples, 0 failed samples" in result.stdout   # the job's own log
    assert f"job {submission_id}: SUCCEEDED" in result.stdout

    status = json.loads(tokenmill("status", str(spec), "--json").stdout)     # written where the spec says
    assert status["stages"]["images"] | {"state": "done", "shards_done": 2, "shards_total": 2, "samples": 40} \
        == status["stages"]["images"]
    assert len(list((tmp_path / "runs/shapes/images/shards").glob("*.tar"))) == 2

    listed = tokenmill("jobs", "--address", head, "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = [r for r in json.loads(listed.stdout) if r["submission_id"] == submission_id]
    assert row["state"] == "SUCCEEDED" and row["job"] == "shapes" and row["start"] <= row["end"] != "-"
    table = tokenmill("jobs", "--address", head).stdout.splitlines()
    assert table[0].split() == ["state", "submission_id", "start", "end", "job", "user"]
    assert any(line.split()[:2] == ["SUCCEEDED", submission_id] for line in table[1:])


def test_a_failing_job_exits_1_with_its_error(head, tmp_path):
    (closed_port,) = free_ports(1)        # nothing listens: every download fails
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\n" + "".join(f"http://127.0.0.1:{closed_port}/{i}.png,c{i}\n" for i in range(6)))
    spec = write_spec(tmp_path, "broken", f"{{kind: ingest-images, url_list: {urls}, image_size: 32, "
                                          "retries: 0, timeout: 2}")
    result = tokenmill("submit", str(spec), "--address", head, "--wait")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "images: FAILED: built 1 shard(s), 0 samples, 6 failed samples" in result.stdout
    assert "FAILED: Job entrypoint command failed with exit code 1" in result.stdout


def test_unreachable_address_is_a_usage_error(tmp_path):
    spec = write_spec(tmp_path, "nowhere", "{kind: ingest-images, url_list: 'demo://shapes?count=4'}")
    (closed_port,) = free_ports(1)
    for args in (["submit", str(spec)], ["jobs"]):
        result = tokenmill(*args, "--address", f"http://127.0.0.1:{closed_port}", timeout=120)
        assert result.returncode == 2
        assert f"cannot reach the Ray jobs endpoint at http://127.0.0.1:{closed_port}" in result.stderr
        assert "Traceback" not in result.stderr


def test_a_wrong_token_is_a_usage_error(head):
    result = tokenmill("jobs", "--address", head, RAY_AUTH_TOKEN=secrets.token_hex(32))
    assert result.returncode == 2 and f"the cluster at {head} refused our token" in result.stderr
    assert AUTH["RAY_AUTH_TOKEN"] not in result.stderr + result.stdout


def test_storage_relative_to_the_spec_is_refused_for_a_remote_head(tmp_path):
    job = load_job(write_spec(tmp_path, "far", "{kind: ingest-images, url_list: 'demo://shapes?count=4'}"))
    with pytest.raises(ShippingError, match=r"storage: 'runs/far' is a folder on this machine .* s3://"):
        shipped_spec(job, head_is_local=False, nodes=1)
    data, warning = shipped_spec(job, head_is_local=True, nodes=1)
    assert data["storage"] == str(tmp_path / "runs/far") and warning is None and data["ray"]["address"] is None
    data, warning = shipped_spec(job, head_is_local=True, nodes=3)
    assert "every node of the cluster must mount it" in warning


@pytest.mark.parametrize("config", ["cluster.yaml", "cluster-local.yaml"])
def test_cluster_configs_pass_rays_own_validation(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(yaml.safe_load((REPO / config).read_text()))
    validate_config(prepared)
    assert "--dashboard-host=127.0.0.1" in prepared["head_start_ray_commands"][-1]   # reached through a tunnel


def _typo(config: dict) -> None:
    config["setup_command"] = config.pop("setup_commands")


@pytest.mark.parametrize("config, breaks, error, message", [
    ("cluster.yaml", _typo, jsonschema.ValidationError, "'setup_command' was unexpected"),
    ("cluster.yaml", lambda c: c.update(head_node_type="gpu"), ValueError, "must be one of `available_node_types`"),
    ("cluster-local.yaml", _typo, jsonschema.ValidationError, "'setup_command' was unexpected"),
    ("cluster-local.yaml", lambda c: c["provider"].pop("head_ip"), click.ClickException, "supply a `head_ip`"),
])
def test_broken_cluster_configs_are_rejected(config, breaks, error, message):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / config).read_text())
    breaks(raw)
    with pytest.raises(error, match=re.escape(message)):
        validate_config(prepare_config(raw))
