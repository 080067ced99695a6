"""An objective TTS score: does a generated waveform say the right text in the prompt speaker's voice?

`score` compares a candidate with a reference of the same text by MCD after DTW alignment (timing
may differ, the spectra of the same phones should not), and with the prompt speaker's audio by
median f0 and long-term spectral envelope. On the demo corpus the reference is eSpeak NG's
rendering of the text in the speaker's voice (`demo_reference`), passed through the same codec as
the candidate, since the codec's own distortion would otherwise swamp the score. `calibrate`
measures how well MCD-DTW alone ranks a right rendering below wrong text, wrong voice and noise.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torchaudio

from pipeline.demo.speech import EVERYDAY, SAMPLE_RATE_OUT, VOICES, espeak_sample_rate, synthesize, transcript
from pipeline.metrics.speech import envelope_distance, f0_distance_semitones, mcd

Roundtrip = Callable[[np.ndarray], np.ndarray]   # a codec's encode -> decode, (S,) -> (S',) at one rate
RIGHT_RATES = (130, 190)    # words per minute of "right" candidates; eSpeak's default, the reference's, is 160
WRONG = ("wrong_text", "wrong_voice", "noise")


@dataclass
class TTSScore:
    mcd_dtw: float        # dB: candidate vs a reference of the same text; lower is better
    f0_semitones: float   # |median f0 distance| to the prompt speaker; nan if either is unvoiced
    envelope: float       # dB: long-term spectral envelope distance to the prompt speaker

    def to_json(self) -> dict:
        """The fields, rounded, with None for nan (JSON has no NaN)."""
        return {k: None if math.isnan(v) else round(v, 3) for k, v in asdict(self).items()}


def score(candidate: np.ndarray, reference: np.ndarray, prompt: np.ndarray, sample_rate: int) -> TTSScore:
    """`candidate` against `reference` (the same text) and against `prompt` (the speaker's audio)."""
    return TTSScore(mcd(reference, candidate, sample_rate, align=True),
                    f0_distance_semitones(candidate, prompt, sample_rate),
                    envelope_distance(candidate, prompt, sample_rate))


# Demo transcripts (LibriSpeech style) drop case and punctuation that eSpeak speaks: questions rise,
# commas pause, "IT" is spelled out. Everyday sentences are looked up; captions are plain lower case.
_SENTENCES = {transcript(s): s for s in EVERYDAY}


def spoken_text(text: str) -> str:
    """The sentence eSpeak spoke for a demo transcript; any other text as it is."""
    return _SENTENCES.get(text, text.lower() if text.isupper() else text)


def demo_reference(text: str, speaker: str, sample_rate: int, roundtrip: Roundtrip | None = None,
                   rate_wpm: int | None = None) -> np.ndarray:
    """(S,) float32: `text` spoken by demo speaker `speaker`'s eSpeak voice at `sample_rate`, made
    as the demo corpus makes its audio (16 kHz, 16-bit) and then passed through `roundtrip`."""
    audio = torch.from_numpy(synthesize(spoken_text(text), VOICES[int(speaker)], rate_wpm or 160))
    audio = torchaudio.functional.resample(audio, espeak_sample_rate(), SAMPLE_RATE_OUT)
    audio = torch.clamp(torch.round(audio * 32768), -32768, 32767) / 32768   # the archive's PCM_16
    audio = torchaudio.functional.resample(audio, SAMPLE_RATE_OUT, sample_rate).numpy()
    return np.asarray(roundtrip(audio), np.float32) if roundtrip else audio


def calibrate(utterances: list[tuple[str, str]], sample_rate: int, roundtrip: Roundtrip | None = None,
              seed: int = 0) -> dict:
    """MCD-DTW of right and wrong candidates for each (text, speaker) reference of held-out demo data.

    right: the same text and voice at another speaking rate; wrong_text: another utterance's text in
    the same voice; wrong_voice: the same text in another listed speaker's voice; noise: white noise
    of the reference's RMS and length. Every rendering goes through `roundtrip`. The prompt is another
    listed utterance of the speaker (the reference itself if there is none). Returns the share of
    references where right scores below every wrong candidate, and per kind the mean MCD-DTW (with
    the std of right), f0 and envelope distances."""
    speakers, texts = sorted({s for _, s in utterances}), sorted({t for t, _ in utterances})
    if len(speakers) < 2 or len(texts) < 2:
        raise ValueError(f"calibrate needs 2+ speakers and 2+ texts, got {len(speakers)} and {len(texts)}")
    rng, renders = np.random.default_rng(seed), {}

    def pick(options):
        return options[rng.integers(len(options))]

    def render(text, speaker, rate=None):
        if (text, speaker, rate) not in renders:
            renders[text, speaker, rate] = demo_reference(text, speaker, sample_rate, roundtrip, rate)
        return renders[text, speaker, rate]

    scores = {kind: [] for kind in ("right",) + WRONG}
    for text, speaker in utterances:
        reference = render(text, speaker)
        others = [t for t, s in utterances if s == speaker and t != text]
        prompt = render(others[0], speaker) if others else reference
        noise = rng.normal(0, np.sqrt(np.mean(reference ** 2)), len(reference)).astype(np.float32)
        candidates = {"right": render(text, speaker, pick(RIGHT_RATES)),
                      "wrong_text": render(pick([t for t in texts if t != text]), speaker),
                      "wrong_voice": render(text, pick([s for s in speakers if s != speaker])),
                      "noise": roundtrip(noise) if roundtrip else noise}
        for kind, candidate in candidates.items():
            scores[kind].append(score(candidate, reference, prompt, sample_rate))
    right = np.array([s.mcd_dtw for s in scores["right"]])
    below = [all(r < scores[k][i].mcd_dtw for k in WRONG) for i, r in enumerate(right)]

    def means(field):
        return {kind: _mean([getattr(s, field) for s in v]) for kind, v in scores.items()}

    return {"references": len(utterances), "right_below_all_wrong": sum(below) / len(below),
            "mcd_dtw": {**means("mcd_dtw"), "right_std": round(float(right.std()), 3)},
            "f0_semitones": means("f0_semitones"), "envelope": means("envelope")}


def _mean(values: list[float]) -> float | None:
    """Rounded mean of the values that are not nan; None if there are none (noise has no f0)."""
    values = [v for v in values if not math.isnan(v)]
    return round(float(np.mean(values)), 3) if values else None
