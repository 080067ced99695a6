"""tokenmill's metrics through `ray.util.metrics`, so Ray's Prometheus export and dashboard show them.

Ray exports them as `ray_tokenmill_*` (counters with a `_total` suffix), tagged with the job and the
stage (and the failure reason or the training task). Metric objects need a connected Ray, so each
process creates them on first use: in the shard tasks and the Ray Train workers, never at import.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

SHARD_SECONDS_BOUNDARIES = [0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]
REASON_CHARS = 80          # failure reasons are short labels; keep a stray long one from bloating tags

_DEFINITIONS = {           # name: (kind, description, tag keys)
    "tokenmill_samples_done": ("counter", "Samples written by a stage.", ("job", "stage")),
    "tokenmill_samples_failed": ("counter", "Samples that failed, by reason.", ("job", "stage", "reason")),
    "tokenmill_bytes_written": ("counter", "Bytes of shard outputs committed to storage.", ("job", "stage")),
    "tokenmill_shard_seconds": ("histogram", "Seconds to build one shard.", ("job", "stage")),
    "tokenmill_train_tokens_per_second": ("gauge", "Training throughput of the last step.", ("job", "stage", "task")),
    "tokenmill_train_loss": ("gauge", "Training loss of the last step (task 'all': the whole batch).",
                             ("job", "stage", "task")),
}
_metrics: dict = {}
_context: dict[str, str] = {}


def _metric(name: str):
    """The metric called `name`, created in this process on first use."""
    if name not in _metrics:
        from ray.util.metrics import Counter, Gauge, Histogram

        kind, description, tag_keys = _DEFINITIONS[name]
        if kind == "histogram":
            _metrics[name] = Histogram(name, description, boundaries=SHARD_SECONDS_BOUNDARIES, tag_keys=tag_keys)
        else:
            _metrics[name] = (Counter if kind == "counter" else Gauge)(name, description, tag_keys=tag_keys)
    return _metrics[name]


@contextmanager
def tagged(job: str, stage: str) -> Iterator[None]:
    """Within this block, context_tags() names this job and stage (e.g. for a training run it starts)."""
    previous = dict(_context)
    _context.update(job=job, stage=stage)
    try:
        yield
    finally:
        _context.clear()
        _context.update(previous)


def context_tags() -> dict[str, str]:
    """{"job", "stage"} of the enclosing `tagged` block; empty outside one."""
    return dict(_context)


def record_shard(tags: dict[str, str], samples: int, failures: dict[str, int], bytes_written: int,
                 seconds: float) -> None:
    """Account for one built shard: samples written and failed (by reason), bytes, build time."""
    if samples:                                  # a Ray counter refuses increments of 0
        _metric("tokenmill_samples_done").inc(samples, tags=tags)
    for reason, count in failures.items():
        _metric("tokenmill_samples_failed").inc(count, tags={**tags, "reason": reason[:REASON_CHARS]})
    if bytes_written:
        _metric("tokenmill_bytes_written").inc(bytes_written, tags=tags)
    _metric("tokenmill_shard_seconds").observe(seconds, tags=tags)


def record_train_step(tags: dict[str, str], stats: dict[str, float]) -> None:
    """Set the training gauges from one step's stats: "loss", "loss_<task>" per task, "tokens_per_s"."""
    if not tags:
        return          # trained outside a job's shard task (a benchmark): nothing to tag it with
    for key, value in stats.items():
        if key == "loss" or key.startswith("loss_"):
            task = key[len("loss_"):] if key != "loss" else "all"
            _metric("tokenmill_train_loss").set(value, tags={**tags, "task": task})
    if "tokens_per_s" in stats:
        _metric("tokenmill_train_tokens_per_second").set(stats["tokens_per_s"], tags={**tags, "task": "all"})
