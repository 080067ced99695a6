"""Read a shapes-corpus scene back from an image: the content check for tokenizers and t2i models.

Every step leans on the corpus rules in shapes.py: the background shows on the image border and
on the 3x3 grid lines (shapes stay wholly inside their cell), shape colors sit at least 100 away
from every background, and kind and size are read together by matching the cell against masks
that shapes.draw itself renders, so the analyzer cannot drift from the drawing code.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np
from PIL import Image

from pipeline.demo.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPE_KINDS, SIZES, Scene, Shape, draw

ImageLike = Image.Image | np.ndarray  # RGB, uint8 HxWx3 for arrays

CELL = 32  # working cell side: a 96 px image, so cells are whole pixels
WORK = 3 * CELL
BLURS = (0.0, 1.0, 2.0, 3.0)  # Gaussian sigmas in working pixels tried on each template
SIDES = (24, 512)  # templates are drawn at the input's side, kept in this range
FOREGROUND_DISTANCE = 50.0  # RGB distance from the background; half the corpus' minimum contrast
MIN_CONTRAST = 25.0  # a luma or chroma difference below this is mostly noise
DENOISE = 1.0  # Gaussian sigma in working pixels applied before measuring distances
MARGIN = 3  # working pixels at each cell edge left out when looking for a shape
MIN_AREA = 0.06  # of a cell's inside: the smallest shape covers >= 0.15 even blurred, noise <= 0.03
CORE = 0.04  # of a cell: its pixels farthest from the background, inside even a small star (~0.11)
_COLOR_NAMES, _COLOR_VALUES = tuple(COLORS), np.array(list(COLORS.values()), float)
_BG_NAMES, _BG_VALUES = tuple(BACKGROUNDS), np.array(list(BACKGROUNDS.values()), float)
_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]])  # JPEG's own


def _rgb(image: ImageLike) -> tuple[np.ndarray, int]:
    """`image` as floats at WORK x WORK, and its side; odd inputs become the nearest sensible RGB."""
    raw = np.asarray(image.convert("RGBA") if isinstance(image, Image.Image) else image)
    array = np.nan_to_num(raw.astype(float))
    if raw.dtype.kind == "f" and array.size and array.max() <= 1.0:
        array = array * 255  # a float image in [0, 1]
    array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or 0 in array.shape:
        array = np.full((1, 1, 3), 128, np.uint8)  # nothing readable: a plain gray image
    array = np.repeat(array, 3, axis=2)[..., :3] if array.shape[2] < 3 else array[..., :3]
    # BILINEAR is antialiased when shrinking and smooth when enlarging, like the box-filtered templates.
    resized = Image.fromarray(np.ascontiguousarray(array)).resize((WORK, WORK), Image.BILINEAR)
    return np.asarray(resized, float), int(np.clip(max(array.shape[:2]), *SIDES))


def _background(rgb: np.ndarray) -> np.ndarray:
    """Median color on the border and the grid lines, where the corpus draws nothing."""
    lines = np.zeros((WORK, WORK), bool)
    for edge in (0, CELL - 1, CELL, 2 * CELL - 1, 2 * CELL, WORK - 1):
        lines[edge, :] = lines[:, edge] = True
    return np.median(rgb[lines], axis=0)


def _nearest(value: np.ndarray, names: tuple[str, ...], values: np.ndarray) -> str:
    return names[int(np.argmin(np.linalg.norm(values - value, axis=1)))]


@lru_cache(maxsize=None)
def _drawn_mask(kind: str, size: str, side: int) -> Image.Image:
    """Float mask of one centered shape drawn by shapes.draw at `side` px, rasterization included."""
    scene = Scene((Shape(kind, "white", size, "center"),), "dark gray")
    return Image.fromarray((np.asarray(draw(scene, side))[..., 1] == 255).astype(np.float32), "F")


def _template(kind: str, size: str, side: int, shift=(0.0, 0.0)) -> np.ndarray:
    """Coverage of a working cell by `kind`, resampled like the image, moved by `shift` working px."""
    # Sampling a shifted box of the drawing moves the shape by sub-pixel amounts at no extra cost.
    top, left = side / 3 - shift[0] * side / WORK, side / 3 - shift[1] * side / WORK
    box = (left, top, left + side / 3, top + side / 3)
    return np.asarray(_drawn_mask(kind, size, side).resize((CELL, CELL), Image.BILINEAR, box=box))


def _centroid(mass: np.ndarray) -> np.ndarray:
    """(row, column) center of mass of a cell; its middle when the cell is empty."""
    total = mass.sum()
    if total <= 0:
        return np.full(2, (CELL - 1) / 2)
    grid = np.arange(CELL, dtype=float)
    return np.array([(mass.sum(axis=1) * grid).sum(), (mass.sum(axis=0) * grid).sum()]) / total


@lru_cache(maxsize=None)
def _blur_matrix(sigma: float, side: int = CELL) -> np.ndarray:
    """Row-normalized Gaussian along one axis: G @ mask @ G.T blurs a `side` x `side` mask."""
    offsets = np.subtract.outer(np.arange(side), np.arange(side))
    weights = np.exp(-0.5 * (offsets / sigma) ** 2) if sigma else (offsets == 0).astype(float)
    return weights / weights.sum(axis=1, keepdims=True)


def _kind_and_size(delta: np.ndarray, contrast: np.ndarray, side: int, exclude: str = "") -> tuple[str, str]:
    """The template that, painted in `contrast` over the background, best fits the cell's `delta`.

    Both are YCbCr differences from the background. JPEG keeps luma sharp but blurs chroma, so each
    is compared at the blur that fits it best: a blurred spiky shape would otherwise look more like
    a smaller round one than like itself, and a shape that differs from its background mostly in
    chroma (purple on dark gray) still shows its outline in luma.
    """
    alpha = np.clip(delta @ contrast / max(float(contrast @ contrast), 1.0), 0, 1)  # soft coverage
    target = _centroid(alpha)

    def misfit(kind_size: tuple[str, str]) -> float:
        # Aligning forgives a shape drawn off-center (generated images) without a costly search;
        # the clamp keeps the template inside its cell whatever the mask looks like.
        shift = np.clip(target - _centroid(_template(*kind_size, side)), -CELL / 4, CELL / 4)
        template = _template(*kind_size, side, shift)
        blurred = [blur @ template @ blur.T for blur in map(_blur_matrix, BLURS)]
        error = 0.0
        for part in (slice(0, 1), slice(1, 3)):  # luma, chroma
            squared = min(float(((delta[..., part] - b[..., None] * contrast[part]) ** 2).sum()) for b in blurred)
            # In units of coverage, so a part with little contrast (mostly noise) counts less.
            error += squared / max(float(contrast[part] @ contrast[part]), MIN_CONTRAST ** 2)
        return error

    return min(((kind, size) for kind in SHAPE_KINDS if kind != exclude for size in SIZES), key=misfit)


def _read_cell(rgb: np.ndarray, background: np.ndarray, distance: np.ndarray, side: int, index: int,
               exclude: str = "") -> Shape:
    """The shape in cell `index`: color from its core, kind and size from its outline."""
    cell, distance = rgb[_cell(index)], distance[_cell(index)]
    # The pixels farthest from the background are the shape's core, untouched by blur at its edge.
    color = _nearest(np.median(cell[distance >= np.quantile(distance, 1 - CORE)], axis=0),
                     _COLOR_NAMES, _COLOR_VALUES)
    # The palette color, not the measured one, sets the contrast: blur dims the core of a small shape.
    kind, size = _kind_and_size((cell - background) @ _YCBCR.T, (COLORS[color] - background) @ _YCBCR.T,
                                side, exclude)
    return Shape(kind, color, size, POSITIONS[index])


def _cell(index: int, margin: int = 0) -> tuple[slice, slice]:
    """Index of grid cell `index` (row-major, like POSITIONS) in the working image, less `margin`."""
    row, col = divmod(index, 3)
    return tuple(slice(k * CELL + margin, (k + 1) * CELL - margin) for k in (row, col))


def analyze(image: ImageLike) -> Scene:
    """Best reading of an RGB image (PIL or uint8 HxWx3, any size) as a Scene of 1 or 2 shapes."""
    rgb, side = _rgb(image)
    background = _background(rgb)
    # Distances are taken on a smoothed copy: noise (generated images) would otherwise pass for shapes.
    smooth = _blur_matrix(DENOISE, WORK)
    smoothed = (smooth @ rgb.transpose(2, 0, 1) @ smooth.T).transpose(1, 2, 0)
    distance = np.linalg.norm(smoothed - background, axis=2)
    # Foreground is counted inside a margin: a blurred shape bleeds a little into the next cell.
    inner = [distance[_cell(i, MARGIN)] for i in range(len(POSITIONS))]
    areas = [float((d > FOREGROUND_DISTANCE).mean()) for d in inner]
    ranked = sorted(range(len(POSITIONS)), key=lambda i: (-areas[i], -float(inner[i].mean()), i))
    chosen = sorted([i for i in ranked[:2] if areas[i] > MIN_AREA] or ranked[:1])  # at least one shape
    shapes = [_read_cell(rgb, background, distance, side, i) for i in chosen]
    if len(shapes) == 2 and (shapes[0].kind, shapes[0].color) == (shapes[1].kind, shapes[1].color):
        # Scene forbids twins: the smaller shape, the less certain reading, takes its next best kind.
        weaker = int(areas[chosen[1]] < areas[chosen[0]])
        shapes[weaker] = _read_cell(rgb, background, distance, side, chosen[weaker], shapes[weaker].kind)
    return Scene(tuple(shapes), _nearest(background, _BG_NAMES, _BG_VALUES))


@dataclass(frozen=True)
class Score:
    """Fraction in [0, 1] of expected shapes read right, per attribute; exact: the whole scene."""
    color: float
    kind: float
    size: float
    position: float
    background: float
    exact: float


def score(expected: Scene, image: ImageLike) -> Score:
    """Compare analyze(image) with `expected`, matching shapes by position (a missing one scores 0)."""
    found = analyze(image)
    at = {s.position: s for s in found.shapes}
    matched = [(s, at.get(s.position)) for s in expected.shapes]

    def fraction(attribute: str) -> float:
        hits = sum(f is not None and getattr(s, attribute) == getattr(f, attribute) for s, f in matched)
        return hits / len(matched)

    return Score(fraction("color"), fraction("kind"), fraction("size"), fraction("position"),
                 float(found.background == expected.background), float(found == expected))


def score_many(pairs: Iterable[tuple[Scene, ImageLike]]) -> dict[str, float]:
    """Mean of each Score field over (expected scene, image) pairs, plus their "count"."""
    scores = [score(expected, image) for expected, image in pairs]
    names = [f.name for f in fields(Score)]
    means = {n: float(np.mean([getattr(s, n) for s in scores])) if scores else 0.0 for n in names}
    return {**means, "count": float(len(scores))}
