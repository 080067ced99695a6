"""Speech corpus recipes (Lhotse style): archives to download per part, and utterance listings.

The registry is a plain table; adding a corpus is one module with a `Recipe` and one line here.
"""
from pipeline.recipes import demo_espeak, librispeech, libritts, ljspeech, manifest, vctk
from pipeline.recipes.base import Recipe, Utterance

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    librispeech.RECIPE, libritts.LIBRITTS, libritts.LIBRITTS_R, ljspeech.RECIPE, vctk.RECIPE,
    manifest.RECIPE, demo_espeak.RECIPE)}

__all__ = ["RECIPES", "Recipe", "Utterance"]
