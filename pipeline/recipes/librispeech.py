"""LibriSpeech (openslr 12): LibriSpeech/{part}/{speaker}/{chapter}/{speaker}-{chapter}-{n}.flac
with one `{speaker}-{chapter}.trans.txt` per chapter ("ID TRANSCRIPT" lines, upper case)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from pipeline.recipes.base import Recipe, Utterance

# sha256 of the official archives (as pinned by torchaudio's LIBRISPEECH dataset)
ARCHIVES = {
    "dev-clean": ("dev-clean.tar.gz", "76f87d090650617fca0cac8f88b9416e0ebf80350acb97b343a85fa903728ab3"),
    "dev-other": ("dev-other.tar.gz", "12661c48e8c3fe1de2c1caa4c3e135193bfb1811584f11f569dd12645aa84365"),
    "test-clean": ("test-clean.tar.gz", "39fde525e59672dc6d1551919b1478f724438a95aa55f874b576be21967e6c23"),
    "test-other": ("test-other.tar.gz", "d09c181bba5cf717b3dee7d4d592af11a3ee3a09e08ae025c5506f6ebe961c29"),
    "train-clean-100": ("train-clean-100.tar.gz", "d4ddd1d5a6ab303066f14971d768ee43278a5f2a0aa43dc716b0e64ecbbbf6e2"),
    "train-clean-360": ("train-clean-360.tar.gz", "146a56496217e96c14334a160df97fffedd6e0a04e66b9c5af0d40be3c792ecf"),
    "train-other-500": ("train-other-500.tar.gz", "ddb22f27f96ec163645d53215559df6aa36515f26e01dd70798188350adcb6d2"),
}


def list_utterances(root: Path, part: str, config: Any = None) -> Iterator[Utterance]:
    """Every transcript line and every FLAC of the part; unmatched ones come with a None side."""
    for chapter_dir in sorted(p for p in root.glob("*/*/*/*") if p.is_dir()):
        speaker, chapter = chapter_dir.parent.name, chapter_dir.name
        texts: dict[str, str] = {}
        for trans in chapter_dir.glob("*.trans.txt"):
            for line in trans.read_text(encoding="utf-8").splitlines():
                uid, _, text = line.strip().partition(" ")
                if uid:
                    texts[uid] = text.strip()
        audio = {p.name[:-len(".flac")]: str(p) for p in chapter_dir.glob("*.flac")}
        for uid in sorted(texts.keys() | audio.keys()):
            yield Utterance(uid, speaker, texts.get(uid), audio.get(uid), (("chapter", chapter),))


RECIPE = Recipe("librispeech", "en-us", list_utterances, "https://www.openslr.org/resources/12/", ARCHIVES)
