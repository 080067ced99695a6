"""The shard tar reader against Python's tarfile, on every tar format it may meet."""
import io
import tarfile

import pytest

from pipeline.data import tar_stream

FILES = [("sample-0." + "x" * 150 + ".jpg", b"\xff\xd8" * 700), ("dir/sample-0.txt", "a caption, ünïcode".encode()),
         ("d" * 120 + "/sample-1.json", b"{}" * 600), ("sample-1.txt", b"")]


def archive(fmt: int, compression: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}", format=fmt) as tar:
        for name, data in FILES:
            if fmt == tarfile.USTAR_FORMAT and len(name.rsplit("/", 1)[-1]) > 100:
                continue                                    # ustar cannot hold this name at all
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        link = tarfile.TarInfo("link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "sample-1.txt"
        tar.addfile(link)
    return buf.getvalue()


def with_tarfile(raw: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("compression", ["", "gz"])
def test_same_files_as_tarfile(fmt, compression):
    raw = archive(fmt, compression)
    files = list(tar_stream.iter_files(io.BytesIO(raw)))
    assert files == with_tarfile(raw)
    assert len(files) == (3 if fmt == tarfile.USTAR_FORMAT else 4)


def test_corrupt_or_truncated_archive_raises():
    raw = archive(tarfile.PAX_FORMAT)
    flipped = bytearray(raw)
    flipped[5] ^= 0x01                                      # inside the first header's name
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(tar_stream.iter_files(io.BytesIO(bytes(flipped))))
    with pytest.raises(tarfile.ReadError, match="unexpected end"):
        list(tar_stream.iter_files(io.BytesIO(raw[:1500])))


def test_short_reads_are_completed():
    class Trickle(io.BytesIO):                              # a network stream handing out 100 bytes at a time
        def read(self, size=-1):
            return super().read(min(size, 100) if size >= 0 else size)

    raw = archive(tarfile.GNU_FORMAT)
    assert list(tar_stream.iter_files(Trickle(raw))) == with_tarfile(raw)
