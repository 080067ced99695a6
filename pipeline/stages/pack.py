"""`pack`: token shards -> fixed-length training rows in the unified vocabulary.

Each input token shard (image tokens or speech tokens) becomes one packed shard,
`{input stage}-{shard}`, so a new token shard packs one shard. Documents are built per task
(pipeline/data/packing.py gives the layouts), optionally turned into their CM3 causal-masked
variant, and packed first-fit into `seq_len` rows with their boundaries recorded, so a trainer
masks attention per document. Every random choice draws from (seed, key): the output is the same
on every run.

The vocabulary (pipeline/tokenizers/vocab.py) is built from the text tokenizer stage and the
token shards' own metadata (codebook sizes, codec levels), written to `{stage}/vocab.json` and
into every shard's metadata; its fingerprint is part of each shard's input digest, so a change of
any tokenizer repacks everything.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow.parquet as pq

from pipeline.data import packing, token_shards
from pipeline.ledger import sha256_of
from pipeline.stages.base import ShardInput, ShardOutput, SpecProblem, Stage
from pipeline.stages.train_text_tokenizer import text_tokenizer_of
from pipeline.storage import Storage
from pipeline.tokenizers import vocab as vocab_module
from pipeline.tokenizers.text_tokenizer import TextTokenizer, load_text_tokenizer

SCHEMA = "packed"
IMAGE_TASKS, SPEECH_TASKS = ("t2i", "i2t"), ("tts", "asr")


@dataclass
class PackConfig:
    text_tokenizer: str                                   # a train-text-tokenizer stage
    tasks: list[str] = field(default_factory=lambda: ["t2i", "i2t", "tts"])
    seq_len: int = 1024
    seed: int = 0
    cm3_rate: float = 0.0               # share of documents replaced by their CM3 causal-masked variant
    cm3_max_spans: int = 1
    prompt_seconds: float = 3.0         # tts: longest speaker prompt
    sentinels: int = 8                  # CM3 mask sentinels in the vocabulary
    open_rows: int = 16                 # rows kept open for first-fit packing


@dataclass(frozen=True)
class PackWork:
    token_shard: str                    # URL of the input token shard
    kind: str                           # "image" | "audio"
    vocab: str                          # the vocabulary's JSON
    text: TextTokenizer


class Pack(Stage):
    kind = "pack"
    version = 2
    Config = PackConfig
    reference_keys = ("text_tokenizer",)

    @classmethod
    def check(cls, config: PackConfig) -> list[SpecProblem]:
        problems = [SpecProblem(("tasks",), f"unknown task {t!r} (tasks: {', '.join(IMAGE_TASKS + SPEECH_TASKS)})")
                    for t in config.tasks if t not in IMAGE_TASKS + SPEECH_TASKS]
        if not 0 <= config.cm3_rate <= 1:
            problems.append(SpecProblem(("cm3_rate",), f"must be in [0, 1], not {config.cm3_rate}"))
        return problems

    def inputs(self, upstream: dict, references: dict | None = None) -> list[ShardInput]:
        text = text_tokenizer_of(references["text_tokenizer"]) if references else None
        parquet = {stage: {s: next(u for u in up.files if u.endswith(".parquet")) if up else None
                           for s, up in shards.items()} for stage, shards in upstream.items()}
        first = {stage: _first_metadata(urls) for stage, urls in parquet.items()}   # read once per input stage
        vocab = self.vocab(text, first) if text else None
        vocab_json = json.dumps(vocab.to_json()) if vocab else None
        items = []
        for stage, shards in sorted(upstream.items()):
            for shard, up in sorted(shards.items()):
                ready = up is not None and vocab is not None
                digest = sha256_of([up.digest, vocab.fingerprint]) if ready else None
                work = PackWork(parquet[stage][shard], first[stage]["kind"], vocab_json, text) if ready else None
                items.append(ShardInput(f"{stage}-{shard}", digest, work))
        return items

    def vocab(self, text: TextTokenizer, first: dict[str, dict | None]) -> vocab_module.Vocab | None:
        """The vocabulary for the text tokenizer and the input token shards (the metadata of one built
        shard per input stage); None while an input stage has no built shard."""
        sizes = {"text_size": text.vocab_size, "text_source": text.digest, "phonemes": text.phonemes,
                 "sentinels": self.config.sentinels}
        for meta in first.values():
            if meta is None:
                return None
            if meta["kind"] == "image":
                sizes.update(image_codes=meta["codebook_size"], image_source=meta["tokenizer"])
            else:
                sizes.update(audio_codebooks=meta["n_q"], audio_codebook_size=meta["codebook_size"],
                             audio_source=meta["codec"])
        return vocab_module.build(**sizes)

    def artifacts(self, items: list[ShardInput]) -> dict[str, bytes]:
        work = next((i.payload for i in items if i.payload is not None), None)
        return {"vocab.json": (json.dumps(json.loads(work.vocab), indent=1) + "\n").encode()} if work else {}

    def build(self, item: ShardInput, workdir) -> ShardOutput:
        work: PackWork = item.payload
        vocab = vocab_module.Vocab.from_json(json.loads(work.vocab))
        with fsspec.open(work.token_shard, "rb") as f:
            rows = pq.read_table(f).to_pylist()          # one shard: bounded (its samples_per_shard)
        made = _Documents(self.config, vocab, load_text_tokenizer(work.text))
        tasks = [t for t in self.config.tasks if t in (IMAGE_TASKS if work.kind == "image" else SPEECH_TASKS)]
        if work.kind == "image":
            candidates = made.image(rows, tasks)
        else:
            candidates = made.speech(rows, tasks, token_shards.metadata(work.token_shard)["frame_rate"])
        documents = []
        for doc in candidates:
            if len(doc.tokens) > self.config.seq_len:
                made.failures[f"{doc.task} document longer than seq_len"] += 1
                continue
            if self.config.cm3_rate and packing.rng_for(self.config.seed, doc.key, "cm3:" + doc.task).random() \
                    < self.config.cm3_rate:
                doc = packing.causal_masked(vocab, doc, packing.rng_for(self.config.seed, doc.key, "spans:" + doc.task),
                                            self.config.cm3_max_spans)
            documents.append(doc)
        columns = packed_columns(packing.pack(documents, self.config.seq_len, self.config.open_rows), self.config.seq_len,
                           vocab.special("<pad>"), item.shard)
        path = token_shards.write(workdir / f"{item.shard}.parquet", SCHEMA, columns, {
            "vocab": vocab.to_json(), "vocab_fingerprint": vocab.fingerprint, "seq_len": self.config.seq_len,
            "tasks": tasks, "seed": self.config.seed, "source": _relative(work.token_shard, self.storage_root)})
        used, rows_out = sum(len(d.tokens) for d in documents), len(columns["tokens"])
        stats = {**made.stats, "rows": rows_out, "tokens": used,
                 "fill": round(used / max(1, rows_out * self.config.seq_len), 4),
                 **{f"documents_{t}": n for t, n in sorted(Counter(d.task for d in documents).items())}}
        return ShardOutput([path], samples=len(documents), failures=made.failures, stats=stats)

    def status_figures(self, markers: list) -> dict:
        rows = sum(m.stats.get("rows", 0) for m in markers)
        tokens = sum(m.stats.get("tokens", 0) for m in markers)
        return {"rows": rows, "fill": round(tokens / max(1, rows * self.config.seq_len), 4)}


def _relative(url: str, storage_root: str) -> str:
    """`url` relative to the storage root when it lies under it."""
    prefix = Storage(storage_root).url("").rstrip("/") + "/"
    return url[len(prefix):] if url.startswith(prefix) else url


def _first_metadata(urls: dict[str, str | None]) -> dict | None:
    """The file metadata of the first built shard of an input stage (None when none is built)."""
    built = sorted(u for u in urls.values() if u)
    return token_shards.metadata(built[0]) if built else None


class _Documents:
    """The documents of one token shard, counting what could not become one."""

    def __init__(self, config: PackConfig, vocab: vocab_module.Vocab, text):
        self.config, self.vocab, self.text = config, vocab, text
        self.failures, self.stats = Counter(), Counter()

    def image(self, rows: list[dict], tasks: list[str]):
        for row in rows:
            ids = self.text.encode(row["text"])
            if not ids:
                self.failures["caption tokenizes to nothing"] += 1
                continue
            image = np.asarray(row["tokens"], dtype=np.int64)
            for task in tasks:
                yield (packing.t2i if task == "t2i" else packing.i2t)(self.vocab, row["key"], ids, image)

    def speech(self, rows: list[dict], tasks: list[str], frame_rate: float):
        """tts prompts come from another utterance of the same speaker in the shard (a seeded
        choice of utterance and window), or, for a speaker with one utterance, from the utterance's
        own prefix (VALL-E's continuation mode: the target is the rest; counted as prefix_prompts)."""
        codes = {r["key"]: np.asarray(r["tokens"], dtype=np.int64).reshape(r["shape"]) for r in rows}
        by_speaker = defaultdict(list)
        for r in rows:
            by_speaker[r["speaker"]].append(r["key"])
        prompt_frames = max(1, int(self.config.prompt_seconds * frame_rate))
        for r in rows:
            key, speech = r["key"], codes[r["key"]]
            if "asr" in tasks:
                ids = self.text.encode(r["text"])
                if ids:
                    yield packing.asr(self.vocab, key, speech, ids)
                else:
                    self.failures["transcript tokenizes to nothing"] += 1
            if "tts" not in tasks:
                continue
            try:
                phonemes = self.text.encode_phonemes(r["phonemes"] or "")
            except ValueError:          # a phone the table lacks: shards the text tokenizer did not read
                self.failures["phoneme not in the text tokenizer's table"] += 1
                continue
            if not phonemes:
                self.failures["no phonemes"] += 1
                continue
            others = [k for k in by_speaker[r["speaker"]] if k != key]
            rng = packing.rng_for(self.config.seed, key, "prompt")
            if others:
                other = codes[others[int(rng.integers(len(others)))]]
                start = int(rng.integers(max(1, other.shape[1] - prompt_frames + 1)))
                yield packing.tts(self.vocab, key, phonemes, other[:, start:start + prompt_frames], speech)
            elif speech.shape[1] > 1:
                cut = min(prompt_frames, speech.shape[1] // 2)
                self.stats["prefix_prompts"] += 1
                yield packing.tts(self.vocab, key, phonemes, speech[:, :cut], speech[:, cut:])
            else:
                self.failures["utterance too short for a prompt"] += 1


def packed_columns(rows, seq_len: int, pad: int, source_shard: str) -> dict[str, list]:
    """The columns of a packed shard (schemas/packed.arrow.json) holding `rows` (packing.Row)."""
    columns = {n: [] for n in token_shards.arrow_schema(SCHEMA).names}
    for row in rows:
        lengths = [len(d.tokens) for d in row.documents]
        columns["tokens"].append(packing.row_tokens(row, seq_len, pad))
        columns["doc_starts"].append(np.cumsum([0] + lengths[:-1]).tolist())
        columns["doc_lengths"].append(lengths)
        columns["doc_targets"].append([d.target for d in row.documents])
        columns["doc_tasks"].append([d.task for d in row.documents])
        columns["doc_keys"].append([d.key for d in row.documents])
        columns["source_shard"].append(source_shard)
    return columns
