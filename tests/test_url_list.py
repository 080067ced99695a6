"""URL lists: parquet, csv, tsv and globs cut into stable slices with content digests."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import url_list


def table(start: int, stop: int) -> pa.Table:
    return pa.table({"url": [f"http://h/{i}.jpg" for i in range(start, stop)],
                     "caption": [f"c{i}" for i in range(start, stop)]})


def rows(piece) -> list[str]:
    return url_list.read_slice(piece).column("url").to_pylist()


def test_glob_of_parquet_files_slices_across_file_boundaries(tmp_path):
    pq.write_table(table(0, 7), tmp_path / "part-0.parquet", row_group_size=3)
    pq.write_table(table(7, 12), tmp_path / "part-1.parquet", row_group_size=2)
    files = url_list.list_files(str(tmp_path / "part-*.parquet"))
    assert [f.rsplit("/", 1)[-1] for f in files] == ["part-0.parquet", "part-1.parquet"]
    pieces = [p for p, _ in url_list.slices(files, 5)]
    assert [p.shard for p in pieces] == ["00000", "00001", "00002"]
    assert [len(p.ranges) for p in pieces] == [1, 2, 1]
    assert [u for p in pieces for u in rows(p)] == [f"http://h/{i}.jpg" for i in range(12)]


def test_appending_rows_keeps_full_slices_and_their_digests(tmp_path):
    path = tmp_path / "list.parquet"
    pq.write_table(table(0, 10), path)
    before = dict((p.shard, d) for p, d in url_list.slices(url_list.list_files(str(path)), 5))
    pq.write_table(table(0, 13), path)
    after = dict((p.shard, d) for p, d in url_list.slices(url_list.list_files(str(path)), 5))
    assert after["00000"] == before["00000"] and after["00001"] == before["00001"]
    assert set(after) == {"00000", "00001", "00002"}


def test_any_column_change_changes_the_digest(tmp_path):
    path = tmp_path / "list.parquet"
    pq.write_table(table(0, 4), path)
    (_, digest), = url_list.slices([str(path)], 10)
    changed = table(0, 4).set_column(1, "caption", pa.array(["c0", "c1", "CHANGED", "c3"]))
    pq.write_table(changed, path)
    (_, digest2), = url_list.slices([str(path)], 10)
    assert digest != digest2


@pytest.mark.parametrize("ext,sep", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv(tmp_path, ext, sep):
    path = tmp_path / f"list{ext}"
    path.write_text(f"url{sep}caption{sep}extra\n" + "".join(f"http://h/{i}.jpg{sep}c {i}{sep}{i}\n" for i in range(7)))
    files = url_list.list_files(str(path))
    assert url_list.check_columns(files, ["url", "caption"]) == []
    pieces = [p for p, _ in url_list.slices(files, 3)]
    assert [len(rows(p)) for p in pieces] == [3, 3, 1]
    assert url_list.read_slice(pieces[1]).column("caption").to_pylist() == ["c 3", "c 4", "c 5"]


def test_errors_name_file_and_column(tmp_path):
    path = tmp_path / "list.parquet"
    pq.write_table(table(0, 2), path)
    ((column, error),) = url_list.check_columns([str(path)], ["url", "text"])
    assert column == "text" and str(path) in error and "'text'" in error and "url, caption" in error
    (tmp_path / "list.json").write_text("{}")
    with pytest.raises(url_list.UrlListError, match="not .parquet, .csv or .tsv"):
        url_list.list_files(str(tmp_path / "list.json"))
    with pytest.raises(url_list.UrlListError, match="matches no file"):
        url_list.list_files(str(tmp_path / "none-*.parquet"))


def test_cached_slices_follow_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "list.parquet"
    pq.write_table(table(0, 6), path)
    files = url_list.list_files(str(path))
    first = url_list.cached_slices(files, 4)
    assert first == list(url_list.slices(files, 4))
    assert len(list((tmp_path / "cache" / "url-lists").glob("*.json"))) == 1
    assert url_list.cached_slices(files, 4) == first                     # served from the cache
    pq.write_table(table(0, 9), path)                                    # the file changed
    assert url_list.cached_slices(files, 4) == list(url_list.slices(files, 4)) != first
