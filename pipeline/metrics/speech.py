"""Speech metrics on mono float waveforms (S,): distortion (MCD, log-mel L1, SI-SNR), pitch and
spectral envelope.

Every spectral metric works on one framing: 25 ms Hann windows every 5 ms (HOP_SECONDS), 40 mel
bands over 0-8 kHz. The band stops at 8 kHz whatever the rate, so that 16 and 24 kHz audio of the
same speech give the same features (the demo corpus is stored at 16 kHz; speech lives below 8 kHz).
The mel cepstrum is the cosine transform of the natural-log mel *amplitude* scaled so that
ln|X(w)| ~ c0 + 2 sum_k c_k cos(k w) (w: mel frequency over 0..pi); then MCD, 10 sqrt(2)/ln10 *
sqrt(sum_k dc_k^2) over c1..c12, is the RMS log-spectral distance in dB of the smoothed envelopes.
c0 (log energy) is left out of distances: a gain changes c0 alone.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torchaudio

HOP_SECONDS = 0.005
WINDOW_SECONDS = 0.025
N_MELS = 40
F_MAX = 8000.0
FLOOR_DB = 80.0          # mel power is floored this far below the utterance's loudest band
MCD_SCALE = 10 * math.sqrt(2) / math.log(10)   # cepstral distance (natural-log amplitude) -> dB
SPEECH_DB = 40.0         # speech frames: within this of the loudest frame


def _log_mel(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """(frames, N_MELS) natural-log mel amplitude; frame t is centred on sample t * hop."""
    win = round(WINDOW_SECONDS * sample_rate)
    n_fft = 1 << (win - 1).bit_length()
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate, n_fft=n_fft, win_length=win, hop_length=round(HOP_SECONDS * sample_rate),
        f_max=min(F_MAX, sample_rate / 2), n_mels=N_MELS, power=2.0)
    wav = np.asarray(wav, np.float32)
    wav = np.pad(wav, (0, max(n_fft - len(wav), 0)))   # a silent or empty output still has frames
    power = mel(torch.from_numpy(wav)).double().T.numpy()   # (frames, N_MELS)
    floor = max(power.max(), 1e-20) * 10 ** (-FLOOR_DB / 10)   # relative: gain-free, silence finite
    return 0.5 * np.log(np.maximum(power, floor))


def _cosines(n_coeffs: int) -> np.ndarray:
    """(N_MELS, n_coeffs): c_k = mean_n L_n cos(pi k (n + 1/2) / N), the DCT-II over 2N."""
    n = np.arange(N_MELS) + 0.5
    return np.cos(np.pi * np.outer(n, np.arange(n_coeffs)) / N_MELS) / N_MELS


def _speech(log_mel: np.ndarray) -> np.ndarray:
    """(frames,) bool: within SPEECH_DB of the loudest frame."""
    db = 10 * np.log10(np.exp(2 * log_mel).sum(1))   # frame power in the mel bands
    return db >= db.max() - SPEECH_DB


def mel_cepstrum(wav: np.ndarray, sample_rate: int, n_coeffs: int = 13) -> np.ndarray:
    """(frames, n_coeffs) mel cepstra c0..c{n-1}, one frame every 5 ms; c0 is the mean log amplitude."""
    return _log_mel(wav, sample_rate) @ _cosines(n_coeffs)


def speech_frames(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """(frames,) bool, aligned with mel_cepstrum: frames with energy within SPEECH_DB of the loudest."""
    return _speech(_log_mel(wav, sample_rate))


def _analyse(wav: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """mel_cepstrum and speech_frames from one spectrogram."""
    log_mel = _log_mel(wav, sample_rate)
    return log_mel @ _cosines(13), _speech(log_mel)


def _cepstral_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) MCD in dB between every pair of frames of cepstra (c1..c12 compared)."""
    a, b = a[:, 1:], b[:, 1:]
    sq = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None] - 2 * a @ b.T
    return MCD_SCALE * np.sqrt(np.maximum(sq, 0))


def dtw_path(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (i, j) index arrays of the cheapest monotonic path from (0, 0) to (N-1, M-1) through
    `cost` (N, M), with steps (1, 0), (0, 1), (1, 1). O(N M): each row is numpy-vectorised, since
    D[i, j] = S[j] + min_{k<=j} (T[k] - S[k]) where S is the row's prefix cost and T the cost of
    entering (i, k) from row i-1."""
    n, m = cost.shape
    acc = np.empty((n, m))
    acc[0] = np.cumsum(cost[0])
    for i in range(1, n):
        above = acc[i - 1]
        enter = cost[i] + np.minimum(above, np.concatenate(([np.inf], above[:-1])))   # from (i-1, j) or (i-1, j-1)
        prefix = np.cumsum(cost[i])
        acc[i] = prefix + np.minimum.accumulate(enter - prefix)
    i, j, path = n - 1, m - 1, [(n - 1, m - 1)]
    while i or j:   # back from the end along the cheapest predecessor
        steps = [(i - 1, j - 1), (i - 1, j), (i, j - 1)]
        i, j = min((s for s in steps if s[0] >= 0 and s[1] >= 0), key=lambda s: acc[s])
        path.append((i, j))
    return tuple(np.array(p[::-1]) for p in zip(*path))


def mcd(reference: np.ndarray, candidate: np.ndarray, sample_rate: int, align: bool = False) -> float:
    """Mel-cepstral distortion (dB, c1..c12) of `candidate` against `reference`, averaged over the
    reference's speech frames: matched by DTW with `align`, else frame by frame over the common length."""
    (ref, speech), cand = _analyse(reference, sample_rate), mel_cepstrum(candidate, sample_rate)
    if align:
        cost = _cepstral_distances(ref, cand)
        i, j = dtw_path(cost)
        return float(cost[i, j][speech[i]].mean())
    n = min(len(ref), len(cand))
    diff = ref[:n, 1:] - cand[:n, 1:]
    return float(MCD_SCALE * np.sqrt((diff ** 2).sum(1))[speech[:n]].mean())


def log_mel_l1(reference: np.ndarray, candidate: np.ndarray, sample_rate: int) -> float:
    """Mean absolute difference of natural-log mel amplitudes over the common frames."""
    a, b = _log_mel(reference, sample_rate), _log_mel(candidate, sample_rate)
    n = min(len(a), len(b))
    return float(np.abs(a[:n] - b[:n]).mean())


def si_snr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Scale-invariant SNR in dB of `estimate` against `reference` (both made zero-mean; common length)."""
    n = min(len(reference), len(estimate))
    ref, est = (np.asarray(x[:n], np.float64) for x in (reference, estimate))
    ref, est = ref - ref.mean(), est - est.mean()
    target = ref * (est @ ref) / max(ref @ ref, 1e-20)   # the part of the estimate along the reference
    noise = est - target
    return float(10 * np.log10(max(target @ target, 1e-20) / max(noise @ noise, 1e-20)))


def _yin_f0(wav: np.ndarray, sample_rate: int, fmin: float = 50.0, fmax: float = 500.0,
            threshold: float = 0.15) -> np.ndarray:
    """(frames,) f0 in Hz every 10 ms by YIN (de Cheveigne & Kawahara 2002), nan where unvoiced:
    no lag whose cumulative-mean-normalised difference dips below `threshold`, or the frame is more
    than SPEECH_DB below the loudest."""
    wav = np.asarray(wav, np.float64)
    lag_min, lag_max = int(sample_rate / fmax), int(sample_rate / fmin)
    width, hop = lag_max, round(0.01 * sample_rate)      # integration window: one longest period
    size = width + lag_max
    if len(wav) < size:
        return np.zeros(0)
    frames = np.lib.stride_tricks.sliding_window_view(wav, size)[::hop]   # (F, size)
    nfft = 1 << (2 * size - 1).bit_length()
    spec = np.fft.rfft(frames, nfft)
    head = np.fft.rfft(frames[:, :width], nfft)
    corr = np.fft.irfft(np.conj(head) * spec, nfft)[:, :lag_max + 1]     # r(tau) = sum_j<W x_j x_j+tau
    cumulative = np.cumsum(np.pad(frames ** 2, ((0, 0), (1, 0))), 1)
    window_energy = cumulative[:, width:width + lag_max + 1] - cumulative[:, :lag_max + 1]   # sum_j<W x_j+tau^2
    diff = window_energy[:, :1] + window_energy - 2 * corr                # (F, lag_max + 1)
    lags = np.arange(1, lag_max + 1)
    cmnd = diff[:, 1:] * lags / np.maximum(np.cumsum(diff[:, 1:], 1), 1e-20)   # cmnd[:, k]: lag k + 1
    energy = window_energy[:, 0]
    loud = (energy > 0) & (energy >= energy.max() * 10 ** (-SPEECH_DB / 10))   # digital silence is unvoiced
    f0 = np.full(len(frames), np.nan)
    for f in np.flatnonzero(loud):
        below = np.flatnonzero(cmnd[f, lag_min - 1:] < threshold)
        if len(below):
            k = lag_min - 1 + below[0]
            while k + 1 < lag_max and cmnd[f, k + 1] < cmnd[f, k]:   # down to the dip's minimum
                k += 1
            f0[f] = sample_rate / (k + 1)
    return f0


def median_f0(wav: np.ndarray, sample_rate: int) -> float | None:
    """Median fundamental (Hz) over voiced frames; None when no frame is voiced."""
    f0 = _yin_f0(wav, sample_rate)
    voiced = f0[~np.isnan(f0)]
    return float(np.median(voiced)) if len(voiced) else None


def f0_distance_semitones(a: np.ndarray, b: np.ndarray, sample_rate: int) -> float:
    """|12 log2(median f0 of a / of b)|; nan when either is unvoiced."""
    fa, fb = median_f0(a, sample_rate), median_f0(b, sample_rate)
    return abs(12 * math.log2(fa / fb)) if fa and fb else math.nan


def envelope(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """(12,) long-term spectral envelope: mean c1..c12 over speech frames."""
    cepstra, speech = _analyse(wav, sample_rate)
    return cepstra[speech, 1:].mean(0)


def envelope_distance(a: np.ndarray, b: np.ndarray, sample_rate: int) -> float:
    """Distance (dB, as MCD) between the long-term spectral envelopes of a and b."""
    return float(MCD_SCALE * np.linalg.norm(envelope(a, sample_rate) - envelope(b, sample_rate)))
