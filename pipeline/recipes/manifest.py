"""Any other corpus: a TSV, CSV or parquet manifest with audio (path or URL), text and speaker.

Relative audio paths are taken relative to the manifest. The column names are the stage's
`audio_col`, `text_col` and `speaker_col`; the id is `id_col` when the manifest has it,
else the audio file's stem.
"""
from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any, Iterator

from pipeline.data import url_list
from pipeline.recipes.base import Recipe, Utterance


def list_utterances(root: str, part: str, config: Any) -> Iterator[Utterance]:
    """One utterance per manifest row; empty cells become None (counted by the stage)."""
    base = str(root).rsplit("/", 1)[0]
    for index, row in enumerate(url_list.iter_rows(str(root))):
        audio = _cell(row, config.audio_col)
        if audio and "://" not in audio and not audio.startswith("/"):
            audio = f"{base}/{audio}"
        uid = _cell(row, config.id_col) or (PurePosixPath(audio).stem if audio else f"row-{index}")
        yield Utterance(uid, _cell(row, config.speaker_col) or "unknown", _cell(row, config.text_col), audio)


def _cell(row: dict, column: str | None) -> str | None:
    value = row.get(column) if column else None
    return None if value is None or str(value).strip() == "" else str(value).strip()


RECIPE = Recipe("manifest", "en-us", list_utterances)
