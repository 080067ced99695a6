"""`ingest-speech`: speech corpora downloaded, verified, extracted and cut into WebDataset shards
of FLAC (mono, `sample_rate`) + transcript + JSON (schemas/speech_sample.schema.json).

Shards are per corpus part, `{part}-{n:05d}`, over the part's utterances sorted by id, so
re-running never reshuffles and adding a part only adds shards.
"""
from __future__ import annotations

import io
import json
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from pipeline.data import url_list
from pipeline.data.speech_shards import decode_audio
from pipeline.demo.server import LocalServer
from pipeline.ledger import sha256_of
from pipeline.recipes import RECIPES, Recipe, Utterance
from pipeline.recipes.demo_espeak import DemoRecipe
from pipeline.stages.base import ShardInput, ShardOutput, SpecProblem, Stage
from pipeline.storage import cache_dir


@dataclass
class IngestSpeechConfig:
    corpus: str
    parts: list[str] = field(default_factory=list)
    base_url: str | None = None                 # a mirror instead of the recipe's official URL
    checksums: dict[str, str] = field(default_factory=dict)   # archive file -> sha256, over the pinned ones
    download_dir: str | None = None             # archives and extracted parts (default: the local cache)
    manifest: str | None = None                 # corpus "manifest": the TSV/CSV/parquet file
    id_col: str | None = "id"
    audio_col: str = "audio"
    text_col: str = "text"
    speaker_col: str = "speaker"
    sample_rate: int = 24000
    min_seconds: float = 0.5
    max_seconds: float = 20.0
    samples_per_shard: int = 1000
    phonemes: bool = True
    language: str | None = None                 # eSpeak NG language (default: the corpus's)


@dataclass(frozen=True)
class Download:
    """One archive to fetch and extract (a Ray task)."""
    url: str
    archive: str
    sha256: str | None
    target: str


def fetch_and_extract(_: None, job: Download) -> str:
    """Download (resuming), verify and extract one archive; returns the extracted folder."""
    from pipeline.recipes.download import fetch
    from pipeline.recipes.extract import extract

    fetch(job.url, job.archive, job.sha256)
    return str(extract(job.archive, job.target))


class IngestSpeech(Stage):
    kind = "ingest-speech"
    version = 1
    Config = IngestSpeechConfig
    # content enters via digests; `parts` only says which shards exist ({part}-{n}, each with its
    # part's digest), so adding a part adds shards and leaves the others fresh
    execution_keys = frozenset({"base_url", "download_dir", "checksums", "parts"})

    def __init__(self, name: str, config: IngestSpeechConfig, storage_root: str = ""):
        super().__init__(name, config, storage_root)
        self.recipe: Recipe = RECIPES[config.corpus]
        self._served: tuple[str, dict[str, str]] | None = None   # (base URL, checksums) of a local corpus

    @classmethod
    def check(cls, config: IngestSpeechConfig) -> list[SpecProblem]:
        recipe = RECIPES[config.corpus]
        if config.corpus == "manifest":
            if not config.manifest:
                return [SpecProblem(("manifest",), "corpus manifest needs `manifest: <tsv|csv|parquet file>`")]
            try:
                files = url_list.list_files(config.manifest)
            except (ValueError, OSError) as exc:
                return [SpecProblem(("manifest",), str(exc))]
            key_of = {config.audio_col: "audio_col", config.text_col: "text_col",
                      config.speaker_col: "speaker_col", None: "manifest"}
            return [SpecProblem((key_of[column],), message)
                    for column, message in url_list.check_columns(files, [c for c in key_of if c])]
        if not config.parts:
            return [SpecProblem(("parts",), f"{recipe.name} needs `parts` (e.g. {', '.join(list(recipe.archives)[:3])})")]
        problems = []
        for i, part in enumerate(config.parts):
            try:
                name, sha256 = recipe.archive(part)
            except KeyError as exc:
                problems.append(SpecProblem(("parts", i), exc.args[0]))
                continue
            if sha256 is None and name not in config.checksums and not isinstance(recipe, DemoRecipe):
                problems.append(SpecProblem(("checksums",), f"no sha256 is pinned for {recipe.name} archive {name}: "
                                                          f"give `checksums: {{{name}: <sha256>}}`"))
        return problems

    def language(self) -> str:
        return self.config.language or self.recipe.language

    def libraries(self) -> dict[str, str]:
        from importlib.metadata import version

        libs = {"soundfile": version("soundfile"), "torchaudio": version("torchaudio")}
        if self.config.phonemes:
            libs["phonemizer"] = version("phonemizer")
            libs["espeakng-loader"] = version("espeakng-loader")
        return libs

    def _folder(self) -> Path:
        return Path(self.config.download_dir or cache_dir() / "corpora") / self.recipe.name

    def _downloads(self) -> list[Download]:
        """What to fetch: URL (official, mirror or the local demo server), archive, checksum, target."""
        base_url, checksums = self._served or (self.config.base_url or self.recipe.base_url, {})
        checksums = {**checksums, **self.config.checksums}
        jobs = []
        for part in self.config.parts:
            name, pinned = self.recipe.archive(part)
            jobs.append(Download(f"{base_url.rstrip('/')}/{name}", str(self._folder() / name),
                                 checksums.get(name, pinned), str(self._folder() / part)))
        return jobs

    @contextmanager
    def session(self) -> Iterator["IngestSpeech"]:
        if not isinstance(self.recipe, DemoRecipe):
            yield self
            return
        folder, checksums = self.recipe.materialize(self.config.parts)
        with LocalServer(folder) as server:
            self._served = (server.base_url, checksums)
            try:
                yield self
            finally:
                self._served = None

    def prepare(self, parallel: Callable) -> list[str]:
        """Fetch and extract the parts not extracted yet, in parallel; one message per failed archive."""
        todo = [job for job in self._downloads() if not Path(job.target).exists()]
        outcomes = parallel(fetch_and_extract, None, todo)
        return [str(error) if job.url in str(error) else f"{job.url}: {error}" for job, _, error in outcomes if error]

    def _parts(self) -> Iterator[tuple[str, str, str]]:
        """(part, root, digest) of every part ready to list: extracted archives, or the manifest."""
        if self.config.corpus == "manifest":
            yield "manifest", self.config.manifest, "manifest"
            return
        for part in self.config.parts:
            target, completed = self._folder() / part, self._folder() / f"{self.recipe.archive(part)[0]}.completed"
            if target.exists() and completed.exists():   # extracted, from an archive whose digest is recorded
                yield part, str(target), json.loads(completed.read_text())["sha256"] or str(completed)

    def inputs(self, upstream: dict, references: dict | None = None) -> list[ShardInput]:
        items = []
        n = self.config.samples_per_shard
        for part, root, part_digest in self._parts():
            utterances = sorted(self.recipe.list_utterances(Path(root) if "://" not in root else root, part,
                                                            self.config), key=lambda u: u.id)
            for i in range(0, len(utterances), n):
                chunk = utterances[i:i + n]
                # audio paths relative to the part, so moving download_dir does not make shards stale
                rows = [[u.id, u.speaker, u.text, u.audio and u.audio.removeprefix(root), list(u.extra)] for u in chunk]
                digest = sha256_of([part_digest, rows])
                items.append(ShardInput(f"{part}-{i // n:05d}", digest, (part, chunk)))
        return items

    def build(self, item: ShardInput, workdir: Path) -> ShardOutput:
        import webdataset as wds

        part, utterances = item.payload
        phonemes = self._phonemes(utterances)
        output = ShardOutput(files=[workdir / f"{item.shard}.tar"], samples=0)
        dropped, speakers, seconds = Counter(), set(), 0.0
        with wds.TarWriter(str(output.files[0])) as tar:
            for utt in utterances:
                try:
                    audio = self._decode(utt)
                except SampleError as exc:
                    output.failures[exc.reason] += 1
                    continue
                duration = audio.shape[-1] / self.config.sample_rate
                if not self.config.min_seconds <= duration <= self.config.max_seconds:
                    dropped["shorter than min_seconds" if duration < self.config.min_seconds
                            else "longer than max_seconds"] += 1
                    continue
                tar.write({"__key__": utt.id.replace(".", "_"), "flac": _flac(audio, self.config.sample_rate),
                           "txt": utt.text, "json": self._meta(utt, part, duration, phonemes.get(utt.id))})
                output.samples += 1
                speakers.add(utt.speaker)
                seconds += duration
        output.stats = {"seconds": round(seconds, 3), "speakers": sorted(speakers), "dropped": dict(dropped)}
        return output

    def _phonemes(self, utterances: list[Utterance]) -> dict[str, str]:
        if not self.config.phonemes:
            return {}
        from pipeline.tokenizers.phonemes import phonemize

        texts = [u for u in utterances if u.text]
        return dict(zip((u.id for u in texts), phonemize([u.text for u in texts], self.language())))

    def _decode(self, utt: Utterance):
        """Mono float32 torch tensor at the configured rate; SampleError names what is wrong."""
        if utt.audio is None:
            raise SampleError("transcript without audio")
        if not utt.text:
            raise SampleError("audio without transcript" if utt.text is None else "empty transcript")
        return read_audio(utt.audio, self.config.sample_rate)

    def _meta(self, utt: Utterance, part: str, duration: float, phonemes: str | None) -> dict:
        return {"id": utt.id, "speaker": utt.speaker, "corpus": self.recipe.name, "part": part,
                "duration": round(duration, 4), "sample_rate": self.config.sample_rate, "text": utt.text,
                "phonemes": phonemes, "source": utt.audio, **dict(utt.extra)}

    def status_figures(self, markers: list) -> dict:
        speakers = {s for m in markers for s in m.stats.get("speakers", [])}
        return {"hours": round(sum(m.stats.get("seconds", 0) for m in markers) / 3600, 4),
                "speakers": len(speakers)}


class SampleError(Exception):
    """A per-utterance failure; `reason` is short and aggregatable."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def read_audio(source: str, sample_rate: int):
    """The audio at `source` (any format, rate, channels) as a mono float32 tensor at `sample_rate`."""
    import fsspec

    try:
        with fsspec.open(source, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SampleError("audio file not found") from None
    except OSError as exc:
        raise SampleError(f"unreadable audio file ({type(exc).__name__})") from None
    if not data:
        raise SampleError("empty audio file")
    try:
        return decode_audio(data, sample_rate)
    except ValueError as exc:
        raise SampleError(str(exc)) from None


def _flac(audio, sample_rate: int) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, audio.clamp(-1, 1).numpy(), sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()
