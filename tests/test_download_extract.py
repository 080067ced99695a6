"""fetch (resume, verify) against a real loopback HTTP server, and safe extraction of real archives."""
from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import stat
import tarfile
import zipfile

import pytest
import requests

from pipeline.demo.server import LocalServer, QuietHandler
from pipeline.recipes.download import DownloadError, fetch, sha256_file
from pipeline.recipes.extract import CorruptArchiveError, UnsafeArchiveError, extract

BODY = os.urandom(300_000) + b"end"   # incompressible, several chunks at chunk_size=64 KiB
DIGEST = hashlib.sha256(BODY).hexdigest()


class Recording(QuietHandler):
    """Records (path, Range header or None) for every request; subclass per test via `fresh`."""
    ranges: list

    def send_head(self):
        type(self).ranges.append((self.path, self.headers.get("Range")))
        return super().send_head()


class CutOnce(Recording):
    """Cuts the connection after half the body on the first request for each path."""
    cut: set

    def copyfile(self, source, outputfile):
        if self.path in type(self).cut or self._range_length is not None:
            return super().copyfile(source, outputfile)
        type(self).cut.add(self.path)
        data = source.read()
        outputfile.write(data[: len(data) // 2])
        outputfile.flush()
        self.close_connection = True


class IgnoresRange(Recording):
    def send_head(self):
        type(self).ranges.append((self.path, self.headers.get("Range")))
        del self.headers["Range"]
        return QuietHandler.send_head(self)


class FailsOnce(Recording):
    """503 on the first request for each path."""
    failed: set

    def send_head(self):
        if self.path not in type(self).failed:
            type(self).failed.add(self.path)
            self.send_error(503)
            return None
        return super().send_head()


def fresh(handler):
    return type(handler.__name__, (handler,), {"ranges": [], "cut": set(), "failed": set()})


@pytest.fixture
def www(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "a.tar.gz").write_bytes(BODY)
    return root


def serve(root, handler=Recording):
    return LocalServer(root, fresh(handler))


# ---- the server's ranges -------------------------------------------------------------------------

def test_server_ranges(www):
    with serve(www) as srv:
        whole = requests.get(srv.url("a.tar.gz"))
        assert whole.status_code == 200 and whole.headers["Accept-Ranges"] == "bytes"
        part = requests.get(srv.url("a.tar.gz"), headers={"Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == BODY[10:20]
        assert part.headers["Content-Range"] == f"bytes 10-19/{len(BODY)}"
        tail = requests.get(srv.url("a.tar.gz"), headers={"Range": "bytes=300000-"})
        assert tail.status_code == 206 and tail.content == b"end"
        beyond = requests.get(srv.url("a.tar.gz"), headers={"Range": f"bytes={len(BODY)}-"})
        assert beyond.status_code == 416 and beyond.headers["Content-Range"] == f"bytes */{len(BODY)}"
        assert srv.hits["/a.tar.gz"] == 4


# ---- fetch ---------------------------------------------------------------------------------------

def test_fetch_writes_marker_and_skips_second_time(www, tmp_path):
    dest = tmp_path / "dl" / "a.tar.gz"
    with serve(www) as srv:
        assert fetch(srv.url("a.tar.gz"), dest, DIGEST) == dest
        assert dest.read_bytes() == BODY and not (tmp_path / "dl" / "a.tar.gz.part").exists()
        marker = json.loads((tmp_path / "dl" / "a.tar.gz.completed").read_text())
        assert marker == {"url": srv.url("a.tar.gz"), "sha256": DIGEST, "size": len(BODY)}
        assert fetch(srv.url("a.tar.gz"), dest, DIGEST) == dest
        assert fetch(srv.url("a.tar.gz"), dest, None) == dest   # no checksum: the same URL suffices
        assert srv.hits["/a.tar.gz"] == 1
        dest.write_bytes(BODY[:-1])   # a file that no longer matches its marker is fetched again
        fetch(srv.url("a.tar.gz"), dest, DIGEST)
        assert srv.hits["/a.tar.gz"] == 2 and sha256_file(dest) == DIGEST


def test_connection_cut_mid_body_resumes_with_range(www, tmp_path):
    dest = tmp_path / "a.tar.gz"
    with serve(www, CutOnce) as srv:
        fetch(srv.url("a.tar.gz"), dest, DIGEST, chunk_size=1 << 16)
        ranges = srv.handler.ranges
    assert ranges == [("/a.tar.gz", None), ("/a.tar.gz", f"bytes={len(BODY) // 2}-")]
    assert sha256_file(dest) == DIGEST


def test_leftover_part_is_continued(www, tmp_path):
    dest = tmp_path / "a.tar.gz"
    (tmp_path / "a.tar.gz.part").write_bytes(BODY[:100_000])   # from an earlier process
    with serve(www) as srv:
        fetch(srv.url("a.tar.gz"), dest, DIGEST)
        assert srv.handler.ranges == [("/a.tar.gz", "bytes=100000-")]
    assert dest.read_bytes() == BODY


def test_complete_part_gets_416_and_is_verified(www, tmp_path):
    dest = tmp_path / "a.tar.gz"
    (tmp_path / "a.tar.gz.part").write_bytes(BODY)
    with serve(www) as srv:
        fetch(srv.url("a.tar.gz"), dest, DIGEST)
        assert srv.handler.ranges == [("/a.tar.gz", f"bytes={len(BODY)}-")]
    assert dest.read_bytes() == BODY and (tmp_path / "a.tar.gz.completed").exists()


def test_server_ignoring_range_restarts_cleanly(www, tmp_path):
    dest = tmp_path / "a.tar.gz"
    (tmp_path / "a.tar.gz.part").write_bytes(b"garbage that must not stay in front")
    with serve(www, IgnoresRange) as srv:
        fetch(srv.url("a.tar.gz"), dest, DIGEST)
        assert srv.handler.ranges == [("/a.tar.gz", "bytes=35-")]
    assert dest.read_bytes() == BODY


def test_5xx_is_retried(www, tmp_path):
    with serve(www, FailsOnce) as srv:
        fetch(srv.url("a.tar.gz"), tmp_path / "a.tar.gz", DIGEST)
        assert srv.handler.failed == {"/a.tar.gz"} and srv.hits["/a.tar.gz"] == 1   # then one good
    assert sha256_file(tmp_path / "a.tar.gz") == DIGEST


def test_checksum_mismatch_deletes_part(www, tmp_path):
    dest, wrong = tmp_path / "a.tar.gz", "0" * 64
    with serve(www) as srv:
        with pytest.raises(DownloadError) as err:
            fetch(srv.url("a.tar.gz"), dest, wrong)
        url = srv.url("a.tar.gz")
    message = str(err.value)
    assert url in message and f"expected {wrong}" in message and f"got {DIGEST}" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["www"]   # no dest, part nor marker


def test_404_fails_at_once(www, tmp_path):
    with serve(www) as srv:
        with pytest.raises(DownloadError) as err:
            fetch(srv.url("missing.tar.gz"), tmp_path / "m.tar.gz", DIGEST)
        assert srv.url("missing.tar.gz") in str(err.value) and "404 Not Found" in str(err.value)
        assert srv.hits["/missing.tar.gz"] == 1


def test_connection_refused_fails_after_attempts(tmp_path):
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/a.tar.gz"
    with pytest.raises(DownloadError) as err:
        fetch(url, tmp_path / "a.tar.gz", DIGEST, attempts=2, timeout=5)
    assert url in str(err.value) and "after 2 attempts" in str(err.value)


# ---- extract -------------------------------------------------------------------------------------

def tree(root):
    """Every path under root (links not followed), with file contents: to prove nothing changed."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = (os.readlink(path) if os.path.islink(path) else
                                                open(path, "rb").read() if os.path.isfile(path) else None)
    return out


def member(name, kind=tarfile.REGTYPE, linkname="", data=b""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, len(data)
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, data


def make_tar(path, *members, mode="w:gz"):
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


GOOD = [member("corpus/", tarfile.DIRTYPE), member("corpus/a/1.flac", data=b"one"),
        member("corpus/b.txt", data=b"two"), member("corpus/alias.txt", tarfile.SYMTYPE, "b.txt")]


@pytest.mark.parametrize("suffix,mode", [(".tar", "w"), (".tar.gz", "w:gz"), (".tgz", "w:gz"),
                                         (".tar.bz2", "w:bz2"), (".tar.xz", "w:xz")])
def test_extract_tar(tmp_path, suffix, mode):
    archive = make_tar(tmp_path / f"c{suffix}", *GOOD, mode=mode)
    target = tmp_path / "out" / "c"
    assert extract(archive, target) == target
    assert (target / "corpus/a/1.flac").read_bytes() == b"one"
    assert (target / "corpus/alias.txt").read_bytes() == b"two"   # links inside are fine
    assert not (tmp_path / "out" / "c.partial").exists()
    archive.unlink()
    assert extract(archive, target) == target   # an existing target is complete: nothing read


def test_extract_zip(tmp_path):
    with zipfile.ZipFile(tmp_path / "c.zip", "w") as zf:
        zf.writestr("corpus/a/1.wav", b"one")
        zf.writestr("corpus/b.txt", b"two")
    target = extract(tmp_path / "c.zip", tmp_path / "c")
    assert (target / "corpus/a/1.wav").read_bytes() == b"one"
    assert (target / "corpus/b.txt").read_bytes() == b"two"
    assert not (tmp_path / "c.partial").exists()


def test_leftover_partial_is_removed_first(tmp_path):
    archive = make_tar(tmp_path / "c.tar.gz", *GOOD)
    (tmp_path / "c.partial" / "stale").mkdir(parents=True)
    (tmp_path / "c.partial" / "stale" / "junk").write_text("from a crash")
    target = extract(archive, tmp_path / "c")
    assert sorted(os.listdir(target)) == ["corpus"] and not (tmp_path / "c.partial").exists()


OK = member("ok.txt", data=b"fine")   # extracted before the bad member: must be cleaned away too
ATTACKS = {
    "dotdot": ([OK, member("../evil", data=b"pwned")], "../evil"),
    "absolute": ([OK, member("/abs", data=b"pwned")], "/abs"),
    "symlink-abs": ([OK, member("link", tarfile.SYMTYPE, "/etc/passwd")], "link"),
    "symlink-up": ([OK, member("link", tarfile.SYMTYPE, "../../x")], "link"),
    "hardlink-up": ([OK, member("hard", tarfile.LNKTYPE, "../outside.txt"),
                     member("hard", data=b"pwned")], "hard"),
    "hardlink-abs": ([OK, member("hard", tarfile.LNKTYPE, "/etc/passwd")], "hard"),
    "fifo": ([OK, member("pipe", tarfile.FIFOTYPE)], "pipe"),
    "device": ([OK, member("dev", tarfile.CHRTYPE)], "dev"),
    # Through a link: each link looks inside when written; together they point out.
    "write-through-link": ([OK, member("sub/", tarfile.DIRTYPE), member("ln", tarfile.SYMTYPE, "sub"),
                            member("ln/f", data=b"x")], "ln/f"),
    "link-chain": ([OK, member("b/", tarfile.DIRTYPE), member("x", tarfile.SYMTYPE, "deep/a/../.."),
                    member("deep/", tarfile.DIRTYPE), member("deep/a", tarfile.SYMTYPE, "../b")], "x"),
    "link-over-dir": ([OK, member("d/", tarfile.DIRTYPE), member("d", tarfile.SYMTYPE, "..")], "d"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_tar_attacks_are_refused(tmp_path, attack):
    members, bad = ATTACKS[attack]
    zone = tmp_path / "a" / "b"   # the target's parent; "../../x" from the target stays in tmp_path
    zone.mkdir(parents=True)
    (zone / "outside.txt").write_text("keep")
    archive = make_tar(tmp_path / "evil.tar.gz", *members)
    before = tree(tmp_path)
    with pytest.raises(UnsafeArchiveError) as err:
        extract(archive, zone / "out")
    assert repr(bad) in str(err.value)
    assert tree(tmp_path) == before   # nothing written anywhere, no target, no .partial


def test_zip_traversal_is_refused(tmp_path):
    zone = tmp_path / "a"
    zone.mkdir()
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("ok.txt", b"fine")
        zf.writestr("../evil", b"pwned")
    before = tree(tmp_path)
    with pytest.raises(UnsafeArchiveError, match=r"'\.\./evil'"):
        extract(tmp_path / "evil.zip", zone / "out")
    assert tree(tmp_path) == before


def test_zip_symlink_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="'link'"):
        extract(tmp_path / "evil.zip", tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["evil.zip"]


@pytest.mark.parametrize("name", ["t.tar.gz", "t.zip"])
def test_truncated_archive_fails_clearly_and_leaves_nothing(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".zip"):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("big.bin", os.urandom(200_000))
    else:
        make_tar(path, member("big.bin", data=os.urandom(200_000)), member("late.txt", data=b"x"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptArchiveError) as err:
        extract(path, tmp_path / "out")
    assert str(path) in str(err.value)
    assert sorted(os.listdir(tmp_path)) == [name]
