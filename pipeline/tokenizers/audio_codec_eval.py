"""Held-out evaluation of tokenmill's audio codec: distortion at several level counts (MCD on speech
frames, log-mel L1, SI-SNR), codebook usage per level, encode and decode speed, and a few examples.

Each utterance is encoded alone at the codec's full levels, and its first n levels decoded for every
n in `levels` (residual quantization is greedy, so they are the n-level codes). Speeds are audio
seconds per second of `encode` and of full-level `decode`, one utterance a call, on this process's
torch threads.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from pipeline.metrics.speech import log_mel_l1, mcd, si_snr
from pipeline.tokenizers.audio_codec_model import AudioCodecModel


@dataclass
class CodecEvaluation:
    utterances: int = 0
    seconds: float = 0.0                                   # of held-out audio
    distortion: dict[int, dict[str, float]] = field(default_factory=dict)   # levels -> mean mcd, log_mel_l1, si_snr
    usage: list[float] = field(default_factory=list)      # per level: share of its codes used on these utterances
    encode_x_realtime: float = 0.0
    decode_x_realtime: float = 0.0
    examples: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)   # key, original, full-level recon

    def figures(self) -> dict:
        """The stage's figures: full-level distortion, MCD at 4 levels, the least-used level's usage, speeds
        (none without utterances)."""
        if not self.utterances:
            return {}
        full = self.distortion[max(self.distortion)]
        return {"mcd": full["mcd"], **({"mcd_4": self.distortion[4]["mcd"]} if 4 in self.distortion else {}),
                "log_mel_l1": full["log_mel_l1"], "si_snr": full["si_snr"], "usage": min(self.usage),
                "encode_x_realtime": self.encode_x_realtime, "decode_x_realtime": self.decode_x_realtime}

    def to_json(self) -> dict:
        return {"utterances": self.utterances, "seconds": round(self.seconds, 2),
                "levels": {str(n): d for n, d in sorted(self.distortion.items())},
                "usage_per_level": self.usage, "threads": torch.get_num_threads(), **self.figures()}


@torch.no_grad()
def evaluate(model: AudioCodecModel, utterances: Iterable[tuple[str, torch.Tensor]], *, levels: Iterable[int],
             limit: int = 64, examples: int = 3) -> CodecEvaluation:
    """Evaluate on up to `limit` (key, waveform (S,)) utterances at every level count of `levels` and at
    all levels; the first `examples` are kept."""
    c = model.config
    result = CodecEvaluation()
    counts = torch.zeros(c.levels, c.codebook_size, dtype=torch.long)
    scores: dict[int, list[tuple[float, float, float]]] = {n: [] for n in sorted({*levels, c.levels}) if 1 <= n <= c.levels}
    encoding = decoding = 0.0
    for key, audio in utterances:
        if result.utterances >= limit:
            break
        wav = audio.view(1, 1, -1)
        started = time.perf_counter()
        codes = model.encode(wav)                                          # (1, levels, T)
        encoding += time.perf_counter() - started
        counts += torch.stack([torch.bincount(level, minlength=c.codebook_size) for level in codes[0]])
        reference = audio.numpy()
        for n in scores:
            started = time.perf_counter()
            recon = model.decode(codes[:, :n])[0, 0, :len(audio)].numpy()   # (S,)
            if n == c.levels:
                decoding += time.perf_counter() - started
            scores[n].append((mcd(reference, recon, c.sample_rate), log_mel_l1(reference, recon, c.sample_rate),
                              si_snr(reference, recon)))
            if n == max(scores) and len(result.examples) < examples:
                result.examples.append((key, reference, recon))
        result.utterances += 1
        result.seconds += len(audio) / c.sample_rate
    if result.utterances:
        result.distortion = {n: dict(zip(("mcd", "log_mel_l1", "si_snr"), np.round(np.mean(s, axis=0), 3).tolist()))
                             for n, s in scores.items()}
        result.usage = [round(u, 4) for u in (counts > 0).double().mean(1).tolist()]
        result.encode_x_realtime = round(result.seconds / encoding, 1)
        result.decode_x_realtime = round(result.seconds / decoding, 1) if decoding else 0.0
    return result
