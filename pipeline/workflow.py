"""Plan and run a job's stages in DAG order, make-like: only what is not done is rebuilt."""
from __future__ import annotations

import os
import re
import socket
import time
import traceback
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, Protocol

from pipeline import executor, telemetry
from pipeline.ledger import (Marker, OutputFile, Plan, StageLedger, State, Totals, new_marker, shard_fingerprint,
                             stage_digest, stage_fingerprint)
from pipeline.spec import JobSpec, StageSpec
from pipeline.stages import ShardInput, Stage, UpstreamShard
from pipeline.storage import Storage


HEARTBEAT_SECONDS = 30
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")   # Ray colours task names in its errors


@dataclass
class StagePlan:
    spec: StageSpec
    fingerprint: str
    items: list[ShardInput]
    plan: Plan


class Planner:
    """Plans stages of one job, reading each stage's markers once (until it is rebuilt)."""

    def __init__(self, job: JobSpec, address: str | None = None):
        self.job = job
        self.address = address          # Ray is joined only when there is work to do
        self.storage = Storage(job.storage)
        self.storage.check()
        self._plans: dict[str, StagePlan] = {}

    def ledger(self, name: str) -> StageLedger:
        return StageLedger(self.storage, name)

    def plan(self, name: str) -> StagePlan:
        if name not in self._plans:
            spec = self.job.stages[name]
            stage = spec.stage
            references = {key: self.built_shards(ref) for key, ref in stage.references().items()}
            ready = all(shards and None not in shards.values() for shards in references.values())
            digests = {key: stage_digest({s: up.digest for s, up in shards.items()}) if ready else None
                       for key, shards in references.items()}
            fp = stage_fingerprint(spec.kind, stage.fingerprint_config(), stage.version, digests, stage.libraries())
            items = stage.inputs({i: self.built_shards(i) for i in spec.inputs}, references if ready else None)
            if not ready:   # every shard waits for the referenced stage (a tokenizer) to be built
                items = [replace(i, digest=None) for i in items]
            plan = self.ledger(name).plan({i.shard: i.digest for i in items}, fp)
            self._plans[name] = StagePlan(spec, fp, items, plan)
        return self._plans[name]

    def built_shards(self, name: str) -> dict[str, UpstreamShard | None]:
        """Shard -> its digest and output URLs, for every shard of a stage; None where not done."""
        ledger = self.ledger(name)
        return {s: UpstreamShard(p.marker.digest, tuple(self.storage.url(ledger.output_rel(o.name))
                                                        for o in p.marker.outputs))
                if p.state is State.DONE else None
                for s, p in self.plan(name).plan.shards.items() if p.state is not State.ORPHAN}

    def forget(self, name: str) -> None:
        self._plans.pop(name, None)

    def reread_markers(self, name: str) -> None:
        """Re-classify a stage's shards after building them; its inputs and fingerprint still hold."""
        planned = self._plans[name]
        planned.plan = self.ledger(name).plan({i.shard: i.digest for i in planned.items}, planned.fingerprint)


@dataclass
class StageResult:
    name: str
    built: int = 0
    failed_shards: int = 0
    totals: Totals = field(default_factory=Totals)   # over all done shards, this run's and earlier
    skipped: str = ""          # why the stage did not run at all
    waiting: int = 0           # shards whose input shards are not built (inputs not selected)
    prepare_errors: list[str] = field(default_factory=list)   # e.g. archives that failed to download
    figures: dict = field(default_factory=dict)                # the stage's own (e.g. a tokenizer's PSNR)

    def failed(self, max_failure_share: float) -> bool:
        return (self.failed_shards > 0 or bool(self.skipped) or bool(self.prepare_errors)
                or self.totals.failure_share() > max_failure_share)


def build_shard(shared: tuple[Stage, Storage, str, str], item: ShardInput) -> dict:
    """Build one shard in a scratch folder, commit its outputs, then write its marker.

    Runs inside a Ray task (shared: the stage, storage, stage fingerprint and job name). The old
    marker goes first, so a crash anywhere leaves the shard visibly not done; the new marker is
    written last, after every output is in place. The shard's figures go to the Ray metrics.
    """
    stage, storage, stage_fp, job_name = shared
    began = time.perf_counter()
    ledger = StageLedger(storage, stage.name)
    marker = new_marker(item.shard, shard_fingerprint(stage_fp, item.digest), item.digest)
    ledger.forget(item.shard)
    with storage.scratch(ledger.rel("_tmp")) as workdir, telemetry.tagged(job_name, stage.name):
        output = stage.build(item, workdir)
        for path in output.files:
            size, digest = storage.commit(path, ledger.output_rel(path.name))
            marker.outputs.append(OutputFile(path.name, size, digest))
    marker.status, marker.samples, marker.stats = "done", output.samples, output.stats
    marker.failures = dict(output.failures)
    marker.finished = time.time()
    ledger.write_marker(marker)
    telemetry.record_shard({"job": job_name, "stage": stage.name}, marker.samples, marker.failures,
                           sum(o.size for o in marker.outputs), time.perf_counter() - began)
    return marker.to_json()


class ProgressSink(Protocol):
    """What the workflow reports to while a stage runs (see pipeline.monitor.progress)."""

    def update(self, marker: Marker) -> None: ...

    def close(self) -> None: ...


ProgressFactory = Callable[[str, int, int], ProgressSink]   # (stage, shards total, shards already done)


def run(job: JobSpec, *, stages: list[str] | None = None, force: list[str] = (), prune: bool = False,
        address: str | None = None, progress: ProgressFactory | None = None) -> list[StageResult]:
    """Run the selected stages (all by default) in dependency order."""
    selected = list(job.stages) if not stages else [n for n in job.stages if n in stages]
    planner = Planner(job, address=address or job.ray_address)
    results: list[StageResult] = []
    failed: set[str] = set()
    for name in selected:
        spec = job.stages[name]
        blocked = failed & set(spec.depends_on)
        if blocked:
            results.append(StageResult(name, skipped=f"input stage {', '.join(sorted(blocked))} failed"))
            failed.add(name)
            continue
        result = run_stage(planner, name, force=name in force, prune=prune, progress=progress)
        results.append(result)
        if result.failed(spec.execution.max_failure_share):
            failed.add(name)
    return results


def run_stage(planner: Planner, name: str, *, force: bool = False, prune: bool = False,
              progress: ProgressFactory | None = None) -> StageResult:
    """Plan one stage and build what is not done."""
    spec = planner.job.stages[name]
    ledger = planner.ledger(name)
    storage = planner.storage
    started = time.time()
    result = StageResult(name)
    with spec.stage.session() as stage:
        result.prepare_errors = stage.prepare(partial(_parallel, planner))
        planner.forget(name)
        planned = planner.plan(name)
        plan = planned.plan
        if prune:
            for marker in plan.orphans():
                ledger.remove_shard(marker)
        todo = [i for i in planned.items
                if i.digest is not None and (force or plan.shards[i.shard].state is not State.DONE)]
        waiting = sum(1 for i in planned.items if i.digest is None)
        storage.remove(ledger.rel("_tmp"))   # scratch left by a killed run
        if force:
            storage.remove(ledger.rel("checkpoints"))   # a model stage retrains from scratch
        _write_stage_record(planner, planned, running=True, started=started)
        for artifact, data in stage.artifacts(planned.items).items():
            storage.write_bytes(ledger.rel(artifact), data)
        sink = progress(name, len(planned.items), len(planned.items) - len(todo) - waiting) if progress else None
        heartbeat = [time.time()]

        def report(marker: Marker) -> None:
            if sink:
                sink.update(marker)
            if time.time() - heartbeat[0] > HEARTBEAT_SECONDS:   # tells `status` on other hosts we live
                heartbeat[0] = time.time()
                _write_stage_record(planner, planned, running=True, started=started)

        def on_result(item: ShardInput, marker_json: dict) -> None:
            result.built += 1
            report(Marker.from_json(marker_json))

        def on_error(item: ShardInput, exc: BaseException) -> None:
            marker = new_marker(item.shard, shard_fingerprint(planned.fingerprint, item.digest), item.digest)
            marker.status, marker.finished = "failed", time.time()
            text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            marker.error = ANSI_ESCAPE.sub("", text)[-2000:]
            ledger.write_marker(marker)
            result.failed_shards += 1
            report(marker)

        try:
            if todo:
                _connect(planner)
                executor.run_bounded(build_shard, (stage, storage, planned.fingerprint, planner.job.name), todo,
                                     **stage.placement(executor.cluster_resources(), len(todo)),
                                     max_in_flight=spec.execution.max_in_flight,
                                     retries=spec.execution.shard_retries, on_result=on_result, on_error=on_error)
        finally:
            if sink:
                sink.close()
    planner.reread_markers(name)
    result.totals = planner.plan(name).plan.totals()
    result.figures = spec.stage.status_figures(planner.plan(name).plan.done_markers())
    result.waiting = waiting
    _write_stage_record(planner, planner.plan(name), running=False, started=started, result=result)
    return result


def _connect(planner: Planner) -> None:
    executor.connect(planner.address, planner.job.ray_num_cpus)


def _parallel(planner: Planner, fn: Callable, shared, items: list) -> list[tuple]:
    """What a stage's prepare() gets to run work on the cluster (Ray is joined only if needed)."""
    if not items:
        return []
    _connect(planner)
    return executor.parallel(fn, shared, items, retries=1, retry_exceptions=False)   # fn retries its own I/O


def _write_stage_record(planner: Planner, planned: StagePlan, *, running: bool, started: float,
                        result: StageResult | None = None) -> None:
    """`{stage}/_stage.json`: fingerprint, config and the last run (read by `status`)."""
    stage = planned.spec.stage
    record = {
        "stage": planned.spec.name, "kind": planned.spec.kind, "fingerprint": planned.fingerprint,
        "version": stage.version, "config": stage.fingerprint_config(), "libraries": stage.libraries(),
        "running": running, "host": socket.gethostname(), "pid": os.getpid(),
        "started": started, "updated": time.time(),
    }
    if result is not None:
        record["last_run"] = {"built": result.built, "failed_shards": result.failed_shards,
                              "samples": result.totals.samples, "failures": result.totals.failures,
                              "failure_reasons": result.totals.reasons, "prepare_errors": result.prepare_errors,
                              "seconds": time.time() - started}
    planner.storage.write_json(planner.ledger(planned.spec.name).rel("_stage.json"), record)
