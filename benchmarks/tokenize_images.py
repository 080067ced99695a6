"""Benchmark: the `tokenize-images` stage against a bare loop running the same encoder on the same images.

On `demo://shapes?count=N` images (64x64, ingested once by `tokenmill run` and reused across
invocations of this script) it measures images/s of:

- stage: `workflow.run(job, stages=["tokens"], force=["tokens"])` in this process, on a local Ray
  that is already started (its start-up is timed and printed apart): planning, the actor pool
  (actor start, tokenizer load), streaming and decoding the JPEGs, encoding, Parquet writes and
  markers, every shard rebuilt;
- bare loop: `model.encode(batch)` in this process with torch's default thread count, over the
  same images already decoded into tensors on the device the stage uses (cuda when there is one),
  batched like the stage batches them (`batch_size` per batch, a shard's last batch smaller).

Both run `--repeat` times, alternating which goes first; medians. Target: stage/bare >= 0.85 on
CPU. The tokenizer is a default-VQConfig model saved by this script (seeded; one forward pass in
train mode on real images initialises its k-means codebook), given to a `train-image-tokenizer`
stage as `pretrained:`. On a GPU machine the same command runs unchanged and reports images/s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from timing import timed_run

from pipeline import executor, workflow
from pipeline.data.image_shards import iter_samples, to_tensor
from pipeline.spec import load_job
from pipeline.tokenizers import image_vq

IMAGE_SIZE = 64


def storage_of(job: Path) -> Path:
    return Path(f"{job.with_suffix('')}-storage")


def images_stage(args) -> str:
    return (f"  images:\n    kind: ingest-images\n    url_list: demo://shapes?count={args.images}\n"
            f"    image_size: {IMAGE_SIZE}\n    resize_mode: center_crop\n"
            f"    samples_per_shard: {args.samples_per_shard}\n")


def write_jobs(work: Path, args) -> tuple[Path, Path]:
    """The ingest-only job (run once as a command) and the whole job; one storage per corpus shape."""
    stem = work / f"shapes-{args.images}-{args.samples_per_shard}"
    ingest, job = stem.with_name(f"{stem.name}-ingest.yaml"), stem.with_suffix(".yaml")
    head = f"storage: {storage_of(job)}\nray: {{address: null}}\nstages:\n"
    ingest.write_text(f"name: {ingest.stem}\n{head}{images_stage(args)}")
    tokens = "".join(f"    {k}: {v}\n" for k, v in (("batch_size", args.batch_size), ("actors", args.actors),
                                                    ("prefetch", args.prefetch)) if v is not None)
    job.write_text(f"name: {job.stem}\n{head}{images_stage(args)}"
                   f"  tokenizer:\n    kind: train-image-tokenizer\n    pretrained: {work / 'checkpoint'}\n"
                   f"  tokens:\n    kind: tokenize-images\n    inputs: [images]\n    tokenizer: tokenizer\n{tokens}")
    return ingest, job


def shard_tars(job) -> list[str]:
    """URLs of the image shards the tokens stage reads, in shard order."""
    built = workflow.Planner(job).built_shards("images")
    return [url for _, up in sorted(built.items()) for url in up.files if url.endswith(".tar")]


def make_checkpoint(folder: Path, tar: str) -> None:
    """A default-VQConfig tokenizer whose k-means codebook was initialised on real images."""
    if (folder / "model.safetensors").exists():
        return
    torch.manual_seed(0)
    model = image_vq.VQAutoencoder(image_vq.VQConfig(image_size=IMAGE_SIZE))
    images = [s.image for s in iter_samples(tar, IMAGE_SIZE) if s.image is not None][:256]
    model.train()
    with torch.no_grad():
        model(to_tensor(images))
    image_vq.save(model, folder)


def decoded_batches(tars: list[str], batch_size: int, device: str) -> tuple[list[torch.Tensor], int]:
    """Every image of the shards as tensors on `device`, batched per shard the way the stage batches."""
    batches, count = [], 0
    for tar in tars:
        images = [s.image for s in iter_samples(tar, IMAGE_SIZE) if s.image is not None]
        count += len(images)
        batches += [to_tensor(images[i:i + batch_size]).to(device) for i in range(0, len(images), batch_size)]
    return batches, count


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bare_loop(model, batches: list[torch.Tensor], device: str) -> float:
    sync(device)
    started = time.perf_counter()
    for batch in batches:
        model.encode(batch)
    sync(device)
    return time.perf_counter() - started


def stage_run(job, storage: Path) -> dict:
    started, clock = time.perf_counter(), time.time()
    (result,) = workflow.run(job, stages=["tokens"], force=["tokens"])
    wall, ended = time.perf_counter() - started, time.time()
    if result.failed_shards or result.totals.failures:
        raise SystemExit(f"tokens stage failed: {result}")
    markers = [json.loads(p.read_text()) for p in (storage / "tokens" / "_state").glob("*.json")]
    first, last = min(m["started"] for m in markers), max(m["finished"] for m in markers)
    return {"wall": wall, "samples": result.totals.samples, "built": result.built, "span": last - first,
            "before": first - clock, "after": ended - last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30000)   # fewer: the fixed ~2 s of actor start and planning weigh more
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--actors", type=int, default=None, help="stage actors (default: the stage's own choice)")
    parser.add_argument("--prefetch", type=int, default=None, help="stage prefetch depth (default: the stage's)")
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of each contender; medians")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tokenmill-bench-tokenize"),
                        help="work dir; the ingested images and the checkpoint are kept there and reused")
    args = parser.parse_args()
    args.work = args.work.resolve()   # the job's storage path must not depend on the job file's folder
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ["TOKENMILL_CACHE"] = str(args.work / "cache")   # before Ray starts: its workers inherit it
    ingest, job_path = write_jobs(args.work, args)
    storage = storage_of(job_path)

    ingested = timed_run(ingest, storage, "images", dict(os.environ))
    print(f"ingest (once; reused when already done): {ingested['line']}")
    job = load_job(job_path)
    tars = shard_tars(job)
    make_checkpoint(args.work / "checkpoint", tars[0])
    started = time.perf_counter()
    executor.connect(job.ray_address, job.ray_num_cpus)
    ray_start = time.perf_counter() - started
    (copied,) = workflow.run(job, stages=["tokenizer"])    # copies the checkpoint (once)
    if copied.failed(0.0):
        raise SystemExit(f"tokenizer stage failed: {copied}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stage = job.stages["tokens"].stage
    placement = stage.placement(executor.cluster_resources(), len(tars))

    model = image_vq.load(args.work / "checkpoint", device)
    batches, count = decoded_batches(tars, stage.config.batch_size, device)
    model.encode(batches[0])     # warm-up (cuDNN, allocator)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none"
    print(f"machine: {os.cpu_count()} CPUs, GPU: {gpu}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads in this process; Ray start {ray_start:.2f} s (not timed below)")
    print(f"{count} images {IMAGE_SIZE}x{IMAGE_SIZE} in {len(tars)} shards of {args.samples_per_shard}; "
          f"batch size {stage.config.batch_size}; device {device}; stage: {placement['actors']} actor(s) x "
          f"{placement['num_cpus']:g} CPU, {placement['num_gpus']:g} GPU")

    bare, mill = [], []
    for r in range(args.repeat):   # alternate which contender goes first
        for who in (["bare", "stage"] if r % 2 == 0 else ["stage", "bare"]):
            if who == "bare":
                bare.append(bare_loop(model, batches, device))
            else:
                mill.append(stage_run(job, storage))
                if mill[-1]["samples"] != count or mill[-1]["built"] != len(tars):
                    raise SystemExit(f"stage encoded {mill[-1]['samples']} images in {mill[-1]['built']} shards, "
                                     f"expected {count} in {len(tars)}")
        print(f"  run {r + 1}: bare loop {count / bare[-1]:.1f} images/s, stage {count / mill[-1]['wall']:.1f} "
              f"images/s", flush=True)
    b = statistics.median(bare)
    t = {k: statistics.median(m[k] for m in mill) for k in ("wall", "span", "before", "after")}
    print(f"bare loop: {count} images in {b:.2f} s = {count / b:.1f} images/s (model.encode on decoded tensors, "
          f"1 process, {torch.get_num_threads()} threads)")
    print(f"stage:     {count} images in {t['wall']:.2f} s = {count / t['wall']:.1f} images/s "
          f"(workflow.run: {t['before']:.2f} s to the first shard's start; first shard start to last shard end "
          f"{t['span']:.2f} s = {count / t['span']:.1f} images/s, tokenizer loads included; {t['after']:.2f} s after)")
    ratio = b / t["wall"]
    print(f"RATIO stage/bare images/s: {ratio:.3f}  target >= 0.85  {'PASS' if ratio >= 0.85 else 'FAIL'}")


if __name__ == "__main__":
    main()
