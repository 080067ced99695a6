"""Run one function over many items as Ray tasks: a bounded number in flight, with retries.

The executor knows nothing about stages or markers; the workflow gives it a function.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import ray

WORKER_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1"}   # albumentations calls the network on import otherwise


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at `address`, or start a local one when it is None."""
    if ray.is_initialized():
        return
    os.environ.update(WORKER_ENV)   # a local cluster's workers inherit the driver's environment
    if address is None:
        # no runtime_env here: it costs a runtime-env agent round trip per worker (~0.6 s a run)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    else:
        ray.init(address=address, runtime_env={"env_vars": WORKER_ENV}, log_to_driver=False, logging_level="ERROR")


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1))


def parallel(fn: Callable[[Any, Any], Any], shared: Any, items: list, **options) -> list[tuple[Any, Any, Any]]:
    """run_bounded collecting (item, result, error) triples, error being None on success."""
    outcomes: list[tuple[Any, Any, Any]] = []
    run_bounded(fn, shared, items, on_result=lambda item, result: outcomes.append((item, result, None)),
                on_error=lambda item, error: outcomes.append((item, None, error)), **options)
    return outcomes


def run_bounded(fn: Callable[[Any, Any], Any], shared: Any, items: Iterable[Any], *,
                num_cpus: float = 1.0, max_in_flight: int | None = None, retries: int = 2,
                retry_exceptions: bool = True, on_result: Callable[[Any, Any], None],
                on_error: Callable[[Any, BaseException], None]) -> None:
    """Call fn(shared, item) for every item as a Ray task and report each outcome.

    `shared` is put in the object store once. At most `max_in_flight` tasks exist at a time
    (default: twice what the cluster can run at once), so memory stays bounded however many
    items there are. A task whose worker died or that raised is retried `retries` times
    before on_error sees it.
    """
    remote = ray.remote(fn).options(num_cpus=num_cpus, max_retries=retries, retry_exceptions=retry_exceptions)
    limit = max_in_flight or max(1, int(2 * cluster_cpus() / num_cpus))
    shared_ref = ray.put(shared)
    pending: dict[ray.ObjectRef, Any] = {}
    queue = iter(items)
    exhausted = False
    while pending or not exhausted:
        while not exhausted and len(pending) < limit:
            item = next(queue, None)
            if item is None:
                exhausted = True
            else:
                pending[remote.remote(shared_ref, item)] = item
        if not pending:
            break
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            item = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                on_error(item, exc.cause or exc)    # the task's own exception, not Ray's wrapper
            except ray.exceptions.RayError as exc:
                on_error(item, exc)
            else:
                on_result(item, result)
