"""`tokenmill report`: one self-contained HTML page about a job (inline CSS and SVG, media as data:
URIs, no scripts, nothing fetched): the DAG coloured by state, per-stage tables, training curves,
codebook usage, utterance durations, tokenizer reconstructions and model samples."""
from __future__ import annotations

import base64
import math
import statistics
import time
from html import escape
from pathlib import Path

from pipeline.monitor import svg
from pipeline.monitor.report_data import JobReport, StageReport, collect
from pipeline.spec import JobSpec

MAX_FIGURES = 40            # evaluation figures listed per stage
COUNTS = ("shards_done", "shards_total", "samples", "failures", "shards_stale", "shards_missing", "shards_failed",
          "orphans")         # the status counts the tables show; other numbers are the stage's own figures

CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1500px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3;text-align:left}td.n{text-align:right}.state{padding:1px 6px;border-radius:4px}
.charts,.media{display:flex;flex-wrap:wrap;gap:12px;margin:8px 0}
figure{margin:0;width:min-content;min-width:160px;font-size:12px}
figure img{image-rendering:pixelated;max-width:512px;min-width:128px;border:1px solid #ccc;display:block}
.notice{background:#fff8e1;border:1px solid #ffc107;padding:10px;border-radius:6px}
.figure{display:inline-block;font-size:12px;background:#f5f5f5;border-radius:4px;margin:2px;padding:2px 6px}
section{border-top:1px solid #ddd;margin-top:18px}.legend span{margin-right:10px}"""


def write_report(job: JobSpec, out: str | Path) -> Path:
    """Write the job's report page to `out`; returns its path."""
    out = Path(out)
    out.write_text(render(collect(job)), encoding="utf-8")
    return out


def render(report: JobReport) -> str:
    """The whole HTML page."""
    legend = "".join(f'<span><span class="state" style="background:{c}">{s}</span></span>'
                     for s, c in svg.STATE_COLORS.items())
    nodes = [(s.name, s.kind, s.status["state"]) for s in report.stages]
    edges = [(d, s.name, is_input) for s in report.stages for d, is_input in s.depends]
    notice = (f'<p class="notice" id="nothing-ran">Nothing has run yet for job {escape(report.job)}: no stage '
              f'has built a shard. Run <code>tokenmill run</code> on the job spec first.</p>'
              if report.nothing_ran else "")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">'
            f'<title>tokenmill report: {escape(report.job)}</title><style>{CSS}</style></head><body>'
            f'<h1>tokenmill report: {escape(report.job)}</h1><p>storage <code>{escape(report.storage)}</code>, '
            f'written {time.strftime("%Y-%m-%d %H:%M:%S %Z")}</p>{notice}'
            f'<h2>Stages</h2><p class="legend">{legend}</p>{svg.dag(nodes, edges)}{_summary(report.stages)}'
            + "".join(_stage_section(s) for s in report.stages) + "</body></html>")


def _summary(stages: list[StageReport]) -> str:
    rows = "".join(
        f'<tr><td><a href="#stage-{escape(s.name)}">{escape(s.name)}</a></td><td>{escape(s.kind)}</td>'
        f'<td><span class="state" style="background:{svg.STATE_COLORS.get(s.status["state"], "#fff")}">'
        f'{s.status["state"]}</span></td><td class="n">{s.status["shards_done"]}/{s.status["shards_total"]}</td>'
        f'<td class="n">{_fmt(s.status["samples"])}</td><td class="n">{_fmt(s.status["failures"])}</td>'
        f'<td class="n">{_throughput(s)}</td></tr>' for s in stages)
    return ('<table class="summary"><tr><th>stage</th><th>kind</th><th>state</th><th>shards done/total</th>'
            f'<th>samples</th><th>failed samples</th><th>throughput</th></tr>{rows}</table>')


def _throughput(stage: StageReport) -> str:
    """Tokens/s of a token model, steps and time of another trained model, samples/s of a shard stage."""
    if "tokens_per_s" in stage.metrics:
        return f'{_fmt(statistics.median(v for _, v in stage.metrics["tokens_per_s"]))} tokens/s (median step)'
    if "seconds" in stage.metrics:
        step, seconds = stage.metrics["seconds"][-1]
        return f"{_fmt(step)} steps in {_fmt(seconds)} s"
    return f"{_fmt(stage.samples_per_s)} samples/s" if stage.samples_per_s else "–"


def _stage_section(stage: StageReport) -> str:
    status = stage.status
    reasons = _table(("failure reason", "samples"), status["failure_reasons"].items())
    problems = f'<p>last error: <code>{escape(str(status["last_error"]))}</code></p>' if status["last_error"] else ""
    shard_counts = _table(("shards", "count"), [(k.removeprefix("shards_"), status[k]) for k in
                                                ("shards_stale", "shards_missing", "shards_failed", "orphans")
                                                if status[k]])
    figures = {k: v for k, v in status.items() if k not in COUNTS and isinstance(v, (int, float))}
    figures.update({k: v for k, v in _flat(stage.evaluation).items() if figures.get(k.rsplit(".", 1)[-1]) != v})
    charts = "".join(_charts(stage))
    return (f'<section id="stage-{escape(stage.name)}"><h2>{escape(stage.name)} <small>({escape(stage.kind)}, '
            f'{status["state"]})</small></h2>{problems}{shard_counts}{reasons}'
            + (f'<div class="charts">{charts}</div>' if charts else "")
            + "".join(f'<span class="figure">{escape(k)} <b>{_fmt(v)}</b></span>'
                      for k, v in list(figures.items())[:MAX_FIGURES])
            + (f'<div class="media">{"".join(_media(stage))}</div>' if stage.media else "") + "</section>")


def _charts(stage: StageReport):
    losses = {k: v for k, v in stage.metrics.items() if k == "loss" or k.startswith("loss_")}
    if losses:
        yield svg.line_chart(losses, f"{stage.name}: training loss", "step")
    if "tokens_per_s" in stage.metrics:
        yield svg.line_chart({"tokens/s": stage.metrics["tokens_per_s"]}, f"{stage.name}: tokens/s", "step")
    usage = stage.evaluation.get("usage_per_level") or (
        [stage.evaluation["usage"]] if isinstance(stage.evaluation.get("usage"), (int, float)) else [])
    if usage:
        yield svg.bar_chart([f"level {i + 1}" for i in range(len(usage))] if len(usage) > 1 else ["codebook"],
                            usage, f"{stage.name}: codebook usage (share of codes used)", "held-out evaluation")
    if stage.durations:
        yield svg.histogram(stage.durations, f"{stage.name}: utterance durations ({len(stage.durations)})", "seconds")


def _media(stage: StageReport):
    for m in stage.media:
        uri = f"data:{m.mime};base64,{base64.b64encode(m.data).decode()}"
        element = (f'<img src="{uri}" alt="{escape(m.name)}">' if m.mime.startswith("image/")
                   else f'<audio controls preload="auto" src="{uri}"></audio>')
        yield f'<figure>{element}<figcaption><b>{escape(m.name)}</b> {escape(m.caption)}</figcaption></figure>'


def _flat(obj: dict, prefix: str = "") -> dict:
    """Numeric leaves of a nested dict, keys joined with dots."""
    flat = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def _table(header: tuple[str, str], rows) -> str:
    body = "".join(f'<tr><td>{escape(str(k))}</td><td class="n">{_fmt(v)}</td></tr>' for k, v in rows)
    return f'<table><tr><th>{header[0]}</th><th>{header[1]}</th></tr>{body}</table>' if body else ""


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else escape(str(value))
