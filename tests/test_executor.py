"""The Ray executor: bounded in-flight tasks, retries after a dead worker or an exception."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from ray import cloudpickle

from pipeline import executor


@pytest.fixture(autouse=True)
def by_value():
    cloudpickle.register_pickle_by_value(sys.modules[__name__])   # Ray workers cannot import tests/
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def die_once(folder: str, item: int) -> int:
    flag = Path(folder) / f"died-{item}"
    if not flag.exists():
        flag.touch()
        os._exit(1)          # the worker process dies: a system failure, not an exception
    return item * 2


def always_raise(folder: str, item: int) -> int:
    (Path(folder) / f"attempt-{item}-{time.monotonic_ns()}").touch()
    raise RuntimeError(f"bad item {item}")


def record_span(folder: str, item: int) -> int:
    start = time.time()
    time.sleep(0.3)
    (Path(folder) / f"span-{item}").write_text(f"{start} {time.time()}")
    return item


def collect(fn, folder, items, **options):
    results, errors = {}, {}
    executor.run_bounded(fn, str(folder), items, on_result=results.__setitem__,
                         on_error=errors.__setitem__, **options)
    return results, errors


def test_dead_worker_is_retried(ray_address, tmp_path):
    results, errors = collect(die_once, tmp_path, range(3), retries=2)
    assert results == {0: 0, 1: 2, 2: 4} and errors == {}


def test_exception_is_retried_then_reported(ray_address, tmp_path):
    results, errors = collect(always_raise, tmp_path, [7], retries=2)
    assert results == {} and "bad item 7" in str(errors[7])
    assert len(list(tmp_path.glob("attempt-7-*"))) == 3


def test_in_flight_is_bounded(ray_address, tmp_path):
    results, _ = collect(record_span, tmp_path, range(4), max_in_flight=1)
    assert sorted(results) == [0, 1, 2, 3]
    spans = sorted(tuple(map(float, p.read_text().split())) for p in tmp_path.glob("span-*"))
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:]))   # never two at once
