"""Train the image VQ autoencoder on WebDataset image shards, one Ray Train worker per process.

`train_loop` is the `train_loop_per_worker` of a `TorchTrainer`: DDP over the workers (gloo on
CPU, NCCL with bf16 autocast on GPU), each worker streaming its own share of the shards through
a shuffle buffer. Every `checkpoint_every` steps rank 0 reports a checkpoint (weights, optimizer,
step, the metrics so far); a restarted run picks up the latest one via `ray.train.get_checkpoint()`.
"""
from __future__ import annotations

import json
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from pipeline.data.image_shards import is_held_out, iter_samples, to_tensor
from pipeline.data.shard_stream import prefetched
from pipeline.storage import Storage
from pipeline.tokenizers import image_vq
from pipeline.tokenizers.image_vq import VQAutoencoder, VQConfig

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
PROGRESS_FILE = "progress.json"    # {"step": n, "starts": [first step of each attempt]}


@dataclass
class TrainSettings:
    steps: int = 1750
    batch_size: int = 16               # per worker
    lr: float = 1e-3
    warmup_steps: int = 90
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    holdout_share: float = 0.1         # keys held out of training for evaluation
    shuffle_buffer: int = 1000         # decoded images held per worker for shuffling
    checkpoint_every: int = 200
    log_every: int = 20                # metrics.jsonl is flushed to storage this often


@dataclass
class TrainJob:
    """Everything a worker needs, picklable: the model, the recipe, the shards, where metrics go."""
    model: VQConfig
    settings: TrainSettings
    files: list[str]                    # WebDataset tar URLs
    storage_root: str
    metrics_rel: str                    # metrics.jsonl under the storage root

    def to_dict(self) -> dict:
        return {"model": asdict(self.model), "settings": asdict(self.settings), "files": self.files,
                "storage_root": self.storage_root, "metrics_rel": self.metrics_rel}

    @classmethod
    def from_dict(cls, data: dict) -> "TrainJob":
        return cls(VQConfig(**data["model"]), TrainSettings(**data["settings"]), data["files"],
                   data["storage_root"], data["metrics_rel"])


def learning_rate(step: int, s: TrainSettings) -> float:
    """Linear warmup, then cosine decay to 5% of the peak."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_batches(files: list[str], size: int, s: TrainSettings, rank: int, world: int,
                  start_step: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches (B, 3, size, size) of this worker's training images.

    Each epoch shuffles the shard order and gives every worker its own slice of it; images pass
    a shuffle buffer. The stream is seeded by (seed, rank, start step), so a resumed run is
    deterministic too, though it does not replay the interrupted epoch.
    """
    rng = random.Random(f"{s.seed}/{rank}/{start_step}")
    buffer, batch = [], []
    while True:
        order = sorted(files)
        rng.shuffle(order)
        mine = order[rank::world] if len(order) >= world else order
        seen = 0
        for url in mine:
            for sample in iter_samples(url, size):
                if sample.image is None or is_held_out(sample.key, s.holdout_share):
                    continue
                seen += 1
                buffer.append(sample.image)
                if len(buffer) < s.shuffle_buffer:
                    continue
                batch.append(buffer.pop(rng.randrange(len(buffer))))
                if len(batch) == s.batch_size:
                    yield to_tensor(batch)
                    batch = []
        if not seen:
            raise ValueError(f"no trainable images in {len(mine)} shard(s): all undecodable or held out")
        while buffer:                     # an epoch smaller than the buffer still trains
            batch.append(buffer.pop(rng.randrange(len(buffer))))
            if len(batch) == s.batch_size:
                yield to_tensor(batch)
                batch = []


def train_loop(config: dict) -> None:
    """Ray Train worker: train (or resume) and report metrics and checkpoints."""
    import ray.train
    import ray.train.torch

    job = TrainJob.from_dict(config)
    s = job.settings
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(s.seed)                      # identical initial weights on every worker
    model = VQAutoencoder(job.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.99), weight_decay=s.weight_decay)
    start, history, starts = _restore(model, optimizer)
    starts.append(start)
    device = ray.train.torch.get_device()
    net = ray.train.torch.prepare_model(model)     # to device; DDP when world > 1
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    storage = Storage(job.storage_root)
    batches = prefetched(train_batches(job.files, job.model.image_size, s, rank, world, start), depth=4)
    started = time.time()
    for step in range(start, s.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, s)
        images = next(batches).to(device, non_blocking=True)
        with autocast:
            recon, indices, aux = net(images)
            loss, stats = model.objective(images, recon.float(), indices, aux)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        history.append({"step": step + 1, "lr": round(learning_rate(step, s), 8), **_rounded(stats),
                        "seconds": round(time.time() - started, 3)})
        last = step + 1 == s.steps
        if rank == 0 and ((step + 1) % s.log_every == 0 or last):
            storage.write_bytes(job.metrics_rel, _jsonl(history))
        if (step + 1) % s.checkpoint_every == 0 or last:
            _report(model, optimizer, step + 1, history, starts, rank)


def _restore(model: VQAutoencoder, optimizer) -> tuple[int, list[dict], list[int]]:
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


def _report(model: VQAutoencoder, optimizer, step: int, history: list[dict], starts: list[int], rank: int) -> None:
    """Every worker reports (Ray Train syncs on it); rank 0 attaches the checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            image_vq.save(model, folder)            # model.safetensors + config.json: the product
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, Path(folder) / STATE_FILE)
            (Path(folder) / METRICS_FILE).write_bytes(_jsonl(history))
            (Path(folder) / PROGRESS_FILE).write_text(json.dumps({"step": step, "starts": starts}))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(history[-1], checkpoint=checkpoint)


def _rounded(stats: dict) -> dict:
    return {k: round(v, 5) for k, v in stats.items()}


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()
