"""Tiny speech corpora in each recipe's real layout, with tones as audio, for tests and benchmarks."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import soundfile as sf


def tone(seconds: float, rate: int, freq: float = 220.0, fmt: str = "FLAC") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format=fmt, subtype="PCM_16")
    return buffer.getvalue()


def pack(files: dict[str, bytes], archive: Path) -> str:
    """Write `files` (member name -> bytes) as a .tar.gz, .tar.bz2, .tar or .zip; returns its sha256."""
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as z:
            for name, data in sorted(files.items()):
                z.writestr(name, data)
    else:
        mode = "w:bz2" if archive.name.endswith(".bz2") else "w" if archive.suffix == ".tar" else "w:gz"
        with tarfile.open(archive, mode) as tar:
            for name, data in sorted(files.items()):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(archive.read_bytes()).hexdigest()


def librispeech_files(part: str, speakers=(19, 84), chapters=1, per_chapter=3, seconds=1.0) -> dict[str, bytes]:
    """LibriSpeech/{part}/{spk}/{ch}/{spk}-{ch}-{n:04d}.flac at 16 kHz + {spk}-{ch}.trans.txt."""
    files = {}
    for spk in speakers:
        for ch in range(100, 100 + chapters):
            folder = f"LibriSpeech/{part}/{spk}/{ch}"
            lines = []
            for n in range(per_chapter):
                uid = f"{spk}-{ch}-{n:04d}"
                files[f"{folder}/{uid}.flac"] = tone(seconds + 0.1 * n, 16000, 200 + 40 * n)
                lines.append(f"{uid} SPEAKER {spk} SAYS NUMBER {n}")
            files[f"{folder}/{spk}-{ch}.trans.txt"] = ("\n".join(lines) + "\n").encode()
    return files


def libritts_files(part: str, folder: str = "LibriTTS") -> dict[str, bytes]:
    files = {}
    for spk in (14, 16):
        for n in range(2):
            uid = f"{spk}_212_{n:06d}_000000"
            base = f"{folder}/{part}/{spk}/212/{uid}"
            files[f"{base}.wav"] = tone(1.0, 24000, 300, "WAV")
            files[f"{base}.normalized.txt"] = f"Speaker {spk} reads sentence {n}.".encode()
            files[f"{base}.original.txt"] = f"Speaker {spk} reads sentence #{n}.".encode()
    return files


def ljspeech_files() -> dict[str, bytes]:
    files = {f"LJSpeech-1.1/wavs/LJ001-000{n}.wav": tone(1.2, 22050, 250, "WAV") for n in range(1, 4)}
    files["LJSpeech-1.1/metadata.csv"] = "".join(
        f"LJ001-000{n}|Chapter {n}, 1st.|Chapter {n}, first.\n" for n in range(1, 4)).encode()
    return files


def vctk_files() -> dict[str, bytes]:
    files = {}
    for spk in ("p225", "p226"):
        for n in (1, 2):
            uid = f"{spk}_{n:03d}"
            files[f"wav48_silence_trimmed/{spk}/{uid}_mic1.flac"] = tone(1.0, 48000, 180)
            files[f"wav48_silence_trimmed/{spk}/{uid}_mic2.flac"] = tone(1.0, 48000, 180)
            files[f"txt/{spk}/{uid}.txt"] = f"Please call Stella number {n}.\n".encode()
    return files


def bad_speech_shard(path: Path) -> Path:
    """A speech WebDataset tar (24 kHz, speaker s1) of the ways utterances go wrong, in key order:
    a-good (1 s tone), b-short (under one frame), c-nan, d-silent, e-corrupt, f-48k (a good 1 s tone
    at 48 kHz), g-no-audio, h-clipped."""
    wave = (0.3 * np.sin(np.arange(24000) / 24000 * 2 * np.pi * 220)).astype(np.float32)
    audio = {"a-good": _encoded(wave, 24000), "b-short": _encoded(wave[:300], 24000),
             "c-nan": _encoded(np.where(np.arange(24000) == 500, np.nan, wave).astype(np.float32), 24000, "WAV"),
             "d-silent": _encoded(np.zeros(24000, np.float32), 24000), "e-corrupt": b"fLaC not really",
             "f-48k": _encoded(np.tile(wave, 2), 48000), "g-no-audio": None,
             "h-clipped": _encoded(np.clip(wave * 10, -1, 1), 24000)}
    files = {}
    for key, data in audio.items():
        files.update({f"{key}.txt": key.encode(), f"{key}.json": json.dumps({"speaker": "s1"}).encode()})
        if data is not None:
            files[f"{key}.{'wav' if key == 'c-nan' else 'flac'}"] = data
    pack(files, path)
    return path


def _encoded(samples: np.ndarray, rate: int, fmt: str = "FLAC") -> bytes:
    """FLAC (16-bit) or WAV (32-bit float: NaN survives) bytes."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype="FLOAT" if fmt == "WAV" else "PCM_16")
    return buffer.getvalue()
