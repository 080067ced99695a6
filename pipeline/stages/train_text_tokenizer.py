"""`train-text-tokenizer`: a byte-level BPE on the captions and transcripts of the input stages,
and the phoneme symbol table of their phonemes.

A model stage: its single output "shard" (`tokenizer`) holds `tokenizer.json`, `phonemes.json`
and `stats.json`, built in one Ray task from the input tars streamed once (texts are kept in
memory, images and audio are not decoded). Its input digest covers every input shard, so a new
shard retrains it (`train_shards` pins the data); its output digest enters the fingerprint of
every stage that references it (`text_tokenizer: <this stage>`), through `text_tokenizer_of`.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pipeline.data.shard_stream import iter_members, member_json
from pipeline.data.speech_shards import AUDIO_EXTENSIONS
from pipeline.ledger import stage_digest
from pipeline.stages.base import ShardInput, ShardOutput, Stage, UpstreamShard, training_input
from pipeline.tokenizers import phoneme_table, text_bpe
from pipeline.tokenizers.phoneme_table import PhonemeTable
from pipeline.tokenizers.text_bpe import TextBPE
from pipeline.tokenizers.text_tokenizer import TextTokenizer

SHARD = "tokenizer"
STATS_FILE = "stats.json"


@dataclass
class TrainTextTokenizerConfig:
    vocab_size: int = 4096
    min_frequency: int = 2
    lowercase: bool = False
    train_shards: int | None = None   # only the first N shards of each input: appending shards keeps the tokenizer


@dataclass
class Corpus:
    """The texts of the input shards: (caption | transcript, text), and the transcripts' phonemes."""
    texts: list[tuple[str, str]] = field(default_factory=list)
    phonemes: list[str] = field(default_factory=list)
    failures: Counter = field(default_factory=Counter)
    without_phonemes: int = 0


def text_tokenizer_of(shards: dict[str, UpstreamShard]) -> TextTokenizer:
    """The tokenizer a train-text-tokenizer stage built, from its built shards (reads phonemes.json
    and tokenizer.json for the sizes, once per process and digest)."""
    files = {url.rsplit("/", 1)[-1]: url for up in shards.values() for url in up.files}
    return _text_tokenizer(stage_digest({s: up.digest for s, up in shards.items()}), files[text_bpe.FILE],
                           files[phoneme_table.FILE])


@lru_cache(maxsize=8)
def _text_tokenizer(digest: str, bpe: str, table: str) -> TextTokenizer:
    return TextTokenizer(digest, bpe, table, text_bpe.load(bpe).vocab_size, phoneme_table.load(table).symbols)


def read_corpus(tars: tuple[str, ...]) -> Corpus:
    """Captions (`key.txt`, or the JSON's caption) and transcripts (of samples with audio: `key.txt`,
    or the JSON's text, and its phonemes) of every sample; empty texts are counted and skipped."""
    corpus = Corpus()
    for url in tars:
        for _, parts in iter_members(url):
            meta = member_json(parts)
            text = (parts["txt"].decode("utf-8", "replace") if "txt" in parts
                    else meta.get("caption") or meta.get("text") or "")
            if not text.strip():
                corpus.failures["empty text"] += 1
                continue
            source = "transcript" if any(e in parts for e in AUDIO_EXTENSIONS) else "caption"
            corpus.texts.append((source, text))
            if source == "transcript":
                if meta.get("phonemes"):
                    corpus.phonemes.append(meta["phonemes"])
                else:
                    corpus.without_phonemes += 1
    return corpus


class TrainTextTokenizer(Stage):
    kind = "train-text-tokenizer"
    version = 1
    Config = TrainTextTokenizerConfig

    def libraries(self) -> dict[str, str]:
        from importlib.metadata import version

        return {"tokenizers": version("tokenizers")}

    def inputs(self, upstream: dict[str, dict[str, UpstreamShard | None]],
               references: dict | None = None) -> list[ShardInput]:
        return [ShardInput(SHARD, *training_input(upstream, self.config.train_shards))]

    def build(self, item: ShardInput, workdir: Path) -> ShardOutput:
        c = self.config
        corpus = read_corpus(item.payload)
        if not corpus.texts:
            raise ValueError(f"no captions or transcripts in the {len(item.payload)} input shards")
        bpe = text_bpe.train((text for _, text in corpus.texts), c.vocab_size, c.min_frequency, c.lowercase)
        table = PhonemeTable.build(corpus.phonemes)
        stats = {**_figures(bpe, corpus), "phoneme_symbols": len(table),
                 "phonemes_per_transcript": _mean(sum(len(p.split()) for p in corpus.phonemes), len(corpus.phonemes)),
                 "transcripts_without_phonemes": corpus.without_phonemes}
        files = [workdir / text_bpe.FILE, workdir / phoneme_table.FILE, workdir / STATS_FILE]
        bpe.save(files[0])
        table.save(files[1])
        files[2].write_text(json.dumps({**stats, "failures": dict(corpus.failures)}, indent=1) + "\n")
        return ShardOutput(files, samples=len(corpus.texts), failures=corpus.failures, stats=stats)

    def status_figures(self, markers: list) -> dict:
        stats = markers[0].stats if markers else {}
        return {k: stats[k] for k in ("vocab_size", "phoneme_symbols") if k in stats}


def _figures(bpe: TextBPE, corpus: Corpus) -> dict:
    """Texts per source, vocabulary reached, and per source the mean tokens per text and the
    compression (UTF-8 bytes per token)."""
    texts, tokens, size = Counter(), Counter(), Counter()
    for (source, text), ids in zip(corpus.texts, bpe.encode_batch([t for _, t in corpus.texts])):
        texts[source] += 1
        tokens[source] += len(ids)
        size[source] += len(text.encode())
    return {"texts": dict(texts), "vocab_size": bpe.vocab_size,
            "tokens_per_text": {s: _mean(tokens[s], n) for s, n in texts.items()},
            "bytes_per_token": {s: _mean(size[s], tokens[s]) for s in texts}}


def _mean(total: float, count: int) -> float:
    return round(total / count, 3) if count else 0.0
