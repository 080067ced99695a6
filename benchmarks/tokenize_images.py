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
from pathlib import Path

import torch
from timing import bare_loop, connect, contest, ingest_once, machine, stage_arguments, stage_run, verdict, work_dir

from pipeline import executor, workflow
from pipeline.data.image_shards import iter_samples, to_tensor
from pipeline.tokenizers import image_vq

IMAGE_SIZE = 64


def images_stage(args) -> str:
    return (f"  images:\n    kind: ingest-images\n    url_list: demo://shapes?count={args.images}\n"
            f"    image_size: {IMAGE_SIZE}\n    resize_mode: center_crop\n"
            f"    samples_per_shard: {args.samples_per_shard}\n")


def write_jobs(work: Path, args) -> tuple[Path, Path]:
    """The ingest-only job (run once as a command) and the whole job; one storage per corpus shape."""
    stem = work / f"shapes-{args.images}-{args.samples_per_shard}"
    ingest, job = stem.with_name(f"{stem.name}-ingest.yaml"), stem.with_suffix(".yaml")
    head = f"storage: {job.with_suffix('')}-storage\nray: {{address: null}}\nstages:\n"
    ingest.write_text(f"name: {ingest.stem}\n{head}{images_stage(args)}")
    tokens = "".join(f"    {k}: {v}\n" for k, v in (("batch_size", args.batch_size), ("actors", args.actors),
                                                    ("prefetch", args.prefetch)) if v is not None)
    job.write_text(f"name: {job.stem}\n{head}{images_stage(args)}"
                   f"  tokenizer:\n    kind: train-image-tokenizer\n    pretrained: {work / 'checkpoint'}\n"
                   f"  tokens:\n    kind: tokenize-images\n    inputs: [images]\n    tokenizer: tokenizer\n{tokens}")
    return ingest, job


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30000)   # fewer: the fixed ~2 s of actor start and planning weigh more
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    stage_arguments(parser, "/tmp/tokenmill-bench-tokenize", "the ingested images and the checkpoint")
    args = parser.parse_args()
    args.work = work_dir(args)
    _, job, tars = ingest_once(*write_jobs(args.work, args), "images")
    make_checkpoint(args.work / "checkpoint", tars[0])
    ray_start = connect(job)
    (copied,) = workflow.run(job, stages=["tokenizer"])    # copies the checkpoint (once)
    if copied.failed(0.0):
        raise SystemExit(f"tokenizer stage failed: {copied}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stage = job.stages["tokens"].stage
    placement = stage.placement(executor.cluster_resources(), len(tars))

    model = image_vq.load(args.work / "checkpoint", device)
    batches, count = decoded_batches(tars, stage.config.batch_size, device)
    model.encode(batches[0])     # warm-up (cuDNN, allocator)
    print(machine(device, ray_start, placement))
    print(f"{count} images {IMAGE_SIZE}x{IMAGE_SIZE} in {len(tars)} shards of {args.samples_per_shard}; "
          f"batch size {stage.config.batch_size}")

    bare, stage_timings = contest(args.repeat, lambda: bare_loop(model.encode, batches, device),
                                  lambda: stage_run(job, "tokens", count, len(tars)), count, "images")
    verdict(bare, stage_timings, count, "images", f"model.encode on decoded tensors, 1 process, "
            f"{torch.get_num_threads()} threads", "tokenizer loads included")

if __name__ == "__main__":
    main()
