"""Run one function over many items as Ray tasks: a bounded number in flight, with retries.

The executor knows nothing about stages or markers; the workflow gives it a function.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import ray

WORKER_ENV = {
    "NO_ALBUMENTATIONS_UPDATE": "1",   # albumentations calls the network on import otherwise
    # Ray Train's controller polls its workers this often (Ray's default, 2 s, adds ~10 s to every fit:
    # starting the worker group, registering each checkpoint and seeing the end each wait for a poll)
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
}


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at `address`, or start a local one when it is None.

    Inside a Ray job (`tokenmill submit`, `ray job submit`) RAY_ADDRESS names the job's cluster, which
    a None address then joins: a second local Ray there would run the job on the head alone.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    os.environ.update(WORKER_ENV)   # a local cluster's workers inherit the driver's environment
    if address is None:
        # no runtime_env here: it costs a runtime-env agent round trip per worker (~0.6 s a run)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    else:
        ray.init(address=address, runtime_env={"env_vars": WORKER_ENV}, log_to_driver=False, logging_level="ERROR")


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1))


def cluster_resources() -> dict[str, float]:
    """{"CPU": n, "GPU": m} of the connected cluster."""
    resources = ray.cluster_resources()
    return {"CPU": float(resources.get("CPU", 1)), "GPU": float(resources.get("GPU", 0))}


def parallel(fn: Callable[[Any, Any], Any], shared: Any, items: list, **options) -> list[tuple[Any, Any, Any]]:
    """run_bounded collecting (item, result, error) triples, error being None on success."""
    outcomes: list[tuple[Any, Any, Any]] = []
    run_bounded(fn, shared, items, on_result=lambda item, result: outcomes.append((item, result, None)),
                on_error=lambda item, error: outcomes.append((item, None, error)), **options)
    return outcomes


def run_bounded(fn: Callable[[Any, Any], Any], shared: Any, items: Iterable[Any], *,
                num_cpus: float = 1.0, num_gpus: float = 0.0, actors: int | None = None,
                max_in_flight: int | None = None, retries: int = 2, retry_exceptions: bool = True,
                on_result: Callable[[Any, Any], None], on_error: Callable[[Any, BaseException], None]) -> None:
    """Call fn(shared, item) for every item on the cluster and report each outcome.

    Without `actors`, every call is a Ray task. With `actors=n`, calls go to n long-lived actors
    that each deserialize `shared` once, so whatever `shared` loads and caches (a model) stays
    loaded across items (tasks share one object-store copy of it). At most `max_in_flight` calls
    exist at a time (default: twice what the cluster or pool runs at once), so memory stays
    bounded however many items there are. A call whose worker died or that raised is retried
    `retries` times before on_error sees it.
    """
    if actors:
        # `shared` by value: a restarted actor must not depend on an object-store copy staying alive
        pool = _ActorPool(fn, shared, actors, num_cpus, num_gpus, retries, retry_exceptions)
        limit = max_in_flight or 2 * actors     # one queued call per actor: no idle gap between items
    else:
        pool = _TaskPool(fn, ray.put(shared), num_cpus, num_gpus, retries, retry_exceptions)
        limit = max_in_flight or max(1, int(2 * cluster_cpus() / max(num_cpus, 0.5)))
    pending: dict[ray.ObjectRef, Any] = {}
    queue = iter(items)
    exhausted = False
    try:
        while pending or not exhausted:
            while not exhausted and len(pending) < limit:
                item = next(queue, None)
                if item is None:
                    exhausted = True
                else:
                    pending[pool.submit(item)] = item
            if not pending:
                break
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                item = pending.pop(ref)
                pool.release(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    on_error(item, exc.cause or exc)    # the call's own exception, not Ray's wrapper
                except ray.exceptions.RayError as exc:
                    on_error(item, exc)
                else:
                    on_result(item, result)
    finally:
        pool.close()


class _TaskPool:
    """One Ray task per call."""

    def __init__(self, fn, shared_ref, num_cpus, num_gpus, retries, retry_exceptions):
        self.remote = ray.remote(fn).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=retries,
                                             retry_exceptions=retry_exceptions)
        self.shared_ref = shared_ref

    def submit(self, item) -> ray.ObjectRef:
        return self.remote.remote(self.shared_ref, item)

    def release(self, ref) -> None:
        pass

    def close(self) -> None:
        pass


class _Holder:
    """An actor that keeps `shared` (and whatever it caches) alive between calls."""

    def __init__(self, fn, shared):
        self.fn, self.shared = fn, shared

    def call(self, item):
        return self.fn(self.shared, item)


class _ActorPool:
    """Calls spread over n actors, each new call to the least busy one; actors die with the pool."""

    def __init__(self, fn, shared, n, num_cpus, num_gpus, retries, retry_exceptions):
        holder = ray.remote(_Holder).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=retries,
                                             max_task_retries=retries)
        self.actors = [holder.remote(fn, shared) for _ in range(n)]
        self.busy = [0] * n
        self.owner: dict[ray.ObjectRef, int] = {}
        self.retry_exceptions = retry_exceptions

    def submit(self, item) -> ray.ObjectRef:
        index = min(range(len(self.actors)), key=self.busy.__getitem__)
        ref = self.actors[index].call.options(retry_exceptions=self.retry_exceptions).remote(item)
        self.busy[index] += 1
        self.owner[ref] = index
        return ref

    def release(self, ref) -> None:
        self.busy[self.owner.pop(ref)] -= 1

    def close(self) -> None:
        for actor in self.actors:    # free their CPUs (and GPUs) for the next stage
            ray.kill(actor)
