"""Run job specs on a Ray cluster through the Ray Jobs API: submit, follow, list.

The job's entrypoint is `python -m pipeline.cli run <spec>` in a copy of the project (see shipping);
inside it `tokenmill run` joins the job's cluster through the RAY_ADDRESS that Ray sets.
"""
from __future__ import annotations

import asyncio
import getpass
import ipaddress
import shlex
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, TextIO
from urllib.parse import urlparse

import aiohttp
from ray.exceptions import AuthenticationError
from ray.job_submission import JobDetails, JobSubmissionClient

from pipeline.shipping import BIG_FILE_BYTES, ShippingError, pack, shipped_spec
from pipeline.spec import JobSpec

METADATA_JOB, METADATA_FINGERPRINT = "tokenmill_job", "tokenmill_spec_fingerprint"


class SubmitError(RuntimeError):
    """The cluster cannot be reached or refused the job; the message says which and why."""


def submit(job: JobSpec, address: str, warn: Callable[[str], None], now: datetime | None = None) -> str:
    """Submit `job` to the Ray jobs endpoint at `address` (http://HEAD:8265); returns its submission id."""
    with _cluster(address) as client:
        head_ip, nodes = _head(address)
        try:
            data, warning = shipped_spec(job, _is_this_machine(head_ip), nodes)
        except ShippingError as exc:
            raise SubmitError(str(exc)) from None
        if warning:
            warn(warning)
        with tempfile.TemporaryDirectory(prefix="tokenmill-submit-") as tmp:
            package = pack(job, data, Path(tmp) / "project")
            if package.left_out:
                warn(f"not shipped (over {BIG_FILE_BYTES >> 20} MiB): {', '.join(package.left_out)}")
            when = now or datetime.now(timezone.utc)
            submission_id = f"{job.name}-{package.fingerprint[:10]}-{when:%Y%m%d-%H%M%S}"
            metadata = {METADATA_JOB: job.name, METADATA_FINGERPRINT: package.fingerprint, "user": _user(),
                        "host": socket.gethostname(), "spec": str(Path(job.source).resolve())}
            try:   # the working_dir is uploaded here, before its folder goes
                return client.submit_job(entrypoint=f"python -m pipeline.cli run {shlex.quote(package.spec)}",
                                         submission_id=submission_id, metadata=metadata,
                                         runtime_env={"working_dir": str(package.folder)})
            except RuntimeError as exc:
                raise SubmitError(f"the cluster at {address} refused job {submission_id}: {exc}") from None


def follow(address: str, submission_id: str, out: TextIO = sys.stdout) -> JobDetails:
    """Stream a job's logs to `out` until it ends; returns its final details."""
    async def tail(client: JobSubmissionClient) -> None:
        async for lines in client.tail_job_logs(submission_id):
            out.write(lines)
            out.flush()

    with _cluster(address) as client:
        try:
            asyncio.run(tail(client))
        except (RuntimeError, aiohttp.ClientError) as exc:
            raise SubmitError(f"lost the logs of job {submission_id} at {address} ({exc}); it may still run: "
                              f"see `tokenmill jobs --address {address}`") from None
        info = client.get_job_info(submission_id)
        while not info.status.is_terminal():    # the log stream may close a moment before the state is set
            time.sleep(0.2)
            info = client.get_job_info(submission_id)
        return info


def list_submissions(address: str) -> list[dict]:
    """Every submission on the cluster, oldest first: state, submission_id, start, end, job (name), user."""
    with _cluster(address) as client:
        found = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    return [{"state": str(j.status.value), "submission_id": j.submission_id, "start": _time(j.start_time),
             "end": _time(j.end_time), "job": (j.metadata or {}).get(METADATA_JOB, "-"),
             "user": (j.metadata or {}).get("user", "-")} for j in found if j.submission_id]


@contextmanager
def _cluster(address: str) -> Iterator[JobSubmissionClient]:
    """A client of the jobs endpoint; an unreachable or unauthorized endpoint becomes a SubmitError."""
    if urlparse(address).scheme not in ("http", "https"):
        raise SubmitError(f"--address {address!r}: give the head's jobs endpoint, e.g. http://127.0.0.1:8265")
    try:
        yield JobSubmissionClient(address)
    except OSError:     # ConnectionError from the client, requests' errors from any later call
        raise SubmitError(f"cannot reach the Ray jobs endpoint at {address}: is the head up, and its dashboard "
                          "port (8265) reachable from here (e.g. through `ray dashboard cluster.yaml`)?") from None
    except AuthenticationError as exc:
        raise SubmitError(f"the cluster at {address} refused our token: {exc}") from None


def _head(address: str) -> tuple[str, int]:
    """The head node's IP and the number of alive nodes."""
    from ray.util.state import list_nodes

    nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    heads = [n.node_ip for n in nodes if n.is_head_node]
    return (heads[0] if heads else urlparse(address).hostname or ""), len(nodes)


def _is_this_machine(ip: str) -> bool:
    """Whether `ip` is an address of this machine (loopback, or the source address of a route to it)."""
    try:
        if ipaddress.ip_address(ip).is_loopback:
            return True
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:   # UDP connect sends nothing
            probe.connect((ip, 9))
            return probe.getsockname()[0] == ip
    except (ValueError, OSError):
        return False


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _time(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"
