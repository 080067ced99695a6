"""LJSpeech 1.1: one speaker; LJSpeech-1.1/metadata.csv ("id|text|normalized text") and wavs/{id}.wav."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from pipeline.recipes.base import Recipe, Utterance

SPEAKER = "LJ"


def list_utterances(root: Path, part: str, config: Any = None) -> Iterator[Utterance]:
    """Rows of metadata.csv (normalized text as transcript) and every wav; unmatched get a None side."""
    (metadata,) = root.glob("*/metadata.csv")
    texts, originals = {}, {}
    for line in metadata.read_text(encoding="utf-8").splitlines():
        fields = line.split("|")
        if len(fields) >= 2 and fields[0]:
            originals[fields[0]] = fields[1].strip()
            texts[fields[0]] = (fields[2] if len(fields) > 2 and fields[2].strip() else fields[1]).strip()
    audio = {p.stem: str(p) for p in (metadata.parent / "wavs").glob("*.wav")}
    for uid in sorted(texts.keys() | audio.keys()):
        extra = (("original_text", originals[uid]),) if uid in originals else ()
        yield Utterance(uid, SPEAKER, texts.get(uid), audio.get(uid), extra)


# sha256 as pinned by torchaudio's LJSPEECH dataset
RECIPE = Recipe("ljspeech", "en-us", list_utterances, "https://data.keithito.com/data/speech/",
                {"LJSpeech-1.1": ("LJSpeech-1.1.tar.bz2",
                                  "be1a30453f28eb8dd26af4101ae40cbf2c50413b1bb21936cbcdc6fae3de8aa5")})
