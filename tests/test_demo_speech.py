"""The demo-espeak speech corpus: real eSpeak NG synthesis, sentences, ids, and the LibriSpeech archive."""
from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import soundfile as sf

from pipeline.demo import speech
from pipeline.demo.shapes import parse_caption
from pipeline.demo.speech import (EVERYDAY, SAMPLE_RATE_OUT, VOICES, build_archive, espeak_sample_rate,
                                  sentences, synthesize, utterances)

SENTENCE = "The quick brown fox jumps over the lazy dog, and a small red circle sits at the top left."


def median_f0(audio: np.ndarray, rate: int) -> float:
    """Median pitch of the voiced 40 ms frames, by autocorrelation over 60-400 Hz."""
    size, hop, f0 = int(0.04 * rate), int(0.01 * rate), []
    for start in range(0, len(audio) - size, hop):
        frame = audio[start:start + size] - audio[start:start + size].mean()
        if np.sqrt(np.mean(frame ** 2)) < 0.02:
            continue
        ac = np.correlate(frame, frame, "full")[size - 1:]
        lo, hi = rate // 400, rate // 60
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.5 * ac[0]:  # clearly periodic: voiced
            f0.append(rate / lag)
    return float(np.median(f0))


def is_female(voice: str) -> bool:
    return voice.partition("+")[2].startswith("f")


def test_synthesize_is_deterministic_audible_and_scales_with_text():
    assert espeak_sample_rate() == 22050
    renders = []
    for _ in range(3):  # in three clock seconds: eSpeak seeds its breath noise from time() at init
        renders.append(synthesize(SENTENCE, "en-us+f5"))  # a breathy variant
        synthesize("Something else in between.", "en-us+m3")
        second = int(time.time())
        while int(time.time()) == second:
            time.sleep(0.02)
    first = renders[0]
    assert all(np.array_equal(first, again) for again in renders[1:])
    assert first.dtype == np.float32 and first.ndim == 1
    assert np.abs(first).max() <= 1.0 and np.sqrt(np.mean(first ** 2)) > 0.03
    short = synthesize("Good morning.", "en-us+m3")
    assert 0.3 < len(short) / 22050 < len(first) / 22050 / 3 and len(first) / 22050 > 4


def test_synthesize_is_identical_in_another_process():
    code = ("import hashlib; from pipeline.demo.speech import synthesize; "
            f"print(hashlib.sha256(synthesize({SENTENCE!r}, 'en+f3').tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hashlib.sha256(synthesize(SENTENCE, "en+f3").tobytes()).hexdigest()


def test_voices_are_distinct_speakers_of_both_sexes():
    assert len(VOICES) >= 6 and len(set(VOICES.values())) == len(VOICES)
    audio = {v: synthesize(SENTENCE, v) for v in VOICES.values()}
    f0 = {v: median_f0(a, espeak_sample_rate()) for v, a in audio.items()}
    female = [f for v, f in f0.items() if is_female(v)]
    male = [f for v, f in f0.items() if not is_female(v)]
    assert len(female) >= 3 and len(male) >= 3
    assert min(female) > 150 and max(male) < 130, f0  # a clear gap, not a shade
    assert len({a.tobytes() for a in audio.values()}) == len(audio)


def test_unknown_voice_raises_naming_it():
    for voice in ("xx-nowhere", "en+nobody", "en+F3"):  # eSpeak would quietly drop the last two variants
        with pytest.raises(ValueError, match=re.escape(voice)):
            synthesize("Hello.", voice)


def test_sentences_are_a_deterministic_mix_of_captions_and_everyday_speech():
    texts = sentences(400, seed=3)
    assert texts == sentences(400, seed=3) and texts[:50] == sentences(50, seed=3)
    assert texts != sentences(400, seed=4)
    assert all(t.strip() and not re.search(r"\d", t) for t in texts)
    captions = [t for t in texts if t not in EVERYDAY]
    for text in captions:  # a caption, capitalized and closed with a full stop
        parse_caption(text[0].lower() + text[1:-1])
    assert 0.35 < len(captions) / len(texts) < 0.65
    assert len(set(EVERYDAY)) >= 40 and len({t for t in texts if t in EVERYDAY}) >= 30
    words = [len(t.split()) for t in EVERYDAY]
    assert min(words) <= 2 and max(words) >= 10


def test_utterances_have_librispeech_ids_and_round_robin_speakers():
    rows = utterances(30, seed=1)
    assert rows == utterances(30, seed=1)
    assert [r["text"] for r in rows] == sentences(30, seed=1)
    assert len({r["id"] for r in rows}) == len(rows)
    assert {r["speaker"] for r in rows} == set(VOICES) and len(VOICES) >= 6
    chapters = {}
    for i, r in enumerate(rows):
        assert re.fullmatch(r"\d+-\d+-\d{4}", r["id"])
        assert r["id"] == f"{r['speaker']}-{r['chapter']}-{i // len(VOICES):04d}"
        assert r["speaker"] == sorted(VOICES)[i % len(VOICES)] and r["voice"] == VOICES[r["speaker"]]
        chapters.setdefault(r["speaker"], set()).add(r["chapter"])
    assert all(len(c) == 1 for c in chapters.values())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("speech")
    archive, sha = build_archive(12, folder)
    return folder, archive, sha


def test_archive_has_the_librispeech_layout(built):
    _, archive, _ = built
    rows = utterances(12)
    chapters = {f"LibriSpeech/demo-12/{r['speaker']}/{r['chapter']}" for r in rows}
    expected = ({"LibriSpeech/SPEAKERS.TXT"}
                | {f"LibriSpeech/demo-12/{r['speaker']}/{r['chapter']}/{r['id']}.flac" for r in rows}
                | {f"{c}/{c.split('/')[2]}-{c.split('/')[3]}.trans.txt" for c in chapters})
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == sorted(expected)
        assert all(m.isfile() and m.mtime == 0 and m.uid == m.gid == 0 and m.uname == m.gname == ""
                   for m in members)
        files = {m.name: tar.extractfile(m).read() for m in members}

    transcripts = {}
    for name, data in files.items():
        if name.endswith(".trans.txt"):
            for line in data.decode().splitlines():
                uid, _, text = line.partition(" ")
                transcripts[uid] = text
    for r in rows:
        assert transcripts[r["id"]] == " ".join(re.sub(r"[^A-Za-z' ]", " ", r["text"]).upper().split())
        assert re.fullmatch(r"[A-Z' ]+", transcripts[r["id"]])

    for r in rows:
        flac = files[f"LibriSpeech/demo-12/{r['speaker']}/{r['chapter']}/{r['id']}.flac"]
        assert sf.info(io.BytesIO(flac)).subtype == "PCM_16"
        audio, rate = sf.read(io.BytesIO(flac))
        assert rate == SAMPLE_RATE_OUT and len(audio) / rate > 0.3
        expected_seconds = len(synthesize(r["text"], r["voice"])) / espeak_sample_rate()
        assert abs(len(audio) / rate - expected_seconds) < 0.01

    speakers = files["LibriSpeech/SPEAKERS.TXT"].decode().splitlines()
    assert ";ID  |SEX| SUBSET           |MINUTES| NAME" in speakers
    table = [[cell.strip() for cell in line.split("|")] for line in speakers if not line.startswith(";")]
    assert [int(row[0]) for row in table] == sorted({r["speaker"] for r in rows})
    for spk, sex, subset, minutes, name in table:
        assert name == VOICES[int(spk)] and sex == ("F" if is_female(name) else "M")
        assert subset == "demo-12" and float(minutes) > 0


def test_archive_is_reproducible_and_not_rebuilt(built, tmp_path, monkeypatch):
    folder, archive, sha = built
    assert archive == folder / "demo-12.tar.gz"
    assert sha == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert json.loads((folder / "demo-12.json").read_text()) == {"count": 12, "seed": 0, "sha256": sha,
                                                                  "size": archive.stat().st_size,
                                                                  "version": speech.SPEECH_VERSION}
    assert build_archive(12, tmp_path / "elsewhere") == (tmp_path / "elsewhere" / "demo-12.tar.gz", sha)

    before = archive.stat().st_mtime_ns
    monkeypatch.setattr(speech, "synthesize", lambda *a, **k: pytest.fail("re-synthesized"))
    assert build_archive(12, folder) == (archive, sha)
    assert archive.stat().st_mtime_ns == before
    assert sorted(p.name for p in folder.iterdir()) == ["demo-12.json", "demo-12.tar.gz"]  # no temp left


def test_a_torn_archive_is_rebuilt(tmp_path):
    archive, sha = build_archive(12, tmp_path, seed=5)
    archive.write_bytes(archive.read_bytes()[:1000])  # as if a copy was cut short
    assert build_archive(12, tmp_path, seed=5) == (archive, sha)
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == sha
    _, other = build_archive(12, tmp_path / "seed6", seed=6)
    assert other != sha
