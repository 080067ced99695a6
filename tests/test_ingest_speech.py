"""ingest-speech end to end: tiny corpora in their real layouts served on 127.0.0.1, real Ray,
real decoding, resampling and phonemes."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import jsonschema
import pytest
import soundfile as sf

import speech_corpora as corpora
from conftest import write_job
from pipeline.demo.server import LocalServer
from pipeline.monitor.status import job_status
from pipeline.schemas import schema
from pipeline.spec import load_job
from pipeline.workflow import run


def samples(storage: Path, stage: str = "speech") -> dict[str, dict]:
    """key -> {"json", "txt", "audio", "rate"} over every shard of the stage."""
    found: dict[str, dict] = {}
    for path in sorted((storage / stage / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                entry = found.setdefault(key, {})
                if ext == "flac":
                    entry["audio"], entry["rate"] = sf.read(io.BytesIO(data))
                else:
                    entry[ext] = json.loads(data) if ext == "json" else data.decode()
    return found


def speech_stage(server: LocalServer, corpus: str, parts: list[str], checksums: dict[str, str], tmp: Path,
                 **keys) -> str:
    options = {"kind": "ingest-speech", "corpus": corpus, "parts": json.dumps(parts), "base_url": server.base_url,
               "checksums": json.dumps(checksums), "download_dir": str(tmp / "corpora"), "samples_per_shard": 4,
               **keys}
    return "  speech: {" + ", ".join(f"{k}: {v}" for k, v in options.items()) + "}\n"


def test_librispeech_counts_failures_and_reruns_nothing(ray_address, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    files = corpora.librispeech_files("dev-clean")
    folder = "LibriSpeech/dev-clean/84/100"
    files[f"{folder}/84-100-0001.flac"] = b"fLaC but not really a flac file" * 10      # corrupt
    files[f"{folder}/84-100-0002.flac"] = b""                                            # zero length
    files[f"{folder}/84-100-0007.flac"] = corpora.tone(1.0, 16000)                       # no transcript line
    files[f"{folder}/84-100.trans.txt"] += b"84-100-0009 A LINE WITH NO AUDIO\n"
    files[f"{folder}/84-100-0003.flac"] = corpora.tone(0.2, 16000)                       # too short: dropped
    files[f"{folder}/84-100.trans.txt"] += b"84-100-0003 TOO SHORT\n"
    sha = corpora.pack(files, www / "dev-clean.tar.gz")
    with LocalServer(www) as server:
        spec = write_job(tmp_path / "job.yaml", tmp_path / "out",
                         speech_stage(server, "librispeech", ["dev-clean"], {"dev-clean.tar.gz": sha}, tmp_path))
        job = load_job(spec)
        (result,) = run(job)
        assert result.totals.samples == 4                       # 19-100-000{0,1,2} and 84-100-0000
        assert result.totals.reasons == {"corrupt audio (LibsndfileError)": 1, "empty audio file": 1,
                                         "audio without transcript": 1, "transcript without audio": 1}
        found = samples(tmp_path / "out")
        assert sorted(found) == ["19-100-0000", "19-100-0001", "19-100-0002", "84-100-0000"]
        first = found["19-100-0001"]
        assert first["txt"] == "SPEAKER 19 SAYS NUMBER 1"
        assert first["rate"] == 24000 and abs(len(first["audio"]) / 24000 - 1.1) < 0.01
        meta = first["json"]
        jsonschema.validate(meta, schema("speech_sample"))
        assert (meta["speaker"], meta["corpus"], meta["chapter"], meta["sample_rate"]) == ("19", "librispeech", "100", 24000)
        assert abs(meta["duration"] - 1.1) < 0.01 and meta["phonemes"].startswith("s p iː k ɚ")
        status = job_status(job)["stages"]["speech"]
        assert (status["state"], status["samples"], status["speakers"]) == ("done", 4, 2)
        assert abs(status["hours"] - 4.3 / 3600) < 1e-4
        markers = [json.loads(p.read_text()) for p in (tmp_path / "out/speech/_state").glob("*.json")]
        assert [m["stats"]["dropped"] for m in markers if m["stats"]["dropped"]] == [{"shorter than min_seconds": 1}]

        hits = dict(server.hits)
        (again,) = run(load_job(spec))
        assert again.built == 0 and dict(server.hits) == hits


@pytest.mark.parametrize("corpus,archive,make,expected", [
    ("libritts", "dev-clean.tar.gz", lambda: corpora.libritts_files("dev-clean"),
     {"14_212_000000_000000": ("14", "Speaker 14 reads sentence 0.")}),
    ("libritts-r", "dev_clean.tar.gz", lambda: corpora.libritts_files("dev-clean", "LibriTTS_R"),
     {"16_212_000001_000000": ("16", "Speaker 16 reads sentence 1.")}),
    ("ljspeech", "LJSpeech-1.1.tar.bz2", corpora.ljspeech_files,
     {"LJ001-0002": ("LJ", "Chapter 2, first.")}),
    ("vctk", "VCTK-Corpus-0.92.zip", corpora.vctk_files,
     {"p226_002": ("p226", "Please call Stella number 2.")}),
])
def test_each_recipe_layout(ray_address, tmp_path, corpus, archive, make, expected):
    www = tmp_path / "www"
    www.mkdir()
    files = make()
    sha = corpora.pack(files, www / archive)
    part = {"ljspeech": "LJSpeech-1.1", "vctk": "VCTK-Corpus-0.92"}.get(corpus, "dev-clean")
    with LocalServer(www) as server:
        spec = write_job(tmp_path / "job.yaml", tmp_path / "out",
                         speech_stage(server, corpus, [part], {archive: sha}, tmp_path, phonemes="false"))
        (result,) = run(load_job(spec))
    audio_files = [n for n in files if n.endswith((".wav", "_mic1.flac", ".flac")) and "_mic2" not in n]
    assert (result.totals.samples, result.totals.failures) == (len(audio_files), 0)
    found = samples(tmp_path / "out")
    for uid, (speaker, text) in expected.items():
        assert (found[uid]["json"]["speaker"], found[uid]["txt"]) == (speaker, text)
        assert found[uid]["rate"] == 24000 and found[uid]["json"]["phonemes"] is None
    if corpus in ("libritts", "ljspeech"):
        assert "original_text" in next(iter(found.values()))["json"]


def test_manifest_with_local_paths_and_urls(ray_address, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    (www / "remote.wav").write_bytes(corpora.tone(1.0, 8000, fmt="WAV"))
    (tmp_path / "a.flac").write_bytes(corpora.tone(1.0, 44100))
    with LocalServer(www) as server:
        (tmp_path / "manifest.tsv").write_text(
            "audio\ttext\tspeaker\n"
            f"a.flac\tlocal file\tann\n"
            f"{server.url('remote.wav')}\tover http\tbob\n"
            f"{server.url('missing.wav')}\tgone\tbob\n")
        spec = write_job(tmp_path / "job.yaml", tmp_path / "out",
                         f"  speech: {{kind: ingest-speech, corpus: manifest, manifest: {tmp_path}/manifest.tsv, "
                         f"id_col: null, phonemes: false}}\n")
        (result,) = run(load_job(spec))
    assert result.totals.samples == 2 and sum(result.totals.reasons.values()) == 1
    found = samples(tmp_path / "out")
    assert {k: (v["json"]["speaker"], v["txt"]) for k, v in found.items()} == \
        {"a": ("ann", "local file"), "remote": ("bob", "over http")}


def test_bad_archive_fails_alone_naming_url_and_reason(ray_address, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    good = corpora.pack(corpora.librispeech_files("dev-clean"), www / "dev-clean.tar.gz")
    corpora.pack(corpora.librispeech_files("test-clean"), www / "test-clean.tar.gz")
    with LocalServer(www) as server:
        spec = write_job(tmp_path / "job.yaml", tmp_path / "out",
                         speech_stage(server, "librispeech", ["dev-clean", "test-clean", "dev-other"],
                                      {"dev-clean.tar.gz": good, "test-clean.tar.gz": "0" * 64}, tmp_path,
                                      phonemes="false"))
        job = load_job(spec)
        (result,) = run(job)
    assert result.failed(job.stages["speech"].execution.max_failure_share)
    errors = "\n".join(result.prepare_errors)
    assert f"{server.base_url}test-clean.tar.gz" in errors and "0" * 64 in errors      # both digests named
    assert f"{server.base_url}dev-other.tar.gz" in errors and "404" in errors
    assert result.totals.samples == 6                                                   # dev-clean went on
    assert not (tmp_path / "corpora/librispeech/test-clean.tar.gz").exists()
    status = job_status(job)["stages"]["speech"]
    assert status["state"] == "failed" and status["last_error"] in result.prepare_errors


def test_spec_errors_for_speech(tmp_path):
    from pipeline.spec import SpecError, parse_job

    with pytest.raises(SpecError) as info:
        parse_job("name: t\nstorage: s\nstages:\n"
                  "  a: {kind: ingest-speech, corpus: librispeech, parts: [dev-clean, dev-cleen]}\n"
                  "  b: {kind: ingest-speech, corpus: libritts-r, parts: [dev-clean]}\n"
                  "  c: {kind: ingest-speech, corpus: manifest}\n"
                  "  d: {kind: ingest-speech, corpus: timit}\n", "job.yaml")
    found = dict(info.value.problems)
    assert "no part 'dev-cleen'" in found["stages.a.parts[1]"]
    assert "dev_clean.tar.gz" in found["stages.b.checksums"]
    assert "manifest" in found["stages.c.manifest"]
    assert "timit" in found["stages.d.corpus"]


def test_archive_with_escaping_member_is_refused_and_writes_nothing_outside(ray_address, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    files = corpora.librispeech_files("dev-clean")
    files["../../escaped.txt"] = b"should never be written"
    sha = corpora.pack(files, www / "dev-clean.tar.gz")
    with LocalServer(www) as server:
        spec = write_job(tmp_path / "job.yaml", tmp_path / "out",
                         speech_stage(server, "librispeech", ["dev-clean"], {"dev-clean.tar.gz": sha}, tmp_path))
        (result,) = run(load_job(spec))
    assert len(result.prepare_errors) == 1 and "../../escaped.txt" in result.prepare_errors[0]
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (tmp_path / "corpora/librispeech/dev-clean").exists()
    assert not (tmp_path / "corpora/librispeech/dev-clean.partial").exists()


def test_demo_espeak_goes_through_the_librispeech_path(ray_address, tmp_path):
    from pipeline.demo import speech

    spec = write_job(tmp_path / "job.yaml", tmp_path / "out",
                     f"  speech: {{kind: ingest-speech, corpus: demo-espeak, parts: [demo-12], "
                     f"download_dir: {tmp_path}/corpora, samples_per_shard: 6}}\n")
    job = load_job(spec)
    (result,) = run(job)
    assert (result.built, result.totals.samples, result.totals.failures) == (2, 12, 0)
    assert (tmp_path / "corpora/demo-espeak/demo-12.tar.gz.completed").exists()      # downloaded over HTTP
    found = samples(tmp_path / "out")
    expected = {u["id"]: u for u in speech.utterances(12)}
    assert set(found) == set(expected)
    for uid, sample in found.items():
        assert sample["txt"] == speech.transcript(expected[uid]["text"])
        assert sample["json"]["speaker"] == str(expected[uid]["speaker"]) and sample["rate"] == 24000
    status = job_status(job)["stages"]["speech"]
    assert status["speakers"] == len({u["speaker"] for u in expected.values()}) >= 6


def test_moving_download_dir_keeps_shards_fresh(ray_address, tmp_path):
    from pipeline.ledger import State
    from pipeline.workflow import Planner

    www = tmp_path / "www"
    www.mkdir()
    sha = corpora.pack(corpora.librispeech_files("dev-clean"), www / "dev-clean.tar.gz")
    with LocalServer(www) as server:
        stage = speech_stage(server, "librispeech", ["dev-clean"], {"dev-clean.tar.gz": sha}, tmp_path,
                             phonemes="false")
        run(load_job(write_job(tmp_path / "job.yaml", tmp_path / "out", stage)))
    (tmp_path / "corpora").rename(tmp_path / "moved")
    moved = stage.replace(str(tmp_path / "corpora"), str(tmp_path / "moved"))
    planner = Planner(load_job(write_job(tmp_path / "job2.yaml", tmp_path / "out", moved)))
    assert {p.state for p in planner.plan("speech").plan.shards.values()} == {State.DONE}
