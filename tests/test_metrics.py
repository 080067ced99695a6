"""Ray metrics end to end: a real job on the session's Ray, then its real Prometheus endpoint scraped."""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Callable

import ray
from prometheus_client.parser import text_string_to_metric_families

from conftest import write_url_list
from pipeline import telemetry
from pipeline.ledger import StageLedger
from pipeline.spec import load_job
from pipeline.storage import Storage
from pipeline.workflow import run

SCRAPE_DEADLINE = 60    # Ray's metrics agent exports every ~10 s


def scrape() -> dict[str, list]:
    """{sample name: [samples]} of every `ray_tokenmill_*` series on this node's Prometheus endpoint."""
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_tokenmill_"):
                found.setdefault(sample.name, []).append(sample)
    return found


def eventually(check: Callable[[dict[str, list]], None]) -> None:
    """Scrape until `check` passes on the series (the agent exports on an interval) or the deadline."""
    deadline = time.time() + SCRAPE_DEADLINE
    while True:
        try:
            return check(scrape())
        except (AssertionError, KeyError, ValueError):
            if time.time() > deadline:
                raise
            time.sleep(1)


def total(samples: list, **labels) -> float:
    """Sum over every worker's series whose labels include `labels`."""
    return sum(s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items()))


def test_job_stages_export_tagged_metrics(ray_address, shapes_site, tmp_path):
    urls = [f"{shapes_site}/{i:06d}.png" for i in range(30)] + [f"{shapes_site}/missing-{i}.png" for i in range(3)]
    url_list = write_url_list(tmp_path / "urls.parquet", urls)
    spec = tmp_path / "job.yaml"
    spec.write_text(f"""
name: metrics-test
storage: {tmp_path / "out"}
stages:
  images: {{kind: ingest-images, url_list: {url_list}, image_size: 32, samples_per_shard: 10, retries: 0}}
  vq: {{kind: train-image-tokenizer, inputs: [images], workers: 1, image_size: 32, channels: 8, codebook_size: 256,
       latent_dim: 16, batch_size: 4, warmup_steps: 1, steps: 4, checkpoint_every: 4, log_every: 2,
       shuffle_buffer: 8, eval_images: 4}}
""")
    job = load_job(spec)
    results = {r.name: r for r in run(job, address=ray_address)}
    assert (results["images"].built, results["vq"].built) == (4, 1)
    storage = Storage(job.storage)
    markers = StageLedger(storage, "images").read_markers().values()
    written = sum(o.size for m in markers for o in m.outputs)
    last_step = json.loads(Path(storage.path("vq/shards/metrics.jsonl")).read_text().splitlines()[-1])

    images = {"job": "metrics-test", "stage": "images"}

    def check(found: dict[str, list]) -> None:
        assert total(found["ray_tokenmill_samples_done_total"], **images) == 30
        assert total(found["ray_tokenmill_samples_failed_total"], **images, reason="http 404") == 3
        assert total(found["ray_tokenmill_bytes_written_total"], **images) == written
        assert total(found["ray_tokenmill_shard_seconds_count"], **images) == 4
        assert total(found["ray_tokenmill_shard_seconds_count"], job="metrics-test", stage="vq") == 1
        (loss,) = [s for s in found["ray_tokenmill_train_loss"] if s.labels.get("job") == "metrics-test"]
        assert (loss.labels["stage"], loss.labels["task"]) == ("vq", "all")
        assert abs(loss.value - last_step["loss"]) < 1e-4       # the gauge holds the last step's loss

    eventually(check)


@ray.remote
def _train_step_metrics(stats: dict) -> None:
    telemetry.record_train_step({"job": "gauges-test", "stage": "model"}, stats)


def test_train_step_gauges_per_task(ray_address):
    """A token model's step stats (as train_loop records them) become per-task loss and tokens/s gauges."""
    ray.get(_train_step_metrics.remote({"step": 3, "loss": 2.5, "loss_t2i": 2.25, "loss_i2t": 2.75,
                                        "tokens_per_s": 1234.5, "step_seconds": 0.1}))

    def check(found: dict[str, list]) -> None:
        losses = {s.labels["task"]: s.value for s in found["ray_tokenmill_train_loss"]
                  if s.labels.get("job") == "gauges-test" and s.labels.get("stage") == "model"}
        assert losses == {"all": 2.5, "t2i": 2.25, "i2t": 2.75}
        (speed,) = [s for s in found["ray_tokenmill_train_tokens_per_second"] if s.labels.get("job") == "gauges-test"]
        assert (speed.labels["task"], speed.value) == ("all", 1234.5)

    eventually(check)
