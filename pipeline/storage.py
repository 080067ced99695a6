"""fsspec storage rooted at a job's `storage` path or URL, with atomic commits.

A local filesystem commits by writing a temporary name and renaming it; an object store
has no rename, so there a commit is one whole-object upload. Either way a reader sees the
old object or the complete new one, never a prefix.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import fsspec

_CHUNK = 1 << 20


class StorageError(OSError):
    """The job's storage cannot be used; the message names its root and what is wrong."""


class Storage:
    """A directory tree under `root` (local path or fsspec URL such as s3://bucket/prefix)."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        # no listings cache: markers and outputs are written by other processes (Ray workers, other
        # drivers), and a cached listing would give their old sizes (a torn read, or s3fs's FileExpired)
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root, use_listings_cache=False)
        self.is_local = "file" in _protocols(self.fs)
        if self.is_local:
            self._root_path = os.path.abspath(self._root_path)

    def __reduce__(self):  # fsspec filesystems pickle, but rebuilding from the URL is cheaper
        return (Storage, (self.root,))

    def path(self, rel: str) -> str:
        """Filesystem path (for self.fs) of `rel` under the root."""
        return f"{self._root_path}/{rel}" if rel else self._root_path

    def url(self, rel: str) -> str:
        """URL of `rel`, usable by any fsspec-aware library."""
        return self.path(rel) if self.is_local else f"{self.root}/{rel}"

    def check(self) -> None:
        """Raise StorageError when an object store's bucket does not exist or its endpoint cannot be
        reached. A refused bucket lookup passes: credentials may be scoped to the prefix."""
        if self.is_local:
            return
        bucket = self._root_path.split("/", 1)[0]
        try:
            self.fs.info(bucket)
        except FileNotFoundError:
            raise StorageError(f"storage {self.root}: bucket {bucket!r} does not exist (or is not visible "
                               f"with these credentials)") from None
        except PermissionError:
            pass
        except Exception as exc:   # noqa: BLE001 - botocore's and others' connection errors share no base
            raise StorageError(f"storage {self.root}: cannot reach it: {type(exc).__name__}: {exc}") from None

    def arrow(self, rel: str):
        """(path, pyarrow filesystem or None) of `rel` for pyarrow-based libraries such as Ray Train
        (`RunConfig(storage_path=..., storage_filesystem=...)`): on an object store, this storage's own
        fsspec filesystem, so they reach the same endpoint with the same credentials (botocore's
        environment and config files); None for a local root, whose path is a plain path."""
        if self.is_local:
            return self.path(rel), None
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return self.path(rel), PyFileSystem(FSSpecHandler(self.fs))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def sizes(self, rel_dir: str) -> dict[str, int]:
        """Names and sizes of the files directly under `rel_dir` (one listing call)."""
        try:
            entries = self.fs.ls(self.path(rel_dir), detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                for e in entries if e.get("type") == "file"}

    def read_json(self, rel: str) -> dict | None:
        """Parsed JSON at `rel`, or None when absent or unreadable (e.g. a torn legacy write)."""
        try:
            with self.fs.open(self.path(rel), "rb") as f:
                return json.loads(f.read())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def write_json(self, rel: str, obj: dict) -> None:
        """Atomically replace `rel` with `obj` as JSON."""
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True).encode())

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomically replace `rel` with `data`."""
        dest = self.path(rel)
        if self.is_local:
            write_atomically(dest, lambda tmp: _write_synced(tmp, data))
        else:
            self.fs.pipe_file(dest, data)

    def commit(self, local_file: str | Path, rel: str) -> tuple[int, str]:
        """Move a finished local file to `rel` atomically; returns (size, sha256)."""
        size, digest = file_digest(local_file)
        dest = self.path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
            shutil.move(str(local_file), tmp)  # a rename when on the same filesystem
            os.replace(tmp, dest)
        else:
            self.fs.put_file(str(local_file), dest)
            os.remove(local_file)
        return size, digest

    def remove(self, rel: str) -> None:
        """Delete a file or a tree; absent is fine."""
        try:
            self.fs.rm(self.path(rel), recursive=True)
        except FileNotFoundError:
            pass

    @contextmanager
    def scratch(self, rel_dir: str) -> Iterator[Path]:
        """A private local working folder, deleted afterwards.

        On a local root it lives under `rel_dir` so that commits are renames on one filesystem.
        """
        if self.is_local:
            base = self.path(rel_dir)
            os.makedirs(base, exist_ok=True)
            folder = tempfile.mkdtemp(dir=base)
        else:
            folder = tempfile.mkdtemp(prefix="tokenmill-")
        try:
            yield Path(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> None:
    """Have `write(tmp)` write a temporary sibling of `path`, then rename it over `path`.

    A crash never leaves a torn file under `path`: readers see the old file or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fetch(urls: list[str], folder: str | Path) -> Path:
    """Local copies of `urls` (any fsspec URL or path) in `folder`, named by their basenames.

    Meant for content-addressed folders (e.g. named by a checkpoint digest): a file already
    there is reused, and each copy appears atomically, so concurrent fetches are safe.
    """
    folder = Path(folder)
    for url in urls:
        dest = folder / url.rstrip("/").rsplit("/", 1)[-1]
        if not dest.exists():
            fs, path = fsspec.core.url_to_fs(url)
            write_atomically(dest, lambda tmp: fs.get_file(path, str(tmp)))
    return folder


@dataclass(frozen=True)
class Checkpoint:
    """A model stage's product as the stages using it see it: the digest that enters their
    fingerprints, and the URLs of its files."""
    digest: str
    files: tuple[str, ...]

    def local(self, kind: str) -> Path:
        """Its model files (`*.safetensors`, `config.json`), fetched once per machine into the cache
        folder `kind/digest`."""
        return fetch([u for u in self.files if u.endswith((".safetensors", "config.json"))],
                     cache_dir() / kind / self.digest)


def cache_dir() -> Path:
    """This machine's cache of derived data: $TOKENMILL_CACHE or ~/.cache/tokenmill."""
    return Path(os.environ.get("TOKENMILL_CACHE", Path.home() / ".cache" / "tokenmill"))


def file_digest(path: str | Path) -> tuple[int, str]:
    """(size, sha256 hex) of a local file, read in chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _protocols(fs) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)
