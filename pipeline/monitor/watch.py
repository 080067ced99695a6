"""`tokenmill status --watch`: a live per-stage table refreshed from the markers (and Ray, if asked).

Each refresh reads the job's status from its markers; samples/s and the ETA come from successive
refreshes. On a terminal the table is redrawn in place (rich Live); otherwise one plain line per
stage and refresh. The watch ends when no stage runs and no run of the job is alive (or on Ctrl-C),
then prints the final table.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from pipeline.monitor.ray_state import RayActivity, RayWatcher
from pipeline.monitor.status import STALE_HEARTBEAT_SECONDS, job_status, live_driver
from pipeline.spec import JobSpec

ERROR_CHARS = 60
PLAIN_TABLE_WIDTH = 140


@dataclass
class _Baseline:
    """A running stage's figures when the watch saw it start (or first saw it)."""
    at: float
    shards: int
    samples: int


class Rates:
    """Samples/s and ETA per stage from successive refreshes; a stage that stopped keeps its last figures."""

    def __init__(self):
        self._base: dict[str, _Baseline] = {}
        self._last: dict[str, dict] = {}

    def update(self, report: dict, now: float) -> dict[str, dict]:
        """{stage: {"samples_per_s", "eta_s"}} for this refresh (None where not measurable)."""
        rates = {}
        for name, s in report["stages"].items():
            if s["state"] == "running":
                base = self._base.setdefault(name, _Baseline(now, s["shards_done"], s["samples"]))
                rates[name] = _measure(base, s, now)
            elif name in self._base:     # it just stopped: keep its rate, counting the shards of its end
                rates[name] = self._last[name] = {**_measure(self._base.pop(name), s, now), "eta_s": None}
            else:
                rates[name] = self._last.get(name, {"samples_per_s": None, "eta_s": None})
        return rates


def _measure(base: _Baseline, s: dict, now: float) -> dict:
    seconds = now - base.at
    if seconds <= 0:
        return {"samples_per_s": None, "eta_s": None}
    shards_per_s = (s["shards_done"] - base.shards) / seconds
    left = s["shards_total"] - s["shards_done"]
    return {"samples_per_s": (s["samples"] - base.samples) / seconds,
            "eta_s": left / shards_per_s if shards_per_s > 0 else None}


def watch(job: JobSpec, interval: float = 2.0, address: str | None = None, console: Console | None = None) -> dict:
    """Refresh until nothing of the job runs any more (or Ctrl-C); print the final table; return the last status."""
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, PLAIN_TABLE_WIDTH)    # a log has room; don't squeeze the columns
    ray = RayWatcher(address, job.name) if address else None
    rates, since = Rates(), time.time() - STALE_HEARTBEAT_SECONDS
    live = Live(console=console, auto_refresh=False) if console.is_terminal else None
    report, figures, activity = {}, {}, None
    try:
        if live:
            live.start()
        while True:
            report = job_status(job)
            figures = rates.update(report, time.monotonic())
            activity = ray.activity() if ray else None
            if live:
                live.update(status_table(report, figures, activity), refresh=True)
            else:
                for line in plain_lines(report, figures, activity):
                    print(line, flush=True)
            if not _going_on(job, report, activity, since):
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        if live:
            live.stop()
    if report and not live:
        console.print(status_table(report, figures, activity))
    return report


def _going_on(job: JobSpec, report: dict, activity: RayActivity | None, since: float) -> bool:
    if any(s["state"] == "running" for s in report["stages"].values()):
        return True
    if activity is not None and activity.jobs_running:
        return True
    return live_driver(job, since)   # between two stages of a local run


def status_table(report: dict, figures: dict, activity: RayActivity | None) -> Table:
    """The live table: per stage its state, a progress bar, counts, samples/s, ETA, failures, last error."""
    table = Table(title=f"job {report['job']}", caption=activity.line() if activity else None)
    for column in ("stage", "state", "progress", "shards", "samples", "samples/s", "ETA", "failures", "last error"):
        table.add_column(column, justify="right" if column in ("shards", "samples", "samples/s", "ETA", "failures")
                         else "left")
    for name, s in report["stages"].items():
        f = figures.get(name, {})
        table.add_row(name, s["state"], ProgressBar(total=max(s["shards_total"], 1), completed=s["shards_done"],
                                                    width=20),
                      f"{s['shards_done']}/{s['shards_total']}", str(s["samples"]), _rate(f), _eta(f),
                      _failures(s), _last_error(s))
    return table


def plain_lines(report: dict, figures: dict, activity: RayActivity | None) -> list[str]:
    """One log line per stage (and one for Ray) for a refresh off a terminal."""
    stamp = time.strftime("%H:%M:%S")
    lines = []
    for name, s in report["stages"].items():
        f = figures.get(name, {})
        lines.append(f"{stamp} [{name}] {s['state']} {s['shards_done']}/{s['shards_total']} shards, "
                     f"{s['samples']} samples, {_rate(f)} samples/s, ETA {_eta(f)}, {s['failures']} failed samples, "
                     f"{s['shards_failed']} failed shards" + (f", last error: {_last_error(s)}" if _last_error(s) else ""))
    if activity:
        lines.append(f"{stamp} {activity.line()}")
    return lines


def _rate(figures: dict) -> str:
    rate = figures.get("samples_per_s")
    return "-" if rate is None else f"{rate:.1f}"


def _eta(figures: dict) -> str:
    eta = figures.get("eta_s")
    if eta is None:
        return "-"
    minutes, seconds = divmod(int(round(eta)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _failures(s: dict) -> str:
    return str(s["failures"]) + (f" + {s['shards_failed']} shard(s)" if s["shards_failed"] else "")


def _last_error(s: dict) -> str:
    error = s["last_error"] or next(iter(s["failure_reasons"]), None) or ""
    return error.splitlines()[-1][:ERROR_CHARS] if error else ""
