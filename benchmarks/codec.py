"""Benchmark: tokenmill's audio codec, trained by the `train-audio-codec` stage and used by `tokenize-speech`.

Speech-like 16 kHz FLAC utterances of 2-15 s (benchmarks/tokenize_speech.py's corpus), listed in a
manifest, are ingested once by `tokenmill run` into 24 kHz speech shards that later invocations reuse.
In one run it measures seconds of audio per second of:

1. training, the same recipe and the same audio per step both ways:
   - Ray Train: the train-audio-codec stage (`workflow.run`, forced) with `--workers` DDP workers of
     one CPU each, `--batch` crops each; its training loop's own clock (metrics.jsonl: from the first
     batch to the last step, checkpoints included), and the stage's wall time apart (Ray Train start,
     the final checkpoint copy, the held-out evaluation);
   - one plain process: `train_loop.train_step` on the same task, batches of workers x batch crops,
     torch's default thread count, no Ray;
2. tokenization with the codec just trained (`--levels` levels), as benchmarks/tokenize_speech.py does
   it for EnCodec: the tokenize-speech stage against a bare `codec.encode` loop over the same padded
   batches, `--repeat` runs alternating, medians; target stage/bare >= 0.85.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tokenize_speech import compare, corpus_arguments, ingest_and_connect, speech_jobs, stage_options

from pipeline import workflow
from pipeline.data.shard_stream import prefetched
from pipeline.stages.base import checkpoint_of
from pipeline.storage import Storage
from pipeline.tokenizers.audio_codec import load_codec
from pipeline.train_loop import autocast, new_optimizer, train_step
from pipeline.workflow import Planner


def write_jobs(work: Path, args) -> tuple[Path, Path]:
    """The ingest-only job and the whole job: the speech stage, the codec stage and its tokens."""
    return speech_jobs(work, args, "codec",
                       f"  codec: {{kind: train-audio-codec, inputs: [speech], steps: {args.steps}, workers: "
                       f"{args.workers}, batch_size: {args.batch}, warmup_steps: 10, checkpoint_every: {args.steps}, "
                       f"eval_utterances: 16}}\n"
                       f"  tokens: {{kind: tokenize-speech, inputs: [speech], codec: {{name: tokenmill, stage: codec, "
                       f"levels: {args.levels}}}{stage_options(args, 'actors', 'prefetch')}}}\n")


def ray_training(job) -> dict:
    """Train the codec stage from scratch: the loop's seconds (its metrics), the stage's wall time, steps."""
    started = time.perf_counter()
    (result,) = workflow.run(job, stages=["codec"], force=["codec"])
    wall = time.perf_counter() - started
    if result.failed_shards or result.built != 1:
        raise SystemExit(f"the codec stage failed: {result}")
    last = json.loads(Path(Storage(job.storage).path("codec/shards/metrics.jsonl")).read_text().splitlines()[-1])
    return {"loop": last["seconds"], "wall": wall, "steps": last["step"], "figures": result.figures}


def plain_training(job, tars: list[str], steps: int, batch: int) -> float:
    """Seconds of `steps` train_step calls in this process on the stage's task with `batch` crops a step,
    from the first batch on (as the Ray Train loop's clock)."""
    stage = job.stages["codec"].stage
    task = stage.task(tars)
    task.settings.batch_size = batch
    torch.manual_seed(task.settings.seed)
    model = task.build()
    optimizer = new_optimizer(model, task.settings)
    batches = prefetched(task.batches(0, 1, 0), depth=4)
    forward_context = autocast(torch.device("cpu"), task.settings.precision)   # as the stage's loop
    started = time.perf_counter()
    for step in range(steps):
        train_step(task, model, model, optimizer, [next(batches)], step, forward_context)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps, each way")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--batch", type=int, default=8, help="crops per worker a step (the plain process: workers x this)")
    parser.add_argument("--levels", type=int, default=8, help="codec levels tokenize-speech uses")
    corpus_arguments(parser, "/tmp/tokenmill-bench-codec")
    args = parser.parse_args()
    ingested, job, tars, device = ingest_and_connect(args, write_jobs)

    settings = job.stages["codec"].stage.settings
    crop = settings.crop_seconds
    audio = args.steps * args.workers * args.batch * crop
    ray = ray_training(job)
    plain = plain_training(job, tars, args.steps, args.workers * args.batch)
    print(f"training: {args.steps} steps x {args.workers * args.batch} crops of {crop:g} s = {audio:.0f} s of audio "
          f"({ingested['status']['samples']} utterances in {len(tars)} shards)")
    print(f"  Ray Train, {args.workers} workers x 1 CPU: loop {ray['loop']:.1f} s = {audio / ray['loop']:.1f} s of audio/s; "
          f"stage wall {ray['wall']:.1f} s (Ray Train start, final checkpoint, evaluation: "
          f"{ray['wall'] - ray['loop']:.1f} s); held-out {ray['figures']}")
    print(f"  one process, {torch.get_num_threads()} threads: {plain:.1f} s = {audio / plain:.1f} s of audio/s")
    print(f"RATIO Ray Train/plain training s of audio/s: {plain / ray['loop']:.3f}")

    codec = load_codec(job.stages["tokens"].stage.config.codec, device, checkpoint_of(Planner(job).built_shards("codec")))
    compare(job, codec, tars, ingested["status"]["samples"], args.repeat, device,
            f"the codec just trained at {args.levels} levels", "codec loads included")


if __name__ == "__main__":
    main()
