"""Hand-written inline SVG for the report: line charts, bar charts, histograms and the stage DAG.

Every function returns one `<svg>` element as text, with no external references, so a page that
embeds it needs nothing from the network.
"""
from __future__ import annotations

import math
from html import escape

WIDTH, HEIGHT = 460, 220
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 56, 12, 26, 34
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
STATE_COLORS = {"done": "#4caf50", "partial": "#ffc107", "stale": "#ff9800", "pending": "#bdbdbd",
                "failed": "#e53935", "running": "#42a5f5"}


def downsample(points: list[tuple[float, float]], limit: int) -> list[tuple[float, float]]:
    """At most `limit` points of a series, evenly spaced, the last one always kept."""
    if len(points) <= limit:
        return points
    stride = math.ceil(len(points) / (limit - 1))
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, x_label: str) -> str:
    """One polyline (`<path class="series">`) per named series of finite (x, y) points, with a legend."""
    series = {n: [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)] for n, pts in series.items()}
    series = {n: pts for n, pts in series.items() if pts}
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    if not xs:
        return ""
    rows = math.ceil(len(series) / 3)           # legend rows, between the title and the plot
    scale = _Scale(min(xs), max(xs), min(ys), max(ys), top=PAD_TOP + 13 * rows)
    paths, legend = [], []
    for i, (name, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        d = " ".join(f"{'M' if j == 0 else 'L'}{scale.x(x):.1f},{scale.y(y):.1f}" for j, (x, y) in enumerate(pts))
        paths.append(f'<path class="series" data-points="{len(pts)}" d="{d}" fill="none" stroke="{color}" '
                     f'stroke-width="1.5"><title>{escape(name)}</title></path>')
        legend.append(f'<text x="{PAD_LEFT + 130 * (i % 3)}" y="{PAD_TOP + 8 + 13 * (i // 3)}" '
                      f'fill="{color}" font-size="11">{escape(name)}</text>')
    return _frame(title, scale, x_label, "".join(paths) + "".join(legend))


def bar_chart(labels: list[str], values: list[float], title: str, x_label: str) -> str:
    """Bars (`<rect class="bar">`) of non-negative values, one per label, from zero."""
    if not values:
        return ""
    plot_width = WIDTH - PAD_LEFT - PAD_RIGHT
    width = min(plot_width / len(values), 60)               # x counts bar slots of this width
    scale = _Scale(0, plot_width / width, 0, max(max(values), 1e-12))
    bars = []
    for i, (label, value) in enumerate(zip(labels, values)):
        x, y = scale.x(i), scale.y(value)
        bars.append(f'<rect class="bar" x="{x + 1:.1f}" y="{y:.1f}" width="{max(width - 2, 1):.1f}" '
                    f'height="{scale.y(0) - y:.1f}" fill="{PALETTE[0]}"><title>{escape(label)}: {value:.4g}</title></rect>')
        if len(values) <= 16:
            bars.append(f'<text x="{x + width / 2:.1f}" y="{HEIGHT - PAD_BOTTOM + 12}" font-size="10" '
                        f'text-anchor="middle">{escape(label)}</text>')
    return _frame(title, scale, x_label, "".join(bars), x_ticks=False)


def histogram(values: list[float], title: str, x_label: str, bins: int = 20) -> str:
    """Counts of `values` in `bins` equal-width bins, as bars labelled by their lower edge."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return ""
    low, high = min(values), max(values)
    step = (high - low) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - low) / step), bins - 1)] += 1
    labels = [f"{low + i * step:.3g}–{low + (i + 1) * step:.3g}" for i in range(bins)]
    return bar_chart(labels, counts, title, f"{x_label} ({low:.3g} to {high:.3g})")


def dag(nodes: list[tuple[str, str, str]], edges: list[tuple[str, str, bool]]) -> str:
    """The stage graph left to right: `nodes` are (name, kind, state) in dependency order, `edges`
    (from, to, is_input); references (a tokenizer) are dashed. Boxes are coloured by state."""
    depth: dict[str, int] = {}
    for name, _, _ in nodes:
        depth[name] = 1 + max((depth[a] for a, b, _ in edges if b == name and a in depth), default=-1)
    columns: dict[int, list[str]] = {}
    for name, _, _ in nodes:
        columns.setdefault(depth[name], []).append(name)
    box_w, box_h, gap_x, gap_y = 150, 40, 60, 18
    pos = {name: (10 + col * (box_w + gap_x), 10 + row * (box_h + gap_y))
           for col, names in columns.items() for row, name in enumerate(names)}
    width = 20 + len(columns) * (box_w + gap_x) - gap_x
    height = 20 + max(len(c) for c in columns.values()) * (box_h + gap_y) - gap_y
    parts = []
    for a, b, is_input in edges:
        (x1, y1), (x2, y2) = pos[a], pos[b]
        dash = "" if is_input else ' stroke-dasharray="5,4"'
        parts.append(f'<path class="edge" d="M{x1 + box_w},{y1 + box_h / 2} C{x1 + box_w + gap_x / 2},{y1 + box_h / 2} '
                     f'{x2 - gap_x / 2},{y2 + box_h / 2} {x2},{y2 + box_h / 2}" fill="none" stroke="#666"{dash} '
                     f'marker-end="url(#arrow)"/>')
    for name, kind, state in nodes:
        x, y = pos[name]
        parts.append(f'<g class="node" data-stage="{escape(name)}" data-state="{state}"><rect x="{x}" y="{y}" '
                     f'width="{box_w}" height="{box_h}" rx="6" fill="{STATE_COLORS.get(state, "#fff")}" stroke="#333"/>'
                     f'<text x="{x + box_w / 2}" y="{y + 16}" text-anchor="middle" font-size="12" font-weight="bold">'
                     f'{escape(name)}</text><text x="{x + box_w / 2}" y="{y + 31}" text-anchor="middle" '
                     f'font-size="10">{escape(kind)} · {state}</text></g>')
    return (f'<svg class="dag" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}"><defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" '
            f'markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#666"/></marker>'
            f'</defs>{"".join(parts)}</svg>')


class _Scale:
    """Data coordinates to the plot area of a WIDTH x HEIGHT chart."""

    def __init__(self, x0: float, x1: float, y0: float, y1: float, top: int = PAD_TOP):
        pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
        self.top = top
        self.x0, self.x1 = x0, x1 if x1 > x0 else x0 + 1
        self.y0, self.y1 = (y0, y1 + pad) if y0 == 0 else (y0 - pad, y1 + pad)

    def x(self, v: float) -> float:
        return PAD_LEFT + (v - self.x0) / (self.x1 - self.x0) * (WIDTH - PAD_LEFT - PAD_RIGHT)

    def y(self, v: float) -> float:
        return HEIGHT - PAD_BOTTOM - (v - self.y0) / (self.y1 - self.y0) * (HEIGHT - self.top - PAD_BOTTOM)


def _frame(title: str, scale: _Scale, x_label: str, body: str, x_ticks: bool = True) -> str:
    """Axes, tick labels and the title around a chart body."""
    bottom, right = HEIGHT - PAD_BOTTOM, WIDTH - PAD_RIGHT
    ticks = [f'<text x="{PAD_LEFT - 4}" y="{scale.y(v) + 4:.1f}" font-size="10" text-anchor="end">{v:.4g}</text>'
             for v in (scale.y0, (scale.y0 + scale.y1) / 2, scale.y1)]
    if x_ticks:
        ticks += [f'<text x="{scale.x(v):.1f}" y="{bottom + 12}" font-size="10" text-anchor="middle">{v:.4g}</text>'
                  for v in (scale.x0, scale.x1)]
    return (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}"><text x="{WIDTH / 2}" y="16" text-anchor="middle" font-size="13" '
            f'font-weight="bold">{escape(title)}</text><path d="M{PAD_LEFT},{scale.top} V{bottom} H{right}" '
            f'fill="none" stroke="#333"/>{"".join(ticks)}{body}<text x="{(PAD_LEFT + right) / 2}" '
            f'y="{HEIGHT - 4}" font-size="11" text-anchor="middle">{escape(x_label)}</text></svg>')
