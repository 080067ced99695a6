"""LibriTTS (openslr 60) and LibriTTS-R (openslr 141), 24 kHz:
{LibriTTS|LibriTTS_R}/{part}/{speaker}/{chapter}/{id}.wav with {id}.normalized.txt and
{id}.original.txt beside each file. The normalized text is the transcript; the original is kept."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from pipeline.recipes.base import Recipe, Utterance, read_text

PARTS = ("dev-clean", "dev-other", "test-clean", "test-other", "train-clean-100", "train-clean-360",
         "train-other-500")
# sha256 of the official LibriTTS archives (as pinned by torchaudio's LIBRITTS dataset)
LIBRITTS_SHA256 = {
    "dev-clean": "da0864e1bd26debed35da8a869dd5c04dfc27682921936de7cff9c8a254dbe1a",
    "dev-other": "d413eda26f3a152ac7c9cf3658ef85504dfb1b625296e5fa83727f5186cca79c",
    "test-clean": "234ea5b25859102a87024a4b9b86641f5b5aaaf1197335c95090cde04fe9a4f5",
    "test-other": "33a5342094f3bba7ccc2e0500b9e72d558f72eb99328ac8debe1d9080402f10d",
    "train-clean-100": "c5608bf1ef74bb621935382b8399c5cdd51cd3ee47cec51f00f885a64c6c7f6b",
    "train-clean-360": "ce7cff44dcac46009d18379f37ef36551123a1dc4e5c8e4eb73ae57260de4886",
    "train-other-500": "e35f7e34deeb2e2bdfe4403d88c8fdd5fbf64865cae41f027a185a6965f0a5df",
}


def list_utterances(root: Path, part: str, config: Any = None) -> Iterator[Utterance]:
    """Every .wav and every .normalized.txt of the part; unmatched ones come with a None side."""
    for chapter_dir in sorted(p for p in root.glob("*/*/*/*") if p.is_dir()):
        speaker, chapter = chapter_dir.parent.name, chapter_dir.name
        audio = {p.stem: p for p in chapter_dir.glob("*.wav")}
        texts = {p.name[:-len(".normalized.txt")]: p for p in chapter_dir.glob("*.normalized.txt")}
        for uid in sorted(audio.keys() | texts.keys()):
            original = chapter_dir / f"{uid}.original.txt"
            extra = (("chapter", chapter),) + ((("original_text", read_text(original)),) if original.exists() else ())
            yield Utterance(uid, speaker, read_text(texts[uid]) if uid in texts else None,
                            str(audio[uid]) if uid in audio else None, extra)


LIBRITTS = Recipe("libritts", "en-us", list_utterances, "https://www.openslr.org/resources/60/",
                  {p: (f"{p}.tar.gz", LIBRITTS_SHA256[p]) for p in PARTS})
# LibriTTS-R's archives use underscores; no sha256 is published for them, so a spec must give
# `checksums` (the stage refuses to download an archive it cannot verify).
LIBRITTS_R = Recipe("libritts-r", "en-us", list_utterances, "https://www.openslr.org/resources/141/",
                    {p: (f"{p.replace('-', '_')}.tar.gz", None) for p in PARTS})
