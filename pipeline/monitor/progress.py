"""Live progress of a running stage: a rich bar on a terminal, plain log lines otherwise."""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.ledger import Marker

LOG_EVERY_SECONDS = 10.0


class StageProgress:
    """Counts finished shards, samples and failures of one stage and shows them."""

    def __init__(self, stage: str, total: int, already_done: int, interactive: bool | None = None):
        self.stage, self.total = stage, total
        self.done, self.samples, self.failures, self.failed_shards = already_done, 0, 0, 0
        self.started = self._last_log = time.monotonic()
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._bar = None
        self.idle = total == already_done
        if self.idle:
            self._log(f"all {total} shards done, nothing to build")
        elif self.interactive:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("shards  {task.fields[rate]}  {task.fields[failures]}"),
                                 TimeElapsedColumn(), console=Console(stderr=True))
            self._task = self._bar.add_task(stage, total=total, completed=already_done, rate="", failures="")
            self._bar.start()
        else:
            self._log(f"{total - already_done} of {total} shards to build")

    def rate(self) -> float:
        return self.samples / max(time.monotonic() - self.started, 1e-9)

    def line(self) -> str:
        return (f"{self.done}/{self.total} shards, {self.samples} samples, {self.rate():.1f} samples/s, "
                f"{self.failures} failed samples, {self.failed_shards} failed shards")

    def update(self, marker: Marker) -> None:
        self.done += 1
        self.samples += marker.samples
        self.failures += marker.failure_count
        self.failed_shards += marker.status == "failed"
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=f"{self.rate():.1f} samples/s",
                             failures=f"{self.failures} failed")
        elif time.monotonic() - self._last_log >= LOG_EVERY_SECONDS or self.done == self.total:
            self._log(self.line())
        if marker.status == "failed":
            self._log(f"shard {marker.shard} failed: {marker.error}")

    def close(self) -> None:
        if self.idle:
            return
        if self._bar is not None:
            self._bar.stop()
        self._log(f"finished in {time.monotonic() - self.started:.1f}s: {self.line()}")

    def _log(self, text: str) -> None:
        self._last_log = time.monotonic()
        stamp = time.strftime("%H:%M:%S")
        print(f"{stamp} [{self.stage}] {text}", file=sys.stderr, flush=True)
