"""Benchmark: the `ingest-images` stage against plain img2dataset, and a no-op re-run.

On a local corpus of distinct 400x300 JPEGs served over HTTP on 127.0.0.1 (by a separate
process, so that neither contender's driver shares a GIL with the server) it measures:

1. Throughput, samples/s, with the same processes, threads and shard size, each contender
   timed as a whole command in a fresh process (Python start-up, imports, pool or Ray
   start-up and shutdown included):
   - baseline: `img2dataset.download(..., distributor="multiprocessing")` with P processes;
   - tokenmill: `tokenmill run` on a one-stage job with a local Ray of num_cpus=P.
   Target: ratio tokenmill/img2dataset >= 0.95. Also printed: tokenmill's stage time
   (`_stage.json` last_run.seconds, Ray start-up included) and, for both, the span from
   the first shard's start to the last shard's end.
2. A no-op re-run: the wall time of `tokenmill run` when all --noop-shards shards are
   already done (a fresh process, Python start-up included). Target: < 2 s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")   # before img2dataset imports albumentations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from timing import timed_run

SERVE = ("import sys\nfrom pipeline.demo.server import LocalServer\n"
         "with LocalServer(sys.argv[1]) as server:\n    print(server.base_url, flush=True)\n    sys.stdin.read()\n")
# The baseline as a command of its own, like `tokenmill run`: arguments come as JSON on argv.
DOWNLOAD = ("import json, os, sys\nos.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')\n"
            "if __name__ == '__main__':\n    from img2dataset import download\n"
            "    download(**json.loads(sys.argv[1]))\n")


def make_images(folder: Path, count: int) -> list[str]:
    """Distinct 400x300 JPEGs: a random two-colour gradient plus noise each."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 400)[None, :, None]
    names = []
    for i in range(count):
        a, b = rng.integers(0, 256, (2, 3))
        pixels = a + (b - a) * ramp + rng.normal(0, 12, (300, 400, 3))
        names.append(f"img-{i:05d}.jpg")
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / names[-1], quality=90)
    return names


def write_url_list(path: Path, urls: list[str]) -> Path:
    pq.write_table(pa.table({"url": urls, "caption": [f"picture {i}" for i in range(len(urls))]}), path)
    return path


def warm(urls: list[str]) -> None:
    """Fetch every URL once: the page cache and the server are warm for both contenders."""
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda u: urllib.request.urlopen(u, timeout=10).read(), urls))


def run_img2dataset(url_list: Path, out: Path, args) -> dict:
    options = dict(url_list=str(url_list), input_format="parquet", url_col="url", caption_col="caption",
                   output_folder=str(out), output_format="webdataset", image_size=256, resize_mode="center_crop",
                   processes_count=args.processes, thread_count=args.threads,
                   number_sample_per_shard=args.samples_per_shard, distributor="multiprocessing", timeout=10,
                   retries=0, enable_wandb=False, compute_hash="sha256", extract_exif=False)
    started = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run([sys.executable, "-c", DOWNLOAD, json.dumps(options)], stdout=log, stderr=log, check=True)
    seconds = time.perf_counter() - started
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    return {"wall": seconds, "samples": sum(s["successes"] for s in stats),
            "shards": span([(s["start_time"], s["end_time"]) for s in stats])}


def span(intervals: list[tuple[float, float]]) -> float:
    """Seconds from the first shard's start to the last shard's end."""
    return max(end for _, end in intervals) - min(start for start, _ in intervals)


def storage_of(job: Path) -> Path:
    return Path(f"{job.with_suffix('')}-storage")


def write_job(path: Path, url_list: Path, processes: int, threads: int, samples_per_shard: int) -> Path:
    path.write_text(f"name: {path.stem}\nstorage: {storage_of(path)}\n"
                    f"ray: {{address: null, num_cpus: {processes}}}\n"
                    f"stages:\n  images:\n    kind: ingest-images\n    url_list: {url_list}\n"
                    f"    image_size: 256\n    resize_mode: center_crop\n    samples_per_shard: {samples_per_shard}\n"
                    f"    thread_count: {threads}\n    timeout: 10\n    retries: 0\n")
    return path


def run_tokenmill(job: Path, env: dict) -> dict:
    run = timed_run(job, storage_of(job), "images", env)
    return {"wall": run["wall"], "seconds": run["record"]["last_run"]["seconds"], "samples": run["status"]["samples"],
            "shards": run["span"], "line": run["line"]}


def throughput(tmp: Path, url_list: Path, args, env: dict) -> None:
    base, mill = [], []
    for r in range(args.repeat):   # alternate which contender goes first
        order = ["img2dataset", "tokenmill"] if r % 2 == 0 else ["tokenmill", "img2dataset"]
        for who in order:
            if who == "img2dataset":
                base.append(run_img2dataset(url_list, tmp / f"img2dataset-{r}", args))
            else:
                job = write_job(tmp / f"bench-{r}.yaml", url_list, args.processes, args.threads,
                                args.samples_per_shard)
                mill.append(run_tokenmill(job, env))
    b, t = ({k: statistics.median(x[k] for x in runs) for k in runs[0] if k != "line"} for runs in (base, mill))
    print(f"img2dataset: {b['samples']:.0f} samples in {b['wall']:.2f} s = {b['samples'] / b['wall']:.1f} samples/s "
          f"(whole command; first shard start to last shard end: {b['shards']:.2f} s)")
    print(f"tokenmill:   {t['samples']:.0f} samples in {t['wall']:.2f} s = {t['samples'] / t['wall']:.1f} samples/s "
          f"(whole command; stage {t['seconds']:.2f} s with Ray start-up; shards span {t['shards']:.2f} s)")
    print(f"             last run said: {mill[-1]['line']}")
    ratio = (t["samples"] / t["wall"]) / (b["samples"] / b["wall"])
    print(f"RATIO tokenmill/img2dataset samples/s: {ratio:.3f}  target >= 0.95  {'PASS' if ratio >= 0.95 else 'FAIL'}")


def noop_rerun(tmp: Path, urls: list[str], args, env: dict) -> None:
    url_list = write_url_list(tmp / "noop.parquet", [urls[i % len(urls)] for i in range(2 * args.noop_shards)])
    job = write_job(tmp / "noop.yaml", url_list, args.processes, args.threads, 2)
    first = run_tokenmill(job, env)
    print(f"no-op job, first run: {first['wall']:.1f} s: {first['line']}")
    second = run_tokenmill(job, env)
    print(f"NO-OP RE-RUN of {args.noop_shards} done shards: {second['wall']:.2f} s (whole command)  target < 2 s  "
          f"{'PASS' if second['wall'] < 2 else 'FAIL'}\n  output: {second['line']}")
    assert "built 0 shard(s)" in second["line"], second["line"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--samples-per-shard", type=int, default=100)
    parser.add_argument("--noop-shards", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of each contender; medians")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as name:
        tmp = Path(name)
        env = {**os.environ, "TOKENMILL_CACHE": str(tmp / "cache")}
        names = make_images(tmp / "www", args.images)
        server = subprocess.Popen([sys.executable, "-c", SERVE, tmp / "www"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            base_url = server.stdout.readline().strip()
            urls = [base_url + n for n in names]
            warm(urls)
            print(f"machine: {os.cpu_count()} CPUs; {args.images} images 400x300 -> 256 center_crop; "
                  f"P={args.processes} processes, T={args.threads} threads, {args.samples_per_shard} samples/shard")
            throughput(tmp, write_url_list(tmp / "urls.parquet", urls), args, env)
            noop_rerun(tmp, urls, args, env)
        finally:
            server.stdin.close()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
