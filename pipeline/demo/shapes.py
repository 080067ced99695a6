"""Procedurally drawn captioned images: the offline demo corpus for image-text pipelines.

Each image shows one or two flat-colored shapes on a muted background and its caption states
exactly what is drawn, so a deterministic analyzer can score a text-to-image model against it.
Every choice serves readability at 64x64 after JPEG: a closed vocabulary, shape colors at least
100 apart in RGB from each other and from every background, positions on a 3x3 grid with each
shape wholly inside its own cell (two shapes never touch, and the cell is the position), and
sizes whose areas differ almost threefold.
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline.storage import write_atomically

SHAPES_VERSION = 1  # bump when drawing or captions change (it enters fingerprints)

SHAPE_KINDS = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS = {
    "red": (210, 20, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (245, 225, 30),
    "purple": (150, 30, 180), "orange": (240, 120, 0), "white": (255, 255, 255), "black": (0, 0, 0),
}
# Grays and pale tints: never saturated, and neither white nor black, so no shape color is near.
BACKGROUNDS = {
    "gray": (128, 128, 128), "dark gray": (64, 64, 64), "beige": (210, 195, 165),
    "pale blue": (170, 190, 215), "pale green": (180, 205, 180),
}
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")  # row-major over the 3x3 grid
# Fraction of the side spanned by a shape; both stay below the 1/3 cell so a shape never leaves it.
_SIZE_FRACTION = {"small": 0.18, "large": 0.30}
SIZES = tuple(_SIZE_FRACTION)


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str

    def __post_init__(self):
        if not 1 <= len(self.shapes) <= 2:
            raise ValueError(f"a scene holds 1 or 2 shapes, not {len(self.shapes)}")
        if len({s.position for s in self.shapes}) != len(self.shapes):
            raise ValueError(f"two shapes share a position in {self.shapes}")
        if len({(s.kind, s.color) for s in self.shapes}) != len(self.shapes):
            raise ValueError(f"two shapes share both kind and color in {self.shapes}")


def scene_for(index: int, seed: int = 0) -> Scene:
    """The scene of row `index`: a function of (index, seed) alone, so rows can be drawn anywhere."""
    rng = random.Random(f"{seed}:{index}")
    positions = sorted(rng.sample(range(len(POSITIONS)), rng.choice((1, 2))))  # reading order
    shapes: list[Shape] = []
    for p in positions:
        while True:  # resample a twin so the caption can tell the two shapes apart
            shape = Shape(rng.choice(SHAPE_KINDS), rng.choice(tuple(COLORS)), rng.choice(SIZES), POSITIONS[p])
            if all((shape.kind, shape.color) != (s.kind, s.color) for s in shapes):
                break
        shapes.append(shape)
    return Scene(tuple(shapes), rng.choice(tuple(BACKGROUNDS)))


def caption(scene: Scene) -> str:
    """E.g. 'a small red circle at the top left and a large blue star at the center on a gray background'."""
    things = " and ".join(f"a {s.size} {s.color} {s.kind} at the {s.position}" for s in scene.shapes)
    return f"{things} on a {scene.background} background"


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # longest first


_SHAPE_RE = re.compile(rf"a ({_alternatives(SIZES)}) ({_alternatives(COLORS)}) "
                       rf"({_alternatives(SHAPE_KINDS)}) at the ({_alternatives(POSITIONS)})")
_BACKGROUND_RE = re.compile(rf"({_alternatives(BACKGROUNDS)}) background")


def parse_caption(text: str) -> Scene:
    """The scene that caption() describes as `text`; ValueError names the part that does not parse."""
    things, sep, background = text.strip().rpartition(" on a ")
    bg = _BACKGROUND_RE.fullmatch(background)
    if not sep or not bg:
        raise ValueError(f"no 'on a <background> background' ending in {text!r}")
    shapes = []
    for phrase in things.split(" and "):
        m = _SHAPE_RE.fullmatch(phrase)
        if not m:
            raise ValueError(f"cannot parse shape phrase {phrase!r} in {text!r}")
        size, color, kind, position = m.groups()
        shapes.append(Shape(kind, color, size, position))
    return Scene(tuple(shapes), bg.group(1))


def _outline(kind: str, cx: float, cy: float, h: float) -> list[tuple[float, float]]:
    """Polygon of `kind` inscribed in the square of half-side `h` centered at (cx, cy)."""
    if kind == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    if kind == "star":  # fat inner radius: thin spikes vanish at 64x64
        return [(cx + r * math.sin(i * math.pi / 5), cy - r * math.cos(i * math.pi / 5))
                for i, r in enumerate([h, 0.5 * h] * 5)]
    if kind == "cross":
        w = 0.35 * h  # arm half-width: arms a third of the box wide, clearly a plus, not a blob
        return [(cx - w, cy - h), (cx + w, cy - h), (cx + w, cy - w), (cx + h, cy - w), (cx + h, cy + w),
                (cx + w, cy + w), (cx + w, cy + h), (cx - w, cy + h), (cx - w, cy + w), (cx - h, cy + w),
                (cx - h, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown shape kind {kind!r}")


def draw(scene: Scene, size: int = 128) -> Image.Image:
    """RGB image of `scene`, `size` pixels square; flat colors (no antialiasing) so pixels are exact."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    pen = ImageDraw.Draw(image)
    for s in scene.shapes:
        row, col = divmod(POSITIONS.index(s.position), 3)
        cx, cy, h = (col + 0.5) * size / 3, (row + 0.5) * size / 3, _SIZE_FRACTION[s.size] * size / 2
        if s.kind == "circle":
            pen.ellipse((cx - h, cy - h, cx + h, cy + h), fill=COLORS[s.color])
        else:
            pen.polygon(_outline(s.kind, cx, cy, h), fill=COLORS[s.color])
    return image


def demo_rows(count: int, seed: int = 0) -> list[dict]:
    """LAION-style URL-list rows for the first `count` scenes (captions only; nothing is drawn)."""
    return [{"url": f"demo://shapes/{i:06d}.png", "caption": caption(scene_for(i, seed)), "index": i}
            for i in range(count)]


def materialize(count: int, folder: str | Path, seed: int = 0, size: int = 128) -> Path:
    """Draw folder/shapes/NNNNNN.png and write folder/shapes.parquet; returns the parquet path.

    The .complete marker is written last and removed before any redraw, so its presence with
    matching parameters means every file is whole and current.
    """
    folder = Path(folder)
    images, table, marker = folder / "shapes", folder / "shapes.parquet", folder / ".complete"
    wanted = {"count": count, "seed": seed, "size": size, "version": SHAPES_VERSION}
    try:
        if json.loads(marker.read_text()) == wanted:
            return table
    except (OSError, ValueError):
        pass
    marker.unlink(missing_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    rows = demo_rows(count, seed)
    names = {f"{row['index']:06d}.png" for row in rows}
    for stale in images.iterdir():  # a smaller count or an interrupted run leaves extra files
        if stale.name not in names:
            stale.unlink()
    for row in rows:
        image = draw(scene_for(row["index"], seed), size)
        write_atomically(images / f"{row['index']:06d}.png", lambda tmp: image.save(tmp, format="PNG"))
    write_atomically(table, lambda tmp: pq.write_table(pa.Table.from_pylist(rows), tmp))
    write_atomically(marker, lambda tmp: tmp.write_text(json.dumps(wanted)))
    return table
