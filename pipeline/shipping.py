"""Pack a job for a Ray cluster: a copy of the project (the job's working_dir) with the spec inside.

What ships is what `tokenmill run` needs there: the package, schemas/ and the spec, rewritten so that
it runs as is on the cluster. Virtualenvs, git history, runs/ and big files stay home.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.spec import JobSpec

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LEFT_HOME = {".git", ".venv", "venv", "runs", ".whl", "__pycache__", ".pytest_cache", ".mypy_cache", "build", "dist"}
BIG_FILE_BYTES = 8 << 20     # data and checkpoints belong in storage, not in every job's upload
SPEC_FOLDER = "tokenmill-submitted"


class ShippingError(ValueError):
    """A job that cannot run as is on the cluster; the message says why and what to do."""


@dataclass
class Package:
    folder: Path          # the job's working_dir
    spec: str             # the shipped spec, relative to folder
    fingerprint: str      # sha256 of the shipped spec's canonical JSON
    left_out: list[str]   # big files not shipped


def shipped_spec(job: JobSpec, head_is_local: bool, nodes: int) -> tuple[dict, str | None]:
    """The spec as it runs on the cluster, and a warning (or None).

    A relative local `storage` is made absolute when the head is this machine; with a remote head it is
    refused, since it would name a folder on the cluster's disks that nothing here can read. Any local
    path on a cluster of several nodes must be a filesystem they all mount. `ray.address` is dropped:
    inside a Ray job, `tokenmill run` joins the job's own cluster.
    """
    data = yaml.safe_load(Path(job.source).read_text())
    raw = data["storage"]
    warning = None
    if "://" not in raw or raw.startswith("file://"):
        if not head_is_local and not Path(raw.removeprefix("file://")).is_absolute():
            raise ShippingError(
                f"{job.source}: storage: {raw!r} is a folder on this machine (relative to the spec), but the "
                "cluster's head is another machine; use object storage (storage: s3://bucket/prefix) or an "
                "absolute path that every node mounts")
        if not head_is_local or nodes > 1:
            warning = (f"storage: {job.storage} is a local path: every node of the cluster must mount it there "
                       "(object storage such as s3://bucket/prefix needs no shared disk)")
        data["storage"] = job.storage
    data.setdefault("ray", {})["address"] = None
    return data, warning


def pack(job: JobSpec, data: dict, folder: Path) -> Package:
    """Copy the project into `folder` (absent) and write the spec `data` inside it."""
    if not (PROJECT_ROOT / "pyproject.toml").is_file() or not (PROJECT_ROOT / "schemas").is_dir():
        raise ShippingError(f"{PROJECT_ROOT} is not a tokenmill checkout (no pyproject.toml and schemas/): "
                            "submit ships the project folder, so run it from a checkout")
    left_out: list[str] = []

    def ignore(directory: str, names: list[str]) -> list[str]:
        skipped = [n for n in names if n in LEFT_HOME or n.endswith(".egg-info")]
        big = [n for n in names if n not in skipped and (Path(directory) / n).is_file()
               and (Path(directory) / n).stat().st_size > BIG_FILE_BYTES]
        left_out.extend(str(Path(directory, n).relative_to(PROJECT_ROOT)) for n in big)
        return skipped + big

    shutil.copytree(PROJECT_ROOT, folder, ignore=ignore)
    spec = f"{SPEC_FOLDER}/{job.name}.yaml"
    (folder / SPEC_FOLDER).mkdir(exist_ok=True)
    (folder / spec).write_text(f"# {job.name}, submitted from {job.source}\n" + yaml.safe_dump(data, sort_keys=False))
    return Package(folder, spec, spec_fingerprint(data), left_out)


def spec_fingerprint(data: dict) -> str:
    """sha256 of the spec's canonical JSON (comments and key order do not count)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
