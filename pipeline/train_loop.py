"""The Ray Train loop every model stage shares; a picklable *task* says what is trained, on what.

`train_loop` is the `train_loop_per_worker` of a `TorchTrainer`: DDP over the workers (gloo on CPU,
NCCL on GPU; bf16 autocast where the hardware computes in bf16: see `autocast`), each worker drawing
its own batches from the task. Every `checkpoint_every` steps rank 0 reports a checkpoint (the task's
product files, weights and optimizer, step, the metrics so far); a restarted run picks up the latest
one via `ray.train.get_checkpoint()`. Rank 0 flushes metrics.jsonl to storage every `log_every`
steps, so progress is visible while it runs.
"""
from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import torch

from pipeline import telemetry
from pipeline.data.shard_stream import prefetched
from pipeline.models.layers import Block
from pipeline.storage import Storage

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
PROGRESS_FILE = "progress.json"    # {"step": n, "starts": [first step of each attempt]}
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainSettings:
    """The recipe keys every model has; a task's settings subclass it with its own defaults and keys."""
    steps: int = 1750
    batch_size: int = 16               # per worker
    lr: float = 1e-3
    warmup_steps: int = 90
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    holdout_share: float = 0.1         # keys held out of training for evaluation
    checkpoint_every: int = 200
    log_every: int = 20                # metrics.jsonl is flushed to storage this often
    precision: str = "auto"            # auto: bf16 autocast on a GPU and on a CPU with bf16 instructions
                                       # (AVX512-BF16 or AMX: ~2x faster there), else fp32; bf16; fp32


class TrainTask(Protocol):
    """What the loop needs of a model; built on the driver, pickled to every worker."""
    settings: TrainSettings

    def build(self) -> torch.nn.Module:
        """A freshly initialised model (the loop seeds torch first, so every rank builds the same one)."""

    def batches(self, rank: int, world: int, start_step: int) -> Iterator[torch.Tensor | dict]:
        """Endless training batches (a tensor or a dict of tensors) of this rank, seeded by (seed, rank,
        start_step); `grad_accum` of them make a step (micro_batches)."""

    def loss(self, net: torch.nn.Module, model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict]:
        """(loss, float stats) of a batch: the forward pass through `net` (DDP-wrapped), the rest on `model`.
        A "tokens" stat (tokens in the batch) makes the loop report tokens/s."""

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        """Write the product (model.safetensors + config.json) into `folder`."""


@dataclass
class TrainJob:
    """A task and where its live metrics go."""
    task: TrainTask
    storage_root: str
    metrics_rel: str                    # metrics.jsonl under the storage root
    tags: dict = field(default_factory=telemetry.context_tags)   # {job, stage} of the shard task building it


def micro_batches(s: TrainSettings) -> int:
    """Batches a step accumulates: a recipe's `grad_accum` key (the tokenizers' recipes have none: 1)."""
    return getattr(s, "grad_accum", 1)


def lr_scale(step: int, s: TrainSettings) -> float:
    """The schedule's share of the peak learning rate: linear warmup, then cosine decay to 5%."""
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Optimizers:
    """Optimizers over disjoint parameters, zeroed, stepped and checkpointed as one."""

    def __init__(self, *parts: torch.optim.Optimizer):
        self.parts = parts

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts for group in part.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def state_dict(self) -> dict:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state: dict) -> None:
        for part, part_state in zip(self.parts, state["parts"], strict=True):
            part.load_state_dict(part_state)


def new_optimizer(model: torch.nn.Module, s: TrainSettings, fused: bool = False) -> torch.optim.Optimizer | Optimizers:
    """AdamW, weight decay on matrices only (not on norms, biases or codebooks' 1-d parameters). A recipe
    whose `optimizer` is "muon" trains the transformer blocks' matrices with Muon at `muon_lr` instead
    (orthogonalised momentum) and the rest (embeddings, the tied head, norms) with AdamW. Each param
    group keeps its "peak_lr" for the schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = blocks_matrices(model) if getattr(s, "optimizer", "adamw") == "muon" else []
    chosen = {id(p) for p in hidden}
    rest = [p for p in params if id(p) not in chosen]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": s.weight_decay, "peak_lr": s.lr},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "peak_lr": s.lr}]
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=s.lr, betas=(0.9, 0.99), fused=fused or None)
    if not hidden:
        return adamw
    muon = torch.optim.Muon([{"params": hidden, "peak_lr": s.muon_lr}], lr=s.muon_lr, weight_decay=s.weight_decay)
    return Optimizers(muon, adamw)


def blocks_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable 2-d weights of the model's transformer blocks (layers.Block): what Muon trains."""
    found = [p for block in model.modules() if isinstance(block, Block)
             for p in block.parameters() if p.dim() == 2 and p.requires_grad]
    if not found:
        raise ValueError(f"optimizer muon: {type(model).__name__} has no transformer blocks to train with it")
    return found


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX), so autocast pays."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether forward passes on `device` run under bf16 autocast for `precision` (one of PRECISIONS)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision == "bf16" or (precision == "auto" and (device.type == "cuda" or cpu_has_bf16()))


def autocast(device: torch.device, precision: str):
    """The forward passes' autocast context for `precision` on `device`: weights, gradients and
    optimizer state stay fp32 either way."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, precision))


def train_step(task: TrainTask, net: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer | Optimizers,
               micro_batches: list, step: int, forward_context=contextlib.nullcontext()) -> dict:
    """One optimizer step (0-based `step` sets the learning rate) on the gradients of `micro_batches`
    (averaged; DDP syncs on the last only), forward passes under `forward_context`; the stats, averaged
    ("tokens" summed)."""
    scale = lr_scale(step, task.settings)
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * scale
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, list[float]] = {}
    for i, batch in enumerate(micro_batches):
        sync = i + 1 == len(micro_batches) or not hasattr(net, "no_sync")
        with (contextlib.nullcontext() if sync else net.no_sync()), forward_context:
            loss, stats = task.loss(net, model, batch)
        (loss / len(micro_batches)).backward()
        for k, v in {**stats, "loss": float(loss.detach())}.items():
            totals.setdefault(k, []).append(v)
    torch.nn.utils.clip_grad_norm_(model.parameters(), task.settings.grad_clip)
    optimizer.step()
    return {k: sum(v) if k == "tokens" else sum(v) / len(v) for k, v in totals.items()}


def train_loop(config: dict) -> None:
    """Ray Train worker: train (or resume) config["job"] and report metrics and checkpoints."""
    import ray.train
    import ray.train.torch

    job: TrainJob = config["job"]
    task, s = job.task, job.task.settings
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(s.seed)                      # identical initial weights on every worker
    model = task.build()
    device = ray.train.torch.get_device()
    net = ray.train.torch.prepare_model(model)     # to device; DDP when world > 1
    optimizer = new_optimizer(model, s, fused=device.type == "cuda")
    start, history, starts = _restore(model, optimizer)
    starts.append(start)
    forward_precision = autocast(device, s.precision)
    storage = Storage(job.storage_root)
    batches = prefetched(task.batches(rank, world, start), depth=4)
    started = time.time()
    for step in range(start, s.steps):
        began = time.perf_counter()
        chunk = [_to_device(next(batches), device) for _ in range(micro_batches(s))]
        waited = time.perf_counter() - began
        stats = train_step(task, net, model, optimizer, chunk, step, forward_precision)
        took = time.perf_counter() - began
        timing = {"step_seconds": took, "data_wait": waited / took}
        if "tokens" in stats:                      # every rank trains on as many tokens, about
            timing["tokens_per_s"] = stats.pop("tokens") * world / took
        history.append({"step": step + 1, "lr": round(s.lr * lr_scale(step, s), 8), **_rounded({**stats, **timing}),
                        "seconds": round(time.time() - started, 3)})
        last = step + 1 == s.steps
        if rank == 0:
            telemetry.record_train_step(job.tags, history[-1])
        if rank == 0 and ((step + 1) % s.log_every == 0 or last):
            storage.write_bytes(job.metrics_rel, _jsonl(history))
        if (step + 1) % s.checkpoint_every == 0 or last:
            _report(task, model, optimizer, step + 1, history, starts, rank)


def _to_device(batch, device: torch.device):
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


def _restore(model: torch.nn.Module, optimizer) -> tuple[int, list[dict], list[int]]:
    """(first step, metrics so far, earlier attempts' first steps) from the run's latest checkpoint."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, [], []
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        history = [json.loads(line) for line in (Path(folder) / METRICS_FILE).read_text().splitlines() if line]
        progress = json.loads((Path(folder) / PROGRESS_FILE).read_text())
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return progress["step"], history, progress["starts"]


def _report(task: TrainTask, model: torch.nn.Module, optimizer, step: int, history: list[dict], starts: list[int],
            rank: int) -> None:
    """Every worker reports (Ray Train syncs on it); rank 0 attaches the checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            task.save(model, Path(folder))           # the product, as the stage will copy it out
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, Path(folder) / STATE_FILE)
            (Path(folder) / METRICS_FILE).write_bytes(_jsonl(history))
            (Path(folder) / PROGRESS_FILE).write_text(json.dumps({"step": step, "starts": starts}))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(history[-1], checkpoint=checkpoint)


def _rounded(stats: dict) -> dict:
    return {k: round(v, 5) for k, v in stats.items()}


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()
