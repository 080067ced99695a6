"""The pack stage over a real local Ray: image and speech token shards, the text tokenizer, the
unified vocabulary, packed rows decoded back into their parts, prompts, determinism, increments."""
from __future__ import annotations

import json
from pathlib import Path

import fsspec
import jsonschema
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import shapes_url_list, write_job
from pipeline.data import packing, token_shards
from pipeline.schemas import schema
from pipeline.spec import SpecError, load_job, parse_job
from pipeline.stages import ShardInput
from pipeline.stages.pack import Pack, PackConfig, PackWork
from pipeline.stages.train_text_tokenizer import text_tokenizer_of
from pipeline.tokenizers import image_vq, phoneme_table, text_bpe
from pipeline.tokenizers import vocab as vocab_module
from pipeline.tokenizers.phoneme_table import PhonemeTable
from pipeline.tokenizers.text_tokenizer import TextTokenizer, load_text_tokenizer
from pipeline.tokenizers.vocab import Vocab
from pipeline.workflow import Planner, run

SEQ_LEN = 1024


def untrained_image_tokenizer(folder: Path) -> Path:
    """A seeded, untrained tiny VQ model: its codes mean nothing, but they are real codes."""
    torch.manual_seed(0)
    config = image_vq.VQConfig(image_size=32, channels=8, codebook_size=256, latent_dim=16, kmeans_init=False)
    return image_vq.save(image_vq.VQAutoencoder(config), folder)


def pack_job(folder: Path, site: str, count: int, seed: int = 0, tasks: str = "[t2i, i2t, tts, asr]") -> Path:
    url_list = shapes_url_list(folder / "urls.parquet", site, count)
    checkpoint = folder / "vq" if (folder / "vq").exists() else untrained_image_tokenizer(folder / "vq")
    return write_job(folder / "job.yaml", folder / "out", f"""\
  images: {{kind: ingest-images, url_list: {url_list}, image_size: 32, samples_per_shard: 20}}
  speech: {{kind: ingest-speech, corpus: demo-espeak, parts: [demo-12], samples_per_shard: 6}}
  vq: {{kind: train-image-tokenizer, pretrained: "{checkpoint}", eval_images: 8}}
  image-tokens: {{kind: tokenize-images, inputs: [images], tokenizer: vq}}
  audio-tokens: {{kind: tokenize-speech, inputs: [speech], codec: {{bandwidth: 1.5, pretrained: false}}}}
  text-bpe: {{kind: train-text-tokenizer, inputs: [images, speech], vocab_size: 512, train_shards: 2}}
  sequences: {{kind: pack, inputs: [image-tokens, audio-tokens], text_tokenizer: text-bpe, tasks: {tasks},
              seq_len: {SEQ_LEN}, seed: {seed}, cm3_rate: 0.3, cm3_max_spans: 2, prompt_seconds: 1.0}}
""")


@pytest.fixture(scope="module")
def packed(ray_address, shapes_site, tmp_path_factory):
    spec = pack_job(tmp_path_factory.mktemp("pack"), shapes_site, 40)
    results = {r.name: r for r in run(load_job(spec), address=ray_address)}
    assert results["sequences"].built == 4 and not results["sequences"].failed(0.0), results["sequences"]
    return spec


def rows_of(spec: Path, stage: str = "sequences") -> dict[str, list[dict]]:
    built = Planner(load_job(spec)).built_shards(stage)
    return {shard: _read(next(u for u in up.files if u.endswith(".parquet"))) for shard, up in built.items()}


def _read(url: str) -> list[dict]:
    with fsspec.open(url, "rb") as f:
        return pq.read_table(f).to_pylist()


def test_vocab_is_saved_valid_and_in_every_shard(packed):
    vocab_json = json.loads((packed.parent / "out" / "sequences" / "vocab.json").read_text())
    jsonschema.validate(vocab_json, schema("vocab"))
    vocab = Vocab.from_json(vocab_json)
    assert [r.name for r in vocab.ranges] == ["special", "text", "phoneme", "image", "audio:0", "audio:1"]
    assert vocab.range("image").size == 256 and vocab.range("audio:1").size == 1024
    text = text_tokenizer_of(Planner(load_job(packed)).built_shards("text-bpe"))
    assert vocab.range("text").size == text.vocab_size and vocab.range("phoneme").tokens == text.phonemes
    for shard in ("image-tokens-00000", "audio-tokens-demo-12-00000"):
        url = str(packed.parent / "out" / "sequences" / "shards" / f"{shard}.parquet")
        assert token_shards.metadata(url)["vocab"] == vocab_json


def test_rows_decode_back_into_the_token_shards(packed):
    job = load_job(packed)
    vocab = Vocab.from_json(json.loads((packed.parent / "out" / "sequences" / "vocab.json").read_text()))
    text = load_text_tokenizer(text_tokenizer_of(Planner(job).built_shards("text-bpe")))
    sources = {r["key"]: r for rows in list(rows_of(packed, "image-tokens").values())
               + list(rows_of(packed, "audio-tokens").values()) for r in rows}
    speakers = {k: r["speaker"] for k, r in sources.items() if "speaker" in r}
    seen, prefix_prompts = set(), 0
    for shard, rows in rows_of(packed).items():
        for row in rows:
            assert len(row["tokens"]) == SEQ_LEN
            end = row["doc_starts"][-1] + row["doc_lengths"][-1]
            assert all(t == vocab.special("<pad>") for t in row["tokens"][end:])
            for start, length, target, task, key in zip(row["doc_starts"], row["doc_lengths"], row["doc_targets"],
                                                         row["doc_tasks"], row["doc_keys"]):
                doc = np.array(row["tokens"][start:start + length])
                assert doc[0] == vocab.special("<bos>") and doc[-1] == vocab.special("<eos>") and 0 < target < length
                parts, source = packing.parse(vocab, doc), sources[key]
                seen.add((task.removeprefix("cm3:"), key))
                codes = np.array(source["tokens"]).reshape(source["shape"])
                if parts["task"] in ("t2i", "i2t"):
                    assert parts["image"].tolist() == source["tokens"]
                    assert text.bpe.decode(parts["text"].tolist()) == source["text"]
                elif parts["task"] == "asr":
                    assert np.array_equal(parts["speech"], codes[:1])
                    assert text.bpe.decode(parts["text"].tolist()) == source["text"]
                else:
                    assert text.table.decode(parts["phonemes"].tolist()) == source["phonemes"]
                    prompt, speech = parts["prompt"], parts["speech"]
                    assert prompt.shape[0] == 2 and 0 < prompt.shape[1] <= 75     # <= prompt_seconds
                    if np.array_equal(np.concatenate([prompt, speech], axis=1), codes):
                        prefix_prompts += 1                                       # continuation mode
                    else:
                        assert np.array_equal(speech, codes)
                        donors = [k for k, r in sources.items() if k != key and speakers.get(k) == speakers[key]
                                  and _contains(np.array(r["tokens"]).reshape(r["shape"]), prompt)]
                        assert donors, f"{key}: the prompt is no window of another utterance of its speaker"
    images = [k for k, r in sources.items() if "speaker" not in r]
    assert {(t, k) for t in ("t2i", "i2t") for k in images} | {(t, k) for t in ("tts", "asr") for k in speakers} == seen
    assert any(task.startswith("cm3:") for rows in rows_of(packed).values() for r in rows for task in r["doc_tasks"])
    markers = [json.loads(p.read_text()) for p in (packed.parent / "out" / "sequences" / "_state").glob("*.json")]
    assert sum(m["stats"].get("prefix_prompts", 0) for m in markers) == prefix_prompts
    tts = sum(n for m in markers for k, n in m["stats"].items() if k.endswith("tts"))
    assert 0 < prefix_prompts < tts                   # both prompt rules ran: a donor utterance, the own prefix


def _contains(codes: np.ndarray, window: np.ndarray) -> bool:
    width = window.shape[1]
    return any(np.array_equal(codes[:, s:s + width], window) for s in range(codes.shape[1] - width + 1))


def test_repacking_is_deterministic_and_incremental(packed, ray_address, shapes_site):
    before = rows_of(packed)
    (result,) = run(load_job(packed), stages=["sequences"], force=["sequences"], address=ray_address)
    assert result.built == 4 and rows_of(packed) == before
    grown = pack_job(packed.parent, shapes_site, 60)                               # a third image shard
    results = {r.name: r.built for r in run(load_job(grown), address=ray_address)}
    assert results["image-tokens"] == 1 and results["text-bpe"] == 0 and results["sequences"] == 1
    reseeded = pack_job(packed.parent, shapes_site, 60, seed=1)
    results = {r.name: r.built for r in run(load_job(reseeded), address=ray_address)}
    assert results["sequences"] == 5


def test_pack_spec_errors_name_the_key(tmp_path):
    base = ("name: t\nstorage: out\nstages:\n  a: {kind: ingest-images, url_list: x.csv}\n"
            "  b: {kind: train-text-tokenizer, inputs: [a]}\n")
    for stage, where in (("{kind: pack, inputs: [a], text_tokenizer: b, tasks: [t2x]}", "stages.p.tasks"),
                         ("{kind: pack, inputs: [a], text_tokenizer: b, cm3_rate: 2}", "stages.p.cm3_rate"),
                         ("{kind: pack, inputs: [a]}", "stages.p"),
                         ("{kind: pack, inputs: [a], text_tokenizer: nope}", "stages.p.text_tokenizer")):
        with pytest.raises(SpecError, match=where.replace(".", r"\.")):
            parse_job(base + f"  p: {stage}\n", tmp_path / "job.yaml")


def test_bad_documents_are_counted_and_the_rest_packed(tmp_path):
    bpe = text_bpe.train(["a red circle", "a blue square", "sounds like speech"] * 5, 300)
    bpe.save(tmp_path / text_bpe.FILE)
    table = PhonemeTable.build(["h ə | l oʊ"])
    table.save(tmp_path / phoneme_table.FILE)
    text = TextTokenizer("d" * 64, str(tmp_path / text_bpe.FILE), str(tmp_path / phoneme_table.FILE),
                         bpe.vocab_size, table.symbols)
    vocab = vocab_module.build(text_size=bpe.vocab_size, phonemes=table.symbols, image_codes=256,
                               audio_codebooks=2, audio_codebook_size=1024)
    images = {"key": ["ok", "empty", "long"], "tokens": [list(range(16))] * 3, "shape": [[4, 4]] * 3,
              "text": ["a red circle", "", " ".join(["a blue square"] * 20)], "url": [""] * 3,
              "source_shard": ["s"] * 3, "source": ["{}"] * 3}
    utterances = [("a1", "A", "h ə"), ("a2", "A", "l oʊ"), ("b1", "B", "h ə | l oʊ"), ("c1", "C", "h x"), ("d1", "D", "")]
    speech = {"key": [u[0] for u in utterances], "tokens": [list(range(20))] * 5, "shape": [[2, 10]] * 5,
              "text": ["sounds like speech"] * 5, "phonemes": [u[2] for u in utterances],
              "speaker": [u[1] for u in utterances], "duration": [10 / 75] * 5, "source_shard": ["s"] * 5,
              "source": ["{}"] * 5}
    token_shards.write(tmp_path / "images.parquet", "image_tokens", images, {"kind": "image", "codebook_size": 256})
    token_shards.write(tmp_path / "speech.parquet", "speech_tokens", speech,
                       {"kind": "audio", "n_q": 2, "codebook_size": 1024, "frame_rate": 75})
    stage = Pack("p", PackConfig("t", tasks=["t2i", "tts"], seq_len=64, prompt_seconds=0.04), "")
    results = {}
    for kind, name in (("image", "images"), ("audio", "speech")):
        work = PackWork(str(tmp_path / f"{name}.parquet"), kind, json.dumps(vocab.to_json()), text)
        (tmp_path / name).mkdir()
        results[kind] = stage.build(ShardInput(name, "0" * 64, work), tmp_path / name)
    assert results["image"].samples == 1 and results["image"].failures == {
        "caption tokenizes to nothing": 1, "t2i document longer than seq_len": 1}
    assert results["audio"].samples == 3 and results["audio"].stats["prefix_prompts"] == 1     # b1 speaks alone
    assert results["audio"].failures == {"phoneme not in the text tokenizer's table": 1, "no phonemes": 1}
    rows = _read(str(tmp_path / "speech" / "speech.parquet"))
    assert sorted(k for r in rows for k in r["doc_keys"]) == ["a1", "a2", "b1"]
