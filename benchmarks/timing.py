"""What the benchmarks share: `tokenmill run` timed as a whole command, and what it left behind; a
stage rebuilt in this process against a bare loop of its model, alternating, with the verdict."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

BIN = Path(sys.executable).parent
TARGET = 0.85   # the lowest stage / bare loop ratio that passes


def timed_run(job: Path, storage: Path, stage: str, env: dict) -> dict:
    """Run `tokenmill run JOB` (exit on failure); its wall time, status, stage record, markers, last line."""
    started = time.perf_counter()
    done = subprocess.run([BIN / "tokenmill", "run", job], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"tokenmill run {job} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    status = json.loads(subprocess.run([BIN / "tokenmill", "status", job, "--json"], env=env, check=True,
                                       capture_output=True, text=True).stdout)["stages"][stage]
    markers = [json.loads(p.read_text()) for p in (storage / stage / "_state").glob("*.json")]
    return {"wall": wall, "status": status, "record": json.loads((storage / stage / "_stage.json").read_text()),
            "span": max(m["finished"] for m in markers) - min(m["started"] for m in markers),
            "line": done.stdout.strip().splitlines()[-1]}


def stage_arguments(parser: argparse.ArgumentParser, work: str, kept: str) -> None:
    """Options of every stage-vs-bare-loop benchmark: the stage's pool, repeats, the work dir."""
    parser.add_argument("--actors", type=int, default=None, help="stage actors (default: the stage's own choice)")
    parser.add_argument("--prefetch", type=int, default=None, help="stage prefetch depth (default: the stage's)")
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of each contender; medians")
    parser.add_argument("--work", type=Path, default=Path(work), help=f"work dir; {kept} are kept there and reused")


def work_dir(args) -> Path:
    """The work dir, absolute (the jobs' storage paths must not depend on the job files' folder), holding
    this machine's cache: set before Ray starts, so its workers inherit it."""
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["TOKENMILL_CACHE"] = str(work / "cache")
    return work


def ingest_once(ingest: Path, job_path: Path, stage: str) -> tuple[dict, object, list[str]]:
    """Run the ingest-only job as a command (nothing to do once done); its figures, the whole job (same
    storage) and the URLs of the ingested tars, in shard order."""
    from pipeline.spec import load_job
    from pipeline.workflow import Planner

    job = load_job(job_path)
    ingested = timed_run(ingest, Path(job.storage), stage, dict(os.environ))
    print(f"ingest (once; reused when already done): {ingested['line']}")
    built = sorted(Planner(job).built_shards(stage).items())
    return ingested, job, [url for _, up in built for url in up.files if url.endswith(".tar")]


def connect(job) -> float:
    """Start (or join) the job's Ray; the seconds it took."""
    from pipeline import executor

    started = time.perf_counter()
    executor.connect(job.ray_address, job.ray_num_cpus)
    return time.perf_counter() - started


def machine(device: str, ray_start: float, placement: dict) -> str:
    """What the benchmark ran on, in words: CPUs, GPU, torch threads, the stage's actor pool."""
    import torch

    gpu = torch.cuda.get_device_name() if device == "cuda" else "none"
    return (f"machine: {os.cpu_count()} CPUs, GPU: {gpu}; torch {torch.__version__}, {torch.get_num_threads()} "
            f"threads in this process; Ray start {ray_start:.2f} s (not timed below); device {device}; stage: "
            f"{placement['actors']} actor(s) x {placement['num_cpus']:g} CPU, {placement['num_gpus']:g} GPU")


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def bare_loop(encode: Callable, batches: list, device: str) -> float:
    """Seconds of `encode(batch)` over every batch, the device's queue drained."""
    sync(device)
    started = time.perf_counter()
    for batch in batches:
        encode(batch)
    sync(device)
    return time.perf_counter() - started


def stage_run(job, stage: str, samples: int, shards: int) -> dict:
    """`workflow.run` of `stage` with every shard rebuilt (exits unless it wrote `samples` samples in
    `shards` shards): wall time, and from its markers the span of its shards, the time before the
    first started and after the last finished."""
    from pipeline import workflow
    from pipeline.storage import Storage

    started, clock = time.perf_counter(), time.time()
    (result,) = workflow.run(job, stages=[stage], force=[stage])
    wall, ended = time.perf_counter() - started, time.time()
    if result.failed_shards or result.totals.failures or (result.totals.samples, result.built) != (samples, shards):
        sys.exit(f"stage {stage}: {result}, expected {samples} samples in {shards} shards")
    markers = [json.loads(p.read_text()) for p in Path(Storage(job.storage).path(stage), "_state").glob("*.json")]
    first, last = min(m["started"] for m in markers), max(m["finished"] for m in markers)
    return {"wall": wall, "span": last - first, "before": first - clock, "after": ended - last}


def contest(repeat: int, bare: Callable[[], float], stage: Callable[[], dict], amount: float,
            unit: str) -> tuple[float, dict]:
    """`repeat` rounds of the bare loop and the stage, alternating which goes first; medians of the
    bare loop's seconds and of the stage's timings."""
    bares, stages = [], []
    for r in range(repeat):
        for who in ("bare", "stage") if r % 2 == 0 else ("stage", "bare"):
            if who == "bare":
                bares.append(bare())
            else:
                stages.append(stage())
        print(f"  run {r + 1}: bare loop {amount / bares[-1]:.1f} {unit}/s, stage {amount / stages[-1]['wall']:.1f} "
              f"{unit}/s", flush=True)
    return statistics.median(bares), {k: statistics.median(s[k] for s in stages) for k in stages[0]}


def verdict(bare: float, stage: dict, amount: float, unit: str, bare_note: str, load_note: str) -> float:
    """Print both contenders' figures and the RATIO line; returns the ratio."""
    print(f"bare loop: {amount:.0f} {unit} in {bare:.2f} s = {amount / bare:.1f} {unit}/s ({bare_note})")
    print(f"stage:     {amount:.0f} {unit} in {stage['wall']:.2f} s = {amount / stage['wall']:.1f} {unit}/s "
          f"(workflow.run: {stage['before']:.2f} s to the first shard's start; first shard start to last shard end "
          f"{stage['span']:.2f} s = {amount / stage['span']:.1f} {unit}/s, {load_note}; {stage['after']:.2f} s after)")
    ratio = bare / stage["wall"]
    print(f"RATIO stage/bare {unit}/s: {ratio:.3f}  target >= {TARGET}  {'PASS' if ratio >= TARGET else 'FAIL'}")
    return ratio
