"""The unified vocabulary and document packing, without Ray: ranges, layouts, CM3 and packing."""
import jsonschema
import numpy as np
import pytest

from pipeline.data import packing
from pipeline.schemas import schema
from pipeline.tokenizers import vocab as vocab_module
from pipeline.tokenizers.vocab import Vocab, VocabError

PHONEMES = ("a", "b", "ə", "|")


def full_vocab(**overrides) -> Vocab:
    sizes = dict(text_size=300, text_source="t" * 64, phonemes=PHONEMES, image_codes=1024, image_source="i" * 64,
                 audio_codebooks=4, audio_codebook_size=1024, audio_source="a" * 64, sentinels=4)
    return vocab_module.build(**{**sizes, **overrides})


def test_ranges_cover_every_id_once_and_validate():
    vocab = full_vocab()
    assert [r.name for r in vocab.ranges] == ["special", "text", "phoneme", "image", "audio:0", "audio:1",
                                              "audio:2", "audio:3"]
    owner = vocab.range_of(np.arange(vocab.size))
    assert np.bincount(owner).tolist() == [r.size for r in vocab.ranges]       # contiguous, no overlap, no gap
    assert vocab.size == len(vocab_module.special_tokens(4)) + 300 + 4 + 1024 + 4 * 1024
    assert vocab.special("<pad>") == 0 and vocab.special("<mask:3>") == vocab.range("text").offset - 1
    jsonschema.validate(vocab.to_json(), schema("vocab"))
    assert Vocab.from_json(vocab.to_json()) == vocab
    with pytest.raises(VocabError, match="ranges are contiguous"):
        Vocab((vocab.ranges[0], vocab.ranges[2]))
    with pytest.raises(VocabError, match=r"image ids must be in \[0, 1024\)"):
        vocab.to_global("image", [1024])
    with pytest.raises(VocabError, match="fingerprint"):
        Vocab.from_json({**vocab.to_json(), "fingerprint": "0" * 64})


def test_fingerprint_follows_every_tokenizer():
    base = full_vocab().fingerprint
    for change in (dict(text_source="u" * 64), dict(image_codes=512), dict(audio_codebooks=8),
                   dict(phonemes=PHONEMES + ("c",)), dict(sentinels=8)):
        assert full_vocab(**change).fingerprint != base, change
    assert full_vocab().fingerprint == base
    assert not full_vocab(image_codes=0).has("image")


def test_documents_parse_back_into_their_parts():
    vocab, rng = full_vocab(), np.random.default_rng(0)
    text, image = [5, 17, 299], rng.integers(0, 1024, 64)
    speech, prompt, phonemes = rng.integers(0, 1024, (4, 30)), rng.integers(0, 1024, (4, 12)), [0, 3, 1, 2]
    for doc in (packing.t2i(vocab, "k", text, image), packing.i2t(vocab, "k", text, image)):
        parts = packing.parse(vocab, doc.tokens)
        assert parts["text"].tolist() == text and parts["image"].tolist() == image.tolist()
        target = doc.tokens[doc.target:]
        assert vocab.range_of(target[0]) == (3 if doc.task == "t2i" else 1)     # image first vs text first
    doc = packing.tts(vocab, "k", phonemes, prompt, speech)
    parts = packing.parse(vocab, doc.tokens)
    assert parts["phonemes"].tolist() == phonemes
    assert np.array_equal(parts["prompt"], prompt) and np.array_equal(parts["speech"], speech)
    assert doc.tokens[doc.target - 1] == vocab.special("<boa>")
    parts = packing.parse(vocab, packing.asr(vocab, "k", speech, text).tokens)
    assert np.array_equal(parts["speech"], speech[:1]) and parts["text"].tolist() == text


def test_causal_masked_variant_restores_and_is_seeded():
    vocab = full_vocab()
    doc = packing.t2i(vocab, "k", [1, 2, 3], np.arange(64))
    for seed in range(20):
        masked = packing.causal_masked(vocab, doc, packing.rng_for(seed, "k"), max_spans=3)
        assert masked.task == "cm3:t2i" and len(masked.tokens) == len(doc.tokens) + 2 * (
            np.isin(masked.tokens, [vocab.special(f"<mask:{i}>") for i in range(3)]).sum() // 2)
        assert not np.array_equal(masked.tokens, doc.tokens)
        assert np.array_equal(packing.restore(vocab, masked.tokens), doc.tokens)
        again = packing.causal_masked(vocab, doc, packing.rng_for(seed, "k"), max_spans=3)
        assert np.array_equal(again.tokens, masked.tokens)
        assert packing.parse(vocab, masked.tokens)["image"].tolist() == list(range(64))


def test_pack_keeps_documents_whole_and_in_bounds():
    vocab = full_vocab()
    rng = np.random.default_rng(1)
    docs = [packing.t2i(vocab, f"k{i}", list(range(int(rng.integers(1, 40)))), np.arange(64)) for i in range(200)]
    rows = list(packing.pack(docs, seq_len=256, open_rows=4))
    assert sorted(d.key for r in rows for d in r.documents) == sorted(d.key for d in docs)
    assert all(r.used <= 256 for r in rows)
    fill = lambda rows: sum(r.used for r in rows) / (256 * len(rows))
    sequential = list(packing.pack(docs, seq_len=256, open_rows=1))              # close a row as soon as it is full
    assert fill(rows) > fill(sequential) and fill(rows) > 0.85, (fill(rows), fill(sequential))
    tokens = packing.row_tokens(rows[0], 256, vocab.special("<pad>"))
    position = 0
    for doc in rows[0].documents:
        assert np.array_equal(tokens[position:position + len(doc.tokens)], doc.tokens)
        position += len(doc.tokens)
    assert (tokens[position:] == vocab.special("<pad>")).all()
    assert [d.key for r in packing.pack(docs, 256, 4) for d in r.documents] == \
        [d.key for r in rows for d in r.documents]
