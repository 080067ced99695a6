"""Phonemes with eSpeak NG through phonemizer, using the library and voice data that the
espeakng-loader wheel ships, so nothing is needed from the operating system."""
from __future__ import annotations

import os
from functools import lru_cache

WORD_SEPARATOR = " | "   # phones are space-separated, words by " | "


@lru_cache(maxsize=None)
def _backend(language: str):
    import espeakng_loader
    from phonemizer.backend import EspeakBackend
    from phonemizer.backend.espeak.wrapper import EspeakWrapper

    EspeakWrapper.set_library(espeakng_loader.get_library_path())
    os.environ["ESPEAK_DATA_PATH"] = espeakng_loader.get_data_path()
    return EspeakBackend(language, preserve_punctuation=False, with_stress=False,
                         language_switch="remove-flags")


def phonemize(texts: list[str], language: str = "en-us") -> list[str]:
    """IPA phones of each text, e.g. "h ə l oʊ | w ɜː l d"; one call for the whole batch."""
    from phonemizer.separator import Separator

    if not texts:
        return []
    return _backend(language).phonemize(texts, separator=Separator(phone=" ", word=WORD_SEPARATOR, syllable=""),
                                        strip=True, njobs=1)
