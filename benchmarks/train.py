"""Benchmark: tokens/s of the `train` stage's Ray Train loop against the same model in one plain process.

A synthetic packed corpus (schemas/packed.arrow.json) is made once under `--work`: `--rows` rows of
`--seq-len` tokens in 4 shards, each row holding t2i documents in the real layout (pipeline.data.packing;
at --seq-len 1024 a caption of 8-48 random text ids and 256 random image codes), packed first-fit as the
pack stage does, in a vocabulary of 1024 text ids and 1024 image codes. Both contenders train the same decoder
(`--layers`, `--d-model`, `--heads`) on the same TokenModelTask with `--batch` rows per worker a step:

- Ray Train: the stage's own path, `TorchTrainer(train_loop, ...)` as ModelStage._train builds it, on a
  local Ray of `--workers` CPUs, `--workers` DDP (gloo) workers of 1 CPU each (Ray gives a 1-CPU worker
  OMP_NUM_THREADS=1; each worker's torch thread count is recorded and printed). Its figures come from
  the loop's own metrics.jsonl: tokens/s per step (rank 0's non-pad tokens x workers / step seconds)
  and the share of each step spent waiting for the batch (`data_wait`);
- one plain process: one worker's share of the machine (`torch.set_num_threads(1)`), `train_step` on
  batches of `task.batches(0, 1, 0)` through the same prefetch thread, timed as the loop times a step.

Both run at the stage's `--precision` (auto: bf16 autocast on a CPU with AVX512-BF16 or AMX, else fp32).

The machine's own ceiling is measured too: `--workers` plain processes like the one above, started
together, each on its own batches. Their summed tokens/s over `--workers` x one alone is what any
`--workers`-process trainer could reach here (a VM whose vCPUs share cores, or memory bandwidth,
caps it below 1); Ray Train's tokens/s over their sum is the share of it that Ray Train and DDP keep.
Each contender's line also prints the CPU steal of its minutes (/proc/stat): on a VM whose host is busy,
the machine's speed drifts between contenders measured minutes apart.

Tokens are non-pad positions (`doc_ids >= 0`: held-out documents are padding too). Both take the
median over the steps after the first `--skip`. Scaling efficiency = Ray Train tokens/s / (workers x
plain tokens/s), target >= 0.8; data wait = mean `data_wait` of the Ray Train steps, target <= 5%.

With CUDA it also trains a >= 100M-parameter decoder (`--gpu-*`) in one process with bf16 autocast and
fused AdamW (the loop's GPU recipe) and prints tokens/s and model FLOPs utilization, 6 x parameters x
positions/s (padding included: it is computed) / `--peak-tflops` (attention's T^2 FLOPs not counted);
target >= 40%.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import executor
from pipeline.data import packing, token_shards
from pipeline.data.shard_stream import prefetched
from pipeline.models import token_model
from pipeline.models.train_tasks import TokenModelTask, TokenTrainSettings
from pipeline.stages.pack import SCHEMA, packed_columns
from pipeline.tokenizers import vocab as vocab_module
from pipeline.train_loop import (METRICS_FILE, PRECISIONS, TrainJob, autocast, new_optimizer, train_loop, train_step,
                                 uses_bf16)

SHARDS = 4
TEXT_IDS, IMAGE_CODES = 1024, 1024


def make_corpus(folder: Path, rows: int, seq_len: int) -> tuple[vocab_module.Vocab, list[str]]:
    """The vocabulary and the packed shards of `rows` rows (made once per shape, then reused)."""
    vocab = vocab_module.build(text_size=TEXT_IDS, text_source="synthetic", image_codes=IMAGE_CODES,
                               image_source="synthetic")
    paths = [folder / f"synthetic-{i}.parquet" for i in range(SHARDS)]
    if all(p.exists() for p in paths):
        return vocab, [str(p) for p in paths]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    image, longest_text = min(256, seq_len // 4), min(48, seq_len // 8)

    def documents(shard: int):
        for n in itertools.count():
            text = rng.integers(0, TEXT_IDS, int(rng.integers(8, longest_text + 1))).tolist()
            yield packing.t2i(vocab, f"{shard}-{n:06d}", text, rng.integers(0, IMAGE_CODES, image))

    for i, path in enumerate(paths):
        packed = list(itertools.islice(packing.pack(documents(i), seq_len), -(-rows // SHARDS)))
        columns = packed_columns(packed, seq_len, vocab.special("<pad>"), f"synthetic-{i}")
        partial = token_shards.write(path.with_suffix(".partial"), SCHEMA, columns, {
            "vocab": vocab.to_json(), "vocab_fingerprint": vocab.fingerprint, "seq_len": seq_len,
            "tasks": ["t2i"], "seed": 0, "source": "synthetic (benchmarks/train.py)"})
        partial.rename(path)
    return vocab, [str(p) for p in paths]


def decoder_task(vocab, files: list[str], layers: int, d_model: int, heads: int, batch: int,
                 steps: int) -> TokenModelTask:
    """The train stage's task for a decoder on the t2i documents of `files`; checkpoint and metrics
    flush only at the last step (outside every step's clock anyway)."""
    config = token_model.model_config({"arch": "decoder", "n_layer": layers, "d_model": d_model, "n_head": heads},
                                      vocab, tasks=("t2i",))
    settings = TokenTrainSettings(steps=steps, batch_size=batch, warmup_steps=min(10, steps),
                                  checkpoint_every=steps, log_every=steps)
    return TokenModelTask("decoder", config, settings, files, json.dumps(vocab.to_json()), ("t2i",))


def plain_steps(task: TokenModelTask, steps: int, device: str = "cpu") -> tuple[list[dict], int]:
    """`steps` train_step calls in this process, each timed as train_loop times its steps (from asking
    for the batch to the optimizer step done); per step tokens, positions, data wait and seconds; the
    model's parameter count."""
    torch.manual_seed(task.settings.seed)
    model = task.build().to(device)
    optimizer = new_optimizer(model, task.settings, fused=device == "cuda")
    forward_context = autocast(torch.device(device), task.settings.precision)   # as the stage's loop
    batches = prefetched(task.batches(0, 1, 0), depth=4)
    records = []
    for step in range(steps):
        began = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        waited = time.perf_counter() - began
        stats = train_step(task, model, model, optimizer, [batch], step, forward_context)
        if device == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - began
        records.append({"tokens": stats["tokens"], "positions": batch["tokens"].numel(), "data_wait": waited / took,
                        "step_seconds": took, "tokens_per_s": stats["tokens"] / took})
    return records, sum(p.numel() for p in model.parameters())


def cpu_times() -> list[int]:
    """The machine's CPU time counters (Linux /proc/stat: user ... steal); [] where there is none."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return []


def steal(before: list[int], after: list[int]) -> str:
    """The share of CPU time the hypervisor gave to other guests between two cpu_times(): a VM's noise."""
    if not before or not after:
        return "CPU steal unknown"
    spent = [b - a for a, b in zip(before, after)]
    return f"CPU steal {spent[7] / max(sum(spent), 1):.1%}"


def _concurrent_plain(task: TokenModelTask, steps: int, skip: int, start, results) -> None:
    """One of the processes that measure the machine's ceiling: plain_steps on 1 thread once all are up."""
    torch.set_num_threads(1)
    start.wait()
    results.put(steady(plain_steps(task, steps)[0], skip)["tokens_per_s"])


def machine_ceiling(task: TokenModelTask, processes: int, steps: int, skip: int) -> list[float]:
    """Median tokens/s of each of `processes` plain single-thread processes training at the same time."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(processes), context.Queue()
    running = [context.Process(target=_concurrent_plain, args=(task, steps, skip, start, results))
               for _ in range(processes)]
    for process in running:
        process.start()
    figures = [results.get(timeout=1800) for _ in running]
    for process in running:
        process.join()
    return figures


def measured_train_loop(config: dict) -> None:
    """train_loop as the stage runs it, after noting this worker's torch and OpenMP thread counts."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    Path(config["threads"], f"rank{rank}.json").write_text(
        json.dumps({"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}))
    train_loop(config)


def ray_train(task: TokenModelTask, workers: int, root: Path) -> tuple[list[dict], float, list[dict]]:
    """Train with TorchTrainer as ModelStage._train does (a fresh run: nothing to resume); the loop's
    metrics records, trainer.fit's wall seconds and the workers' thread counts."""
    import ray.train
    from ray.train.torch import TorchTrainer

    shutil.rmtree(root, ignore_errors=True)
    (root / "threads").mkdir(parents=True)
    job = TrainJob(task, str(root), f"bench/{METRICS_FILE}")
    trainer = TorchTrainer(
        measured_train_loop, train_loop_config={"job": job, "threads": str(root / "threads")},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"run-{int(time.time())}", storage_path=str(root / "checkpoints"),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)))
    started = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (root / "bench" / METRICS_FILE).read_text().splitlines() if line]
    threads = [json.loads(p.read_text()) for p in sorted((root / "threads").glob("*.json"))]
    return records, wall, threads


def steady(records: list[dict], skip: int) -> dict:
    """Median tokens/s, overall tokens/s (all their tokens / all their seconds), mean data wait and mean
    step seconds of the steps after the first `skip`."""
    kept = records[skip:]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in kept),
            "overall": sum(r["tokens_per_s"] * r["step_seconds"] for r in kept) / sum(r["step_seconds"] for r in kept),
            "data_wait": statistics.fmean(r["data_wait"] for r in kept),
            "step_seconds": statistics.fmean(r["step_seconds"] for r in kept), "steps": len(kept)}


def gpu_section(args, vocab, files: list[str]) -> None:
    """The >= 100M-parameter decoder in one process on the GPU, bf16 autocast, fused AdamW: tokens/s, MFU."""
    task = decoder_task(vocab, files, args.gpu_layers, args.gpu_d_model, args.gpu_heads, args.gpu_batch,
                        args.gpu_steps)
    task.settings.precision = "bf16"
    records, params = plain_steps(task, args.gpu_steps, "cuda")
    figures = steady(records, args.skip)
    positions = statistics.median(r["positions"] / r["step_seconds"] for r in records[args.skip:])
    mfu = 6 * params * positions / (args.peak_tflops * 1e12)
    print(f"GPU {torch.cuda.get_device_name()}: decoder {args.gpu_layers} layers x d_model {args.gpu_d_model}, "
          f"{args.gpu_heads} heads, {params / 1e6:.1f}M parameters; {args.gpu_batch} rows x {args.seq_len} a step, "
          f"bf16 autocast, fused AdamW")
    print(f"  {figures['tokens_per_s']:,.0f} tokens/s ({positions:,.0f} positions/s with padding; step "
          f"{figures['step_seconds'] * 1e3:.0f} ms, data wait {figures['data_wait']:.1%}; median of steps "
          f"{args.skip + 1}-{args.gpu_steps})")
    print(f"MFU: {mfu:.1%} of {args.peak_tflops:g} TFLOPS bf16 (6 x parameters x positions/s; target >= 40%) "
          f"{'PASS' if mfu >= 0.4 else 'FAIL'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps, each contender")
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the figures")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers of 1 CPU each")
    parser.add_argument("--batch", type=int, default=2, help="rows per worker a step (the plain process: the same)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per packed row")
    parser.add_argument("--rows", type=int, default=512, help="packed rows in the synthetic corpus")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the stage's precision key, both contenders (auto: bf16 where the CPU has bf16 instructions)")
    parser.add_argument("--gpu-d-model", type=int, default=1024, help="GPU section's decoder (with CUDA only)")
    parser.add_argument("--gpu-layers", type=int, default=12)
    parser.add_argument("--gpu-heads", type=int, default=16)
    parser.add_argument("--gpu-batch", type=int, default=16, help="GPU section's rows a step")
    parser.add_argument("--gpu-steps", type=int, default=30)
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's peak dense bf16 TFLOPS (H100 SXM 989, H100 PCIe 756, A100 312)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tokenmill-bench-train"),
                        help="work dir; the synthetic corpus is kept there and reused")
    args = parser.parse_args()
    if args.steps <= args.skip:
        parser.error(f"--steps must exceed --skip ({args.skip})")
    began = time.perf_counter()
    work = args.work.resolve()

    vocab, files = make_corpus(work / f"corpus-{args.seq_len}-{args.rows}", args.rows, args.seq_len)
    task = decoder_task(vocab, files, args.layers, args.d_model, args.heads, args.batch, args.steps)
    task.settings.precision = args.precision
    threads = torch.get_num_threads()
    torch.set_num_threads(1)             # one worker's share of the machine
    counters = [cpu_times()]
    plain_records, params = plain_steps(task, args.steps)
    counters.append(cpu_times())
    torch.set_num_threads(threads)
    plain = steady(plain_records, args.skip)

    together = machine_ceiling(task, args.workers, args.steps, args.skip)
    counters.append(cpu_times())

    executor.connect(None, args.workers)
    ray_records, wall, worker_threads = ray_train(task, args.workers, work / "ray")
    counters.append(cpu_times())
    noise = [steal(a, b) for a, b in zip(counters, counters[1:])]
    ray_figures = steady(ray_records, args.skip)

    tokens = statistics.fmean(r["tokens"] for r in plain_records)
    print(f"corpus: {args.rows} rows x {args.seq_len} tokens of t2i documents in {SHARDS} packed shards under {work}; "
          f"vocabulary {vocab.size}")
    print(f"model: decoder {args.layers} layers x d_model {args.d_model}, {args.heads} heads, {params / 1e6:.2f}M "
          f"parameters; a step: {args.batch} rows = {args.batch * args.seq_len} positions, {tokens:.0f} tokens "
          f"(non-pad) per worker; median of steps {args.skip + 1}-{args.steps}; {os.cpu_count()} CPUs; precision "
          f"{args.precision}: {'bf16 autocast' if uses_bf16(torch.device('cpu'), args.precision) else 'fp32'}")
    print(f"  one process, 1 torch thread: {plain['tokens_per_s']:,.0f} tokens/s (overall {plain['overall']:,.0f}; "
          f"step {plain['step_seconds']:.3f} s, data wait {plain['data_wait']:.1%}; {noise[0]})")
    described = ", ".join(f"torch {t['torch']} / OMP_NUM_THREADS={t['OMP_NUM_THREADS']}" for t in worker_threads)
    print(f"  Ray Train, {args.workers} workers x 1 CPU ({described}): {ray_figures['tokens_per_s']:,.0f} tokens/s "
          f"(overall {ray_figures['overall']:,.0f}; step {ray_figures['step_seconds']:.3f} s, data wait "
          f"{ray_figures['data_wait']:.1%}); trainer.fit {wall:.1f} s, its loop {ray_records[-1]['seconds']:.1f} s; "
          f"{noise[2]}")
    ceiling = sum(together) / (args.workers * plain["tokens_per_s"])
    print(f"  {args.workers} plain processes at once, 1 thread each: {' + '.join(f'{t:,.0f}' for t in together)} = "
          f"{sum(together):,.0f} tokens/s: this machine's ceiling for {args.workers} processes, {ceiling:.3f} of linear "
          f"({noise[1]})")
    efficiency = ray_figures["tokens_per_s"] / (args.workers * plain["tokens_per_s"])
    print(f"RATIO scaling efficiency: {efficiency:.3f} (target >= 0.8) {'PASS' if efficiency >= 0.8 else 'FAIL'}; "
          f"from overall tokens/s {ray_figures['overall'] / (args.workers * plain['overall']):.3f}")
    print(f"  Ray Train keeps {ray_figures['tokens_per_s'] / sum(together):.3f} of what {args.workers} plain processes "
          f"reach together here (the rest is DDP's gradient all-reduce and Ray's own processes)")
    wait = ray_figures["data_wait"]
    print(f"data-wait: {wait:.1%} (target <= 5%) {'PASS' if wait <= 0.05 else 'FAIL'}")

    if torch.cuda.is_available():
        gpu_section(args, vocab, files)
    print(f"benchmark wall time: {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
