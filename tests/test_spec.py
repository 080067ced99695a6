"""Spec errors are reported with the YAML path (and line) of the offending key, before any work."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from caption_stats import CaptionStats
from conftest import write_url_list
from pipeline.schemas import schema
from pipeline.spec import SpecError, load_job, parse_job
from pipeline.stages import STAGES


@pytest.fixture
def url_list(tmp_path):
    return write_url_list(tmp_path / "list.parquet", ["http://127.0.0.1:9/a.jpg"])


@pytest.fixture
def with_caption_stats(monkeypatch):
    monkeypatch.setitem(STAGES, CaptionStats.kind, CaptionStats)


def problems(text: str) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_job(text, "job.yaml")
    return dict(info.value.problems)


def test_valid_spec_resolves_dag_in_dependency_order(url_list, with_caption_stats, tmp_path):
    job = parse_job(f"""
name: t
storage: runs/t
stages:
  stats: {{kind: caption-stats, inputs: [images]}}
  images: {{kind: ingest-images, url_list: {url_list}, image_size: 64}}
""", "job.yaml", base_dir=tmp_path)
    assert list(job.stages) == ["images", "stats"]
    assert job.storage == str(tmp_path / "runs" / "t")
    assert job.stages["images"].stage.config.image_size == 64
    assert job.stages["images"].stage.config.samples_per_shard == 1000      # default filled in
    assert job.downstream({"images"}) == {"images", "stats"}


def test_unknown_kind_names_the_key_and_the_known_kinds():
    found = problems("name: t\nstorage: s\nstages:\n  a: {kind: ingest-imagez}\n")
    assert "unknown kind 'ingest-imagez'" in found["stages.a.kind"]
    assert "ingest-images" in found["stages.a.kind"]


def test_unknown_key_is_pointed_at_with_its_line(url_list):
    text = f"name: t\nstorage: s\nstages:\n  a:\n    kind: ingest-images\n    url_list: {url_list}\n    image_sise: 64\n"
    with pytest.raises(SpecError) as info:
        parse_job(text, "job.yaml")
    assert info.value.problems[0][0] == "stages.a.image_sise"
    assert "job.yaml:7: stages.a.image_sise: unknown key" in str(info.value)


def test_wrong_type_and_bad_value(url_list):
    found = problems(f"name: t\nstorage: s\nstages:\n  a: {{kind: ingest-images, url_list: {url_list}, "
                     f"image_size: big, resize_mode: stretch}}\n")
    assert "not of type 'integer'" in found["stages.a.image_size"]
    assert "stretch" in found["stages.a.resize_mode"]


def test_top_level_errors_all_reported():
    found = problems("name: t\nstages: {}\nextra: 1\nray: {address: 3}\n")
    assert "storage" in found[""]
    assert "unknown key" in found["extra"]
    assert "not of type" in found["ray.address"]


def test_missing_reference(url_list, with_caption_stats):
    found = problems(f"name: t\nstorage: s\nstages:\n  stats: {{kind: caption-stats, inputs: [imgs]}}\n"
                     f"  images: {{kind: ingest-images, url_list: {url_list}}}\n")
    assert "no stage named 'imgs'" in found["stages.stats.inputs[0]"]


def test_cycle(with_caption_stats):
    found = problems("name: t\nstorage: s\nstages:\n  a: {kind: caption-stats, inputs: [b]}\n"
                     "  b: {kind: caption-stats, inputs: [a]}\n")
    assert found["stages.a.inputs"] == "cycle: a -> b -> a"


def test_url_list_missing_column_names_file_and_column(url_list):
    found = problems(f"name: t\nstorage: s\nstages:\n  a: {{kind: ingest-images, url_list: {url_list}, "
                     f"caption_col: TEXT}}\n")
    assert str(url_list) in found["stages.a.caption_col"] and "'TEXT'" in found["stages.a.caption_col"]


def test_url_list_unreadable_or_absent(tmp_path):
    garbage = tmp_path / "broken.parquet"
    garbage.write_bytes(b"not parquet at all")
    found = problems(f"name: t\nstorage: s\nstages:\n  a: {{kind: ingest-images, url_list: {garbage}}}\n"
                     f"  b: {{kind: ingest-images, url_list: {tmp_path}/none-*.parquet}}\n")
    assert "cannot read url list" in found["stages.a.url_list"] and str(garbage) in found["stages.a.url_list"]
    assert "matches no file" in found["stages.b.url_list"]


def test_png_needs_a_compression_level():
    found = problems("name: t\nstorage: s\nstages:\n  a: {kind: ingest-images, url_list: 'demo://shapes?count=3', "
                     "encode_format: png}\n")
    assert "zlib compression level 0-9, not 95" in found["stages.a.encode_quality"]


def test_bad_demo_url():
    found = problems("name: t\nstorage: s\nstages:\n  a: {kind: ingest-images, url_list: 'demo://shapes?cnt=3'}\n")
    assert "unknown parameter(s) cnt" in found["stages.a.url_list"]


def test_schema_defaults_match_config_defaults():
    """The schema documents the defaults the stage configs apply: they must not drift apart."""
    for kind, cls in STAGES.items():
        props = schema("job")["$defs"][kind]["properties"]
        for f in dataclasses.fields(cls.Config):
            if "default" in props.get(f.name, {}) and f.default is not dataclasses.MISSING:
                default = list(f.default) if isinstance(f.default, tuple) else f.default   # YAML has no tuples
                assert props[f.name]["default"] == default, (kind, f.name)


def test_cli_exits_2_on_spec_error_before_any_work(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(f"name: t\nstorage: {tmp_path}/out\nstages:\n  a: {{kind: nope}}\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(spec)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "stages.a.kind: unknown kind 'nope'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_exits_2_on_unknown_stage_option(url_list, tmp_path):
    spec = tmp_path / "ok.yaml"
    spec.write_text(f"name: t\nstorage: {tmp_path}/out\nstages:\n  a: {{kind: ingest-images, url_list: {url_list}}}\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(spec), "--force", "b"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--force: no stage named b" in proc.stderr


def test_load_job_reports_unreadable_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read job spec"):
        load_job(tmp_path / "absent.yaml")
