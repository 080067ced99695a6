"""What a Ray cluster says about a tokenmill job: its submitted Ray jobs and running shard tasks.

Best effort for `status --watch`: any failure (no dashboard, cluster gone, auth) gives None, and a
cluster that failed is not asked again for BACKOFF_SECONDS, so refreshes stay quick.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

METADATA_JOB = "tokenmill_job"          # the metadata key `tokenmill submit` tags its Ray jobs with
SHARD_TASKS = ("build_shard", "_Holder.call")   # the executor's task and actor-pool call names
BACKOFF_SECONDS = 30.0
TIMEOUT_SECONDS = 3


@dataclass(frozen=True)
class RayActivity:
    jobs_running: int       # submitted Ray jobs of this tokenmill job not yet finished
    shard_tasks: int        # shard tasks running on the cluster

    def line(self) -> str:
        return f"ray: {self.jobs_running} job(s) running, {self.shard_tasks} shard task(s) running"


class RayWatcher:
    """Asks the cluster at `address` (a dashboard URL such as http://HEAD:8265, or "auto") about `job_name`."""

    def __init__(self, address: str, job_name: str):
        self.address, self.job_name = address, job_name
        self._quiet_until = 0.0

    def activity(self) -> RayActivity | None:
        """The cluster's view now, or None when it cannot be had."""
        if time.monotonic() < self._quiet_until:
            return None
        try:
            return RayActivity(self._jobs_running(), self._shard_tasks())
        except Exception:   # noqa: BLE001 - best effort by contract: the watch never fails on Ray
            self._quiet_until = time.monotonic() + BACKOFF_SECONDS
            return None

    def _jobs_running(self) -> int:
        from ray.job_submission import JobSubmissionClient

        jobs = JobSubmissionClient(self.address).list_jobs()
        return sum(1 for j in jobs if (j.metadata or {}).get(METADATA_JOB) == self.job_name
                   and not j.status.is_terminal())

    def _shard_tasks(self) -> int:
        from ray.util.state import list_tasks

        running = list_tasks(address=self.address, filters=[("state", "=", "RUNNING")], limit=10000,
                             timeout=TIMEOUT_SECONDS, raise_on_missing_output=False)
        return sum(1 for t in running if t.name in SHARD_TASKS)
