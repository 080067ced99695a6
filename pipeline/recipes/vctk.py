"""VCTK 0.92 (a zip): wav48_silence_trimmed/{speaker}/{speaker}_{n}_mic1.flac and txt/{speaker}/{speaker}_{n}.txt.
Microphone 1 only; p315 has no transcripts, so its files are counted as failures like any gap."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from pipeline.recipes.base import Recipe, Utterance, read_text

MIC = "mic1"


def list_utterances(root: Path, part: str, config: Any = None) -> Iterator[Utterance]:
    """Every mic1 recording and every transcript; unmatched ones come with a None side."""
    audio = {p.name[:-len(f"_{MIC}.flac")]: p for p in root.glob(f"**/wav48_silence_trimmed/*/*_{MIC}.flac")}
    texts = {p.stem: p for p in root.glob("**/txt/*/*.txt")}
    for uid in sorted(audio.keys() | texts.keys()):
        yield Utterance(uid, uid.split("_")[0], read_text(texts[uid]) if uid in texts else None,
                        str(audio[uid]) if uid in audio else None)


# sha256 as pinned by torchaudio's VCTK_092 dataset
RECIPE = Recipe("vctk", "en-gb", list_utterances, "https://datashare.is.ed.ac.uk/bitstream/handle/10283/3443/",
                {"VCTK-Corpus-0.92": ("VCTK-Corpus-0.92.zip",
                                      "f96258be9fdc2cbff6559541aae7ea4f59df3fcaf5cf963aae5ca647357e359c")})
