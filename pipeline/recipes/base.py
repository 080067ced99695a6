"""What a speech corpus recipe is: its archives, and how to list the utterances of a part."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator


@dataclass(frozen=True)
class Utterance:
    """One utterance as the corpus lists it; gaps are kept so the stage can count them."""
    id: str
    speaker: str
    text: str | None                  # None: audio without a transcript line
    audio: str | None                 # local path or URL; None: a transcript line without audio
    extra: tuple[tuple[str, str], ...] = ()   # corpus fields kept in the sample JSON (chapter, original text)


@dataclass(frozen=True)
class Recipe:
    """A corpus: its archives per part, and a function listing a part's utterances.

    `list_utterances(root, part, config)` walks the extracted part at `root` (for archive
    corpora) or reads the manifest at `root` (for `manifest`), in any order.
    """
    name: str
    language: str                                         # eSpeak NG language for phonemes
    list_utterances: Callable[[Path, str, Any], Iterator[Utterance]]
    base_url: str | None = None
    archives: dict[str, tuple[str, str | None]] = field(default_factory=dict)   # part -> (file, sha256)

    def archive(self, part: str) -> tuple[str, str | None]:
        """(file name, pinned sha256 or None) of a part; KeyError lists the known parts."""
        if part not in self.archives:
            raise KeyError(f"{self.name} has no part {part!r} (parts: {', '.join(self.archives)})")
        return self.archives[part]


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip()
