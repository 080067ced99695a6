"""demo-espeak: the offline demo speech corpus, eSpeak NG voices as speakers, LibriSpeech layout.

Parts are named `demo-N` (N utterances). Archives are synthesized once into the local cache;
the stage serves that folder on 127.0.0.1 and the real librispeech path downloads, verifies
and lists them, so the demo exercises exactly what a real corpus goes through.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.recipes import librispeech
from pipeline.recipes.base import Recipe
from pipeline.storage import cache_dir

PART = re.compile(r"demo-(\d+)$")


@dataclass(frozen=True)
class DemoRecipe(Recipe):
    def archive(self, part: str) -> tuple[str, str | None]:
        if not PART.match(part) or int(PART.match(part).group(1)) < 1:
            raise KeyError(f"{self.name} parts are named demo-N with N utterances, not {part!r}")
        return f"{part}.tar.gz", None

    def materialize(self, parts: list[str]) -> tuple[Path, dict[str, str]]:
        """Synthesize the parts' archives (once); returns (folder to serve, {file: sha256})."""
        from pipeline.demo import speech

        folder = cache_dir() / "demo" / f"espeak-v{speech.SPEECH_VERSION}"
        checksums = {}
        for part in parts:
            self.archive(part)
            archive, sha256 = speech.build_archive(int(PART.match(part).group(1)), folder)
            checksums[archive.name] = sha256
        return folder, checksums


RECIPE = DemoRecipe("demo-espeak", "en-us", librispeech.list_utterances)
