"""The shapes demo corpus: deterministic scenes, exact captions, and images that show them."""
from __future__ import annotations

import itertools
import json
import math
import os
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.demo import shapes
from pipeline.demo.shapes import (BACKGROUNDS, COLORS, POSITIONS, SHAPE_KINDS, SIZES, Scene, Shape,
                                  caption, demo_rows, draw, materialize, parse_caption, scene_for)


def test_scene_for_and_rows_are_deterministic_per_index():
    assert [scene_for(i, 3) for i in range(50)] == [scene_for(i, 3) for i in reversed(range(50))][::-1]
    assert demo_rows(40, seed=7) == demo_rows(40, seed=7)
    assert demo_rows(40, seed=7)[:10] == demo_rows(10, seed=7)  # a row does not depend on count
    assert demo_rows(40, seed=7) != demo_rows(40, seed=8)
    row = demo_rows(3)[2]
    assert row == {"url": "demo://shapes/000002.png", "caption": caption(scene_for(2)), "index": 2}


def test_sampling_covers_the_vocabulary_and_respects_the_rules():
    scenes = [scene_for(i) for i in range(2000)]
    counts = Counter(len(s.shapes) for s in scenes)
    assert 0.4 < counts[1] / len(scenes) < 0.6 and counts[1] + counts[2] == len(scenes)
    every = [shape for s in scenes for shape in s.shapes]
    assert {s.kind for s in every} == set(SHAPE_KINDS)
    assert {s.color for s in every} == set(COLORS)
    assert {s.size for s in every} == set(SIZES)
    assert {s.position for s in every} == set(POSITIONS)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    for s in scenes:
        if len(s.shapes) == 2:
            a, b = s.shapes
            assert a.position != b.position and (a.kind, a.color) != (b.kind, b.color)


def test_palette_is_far_apart_and_far_from_backgrounds():
    for a, b in itertools.combinations(COLORS.values(), 2):
        assert math.dist(a, b) >= 100
    for color, background in itertools.product(COLORS.values(), BACKGROUNDS.values()):
        assert math.dist(color, background) >= 100


def test_caption_round_trips():
    for i in range(500):
        scene = scene_for(i, seed=1)
        assert parse_caption(caption(scene)) == scene
    scene = Scene((Shape("circle", "red", "small", "top left"), Shape("star", "blue", "large", "bottom right")), "gray")
    text = "a small red circle at the top left and a large blue star at the bottom right on a gray background"
    assert caption(scene) == text and parse_caption(text) == scene


@pytest.mark.parametrize("text, part", [
    ("a tiny red circle at the top on a gray background", "a tiny red circle at the top"),
    ("a small red circle at the top and a large red circle at the left on a gray background",
     "share both kind and color"),
    ("a small red circle at the top on a neon background", "background"),
    ("a small red circle at the top", "background"),
])
def test_parse_caption_names_what_is_wrong(text, part):
    with pytest.raises(ValueError, match=part):
        parse_caption(text)


def _cell(y, x, size):
    return POSITIONS[(y * 3 // size) * 3 + x * 3 // size]


@pytest.mark.parametrize("size", [128, 64])
def test_drawn_pixels_are_exactly_the_captioned_shapes(size):
    for i in range(150):
        scene = scene_for(i, seed=size)
        pixels = np.asarray(draw(scene, size))
        assert pixels.shape == (size, size, 3)
        drawn = np.any(pixels != BACKGROUNDS[scene.background], axis=-1)
        frame = np.ones_like(drawn)
        frame[1:-1, 1:-1] = False
        assert not drawn[frame].any()  # every shape is inside the image, with a margin
        by_position = {s.position: s for s in scene.shapes}
        ys, xs = np.nonzero(drawn)
        assert {_cell(y, x, size) for y, x in zip(ys, xs)} == set(by_position)  # empty cells show background
        for position, shape in by_position.items():
            in_cell = [(y, x) for y, x in zip(ys, xs) if _cell(y, x, size) == position]
            colors = Counter(tuple(pixels[y, x]) for y, x in in_cell)
            assert colors.most_common(1)[0][0] == COLORS[shape.color]
            width = max(x for _, x in in_cell) - min(x for _, x in in_cell) + 1
            side = shapes._SIZE_FRACTION[shape.size] * size
            # PIL fills both edges of a box, so a drawn extent can exceed it by up to two pixels
            assert 0.9 * side - 1 <= width <= side + 2, (caption(scene), position, width, side)


@pytest.mark.parametrize("kind, fill", [("square", 1.0), ("circle", math.pi / 4), ("triangle", 0.5),
                                        ("diamond", 0.5), ("cross", 0.58), ("star", 0.37)])
def test_kinds_are_told_apart_by_area_and_profile(kind, fill):
    side = shapes._SIZE_FRACTION["large"] * 128 + 1  # PIL fills both edges of a box
    drawn = np.any(np.asarray(draw(Scene((Shape(kind, "red", "large", "center"),), "gray"))) != 128, axis=-1)
    assert abs(drawn.sum() / side**2 - fill) < 0.06
    rows = drawn.sum(axis=1)[drawn.any(axis=1)]
    widest = np.argmax(rows) / (len(rows) - 1)  # where the widest row lies, 0 top to 1 bottom
    if kind == "triangle":  # same area as a diamond, told apart by where it is widest
        assert widest > 0.9
    if kind == "diamond":
        assert 0.35 < widest < 0.65


def test_materialize_writes_once_and_redraws_on_change(tmp_path):
    table = materialize(6, tmp_path, seed=2, size=64)
    assert table == tmp_path / "shapes.parquet"
    rows = pq.read_table(table).to_pylist()
    assert rows == demo_rows(6, seed=2)
    files = sorted((tmp_path / "shapes").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(6)]
    for i, f in enumerate(files):
        with Image.open(f) as image:
            assert image.mode == "RGB" and image.size == (64, 64)
            assert np.array_equal(np.asarray(image), np.asarray(draw(scene_for(i, 2), 64)))
    marker = json.loads((tmp_path / ".complete").read_text())
    assert marker == {"count": 6, "seed": 2, "size": 64, "version": shapes.SHAPES_VERSION}
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]

    old = 1_000_000_000  # far in the past, so any rewrite shows even on coarse-clock filesystems
    for f in [*files, table]:
        os.utime(f, (old, old))
    assert materialize(6, tmp_path, seed=2, size=64) == table
    assert all(f.stat().st_mtime == old for f in [*files, table])

    materialize(4, tmp_path, seed=2, size=64)  # a different count redraws, dropping extra files
    assert sorted(f.name for f in (tmp_path / "shapes").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    assert all(f.stat().st_mtime != old for f in [*files[:4], table])
    assert len(pq.read_table(table)) == 4

    for f in (tmp_path / "shapes").iterdir():
        os.utime(f, (old, old))
    (tmp_path / ".complete").unlink()  # as if a crash came before the marker: draw everything again
    materialize(4, tmp_path, seed=2, size=64)
    assert all(f.stat().st_mtime != old for f in (tmp_path / "shapes").iterdir())
