"""What `tokenmill report` shows, read from storage only: job_status, the done markers, metrics.jsonl,
eval.json, the sample files model stages keep beside their model, and speech shard metadata.

Everything embedded is bounded: metric series are downsampled, and images, audio clips and
utterance durations are capped per stage.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

from pipeline.data.shard_stream import iter_members, member_json
from pipeline.ledger import Marker
from pipeline.monitor.status import job_status
from pipeline.monitor.svg import downsample
from pipeline.spec import JobSpec
from pipeline.workflow import Planner

MAX_POINTS = 300            # per metric series
MAX_IMAGES = 12             # per stage
MAX_CLIPS = 6               # per stage
MAX_CLIP_SECONDS = 10.0     # longer clips are cut
MAX_IMAGE_PIXELS = 768      # larger images are scaled down to this width / height
MAX_DURATIONS = 2000        # utterances per speech stage read for the durations histogram


@dataclass
class Media:
    """One embedded file: its bytes, MIME type and a caption."""
    name: str
    mime: str
    data: bytes
    caption: str = ""


@dataclass
class StageReport:
    """One stage's part of the page."""
    name: str
    kind: str
    status: dict                                   # the stage's job_status entry
    depends: list[tuple[str, bool]]                # (stage, is an input; else a reference)
    samples_per_s: float | None = None             # over the done shards' wall-clock span
    metrics: dict[str, list[tuple[float, float]]] = field(default_factory=dict)   # key -> (step, value)
    evaluation: dict = field(default_factory=dict)
    media: list[Media] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)


@dataclass
class JobReport:
    """The whole page's content: the stages in dependency order."""
    job: str
    storage: str
    stages: list[StageReport]

    @property
    def nothing_ran(self) -> bool:
        """No stage has a done shard, a failed one or live metrics."""
        return not any(s.status["shards_done"] or s.status["shards_failed"] or s.metrics for s in self.stages)


def collect(job: JobSpec) -> JobReport:
    """The report's content for `job`, from its storage."""
    planner = Planner(job)
    status = job_status(job, planner)["stages"]   # the same planner: each stage's markers are read once
    stages = []
    for name, spec in job.stages.items():
        markers = planner.plan(name).plan.done_markers()
        outputs = {o.name for m in markers for o in m.outputs}
        read = _Reader(planner, name, outputs)
        stages.append(StageReport(
            name, spec.kind, status[name],
            [(i, True) for i in spec.inputs] + [(r, False) for r in spec.depends_on if r not in spec.inputs],
            samples_per_s=_throughput(markers), metrics=read.metrics(), evaluation=read.json("eval.json") or {},
            media=read.images() + read.clips(),
            durations=_durations(planner, name, markers) if spec.kind == "ingest-speech" else []))
    return JobReport(job.name, job.storage, stages)


class _Reader:
    """Reads one stage's files: outputs its done markers name, or the live metrics.jsonl."""

    def __init__(self, planner: Planner, stage: str, outputs: set[str]):
        self.storage, self.ledger, self.outputs = planner.storage, planner.ledger(stage), outputs

    def bytes(self, name: str) -> bytes:
        with self.storage.fs.open(self.storage.path(self.ledger.output_rel(name)), "rb") as f:
            return f.read()

    def json(self, name: str):
        return json.loads(self.bytes(name)) if name in self.outputs else None

    def metrics(self) -> dict[str, list[tuple[float, float]]]:
        """Per-step numeric metrics, downsampled; while training, the stage's live metrics.jsonl."""
        rel = self.ledger.output_rel("metrics.jsonl") if "metrics.jsonl" in self.outputs else self.ledger.rel("metrics.jsonl")
        try:
            with self.storage.fs.open(self.storage.path(rel), "rt") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return {}
        series: dict[str, list[tuple[float, float]]] = {}
        for row in (r for r in rows if isinstance(r.get("step"), (int, float))):
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    series.setdefault(key, []).append((row["step"], float(value)))
        return {key: downsample(points, MAX_POINTS) for key, points in series.items()}

    def images(self) -> list[Media]:
        captions = {c["file"]: c["caption"] for c in self.json("t2i.json") or []}
        names = (["reconstructions.png"] if "reconstructions.png" in self.outputs else []) + \
            sorted(n for n in self.outputs if n.startswith("t2i-") and n.endswith(".png"))
        captions.setdefault("reconstructions.png", "held-out originals over their reconstructions")
        return [Media(n, "image/png", _bounded_png(self.bytes(n)), captions.get(n, "")) for n in names[:MAX_IMAGES]]

    def clips(self) -> list[Media]:
        """Generated speech (tts-NN.wav) and codec examples (key.original.wav beside key.decoded.wav)."""
        names = sorted(n for n in self.outputs if n.endswith(".wav"))[:MAX_CLIPS]
        return [Media(n, "audio/flac", _bounded_flac(self.bytes(n)), _clip_caption(n)) for n in names]


def _clip_caption(name: str) -> str:
    key, _, kind = name.removesuffix(".wav").rpartition(".")
    return f"{key}: {kind}" if key else "generated from a held-out utterance's text and voice prompt"


def _throughput(markers: list[Marker]) -> float | None:
    span = max((m.finished for m in markers), default=0) - min((m.started for m in markers), default=0)
    samples = sum(m.samples for m in markers)
    return samples / span if markers and span > 0 and samples else None


def _durations(planner: Planner, stage: str, markers: list[Marker]) -> list[float]:
    """Utterance durations (s) from the speech shards' key.json, at most MAX_DURATIONS of them."""
    durations: list[float] = []
    ledger = planner.ledger(stage)
    for marker in sorted(markers, key=lambda m: m.shard):
        for out in (o for o in marker.outputs if o.name.endswith(".tar")):
            for _, parts in iter_members(planner.storage.url(ledger.output_rel(out.name))):
                if isinstance(duration := member_json(parts).get("duration"), (int, float)):
                    durations.append(float(duration))
                if len(durations) >= MAX_DURATIONS:
                    return durations
    return durations


def _bounded_png(data: bytes) -> bytes:
    """The PNG itself, or a scaled-down copy when it is larger than MAX_IMAGE_PIXELS."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    if max(image.size) <= MAX_IMAGE_PIXELS:
        return data
    image.thumbnail((MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _bounded_flac(data: bytes) -> bytes:
    """Any WAV as 16-bit FLAC (a quarter of a float WAV), cut at MAX_CLIP_SECONDS."""
    import soundfile as sf

    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, audio[: int(MAX_CLIP_SECONDS * rate)].clip(-1, 1), rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()
