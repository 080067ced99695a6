"""Evaluating a trained token model on the held-out documents of its packed shards.

- Every arch: teacher-forced loss and perplexity per task (`loss_t2i`, `perplexity_t2i`, ...).
- t2i (decoder, parti), with an image tokenizer: images sampled for held-out captions, decoded to PNG;
  on demo shapes captions the analyzer reads each image back and scores color, kind, position, color
  and kind together, and the whole scene (`fidelity_*`). With `holdout: combinations` these captions
  hold (color, kind) pairs that training never saw.
- i2t (decoder): captions sampled for held-out images; demo captions scored per attribute and exactly
  (`i2t_fidelity_*`).
- tts (valle), with a codec: speech sampled for held-out utterances with a prompt of the same speaker,
  decoded to WAV; on the demo-espeak corpus scored by the TTS score (pipeline.metrics.tts_score:
  MCD-DTW against the eSpeak rendering through the same codec, f0 distance to the prompt; `tts_*`).
"""
from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline.data import packed_rows, packing, token_shards
from pipeline.models.holdout import HoldOut
from pipeline.models.rerank import target_log_likelihood
from pipeline.models.samplers import SamplingSettings, image_to_text, text_to_image, text_to_speech
from pipeline.models.token_model import TokenModel
from pipeline.models.train_tasks import DocumentFilter, base_task
from pipeline.storage import Storage

CAPTION_TOKENS = 48            # i2t: longest sampled caption


def evaluate(model: TokenModel, work, config, tasks: tuple[str, ...], storage_root: str, out: Path, output) -> None:
    """Write eval.json and the sample files (t2i-NN.png, tts-NN.wav, t2i.json) into `out`; figures into
    output.stats, files into output.files (the stage keeps them beside the model)."""
    s = SamplingSettings(config.temperature, config.top_k, config.top_p, config.cfg_scale, config.seed,
                         config.i2t_cfg_scale, config.rerank, config.i2t_rerank)
    keep = DocumentFilter(model.vocab, tasks, HoldOut(config.holdout, config.holdout_share), work.text)
    held = list(itertools.islice(_held_out(work.files, keep), config.eval_documents))
    report: dict = {"documents": len(held), **heldout_loss(model, [doc for _, doc in held])}
    samples = out / "samples"
    samples.mkdir(exist_ok=True)
    plain = defaultdict(list)                          # task -> [(shard url, doc)], plain documents only
    for url, doc in held:
        plain[doc.task].append((url, doc))
    n = config.eval_samples
    if "t2i" in tasks and model.arch in ("decoder", "parti") and work.image_tokenizer and work.text:
        report["t2i"] = t2i_samples(model, keep, work.image_tokenizer, plain["t2i"][:n], s, samples)
    if "i2t" in tasks and model.arch == "decoder" and work.text:
        report["i2t"] = i2t_samples(model, keep, plain["i2t"][:n], s)
    if "tts" in tasks and model.arch == "valle" and work.codec:
        report["tts"] = tts_samples(model, work.codec, plain["tts"][:n], s, storage_root, samples)
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    output.files += [out / "eval.json", *sorted(samples.iterdir())]
    output.samples = len(held)
    output.stats.update(figures(report))


def figures(report: dict) -> dict:
    """The report's headline numbers, flat: loss, perplexity (per task too) and every fidelity / tts figure."""
    flat = {k: v for k, v in report.items() if isinstance(v, (int, float))}
    for part in ("t2i", "i2t", "tts"):
        flat.update({k: v for k, v in report.get(part, {}).items() if isinstance(v, (int, float))})
    return flat


def _held_out(files, keep: DocumentFilter) -> Iterator[tuple[str, packed_rows.PackedDocument]]:
    for url in files:
        for row in packed_rows.iter_rows(url, keep.vocab.size):
            for doc in packed_rows.documents(url, row):
                if base_task(doc.task) in keep.tasks and keep.held_out(doc):
                    yield url, doc


@torch.no_grad()
def heldout_loss(model: TokenModel, docs: list[packed_rows.PackedDocument]) -> dict:
    """Mean teacher-forced loss of each document's target part, per task and overall, and perplexities."""
    losses = defaultdict(list)
    for doc in docs:
        for name, value in _document_losses(model, doc).items():
            losses[name].append(value)
    report = {}
    for name, values in sorted(losses.items()):
        report[f"loss_{name}"] = round(float(np.mean(values)), 4)
        report[f"perplexity_{name}"] = round(math.exp(min(50.0, float(np.mean(values)))), 3)
    if losses:
        overall = float(np.mean([v for values in losses.values() for v in values]))
        report.update(loss=round(overall, 4), perplexity=round(math.exp(min(50.0, overall)), 3))
    return report


def _document_losses(model: TokenModel, doc: packed_rows.PackedDocument) -> dict[str, float]:
    task = doc.task.replace(":", "_")
    if model.arch == "decoder":                       # the mean over the target's ids
        return {task: -target_log_likelihood(model, doc) / (len(doc.tokens) - doc.target)}
    parsed = packing.parse(model.vocab, doc.tokens)
    if model.arch == "valle":
        from pipeline.models.valle import collate

        _, stats = model.net(collate(model.vocab, [parsed], torch.Generator().manual_seed(0)))
        return {"tts_ar": stats["loss_tts_ar"], "tts_nar": stats["loss_tts_nar"]}
    from pipeline.models.parti import collate, training_loss

    loss, _ = training_loss(model.net, collate(model.vocab, [parsed]))
    return {task: float(loss)}


def _scene(caption: str):
    from pipeline.demo.shapes import parse_caption

    try:
        return parse_caption(caption)
    except ValueError:
        return None


def t2i_samples(model: TokenModel, keep: DocumentFilter, tokenizer, docs: list, s: SamplingSettings,
                samples: Path) -> dict:
    """PNGs sampled for held-out captions, and their fidelity on demo shapes captions."""
    from pipeline.data.image_shards import to_images
    from pipeline.demo.analyzer import analyze
    from pipeline.stages.tokenize_images import load_tokenizer

    vq = load_tokenizer(tokenizer)
    hits, captions = defaultdict(list), []
    for i, (_, doc) in enumerate(docs):
        parsed = packing.parse(model.vocab, doc.tokens)
        caption = keep.caption(doc)
        side = math.isqrt(len(parsed["image"]))
        codes = text_to_image(model, parsed["text"].tolist(), side * side, s, salt=i)
        image = to_images(vq.decode(torch.as_tensor(codes, dtype=torch.long).reshape(1, side, side)))[0]
        image.save(samples / f"t2i-{i:02d}.png")
        captions.append({"file": f"t2i-{i:02d}.png", "caption": caption})
        expected = _scene(caption)
        if expected is not None:
            for name, value in _scene_hits(expected, analyze(image)).items():
                hits[name].append(value)
    (samples / "t2i.json").write_text(json.dumps(captions, indent=1) + "\n")
    return {"samples": len(docs), "scored": len(hits.get("exact", [])),
            **{f"fidelity_{name}": round(float(np.mean(v)), 4) for name, v in hits.items()}}


def _scene_hits(expected, found) -> dict[str, float]:
    """Share of expected shapes whose color, kind, position, color and kind are read back (matched
    by position), and whether the whole scene is."""
    at = {shape.position: shape for shape in found.shapes}
    pairs = [(shape, at.get(shape.position)) for shape in expected.shapes]

    def share(test) -> float:
        return sum(f is not None and test(e, f) for e, f in pairs) / len(pairs)

    return {"color": share(lambda e, f: e.color == f.color), "kind": share(lambda e, f: e.kind == f.kind),
            "position": share(lambda e, f: True),
            "color_and_kind": share(lambda e, f: (e.color, e.kind) == (f.color, f.kind)),
            "exact": float(found == expected)}


def i2t_samples(model: TokenModel, keep: DocumentFilter, docs: list, s: SamplingSettings) -> dict:
    """Captions sampled greedily (i2t guidance as in `s`) for held-out images, scored against the true
    caption on demo shapes captions."""
    greedy = replace(s, temperature=0.0)
    hits, exact = defaultdict(list), []
    for i, (_, doc) in enumerate(docs):
        parsed = packing.parse(model.vocab, doc.tokens)
        truth = keep.caption(doc)
        said = keep.bpe.decode(image_to_text(model, parsed["image"], CAPTION_TOKENS, greedy, salt=i))
        exact.append(float(said.strip() == truth.strip()))
        expected, found = _scene(truth), _scene(said)
        if expected is not None:
            for name, value in _scene_hits(expected, found or _EmptyScene()).items():
                hits[name].append(value)
    return {"samples": len(docs), "i2t_exact": round(float(np.mean(exact)), 4) if exact else None,
            **{f"i2t_fidelity_{name}": round(float(np.mean(v)), 4) for name, v in hits.items()}}


class _EmptyScene:
    """What a caption that does not parse reads as: no shapes, no background."""
    shapes: tuple = ()
    background = None


def tts_samples(model: TokenModel, codec_checkpoint, docs: list, s: SamplingSettings, storage_root: str,
                samples: Path) -> dict:
    """WAVs sampled for held-out utterances (phonemes + their document's prompt), TTS-scored on demo-espeak."""
    import soundfile as sf

    from pipeline.metrics.tts_score import demo_reference, score
    from pipeline.tokenizers.audio_codec import CodecConfig, load_codec

    n_q = sum(1 for r in model.vocab.ranges if r.name.startswith("audio:"))
    codec = load_codec(CodecConfig(name="tokenmill", stage="codec", levels=n_q), trained=codec_checkpoint)

    def decode(codes: np.ndarray) -> np.ndarray:
        return codec.decode(torch.as_tensor(codes, dtype=torch.long)[None])[0, 0].numpy()

    scores, written = [], []
    for i, (url, doc) in enumerate(docs):
        parsed = packing.parse(model.vocab, doc.tokens)
        frames = parsed["speech"].shape[1]
        codes = text_to_speech(model, parsed["phonemes"].tolist(), parsed["prompt"], 2 * frames + 75, s, salt=i)
        wav = decode(codes)
        sf.write(samples / f"tts-{i:02d}.wav", wav, codec.sample_rate, format="WAV", subtype="FLOAT")
        written.append(f"tts-{i:02d}.wav")
        source = _source_row(url, doc.key, storage_root)
        if source is not None and _is_demo_speech(source):
            reference = demo_reference(source["text"], str(source["speaker"]), codec.sample_rate,
                                       lambda audio: decode(codec.encode(torch.from_numpy(audio).view(1, 1, -1))[0]))
            scores.append(score(wav, reference, decode(parsed["prompt"]), codec.sample_rate))
    result = {"samples": len(written), "scored": len(scores)}
    if scores:
        voiced = [x.f0_semitones for x in scores if np.isfinite(x.f0_semitones)]   # nan: a side is unvoiced
        result.update(tts_mcd=round(float(np.mean([x.mcd_dtw for x in scores])), 3), tts_voiced=len(voiced),
                      tts_f0_semitones=round(float(np.median(voiced)), 3) if voiced else None)
    return result


def _is_demo_speech(row: dict) -> bool:
    """Whether an utterance comes from the demo-espeak corpus (whose speech the TTS score re-synthesizes)."""
    return "demo-espeak" in str(row.get("source", ""))


def _source_row(packed_url: str, key: str, storage_root: str) -> dict | None:
    """The token-shard row a packed document was made from (text, speaker, ...), via the shard's `source`."""
    url = _source_url(packed_url, storage_root)
    return token_shards.read_row(url, key=key) if url else None


@lru_cache(maxsize=64)
def _source_url(packed_url: str, storage_root: str) -> str | None:
    """The URL of the token shard a packed shard was made from (its metadata read once per shard)."""
    source = token_shards.metadata(packed_url).get("source")
    if not source:
        return None
    return source if "://" in source or source.startswith("/") else Storage(storage_root).url(source)
