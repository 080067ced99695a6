"""Synthesized speech: the offline demo speech corpus `demo-espeak`.

eSpeak NG (libespeak-ng and its voice data from the espeakng-loader wheel, nothing from the OS)
reads shape captions and everyday sentences, one voice per speaker, and build_archive packs them
as a LibriSpeech-layout .tar.gz for the real librispeech recipe to download. synthesize is a pure
function of its arguments, so generated speech can be scored against eSpeak's rendering of it.
"""
from __future__ import annotations

import _ctypes
import ctypes
import gzip
import hashlib
import io
import json
import os
import random
import re
import tarfile
import threading
from contextlib import contextmanager
from pathlib import Path

import espeakng_loader
import numpy as np
import soundfile as sf

from pipeline.demo.shapes import caption, scene_for
from pipeline.storage import write_atomically

SPEECH_VERSION = 1  # bump when synthesis, sentences or layout change
SAMPLE_RATE_OUT = 16000  # LibriSpeech's rate; archive audio is resampled to it

# Speaker id -> eSpeak "language+variant": four men (fundamental near 100 Hz) and four women
# (180-210 Hz) over six accents; within a sex the variants differ in formants and breathiness.
VOICES: dict[int, str] = {
    1001: "en-us+m3", 1002: "en-us+f5", 1003: "en-gb-scotland+m7", 1004: "en-gb-x-rp+f1",
    1005: "en-029+m1", 1006: "en+f3", 1007: "en-us-nyc+m6", 1008: "en-gb-x-gbcwmd+f2",
}

EVERYDAY = (  # numbers spelled out, so the transcript says what is spoken
    "Yes.", "Good morning.", "Please close the door.", "The kettle is boiling.",
    "It might rain later today.", "Thank you for the lovely dinner.", "Do you know what time it is?",
    "I left my keys on the kitchen table.", "The train to the city leaves at seven fifteen.",
    "She bought three apples and a loaf of bread.", "We walked along the river until sunset.",
    "Could you turn the music down a little?", "The library opens at nine o'clock on Sundays.",
    "My brother has two cats and one very old dog.", "Turn left at the second traffic light.",
    "The children played football in the park all afternoon.", "Where did you put the umbrella?",
    "He reads the newspaper every morning with a cup of coffee.", "I can't find my glasses anywhere.",
    "The meeting has been moved to Thursday afternoon.", "Forty two people came to the concert.",
    "Our garden is full of roses in the summer.", "Please remember to water the plants.",
    "The bakery on the corner sells the best bread in town.", "The soup needs a little more salt.",
    "The old bridge was built more than one hundred years ago.", "A cold wind blew across the field.",
    "It takes twenty minutes to walk to school.", "They painted the fence a bright shade of green.",
    "My sister is learning to play the violin.", "We need eggs, milk and butter from the shop.",
    "The flight was delayed by almost three hours.", "He fixed the bicycle with an old spanner.",
    "The moon was bright and the sky was clear.", "Let's meet outside the cinema at half past six.",
    "The museum has a famous collection of ancient coins.", "Don't forget to lock the back door.",
    "She wrote a long letter to her grandmother.", "The shop closes early on public holidays.",
    "Eleven ducks swam slowly across the pond.", "I would like a window seat, please.",
    "The baby finally fell asleep after midnight.", "Our neighbours are moving to a house by the sea.",
    "The recipe calls for two cups of flour and one egg.",
)

# From espeak-ng's speak_lib.h.
_SYNCHRONOUS, _DONT_EXIT = 2, 0x8000  # AUDIO_OUTPUT_SYNCHRONOUS; report errors instead of exit()
_RATE, _POS_CHARACTER, _CHARS_UTF8, _EE_OK = 1, 1, 1, 0  # espeakRATE, ..., espeak_ERROR EE_OK
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_DATA = espeakng_loader.get_data_path()
_LOCK = threading.Lock()  # one eSpeak at a time: its state is C globals
_private: str | None = None  # path of this process's copy of the library
_sample_rate: int | None = None


def _private_library() -> str:
    """This process's own copy of libespeak-ng: a new file is a new instance that no one else holds."""
    global _private
    if _private is None:  # an anonymous in-memory file, inherited by forks, gone with the process
        fd = os.memfd_create("libespeak-ng")
        os.write(fd, Path(espeakng_loader.get_library_path()).read_bytes())
        _private = f"/proc/self/fd/{fd}"
    return _private


@contextmanager
def _fresh_espeak():
    """A freshly loaded and initialized eSpeak, yielded as (lib, sample rate) and unloaded after.

    eSpeak keeps synthesis state in C statics that no API resets (the pitch-flutter phase) and seeds
    its breath noise from the clock, so a reused instance never says a text the same way twice.
    A fresh load costs under a millisecond; with a fixed noise seed every call starts alike.
    """
    with _LOCK:
        lib = ctypes.CDLL(_private_library())
        try:
            lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            rate = lib.espeak_Initialize(_SYNCHRONOUS, 0, _DATA.encode(), _DONT_EXIT)
            if rate <= 0:
                raise RuntimeError(f"espeak_Initialize failed on data {_DATA}")
            lib.espeak_ng_SetRandSeed(ctypes.c_long(1))
            try:
                yield lib, rate
            finally:
                lib.espeak_Terminate()
        finally:
            _ctypes.dlclose(lib._handle)


def espeak_sample_rate() -> int:
    """The rate of synthesize's audio (22050 Hz for eSpeak NG)."""
    global _sample_rate
    if _sample_rate is None:
        with _fresh_espeak() as (_, rate):
            _sample_rate = rate
    return _sample_rate


def synthesize(text: str, voice: str, rate_wpm: int = 160) -> np.ndarray:
    """`text` spoken by eSpeak `voice`: float32 mono in [-1, 1] at espeak_sample_rate(); deterministic."""
    chunks = []

    def collect(wav, count, events):
        if wav and count > 0:
            chunks.append(np.ctypeslib.as_array(wav, (count,)).copy())  # eSpeak reuses its buffer
        return 0  # continue synthesis

    callback, data = _CALLBACK(collect), text.encode()  # the callback lives until eSpeak is unloaded
    variant = voice.partition("+")[2]
    with _fresh_espeak() as (lib, _):
        lib.espeak_SetSynthCallback(callback)
        # eSpeak quietly falls back to the plain language on an unknown variant: check that it ships.
        if lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK or (
                variant and not (Path(_DATA) / "voices" / "!v" / variant).is_file()):
            raise ValueError(f"unknown eSpeak voice {voice!r}")
        lib.espeak_SetParameter(_RATE, rate_wpm, 0)
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        if lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None) != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed on {text!r}")
        lib.espeak_Synchronize()
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.int16)).astype(np.float32) / 32768


def sentences(count: int, seed: int = 0) -> list[str]:
    """About half shape captions, half everyday sentences; sentence i depends on (i, seed) alone."""
    out = []
    for i in range(count):
        rng = random.Random(f"speech:{seed}:{i}")
        if rng.random() < 0.5:
            text = caption(scene_for(i, seed))
            out.append(text[0].upper() + text[1:] + ".")  # a full stop: sentence-final intonation
        else:
            out.append(rng.choice(EVERYDAY))
    return out


def utterances(count: int, seed: int = 0) -> list[dict]:
    """Sentences with LibriSpeech ids SPEAKER-CHAPTER-NNNN; speakers take turns, one chapter each."""
    speakers, rows = sorted(VOICES), []
    for i, text in enumerate(sentences(count, seed)):
        speaker, chapter = speakers[i % len(speakers)], 100 + i % len(speakers)
        rows.append({"id": f"{speaker}-{chapter}-{i // len(speakers):04d}", "speaker": speaker,
                     "chapter": chapter, "voice": VOICES[speaker], "text": text})
    return rows


def transcript(text: str) -> str:
    """As LibriSpeech writes it: upper case, no punctuation but apostrophes."""
    return " ".join(re.sub(r"[^A-Z']+", " ", text.upper()).split())


def _flac(text: str, voice: str) -> tuple[bytes, float]:
    """`text` in `voice` as 16 kHz PCM_16 FLAC bytes, and its seconds."""
    import torch  # here, so that synthesizing alone does not import torch
    import torchaudio

    audio = torchaudio.functional.resample(torch.from_numpy(synthesize(text, voice)),
                                           espeak_sample_rate(), SAMPLE_RATE_OUT).numpy()
    pcm = np.clip(np.round(audio * 32768), -32768, 32767).astype(np.int16)  # resampling can overshoot
    buf = io.BytesIO()
    sf.write(buf, pcm, SAMPLE_RATE_OUT, format="FLAC", subtype="PCM_16")
    return buf.getvalue(), len(pcm) / SAMPLE_RATE_OUT


def _members(part: str, rows: list[dict]) -> dict[str, bytes]:
    """Member name -> bytes: the FLACs, a trans.txt per chapter and SPEAKERS.TXT, as in LibriSpeech."""
    members, lines, seconds = {}, {}, {}
    for r in rows:
        chapter = f"LibriSpeech/{part}/{r['speaker']}/{r['chapter']}"
        members[f"{chapter}/{r['id']}.flac"], duration = _flac(r["text"], r["voice"])
        trans = f"{chapter}/{r['speaker']}-{r['chapter']}.trans.txt"
        lines[trans] = lines.get(trans, "") + f"{r['id']} {transcript(r['text'])}\n"
        seconds[r["speaker"]] = seconds.get(r["speaker"], 0.0) + duration
    members.update({name: text.encode() for name, text in lines.items()})
    table = "; demo-espeak: eSpeak NG voices as speakers\n;ID  |SEX| SUBSET           |MINUTES| NAME\n"
    for spk in sorted(seconds):
        sex = "F" if VOICES[spk].partition("+")[2].startswith("f") else "M"  # variants fN are female
        table += f"{spk:<5}| {sex} | {part:<17}| {seconds[spk] / 60:5.2f} | {VOICES[spk]}\n"
    members["LibriSpeech/SPEAKERS.TXT"] = table.encode()
    return members


def _write_tar_gz(path: Path, members: dict[str, bytes]) -> None:
    """Byte-reproducible: sorted members, zero times and owners, no name or time in the gzip header."""
    with open(path, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = len(members[name]), 0, 0o644, 0, 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(members[name]))


def build_archive(count: int, folder: str | Path, seed: int = 0) -> tuple[Path, str]:
    """Write folder/demo-{count}.tar.gz in the LibriSpeech layout; returns (path, sha256 hex).

    The folder/demo-{count}.json marker is written last: when it matches and the archive has its
    size, the archive is whole and current and comes back without synthesizing anything.
    """
    folder, part = Path(folder), f"demo-{count}"
    archive, marker = folder / f"{part}.tar.gz", folder / f"{part}.json"
    try:
        done = json.loads(marker.read_text())
        if ((done["count"], done["seed"], done["version"]) == (count, seed, SPEECH_VERSION)
                and archive.stat().st_size == done["size"]):
            return archive, done["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    marker.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    members = _members(part, utterances(count, seed))
    write_atomically(archive, lambda tmp: _write_tar_gz(tmp, members))
    with open(archive, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    record = {"count": count, "seed": seed, "sha256": sha, "size": archive.stat().st_size,
              "version": SPEECH_VERSION}
    write_atomically(marker, lambda tmp: tmp.write_text(json.dumps(record)))
    return archive, sha
