"""Resumable, verified HTTP downloads of corpus archives (the recipes' download step).

`fetch` streams into `dest.part`, resumes it with a Range request after a cut, checks the sha256
of the whole file, renames it to `dest` and only then writes `dest.completed`; a later call that
finds a matching marker returns without any request.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from http import HTTPStatus
from pathlib import Path

import requests
import urllib3

from pipeline.storage import write_atomically


class DownloadError(RuntimeError):
    """A download that failed for good; the message names the URL and the reason."""


class _Transient(Exception):
    """A failure worth another attempt: 5xx, a short body, a range the server got wrong."""


# What a flaky network raises; the body is read raw (below), so urllib3's own errors as well.
_RETRY = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
          urllib3.exceptions.HTTPError, _Transient)
_PHRASES = {status.value: status.phrase for status in HTTPStatus}


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks."""
    hasher = hashlib.sha256()
    _hash_into(hasher, Path(path), chunk_size)
    return hasher.hexdigest()


def fetch(url: str, dest: str | Path, sha256: str | None, *, timeout: float = 60, attempts: int = 5,
          chunk_size: int = 1 << 20) -> Path:
    """Download `url` to `dest` (continuing a leftover `dest.part`), verify `sha256`, return `dest`."""
    dest = Path(dest)
    part, marker = (dest.with_name(dest.name + suffix) for suffix in (".part", ".completed"))
    if _is_complete(dest, marker, url, sha256):
        return dest
    marker.unlink(missing_ok=True)   # it describes an older file; rewritten once this one verifies
    dest.parent.mkdir(parents=True, exist_ok=True)
    attempts = max(1, attempts)
    for attempt in range(1, attempts + 1):
        try:
            digest = _attempt(url, part, timeout, chunk_size)
            break
        except _RETRY as err:
            if attempt == attempts:
                raise DownloadError(f"{url}: failed after {attempts} attempts: {err}") from err
            time.sleep(min(0.5 * 2 ** (attempt - 1), 8))
    if sha256 and digest != sha256.lower():
        part.unlink(missing_ok=True)   # resuming a wrong part would only fail again
        raise DownloadError(f"{url}: sha256 mismatch: expected {sha256.lower()}, got {digest}")
    os.replace(part, dest)
    record = {"url": url, "sha256": digest, "size": dest.stat().st_size}
    write_atomically(marker, lambda tmp: tmp.write_text(json.dumps(record)))   # last, whole or absent
    return dest


def _is_complete(dest: Path, marker: Path, url: str, sha256: str | None) -> bool:
    try:
        done = json.loads(marker.read_text())
        size = dest.stat().st_size
    except (OSError, ValueError):
        return False
    same = done.get("sha256") == sha256.lower() if sha256 else done.get("url") == url
    return same and done.get("size") == size


def _hash_into(hasher, path: Path, chunk_size: int) -> int:
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            hasher.update(chunk)
            size += len(chunk)
    return size


def _attempt(url: str, part: Path, timeout: float, chunk_size: int) -> str:
    """One request that continues `part` from its end; returns the sha256 of the whole part."""
    hasher = hashlib.sha256()
    have = _hash_into(hasher, part, chunk_size) if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}   # the archive byte for byte, as its checksum expects
    if have:
        headers["Range"] = f"bytes={have}-"
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416 and have:
            total = re.search(r"/(\d+)$", r.headers.get("Content-Range", ""))
            if total and int(total[1]) != have:   # the part is not (a prefix of) this file
                part.unlink()
                raise _Transient(f"416 for a {have}-byte part of a {total[1]}-byte file")
            return hasher.hexdigest()   # the part may be the whole file: the checksum decides
        # The standard phrase ("404 Not Found"): servers word their own reasons freely.
        status = f"{r.status_code} {_PHRASES.get(r.status_code, r.reason)}"
        if 400 <= r.status_code < 500:
            raise DownloadError(f"{url}: {status}")
        if r.status_code >= 500:
            raise _Transient(status)
        if r.status_code == 206:
            start = re.match(r"bytes (\d+)-", r.headers.get("Content-Range", ""))
            if not start or int(start[1]) != have:
                part.unlink()
                raise _Transient(f"asked for bytes {have}-, got {r.headers.get('Content-Range')}")
        else:   # the whole body: no range asked, or the server ignored it
            hasher, have = hashlib.sha256(), 0
        got, expected = 0, r.headers.get("Content-Length")
        with open(part, "ab" if have else "wb") as f:
            for chunk in r.raw.stream(chunk_size, decode_content=False):
                f.write(chunk)
                hasher.update(chunk)
                got += len(chunk)
        if expected is not None and got < int(expected):   # some clients end a cut body quietly
            raise _Transient(f"connection closed after {got} of {expected} bytes")
    return hasher.hexdigest()
