"""The whole small pipeline with `storage: s3://...` on a real S3-compatible server (moto on 127.0.0.1):
demo images, a tiny image tokenizer trained with Ray Train (checkpoints in the bucket), image tokens,
a text tokenizer, packing and a tiny decoder; status, a rerun that does nothing, no secret in any output;
markers that never name an incomplete object, also when a run is killed mid-stage."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import pytest
from PIL import Image

from conftest import write_url_list
from pipeline.data.tar_stream import iter_files
from pipeline.spec import SpecError, load_job, parse_job
from pipeline.storage import Storage
from pipeline.workflow import run

# one Ray Train worker each: the bucket is the subject here, DDP is tested where the stages are
VQ = ("workers: 1, image_size: 32, channels: 8, codebook_size: 256, latent_dim: 16, batch_size: 8, warmup_steps: 2, "
      "shuffle_buffer: 40, eval_images: 8, steps: 4, checkpoint_every: 2, log_every: 2")
DECODER = ("workers: 1, model: {arch: decoder, n_layer: 2, n_head: 4, d_model: 64}, tasks: [t2i, i2t], "
           "text_tokenizer: text-bpe, image_tokenizer: vq, holdout: combinations, holdout_share: 0.2, steps: 4, "
           "batch_size: 2, warmup_steps: 2, checkpoint_every: 2, log_every: 2, eval_documents: 8, eval_samples: 1")
STAGES = f"""  images: {{kind: ingest-images, url_list: "demo://shapes?count=40", image_size: 32, samples_per_shard: 20}}
  vq: {{kind: train-image-tokenizer, inputs: [images], {VQ}}}
  image-tokens: {{kind: tokenize-images, inputs: [images], tokenizer: vq, batch_size: 16}}
  text-bpe: {{kind: train-text-tokenizer, inputs: [images], vocab_size: 300}}
  sequences: {{kind: pack, inputs: [image-tokens], text_tokenizer: text-bpe, tasks: [t2i, i2t], seq_len: 1024}}
  decoder: {{kind: train, inputs: [sequences], {DECODER}}}
"""


def s3():
    """A boto3 client of the test server (endpoint and credentials from the environment)."""
    return boto3.client("s3")


def new_bucket() -> str:
    name = f"tokenmill-{uuid.uuid4().hex[:12]}"
    s3().create_bucket(Bucket=name)
    return name


def objects(bucket: str, prefix: str = "") -> dict[str, int]:
    """Key -> size of every object under `prefix`."""
    found = {}
    for page in s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return found


def body(bucket: str, key: str) -> bytes:
    return s3().get_object(Bucket=bucket, Key=key)["Body"].read()


def marker_problems(bucket: str, prefix: str, check_digests: bool = False) -> list[str]:
    """What is wrong with the done markers under `prefix`: an output they name that is missing, or of
    another size (or sha256) than recorded."""
    listing, problems = objects(bucket, prefix), []
    for key in [k for k in listing if "/_state/" in k and k.endswith(".json")]:
        try:
            marker = json.loads(body(bucket, key))
        except s3().exceptions.NoSuchKey:
            continue                                 # replaced while we looked (a rebuild forgets it first)
        if marker["status"] != "done":
            continue
        stage_prefix = key.split("/_state/")[0]
        for out in marker["outputs"]:
            name = f"{stage_prefix}/shards/{out['name']}"
            try:
                data = body(bucket, name) if check_digests else None
                size = len(data) if data is not None else s3().head_object(Bucket=bucket, Key=name)["ContentLength"]
            except Exception as exc:                 # noqa: BLE001 - any failure to read it is the finding
                problems.append(f"{key} names {name}, unreadable: {exc}")
                continue
            if size != out["size"] or (data is not None and hashlib.sha256(data).hexdigest() != out["sha256"]):
                problems.append(f"{key} names {name} of {out['size']} bytes, the object has {size}")
    return problems


class MarkerWatch(threading.Thread):
    """Checks the markers under a prefix while a run writes them, until stopped."""

    def __init__(self, bucket: str, prefix: str):
        super().__init__(daemon=True)
        self.bucket, self.prefix, self.problems, self.rounds = bucket, prefix, [], 0
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            self.problems += marker_problems(self.bucket, self.prefix)
            self.rounds += 1
            self.stopping.wait(0.3)

    def stop(self) -> list[str]:
        self.stopping.set()
        self.join()
        return self.problems


def write_job(folder: Path, storage: str, stages: str = STAGES) -> Path:
    spec = folder / "job.yaml"
    spec.write_text(f"name: s3-test\nstorage: {storage}\nstages:\n{stages}")
    return spec


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def built(ray_address, tmp_path_factory):
    """The job built once on a fresh bucket, its markers watched while it ran; the driver's working
    folder (which must stay empty: nothing goes to a local path named like the bucket)."""
    bucket = new_bucket()
    folder = tmp_path_factory.mktemp("s3job")
    spec = write_job(folder, f"s3://{bucket}/jobs/small")
    cwd = tmp_path_factory.mktemp("cwd")
    watch = MarkerWatch(bucket, "jobs/small/")
    watch.start()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        results = {r.name: r for r in run(load_job(spec), address=ray_address)}
    finally:
        os.chdir(here)
        problems = watch.stop()
    return spec, bucket, results, problems, watch.rounds, cwd


def test_every_stage_builds_into_the_bucket(built):
    spec, bucket, results, problems, rounds, cwd = built
    assert {n: (r.built, r.failed_shards) for n, r in results.items()} == {
        "images": (2, 0), "vq": (1, 0), "image-tokens": (2, 0), "text-bpe": (1, 0), "sequences": (2, 0),
        "decoder": (1, 0)}, results
    assert rounds > 3 and problems == []             # no marker ever named a missing or partial object
    assert marker_problems(bucket, "jobs/small/", check_digests=True) == []
    keys = objects(bucket, "jobs/small/")
    for name in ("images/shards/00000.tar", "images/shards/00001.parquet", "vq/shards/model.safetensors",
                 "vq/shards/metrics.jsonl", "vq/shards/eval.json", "image-tokens/shards/00001.parquet",
                 "text-bpe/shards/tokenizer.json", "sequences/vocab.json", "sequences/shards/image-tokens-00000.parquet",
                 "decoder/shards/model.safetensors", "decoder/shards/eval.json", "decoder/_stage.json"):
        assert f"jobs/small/{name}" in keys, name
    # Ray Train's checkpoints and its run state live in the bucket too
    for stage in ("vq", "decoder"):
        assert any(k.startswith(f"jobs/small/{stage}/checkpoints/run-") and "/checkpoint_" in k
                   and k.endswith("/model.safetensors") for k in keys), stage
    metrics = [json.loads(line) for line in body(bucket, "jobs/small/decoder/shards/metrics.jsonl").splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert list(cwd.iterdir()) == []                 # nothing written to a local folder named like the URL
    assert not Path(bucket).exists() and not Path("s3:").exists()


def test_status_and_a_rerun_that_does_nothing(built, ray_address, s3_server):
    spec, bucket, *_ = built
    status = cli("status", str(spec), "--json")
    assert status.returncode == 0, status.stderr
    stages = json.loads(status.stdout)["stages"]
    assert {n: s["state"] for n, s in stages.items()} == dict.fromkeys(stages, "done")
    assert stages["images"]["samples"] == 40 and stages["images"]["shards_done"] == 2
    assert stages["decoder"]["steps"] == 4
    markers = {k: v for k, v in objects(bucket, "jobs/small/").items() if "/_state/" in k}
    stamps = {k: json.loads(body(bucket, k))["finished"] for k in markers}
    again = cli("run", str(spec), "--address", ray_address)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("built 0 shard(s)") == 6, again.stdout
    assert {k: json.loads(body(bucket, k))["finished"] for k in markers} == stamps
    table = cli("status", str(spec))
    assert table.returncode == 0 and "│ decoder " in table.stdout, table.stdout
    assert re.search(r"^decoder: .*steps 4", table.stdout, re.M), table.stdout    # figures: a line a stage, below
    secret = s3_server["AWS_SECRET_ACCESS_KEY"]
    for output in (status, again, table):
        assert secret not in output.stdout + output.stderr


def test_decode_and_sample_read_tokenizers_and_models_from_the_bucket(built, tmp_path):
    spec, *_ = built
    decoded = cli("decode", str(spec), "--stage", "image-tokens", "--shard", "00000", "--row", "0",
                  "--out", str(tmp_path / "row.png"))
    assert decoded.returncode == 0, decoded.stderr
    assert Image.open(tmp_path / "row.png").size == (32, 32)
    sampled = cli("sample", str(spec), "--stage", "decoder", "--task", "t2i", "--text", "a small red circle",
                  "--out", str(tmp_path / "samples"))
    assert sampled.returncode == 0, sampled.stderr
    assert [Image.open(p).size for p in sampled.stdout.split()] == [(32, 32)]


def test_no_object_in_the_bucket_holds_the_secret(built, s3_server):
    _, bucket, *_ = built
    secret = s3_server["AWS_SECRET_ACCESS_KEY"].encode()
    texts = [k for k in objects(bucket) if k.endswith((".json", ".jsonl"))]
    assert any(k.endswith("_stage.json") for k in texts)
    assert all(secret not in body(bucket, k) for k in texts)


def test_a_killed_run_leaves_no_marker_of_an_incomplete_object(web, ray_address, tmp_path):
    """Kill `tokenmill run` mid-stage (slow downloads; the URL list is in the bucket too): every marker names
    complete objects, every shard object is a whole tar; the rerun builds only what was not done."""
    bucket = new_bucket()
    urls = write_url_list(tmp_path / "urls.parquet", [f"{web.base_url}delay/good-{i}.jpg" for i in range(30)])
    s3().upload_file(str(urls), bucket, "lists/urls.parquet")           # the URL list is read from the bucket too
    spec = write_job(tmp_path, f"s3://{bucket}/killed", f"  images: {{kind: ingest-images, "
                                                           f"url_list: s3://{bucket}/lists/urls.parquet, "
                                                           f"image_size: 32, samples_per_shard: 6, thread_count: 2}}\n")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(spec), "--address", ray_address],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watch = MarkerWatch(bucket, "killed/")
    watch.start()
    deadline = time.time() + 120
    while not any("/_state/" in k for k in objects(bucket, "killed/")) and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert watch.stop() == []
    assert marker_problems(bucket, "killed/", check_digests=True) == []
    keys = objects(bucket, "killed/")
    done = {k for k in keys if "/_state/" in k}
    tars = [k for k in keys if k.endswith(".tar")]
    assert 1 <= len(done) < 5, "killed too late: every shard was done"
    for key in tars:            # a whole tar: every header and member verified, the end-of-archive blocks there
        data = body(bucket, key)
        assert list(iter_files(io.BytesIO(data))) and data[-1024:] == bytes(1024), key
    (result,) = run(load_job(spec), address=ray_address)
    assert result.built == 5 - len(done) and result.failed_shards == 0
    assert marker_problems(bucket, "killed/", check_digests=True) == []


def test_storage_sees_what_other_clients_wrote(s3_server):
    """Markers are rewritten by other processes: a listing or a read never serves a cached old version."""
    bucket = new_bucket()
    storage = Storage(f"s3://{bucket}/job")
    storage.write_json("stage/_state/a.json", {"v": 1})
    assert set(storage.sizes("stage/_state")) == {"a.json"} and storage.read_json("stage/_state/a.json") == {"v": 1}
    newer = json.dumps({"v": 2, "pad": "x" * 40}).encode()
    s3().put_object(Bucket=bucket, Key="job/stage/_state/a.json", Body=newer)
    s3().put_object(Bucket=bucket, Key="job/stage/_state/b.json", Body=b"{}")
    assert storage.read_json("stage/_state/a.json") == json.loads(newer)
    assert storage.sizes("stage/_state") == {"a.json": len(newer), "b.json": 2}


def test_endpoint_and_keys_from_the_aws_config_files(built, tmp_path, s3_server):
    """With no AWS_* variables but the AWS config files, `status` reads the bucket and Ray Train's
    filesystem (Storage.arrow) reaches the same server."""
    spec, bucket, *_ = built
    (tmp_path / "config").write_text(f"[default]\nregion = us-east-1\nendpoint_url = {s3_server['AWS_ENDPOINT_URL']}\n")
    (tmp_path / "credentials").write_text(f"[default]\naws_access_key_id = {s3_server['AWS_ACCESS_KEY_ID']}\n"
                                          f"aws_secret_access_key = {s3_server['AWS_SECRET_ACCESS_KEY']}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "config"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "credentials"))
    script = f"""
import json, pyarrow.fs
from pipeline.monitor.status import job_status
from pipeline.spec import load_job
from pipeline.storage import Storage
job = load_job({str(spec)!r})
path, fs = Storage(job.storage).arrow("decoder/checkpoints")
print(json.dumps({{"states": {{n: s["state"] for n, s in job_status(job)["stages"].items()}},
                  "runs": [i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(path))]}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert set(found["states"].values()) == {"done"} and any(r.startswith("run-") for r in found["runs"]), found


def test_storage_errors_are_clear_and_keep_credentials_out(tmp_path, s3_server):
    with pytest.raises(SpecError) as err:
        parse_job(f"name: x\nstorage: s3://AKIAEXAMPLE:{s3_server['AWS_SECRET_ACCESS_KEY']}@bucket/x\nstages: {{}}\n",
                  tmp_path)
    assert "storage" in str(err.value) and s3_server["AWS_SECRET_ACCESS_KEY"] not in str(err.value)
    spec = write_job(tmp_path, "s3://no-such-bucket-here/x", "  images: {kind: ingest-images, url_list: \"demo://shapes?count=4\"}\n")
    status = cli("status", str(spec))
    assert status.returncode == 2 and "no-such-bucket-here" in status.stderr, status.stderr
    assert "Traceback" not in status.stderr and s3_server["AWS_SECRET_ACCESS_KEY"] not in status.stderr
