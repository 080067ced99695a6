"""Read speech WebDataset shards (ingest-speech's layout) as decoded mono waveforms.

A shard is streamed sample by sample from any fsspec URL. Audio (`key.flac`, or `key.wav`) goes
through one decoder, `decode_audio`, shared with ingestion: soundfile reads any rate and channel
count, channels are averaged to mono, and another rate is resampled with torchaudio.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from pipeline.data.shard_stream import decoded_samples

if TYPE_CHECKING:
    import torch

AUDIO_EXTENSIONS = ("flac", "wav")
SILENCE = 2.0 ** -15        # a peak below one 16-bit step is silence
CLIPPED_LEVEL = 0.999       # a sample this close to full scale is clipped...
CLIPPED_SHARE = 0.01        # ...and an utterance with this share of them is


@dataclass
class SpeechSample:
    """One sample of a shard: the decoded audio (float32 (S,)) or why it could not be."""
    key: str
    audio: torch.Tensor | None
    text: str
    meta: dict = field(default_factory=dict)
    error: str | None = None


def decode_audio(data: bytes, sample_rate: int) -> torch.Tensor:
    """Encoded audio bytes -> mono float32 tensor (S,) at `sample_rate`. Raises ValueError naming
    what is wrong."""
    import soundfile as sf
    import torch

    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise ValueError(f"corrupt audio ({type(exc).__name__})") from None
    if rate <= 0:
        raise ValueError("unreadable sample rate")
    if samples.shape[0] == 0:
        raise ValueError("no audio frames")
    mono = torch.from_numpy(samples.mean(axis=1))
    return _resampler(rate, sample_rate)(mono) if rate != sample_rate else mono


def audio_problem(audio: torch.Tensor, hop_length: int) -> str | None:
    """Why a decoded waveform (S,) is not fit to train a codec on or to tokenize, or None."""
    import torch

    if len(audio) < hop_length:
        return "shorter than one codec frame"
    if not torch.isfinite(audio).all():
        return "NaN or infinite samples"
    peak = audio.abs()
    if peak.max() < SILENCE:
        return "silent"
    if (peak >= CLIPPED_LEVEL).float().mean() >= CLIPPED_SHARE:
        return "clipped"
    return None


def iter_samples(url: str, sample_rate: int) -> Iterator[SpeechSample]:
    """Decoded samples of one shard at `sample_rate`; a sample that cannot be decoded carries its error."""
    for fields in decoded_samples(url, AUDIO_EXTENSIONS, lambda data: decode_audio(data, sample_rate), "text", "audio"):
        yield SpeechSample(*fields)


_RESAMPLERS: dict = {}


def _resampler(orig: int, new: int):
    """One torchaudio Resample per rate pair and process: its kernel is computed once."""
    if (orig, new) not in _RESAMPLERS:
        import torchaudio

        _RESAMPLERS[orig, new] = torchaudio.transforms.Resample(orig, new)
    return _RESAMPLERS[orig, new]
