"""Speech metrics (MCD with and without DTW, log-mel L1, SI-SNR, f0, spectral envelope) on synthetic
signals, and the TTS score on eSpeak NG renderings: its ordering, the demo reference, its calibration."""
from __future__ import annotations

import math
import tarfile

import numpy as np
import pytest
import torch
import torchaudio

from pipeline.data.speech_shards import decode_audio
from pipeline.demo.speech import build_archive, utterances
from pipeline.metrics.speech import (dtw_path, envelope_distance, f0_distance_semitones, log_mel_l1, mcd,
                                     mel_cepstrum, median_f0, si_snr, speech_frames)
from pipeline.metrics.tts_score import TTSScore, calibrate, demo_reference, score

SR = 24000
TEXT = "She bought three apples and a loaf of bread."
OTHER = "The train to the city leaves at seven fifteen."


def harmonic(f0: float, seconds: float = 1.0, rate: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 8))).astype(np.float32)


@pytest.fixture(scope="module")
def speech():
    return demo_reference(TEXT, "1002", SR)


def test_features_have_one_framing(speech):
    cepstra, speech_mask = mel_cepstrum(speech, SR), speech_frames(speech, SR)
    assert cepstra.shape == (len(speech) // 120 + 1, 13) and speech_mask.shape == (len(cepstra),)   # 5 ms hop
    assert 0.5 < speech_mask.mean() < 1
    quiet = np.concatenate([np.zeros(SR // 2, np.float32), speech])   # leading silence is not speech
    assert not speech_frames(quiet, SR)[:90].any()
    assert np.allclose(mel_cepstrum(0.1 * speech, SR)[:, 1:], cepstra[:, 1:], atol=1e-4)   # gain moves c0 only


def test_mcd_is_zero_on_itself_and_grows_with_noise(speech):
    rng = np.random.default_rng(0)
    noisy = [mcd(speech, speech + rng.normal(0, level, len(speech)).astype(np.float32), SR)
             for level in (0.001, 0.01, 0.05)]
    assert mcd(speech, speech, SR) == 0 and mcd(speech, speech, SR, align=True) == pytest.approx(0, abs=1e-6)
    assert 0 < noisy[0] < noisy[1] < noisy[2]
    assert log_mel_l1(speech, speech, SR) == 0 < log_mel_l1(speech, speech + 0.01, SR)


def test_dtw_aligns_a_time_stretched_copy(speech):
    window = torch.hann_window(1024)
    spec = torch.stft(torch.from_numpy(speech), 1024, 256, window=window, return_complex=True)
    slower = torchaudio.functional.phase_vocoder(spec, 0.8, torch.linspace(0, math.pi * 256, 513)[:, None])
    stretched = torch.istft(slower, 1024, 256, window=window).numpy()
    assert len(stretched) > 1.2 * len(speech)
    assert mcd(speech, stretched, SR, align=True) < 0.5 * mcd(speech, stretched, SR)


def test_dtw_path_is_the_cheapest_monotonic_path():
    rng = np.random.default_rng(1)
    for _ in range(10):
        cost = rng.random(rng.integers(1, 12, 2))
        best = np.full(np.add(cost.shape, 1), np.inf)   # the textbook recursion, cell by cell
        best[0, 0] = 0
        for i, j in np.ndindex(cost.shape):
            best[i + 1, j + 1] = cost[i, j] + min(best[i, j], best[i, j + 1], best[i + 1, j])
        i, j = dtw_path(cost)
        assert (i[0], j[0], i[-1], j[-1]) == (0, 0, *np.subtract(cost.shape, 1))
        assert set(zip(np.diff(i), np.diff(j))) <= {(0, 1), (1, 0), (1, 1)}
        assert cost[i, j].sum() == pytest.approx(best[-1, -1])


def test_si_snr_is_scale_invariant(speech):
    noisy = speech + np.random.default_rng(2).normal(0, 0.01, len(speech))
    assert si_snr(speech, speech) > 100
    assert si_snr(speech, 3 * noisy) == pytest.approx(si_snr(speech, noisy), abs=1e-6)
    assert 0 < si_snr(speech, noisy) < 40


def test_f0_of_harmonic_tones():
    for f0 in (80, 120, 200, 320):
        assert abs(12 * math.log2(median_f0(harmonic(f0), SR) / f0)) < 1
    assert median_f0(np.random.default_rng(3).normal(0, 0.1, SR), SR) is None
    assert f0_distance_semitones(harmonic(100), harmonic(200), SR) == pytest.approx(12, abs=0.5)
    assert math.isnan(f0_distance_semitones(harmonic(100), np.zeros(SR), SR))


def test_envelope_tells_voices_apart(speech):
    same_voice, other_voice = demo_reference(OTHER, "1002", SR), demo_reference(OTHER, "1001", SR)
    assert envelope_distance(speech, same_voice, SR) < envelope_distance(speech, other_voice, SR)


def test_tts_score_ranks_a_rerendering_below_other_text_and_voice(speech):
    prompt = demo_reference("Please remember to water the plants.", "1002", SR)
    right = score(demo_reference(TEXT, "1002", SR, rate_wpm=130), speech, prompt, SR)
    wrong_text = score(demo_reference(OTHER, "1002", SR), speech, prompt, SR)
    wrong_voices = [score(demo_reference(TEXT, s, SR), speech, prompt, SR) for s in ("1001", "1004", "1006")]
    assert right.mcd_dtw < wrong_text.mcd_dtw and all(right.mcd_dtw < w.mcd_dtw for w in wrong_voices)
    assert right.f0_semitones < 1 and right.envelope < min(w.envelope for w in wrong_voices)
    assert TTSScore(1.0, math.nan, 2.0).to_json() == {"mcd_dtw": 1.0, "f0_semitones": None, "envelope": 2.0}


def test_demo_reference_is_the_corpus_audio(tmp_path):
    archive, _ = build_archive(8, tmp_path)
    with tarfile.open(archive) as tar:
        files = {m.name.rsplit("/", 1)[-1]: tar.extractfile(m).read() for m in tar.getmembers()}
    row = utterances(8)[7]
    assert row["text"].endswith("?")   # a question: its transcript has lost the rise that eSpeak spoke
    transcript = files[f"{row['speaker']}-{row['chapter']}.trans.txt"].decode().split(" ", 1)[1].strip()
    ingested = decode_audio(files[f"{row['id']}.flac"], SR).numpy()   # as ingest-speech stores it
    reference = demo_reference(transcript, str(row["speaker"]), SR)   # from the transcript, as a model sees it
    assert reference.shape == ingested.shape and np.abs(reference - ingested).max() < 1e-4
    assert np.array_equal(demo_reference(transcript, str(row["speaker"]), SR, roundtrip=lambda x: x[::2]),
                          reference[::2])


def test_calibration_ranks_right_below_every_wrong_candidate():
    held_out = [(r["text"], str(r["speaker"])) for r in utterances(480)[-24:] if r["speaker"] in (1001, 1002, 1006)]
    report = calibrate(held_out[:6], SR, seed=0)
    assert calibrate(held_out[:2], SR, seed=1) == calibrate(held_out[:2], SR, seed=1)
    assert report["references"] == 6 and report["right_below_all_wrong"] >= 0.95
    means = report["mcd_dtw"]
    assert means["right"] < min(means["wrong_text"], means["wrong_voice"]) < means["noise"]
    assert report["f0_semitones"]["noise"] is None   # white noise has no pitch
    with pytest.raises(ValueError, match="2\\+ speakers"):
        calibrate([(TEXT, "1001"), (OTHER, "1001")], SR)
