"""`tokenmill status`: every stage's state, read from markers only (no Ray needed)."""
from __future__ import annotations

import os
import socket
import time

from pipeline.ledger import State
from pipeline.spec import JobSpec
from pipeline.workflow import Planner

STALE_HEARTBEAT_SECONDS = 120   # a running record from another host older than this is dead


def job_status(job: JobSpec, planner: Planner | None = None) -> dict:
    """The DESIGN.md status object: {"job": name, "stages": {stage: {...}}} (with `planner`: its plans, reused)."""
    planner = planner or Planner(job)
    stages = {}
    for name, spec in job.stages.items():
        planned = planner.plan(name)
        shards = [p for p in planned.plan.shards.values() if p.state is not State.ORPHAN]
        totals = planned.plan.totals()
        counts = {state: planned.plan.count(state) for state in State}
        over_threshold = totals.failure_share() > spec.execution.max_failure_share
        record = planner.storage.read_json(planner.ledger(name).rel("_stage.json")) or {}
        prepare_errors = record.get("last_run", {}).get("prepare_errors", [])
        stages[name] = {
            "state": _state(counts, len(shards), over_threshold or bool(prepare_errors), _is_running(record)),
            "shards_done": counts[State.DONE], "shards_total": len(shards),
            "samples": totals.samples, "failures": totals.failures,
            "shards_stale": counts[State.STALE], "shards_missing": counts[State.MISSING],
            "shards_failed": counts[State.FAILED], "orphans": counts[State.ORPHAN],
            "failure_reasons": totals.reasons,
            "last_error": next((p.reason for p in shards if p.state is State.FAILED), None)
            or next(iter(prepare_errors), None),
            **spec.stage.status_figures(planned.plan.done_markers()),
        }
    return {"job": job.name, "stages": stages}


def _state(counts: dict, total: int, failed: bool, running: bool) -> str:
    if running:
        return "running"
    if counts[State.FAILED] or failed:
        return "failed"
    if total and counts[State.DONE] == total:
        return "done"
    if counts[State.STALE]:
        return "stale"
    return "partial" if counts[State.DONE] else "pending"


def live_driver(job: JobSpec, since: float) -> bool:
    """Whether a `tokenmill run` of `job` that wrote a stage record after `since` still lives on this
    host: between two stages none is running, yet the run goes on."""
    planner = Planner(job)
    records = (planner.storage.read_json(planner.ledger(name).rel("_stage.json")) or {} for name in job.stages)
    return any(r.get("updated", 0) >= since and _local_process_alive(r) for r in records)


def _is_running(record: dict) -> bool:
    if not record.get("running"):
        return False
    if record.get("host") == socket.gethostname():
        return _local_process_alive(record)
    return time.time() - record.get("updated", 0) < STALE_HEARTBEAT_SECONDS


def _local_process_alive(record: dict) -> bool:
    if record.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(record["pid"]), 0)
        return True
    except (OSError, ValueError, KeyError):
        return False
