"""All-or-nothing, safe extraction of corpus archives (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz, .zip).

An archive is unpacked into `target.partial` and renamed to `target` only when complete, so an
existing `target` is always whole. Members that could write or point outside it are refused.
"""
from __future__ import annotations

import lzma
import os
import posixpath
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path


class UnsafeArchiveError(ValueError):
    """An archive member that would escape the target folder; the message names the member."""


class CorruptArchiveError(ValueError):
    """An archive that cannot be read to its end (damaged or truncated); the message names it."""


_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError)


def extract(archive: str | Path, target: str | Path) -> Path:
    """Extract `archive` into the folder `target` (created by rename once complete); return it."""
    archive, target = Path(archive), Path(target)
    if target.exists():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)   # left by a crash mid-extraction
    partial.mkdir(parents=True)
    try:
        try:
            (_extract_zip if archive.name.lower().endswith(".zip") else _extract_tar)(archive, partial)
        except _CORRUPT as err:
            raise CorruptArchiveError(f"{archive}: damaged or truncated archive: {err}") from err
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, target)
    return target


def _unsafe(archive: Path, member: str, why) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"{archive}: refusing member {member!r}: {why}")


def _extract_tar(archive: Path, dest: Path) -> None:
    # The stdlib "data" filter checks paths with realpath, which some Pythons let crafted link
    # chains fool (CVE-2025-4517); these lexical rules keep every write on real folders anyway.
    links: set[str] = set()   # symlink members so far

    def check(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
        for name in [member.name] + ([member.linkname] if member.islnk() else []):
            if name.startswith("/") or ".." in name.split("/"):
                raise _unsafe(archive, member.name, f"{name!r} is absolute or climbs out with '..'")
            parent = posixpath.normpath(name)
            while parent not in ("", ".", "/"):
                if parent in links:
                    raise _unsafe(archive, member.name, f"goes through the symlink {parent!r}")
                parent = posixpath.dirname(parent)
        if member.issym() and os.path.lexists(os.path.join(path, member.name)):
            raise _unsafe(archive, member.name, "a symlink replacing an earlier member")
        try:
            member = tarfile.data_filter(member, path)   # link targets, device files, FIFOs, modes
        except tarfile.FilterError as err:
            raise _unsafe(archive, err.tarinfo.name, err) from err
        if member.issym():
            links.add(posixpath.normpath(member.name))
        return member

    with tarfile.open(archive) as tar:   # compression detected from the content
        tar.extractall(dest, filter=check)
    root = os.path.realpath(dest)   # a link may point out only through a link extracted after it
    for name in sorted(links):
        if os.path.commonpath([root, os.path.realpath(dest / name)]) != root:
            raise _unsafe(archive, name, "a symlink that resolves outside the target")


def _extract_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():   # all checked before anything is written
            name = info.filename.replace("\\", "/")
            if name.startswith("/") or re.match(r"[A-Za-z]:", name) or ".." in name.split("/"):
                raise _unsafe(archive, info.filename, "absolute or climbs out with '..'")
            if stat.S_IFMT(info.external_attr >> 16) not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise _unsafe(archive, info.filename, "a symlink or special file")
        zf.extractall(dest)
