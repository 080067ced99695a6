"""The content check: reading shapes-corpus scenes back from originals and degraded images."""
from __future__ import annotations

import io
from dataclasses import asdict, replace

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pipeline.demo.analyzer import Score, analyze, score, score_many
from pipeline.demo.shapes import BACKGROUNDS, POSITIONS, Scene, Shape, draw, scene_for

SCENES = [scene_for(i) for i in range(300)]
ATTRIBUTES = ("color", "kind", "size", "position", "background")


def jpeg(image: Image.Image, quality: int = 75) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def blurred(image: Image.Image) -> Image.Image:
    """Stands in for a VQ reconstruction: detail lost at the edges, flat areas kept."""
    return image.filter(ImageFilter.GaussianBlur(1.0))


DEGRADATIONS = {
    "original 128": lambda scene: draw(scene, 128),
    "original 64": lambda scene: draw(scene, 64),
    "64 + JPEG 75": lambda scene: jpeg(draw(scene, 64)),
}


@pytest.mark.parametrize("name", DEGRADATIONS)
def test_originals_are_read_back(name):
    # Measured on these 300 scenes: 1.0 for every attribute and exact, in all three settings.
    result = score_many((scene, DEGRADATIONS[name](scene)) for scene in SCENES)
    assert result["count"] == len(SCENES)
    assert all(result[a] >= 0.99 for a in ATTRIBUTES), result
    assert result["exact"] >= 0.97, result


def test_blurred_reconstructions_are_read_back():
    # Measured: 1.0 everywhere for the blur alone; blur then JPEG 75 gives kind 0.988, exact 0.983.
    plain = score_many((scene, blurred(draw(scene, 64))) for scene in SCENES)
    assert all(plain[a] >= 0.99 for a in ATTRIBUTES) and plain["exact"] >= 0.97, plain
    both = score_many((scene, jpeg(blurred(draw(scene, 64)))) for scene in SCENES)
    assert all(both[a] >= 0.99 for a in ("color", "size", "position", "background")), both
    assert both["kind"] >= 0.97 and both["exact"] >= 0.95, both


def test_noisy_off_center_images_are_mostly_read_back():
    # Generated images are noisy and place shapes loosely: noise sigma 20 plus a 2 px shift.
    # Measured: every attribute >= 0.993, exact 0.987.
    rng = np.random.default_rng(0)

    def generated(scene):
        pixels = np.roll(np.asarray(draw(scene, 64), float), (2, -2), axis=(0, 1))
        return np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)

    result = score_many((scene, generated(scene)) for scene in SCENES[:150])
    assert all(result[a] >= 0.97 for a in ATTRIBUTES) and result["exact"] >= 0.9, result


def test_every_kind_color_size_and_position_is_told_apart_at_64_after_jpeg():
    for i, position in enumerate(POSITIONS):
        for kind in ("circle", "square", "triangle", "star", "cross", "diamond"):
            for size, color in (("small", "red"), ("large", "purple")):
                background = tuple(BACKGROUNDS)[i % len(BACKGROUNDS)]
                scene = Scene((Shape(kind, color, size, position),), background)
                assert analyze(jpeg(draw(scene, 64))) == scene


def test_blank_image_gives_a_valid_scene_that_scores_nothing():
    for background, rgb in BACKGROUNDS.items():
        for image in (Image.new("RGB", (64, 64), rgb), np.full((128, 128, 3), rgb, np.uint8)):
            found = analyze(image)
            assert len(found.shapes) == 1 and found.background == background
            elsewhere = next(p for p in POSITIONS if p != found.shapes[0].position)
            expected = Scene((Shape("star", "red", "large", elsewhere),), background)
            assert score(expected, image) == Score(0.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def test_odd_inputs_never_raise():
    odd = [np.zeros((0, 0, 3), np.uint8), np.zeros(5, np.uint8), np.zeros((1, 1), np.uint8),
           np.random.default_rng(0).random((10, 7, 2)), np.full((3, 3, 4), 300), np.full((8, 8, 3), np.nan),
           np.zeros((2, 2, 2, 3)), Image.new("RGB", (0, 0)), Image.new("L", (10, 10)), Image.new("I;16", (9, 9)),
           Image.new("F", (5, 5)), Image.new("P", (30, 40)), Image.new("RGBA", (1000, 10), (255, 0, 0, 0))]
    for image in odd:
        found = analyze(image)
        assert isinstance(found, Scene) and 1 <= len(found.shapes) <= 2


def test_a_different_scene_scores_low():
    result = score_many((scene, draw(other, 64)) for scene, other in zip(SCENES[:150], SCENES[1:151]))
    assert result["exact"] == 0.0, result
    assert max(result["color"], result["kind"], result["size"], result["position"]) < 0.25, result  # measured 0.15 at most


def test_score_matches_shapes_by_position():
    first, second = Shape("triangle", "blue", "large", "top left"), Shape("cross", "yellow", "small", "center")
    expected = Scene((first, second), "beige")
    assert score(expected, draw(expected)) == Score(1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    # The second shape is missing: it scores 0 on every attribute, the first still counts.
    assert score(expected, draw(Scene((first,), "beige"))) == Score(0.5, 0.5, 0.5, 0.5, 1.0, 0.0)
    # One attribute wrong on one shape, and the background wrong.
    recolored = Scene((first, replace(second, color="green")), "gray")
    assert score(expected, draw(recolored)) == Score(0.5, 1.0, 1.0, 1.0, 0.0, 0.0)
    # The right shape in the wrong cell counts as missing.
    moved = Scene((first, replace(second, position="bottom right")), "beige")
    assert score(expected, draw(moved)) == Score(0.5, 0.5, 0.5, 0.5, 1.0, 0.0)


def test_score_many_averages_each_field():
    pairs = [(scene, draw(scene if i % 3 else SCENES[i + 1], 64)) for i, scene in enumerate(SCENES[:12])]
    scores = [asdict(score(scene, image)) for scene, image in pairs]
    result = score_many(pairs)
    assert result["count"] == 12
    for field in (*ATTRIBUTES, "exact"):
        assert result[field] == pytest.approx(sum(s[field] for s in scores) / 12)
    assert 0 < result["exact"] < 1  # the mix of right and wrong images is seen
    assert score_many([]) == {**{field: 0.0 for field in (*ATTRIBUTES, "exact")}, "count": 0.0}


def test_analysis_is_deterministic():
    images = [jpeg(draw(scene, 64)) for scene in SCENES[:20]]
    first = [analyze(image) for image in images]
    assert [analyze(image) for image in reversed(images)][::-1] == first
    assert [analyze(np.asarray(image)) for image in images] == first  # array or PIL alike
