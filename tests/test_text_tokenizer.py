"""The text tokenizer: byte-level BPE determinism and round trips, the phoneme table, and the
train-text-tokenizer stage on demo images and demo-espeak speech over a real local Ray."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from conftest import shapes_url_list, write_job
from pipeline.demo import shapes, speech
from pipeline.spec import SpecError, load_job, parse_job
from pipeline.stages import ShardInput
from pipeline.stages.train_text_tokenizer import (TrainTextTokenizer, TrainTextTokenizerConfig, read_corpus,
                                                  text_tokenizer_of)
from pipeline.storage import Storage
from pipeline.tokenizers import phoneme_table, text_bpe
from pipeline.tokenizers.phoneme_table import WORD_BOUNDARY, PhonemeTable
from pipeline.tokenizers.text_tokenizer import load_text_tokenizer
from pipeline.workflow import Planner, run

ODD_TEXTS = ["  two  spaces\tand a tab\n", "ünïcödé, 日本語 and 🎉", "\x00\x7f control", "UPPER lower"]


def text_job(folder: Path, site: str, count: int) -> Path:
    """The first `count` demo shapes (20 a shard), 12 demo-espeak utterances (6 a shard), the tokenizer."""
    url_list = shapes_url_list(folder / "urls.parquet", site, count)
    return write_job(folder / "job.yaml", folder / "out",
                     f"  images: {{kind: ingest-images, url_list: {url_list}, image_size: 32, samples_per_shard: 20}}\n"
                     "  speech: {kind: ingest-speech, corpus: demo-espeak, parts: [demo-12], samples_per_shard: 6}\n"
                     "  text-bpe: {kind: train-text-tokenizer, inputs: [images, speech], vocab_size: 512}\n")


@pytest.fixture(scope="module")
def built(ray_address, shapes_site, tmp_path_factory):
    """Images (2 shards), speech (2 shards) and the text tokenizer, built once for the module."""
    spec = text_job(tmp_path_factory.mktemp("text"), shapes_site, 40)
    results = {r.name: r.built for r in run(load_job(spec), address=ray_address)}
    assert results == {"images": 2, "speech": 2, "text-bpe": 1}
    return spec


def tars(job, *names: str) -> tuple[str, ...]:
    planner = Planner(job)
    return tuple(u for n in names for up in planner.built_shards(n).values() for u in up.files if u.endswith(".tar"))


def test_bpe_training_is_deterministic_and_round_trips_any_text():
    texts = [row["caption"] for row in shapes.demo_rows(300)] + speech.sentences(200)
    first, second = text_bpe.train(texts, 400), text_bpe.train(reversed(texts), 400)
    assert first.tokenizer.to_str() == second.tokenizer.to_str() and first.vocab_size == 400
    for text in texts[:50] + ODD_TEXTS:
        assert first.decode(first.encode(text)) == text
    assert len(first.encode(texts[0])) < len(texts[0].encode()) / 2    # merges learnt from the data
    lower = text_bpe.train(texts, 400, lowercase=True)
    assert lower.decode(lower.encode("UPPER lower")) == "upper lower"
    assert text_bpe.train(["a b"], 4096).vocab_size == 256       # nothing occurs twice: bytes only
    with pytest.raises(ValueError, match="vocab_size"):
        text_bpe.train(texts, 200)


def test_phoneme_table_is_sorted_and_round_trips(tmp_path):
    strings = ["h ə l oʊ | w ɜː l d", "ɐ s m ɔː l | s k w ɛɹ"]
    table = PhonemeTable.build(reversed(strings))
    assert table == PhonemeTable.build(strings) and list(table.symbols) == sorted(table.symbols)
    assert WORD_BOUNDARY in table.symbols and len(table) == len({s for p in strings for s in p.split()})
    assert all(table.decode(table.encode(s)) == s for s in strings)
    table.save(tmp_path / phoneme_table.FILE)
    assert phoneme_table.load(tmp_path / phoneme_table.FILE) == table
    with pytest.raises(ValueError, match="'x'"):
        table.encode("h x")


def test_stage_reads_captions_and_transcripts_and_trains(built):
    job = load_job(built)
    corpus = read_corpus(tars(job, "images", "speech"))
    captions = [t for source, t in corpus.texts if source == "caption"]
    transcripts = [t for source, t in corpus.texts if source == "transcript"]
    assert sorted(captions) == sorted(row["caption"] for row in shapes.demo_rows(40))
    assert sorted(transcripts) == sorted(speech.transcript(u["text"]) for u in speech.utterances(12))
    tokenizer = text_tokenizer_of(Planner(job).built_shards("text-bpe"))
    codec = load_text_tokenizer(tokenizer)
    assert all(codec.bpe.decode(codec.encode(t)) == t for _, t in corpus.texts)
    phones = {s for p in corpus.phonemes for s in p.split()}
    assert len(corpus.phonemes) == 12 and set(tokenizer.phonemes) == phones | {WORD_BOUNDARY}
    assert all(codec.table.decode(codec.encode_phonemes(p)) == p for p in corpus.phonemes)
    stats = json.loads(Path(Storage(job.storage).path("text-bpe/shards/stats.json")).read_text())
    assert stats["texts"] == {"caption": 40, "transcript": 12} and stats["vocab_size"] == tokenizer.vocab_size
    assert stats["phoneme_symbols"] == len(tokenizer.phonemes) and stats["bytes_per_token"]["caption"] > 2
    (result,) = run(job, stages=["text-bpe"])
    assert result.built == 0 and result.figures == {"vocab_size": tokenizer.vocab_size,
                                                    "phoneme_symbols": len(tokenizer.phonemes)}


def test_forced_rebuild_gives_identical_files_and_digest(built, ray_address):
    job = load_job(built)
    shards = Path(Storage(job.storage).path("text-bpe/shards"))
    before = {name: (shards / name).read_bytes() for name in (text_bpe.FILE, phoneme_table.FILE)}
    digest = text_tokenizer_of(Planner(job).built_shards("text-bpe")).digest
    (forced,) = run(job, stages=["text-bpe"], force=["text-bpe"], address=ray_address)
    assert forced.built == 1
    assert {name: (shards / name).read_bytes() for name in before} == before
    assert text_tokenizer_of(Planner(load_job(built)).built_shards("text-bpe")).digest == digest


def test_a_new_image_shard_retrains_it(built, shapes_site, ray_address):
    grown = text_job(built.parent, shapes_site, 60)
    (images,) = run(load_job(grown), stages=["images"], address=ray_address)
    assert images.built == 1 and Planner(load_job(grown)).plan("text-bpe").plan.todo() == ["tokenizer"]
    rebuilt = {r.name: r.built for r in run(load_job(grown), address=ray_address)}
    assert rebuilt == {"images": 0, "speech": 0, "text-bpe": 1}
    again = {r.name: r.built for r in run(load_job(grown), address=ray_address)}
    assert again == {"images": 0, "speech": 0, "text-bpe": 0}


def test_empty_texts_are_counted_and_skipped(tmp_path):
    tar = tmp_path / "shard.tar"
    samples = {"a": {"txt": b"a red circle"}, "b": {"txt": b""}, "c": {"txt": b" \n\t"},
               "d": {"json": json.dumps({"caption": "a blue star"}).encode()},
               "e": {"flac": b"", "txt": b"HELLO", "json": json.dumps({"phonemes": "h ə l oʊ"}).encode()},
               "f": {"flac": b"", "txt": b"HI", "json": json.dumps({"phonemes": None}).encode()}}
    with tarfile.open(tar, "w") as out:
        for key, parts in samples.items():
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    stage = TrainTextTokenizer("text-bpe", TrainTextTokenizerConfig(vocab_size=300))
    output = stage.build(ShardInput("tokenizer", "digest", (str(tar),)), tmp_path)
    assert output.samples == 4 and output.failures == {"empty text": 2}
    assert output.stats["texts"] == {"caption": 2, "transcript": 2}
    assert output.stats["transcripts_without_phonemes"] == 1 and output.stats["phoneme_symbols"] == 5
    with pytest.raises(ValueError, match="no captions or transcripts"):
        stage.build(ShardInput("tokenizer", "digest", ()), tmp_path)


def test_spec_errors_name_the_key(tmp_path):
    text = ("name: bad\nstorage: runs\nstages:\n  images: {kind: ingest-images, url_list: 'demo://shapes?count=5'}\n"
            "  text-bpe: {kind: train-text-tokenizer, inputs: [images], vocab_size: 100, min_frequency: 0}\n")
    with pytest.raises(SpecError) as error:
        parse_job(text, "bad.yaml", tmp_path)
    found = dict(error.value.problems)
    assert "minimum of 257" in found["stages.text-bpe.vocab_size"] and "stages.text-bpe.min_frequency" in found
    with pytest.raises(SpecError, match="stages.text-bpe.vocab_size: 70000 is greater than the maximum of 65535"):
        parse_job(text.replace("100, min_frequency: 0", "70000"), "bad.yaml", tmp_path)
    with pytest.raises(SpecError, match="stages.text-bpe: 'inputs' is a required property"):
        parse_job(text.replace("inputs: [images], ", ""), "bad.yaml", tmp_path)
