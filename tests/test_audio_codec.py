"""tokenmill's audio codec on a real local Ray over the offline demo corpus (eSpeak NG voices): a tiny
codec trained with Ray Train (metrics, evaluation, calibration, examples), recovering in the same fit
when one of its workers is killed; shapes and frame counts at every level count; tokenize-speech with it, deterministic, decoded
back to WAV; checkpoints refused for levels or sample rate; bad utterances counted; spec errors."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from conftest import assert_recovers_after_worker_kill
from speech_corpora import bad_speech_shard
from pipeline.data import token_shards
from pipeline.data.speech_shards import iter_samples
from pipeline.ledger import StageLedger
from pipeline.roundtrip import decode_speech
from pipeline.spec import SpecError, load_job, parse_job
from pipeline.stages.base import ShardOutput, checkpoint_of
from pipeline.storage import Storage
from pipeline.tokenizers import audio_codec_model
from pipeline.tokenizers.audio_codec import CheckpointError, CodecConfig, load_codec
from pipeline.tokenizers.audio_codec_model import AudioCodecModel, CodecModelConfig
from pipeline.tokenizers.audio_codec_train import CodecTrainSettings, train_crops
from pipeline.workflow import Planner, run

TINY = ("channels: 4, max_channels: 16, latent_dim: 16, codebook_dim: 16, codebook_size: 64, levels: 4, "
        "batch_size: 2, crop_seconds: 0.2, warmup_steps: 2, shuffle_buffer: 8, holdout_share: 0.25, "
        "eval_utterances: 6, examples: 2, calibration_utterances: 3, log_every: 2")
TINY_MODEL = CodecModelConfig(channels=4, max_channels=16, latent_dim=16, codebook_dim=16, codebook_size=64, levels=4)


def write_job(folder: Path, steps: int = 8, checkpoint_every: int = 4, levels: int = 2, extra: str = "") -> Path:
    """Demo speech (24 utterances, 8 a shard), a tiny codec trained on it, its tokens at `levels`."""
    spec = folder / "job.yaml"
    spec.write_text(f"""
name: codec-test
storage: runs
stages:
  speech: {{kind: ingest-speech, corpus: demo-espeak, parts: [demo-24], download_dir: {folder / "corpora"},
           samples_per_shard: 8}}
  codec: {{kind: train-audio-codec, inputs: [speech], {TINY}, steps: {steps}, checkpoint_every: {checkpoint_every}}}
  tokens: {{kind: tokenize-speech, inputs: [speech], codec: {{name: tokenmill, stage: codec, levels: {levels}}}}}
{extra}""")
    return spec


def shards_folder(spec: Path, stage: str) -> Path:
    return Path(Storage(load_job(spec).storage).path(f"{stage}/shards"))


def trained_model(spec: Path) -> AudioCodecModel:
    return audio_codec_model.load(shards_folder(spec, "codec"))


@pytest.fixture(scope="module")
def built(ray_address, tmp_path_factory):
    """Speech, the tiny codec and its tokens, built once for the module's tests."""
    spec = write_job(tmp_path_factory.mktemp("codec"))
    results = {r.name: r for r in run(load_job(spec), address=ray_address)}
    assert [(r.built, r.totals.failures, r.failed_shards) for r in results.values()] == [(3, 0, 0), (1, 0, 0), (3, 0, 0)]
    return spec, results


def test_training_writes_checkpoint_metrics_evaluation_and_examples(built):
    spec, results = built
    folder = shards_folder(spec, "codec")
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert {"loss", "l1", "stft", "mel", "commit", "levels", "usage", "lr", "seconds"} <= set(metrics[0])
    assert all(1 <= m["levels"] <= 4 for m in metrics)    # quantizer dropout: 1..levels a step
    report = json.loads((folder / "eval.json").read_text())
    assert report["utterances"] == 6 and set(report["levels"]) == {"1", "2", "4"}
    assert 0 < report["levels"]["4"]["mcd"] < 60 and report["mcd_4"] == report["mcd"] == report["levels"]["4"]["mcd"]
    assert len(report["usage_per_level"]) == 4 and report["usage"] == min(report["usage_per_level"]) > 0
    assert report["encode_x_realtime"] > 0 and report["decode_x_realtime"] > 0 and report["train_hours"] > 0
    # demo-espeak speech: the TTS-score calibration ran through this codec's round trip
    assert report["calibration"]["references"] == 3 and 0 <= report["calibration"]["right_below_all_wrong"] <= 1
    wavs = sorted(p.name for p in folder.glob("*.wav"))
    assert len(wavs) == 4 and all(n.endswith((".original.wav", ".decoded.wav")) for n in wavs)
    original, rate = sf.read(folder / wavs[1])
    decoded, _ = sf.read(folder / wavs[0])
    assert rate == 24000 and original.shape == decoded.shape
    figures = results["codec"].figures
    assert figures["steps"] == 8 and figures["mcd"] == report["mcd"] and figures["usage"] == report["usage"]
    assert {"mcd_4", "si_snr", "encode_x_realtime", "decode_x_realtime", "tts_right_below_wrong"} <= set(figures)
    status = json.loads(subprocess.run([sys.executable, "-m", "pipeline.cli", "status", str(spec), "--json"],
                                       capture_output=True, text=True, check=True).stdout)
    assert status["stages"]["codec"]["mcd"] == report["mcd"]
    assert trained_model(spec).config.levels == 4


def test_shapes_and_frame_counts_at_every_level_count(built):
    model = trained_model(built[0])
    wav = 0.1 * torch.randn(2, 1, 24000, generator=torch.Generator().manual_seed(0))
    full = model.encode(wav)
    for samples in (1, 320, 321, 641, 24000):
        for n in range(1, 5):
            codes = model.encode(wav[..., :samples], n)
            frames = math.ceil(samples / 320)
            assert codes.shape == (2, n, frames) and codes.dtype == torch.long
            assert 0 <= codes.min() and codes.max() < 64
            assert model.decode(codes).shape == (2, 1, frames * 320)
    for n in range(1, 5):   # greedy residual levels: n levels are the first n of all, whatever the length
        assert torch.equal(model.encode(wav, n), full[:, :n])
    # causal: the codes of a prefix are the prefix of the codes
    assert torch.equal(model.encode(wav[..., :6400]), full[..., :20])
    with pytest.raises(ValueError, match="codes of 5 levels"):
        model.decode(torch.zeros(1, 5, 3, dtype=torch.long))


def test_token_shards_record_the_codec_and_decode_back(built, tmp_path):
    spec, results = built
    job = load_job(spec)
    checkpoint = checkpoint_of(Planner(job).built_shards("codec"))
    model = trained_model(spec)
    audio = {s.key: s.audio for up in Planner(job).built_shards("speech").values() for s in iter_samples(up.files[0], 24000)}
    rows, agree, total = [], 0, 0
    for path in sorted(shards_folder(spec, "tokens").glob("*.parquet")):
        assert token_shards.metadata(path) == {"kind": "audio", "codec": checkpoint.digest, "codec_name": "tokenmill",
                                               "bandwidth": 0.9, "n_q": 2, "codebook_size": 64, "frame_rate": 75,
                                               "sample_rate": 24000}
        rows += pq.read_table(path).to_pylist()
    assert len(rows) == 24 == results["tokens"].totals.samples
    for row in rows:
        wav = audio[row["key"]]
        frames = math.ceil(len(wav) / 320)
        assert row["shape"] == [2, frames] and len(row["tokens"]) == 2 * frames
        alone = model.encode(wav.view(1, 1, -1), 2)[0].numpy()
        agree += (alone == np.array(row["tokens"]).reshape(2, frames)).sum()
        total += 2 * frames
    assert agree / total > 0.99    # batch-mates change codes only through float rounding (causal codec)
    row = rows[3]
    wav, rate = decode_speech(job, "tokens", key=row["key"])
    expected = model.decode(torch.tensor(row["tokens"]).reshape(1, *row["shape"]))[0, 0, :round(row["duration"] * 24000)]
    assert rate == 24000 and np.array_equal(wav, expected.numpy())
    out = tmp_path / "row.wav"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "decode", str(spec), "--stage", "tokens", "--key",
                           row["key"], "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(sf.read(out, dtype="float32")[0], wav)


def test_tokens_are_deterministic_and_follow_the_checkpoint(built, ray_address):
    spec, _ = built
    tokens = lambda: {p.name: pq.read_table(p).column("tokens").to_pylist()
                      for p in sorted(shards_folder(spec, "tokens").glob("*.parquet"))}
    before = tokens()
    (forced,) = run(load_job(spec), stages=["tokens"], force=["tokens"], address=ray_address)
    assert forced.built == 3 and tokens() == before              # new actors, the same checkpoint
    assert torch.equal(trained_model(spec).encode(torch.ones(1, 1, 960) * 0.1),
                       trained_model(spec).encode(torch.ones(1, 1, 960) * 0.1))
    # more levels: every token shard is stale; the first 2 levels of 4 are the 2-level tokens
    write_job(spec.parent, levels=4)
    job = load_job(spec)
    assert Planner(job).plan("codec").plan.todo() == [] and len(Planner(job).plan("tokens").plan.todo()) == 3
    run(job, stages=["tokens"], address=ray_address)
    for name, rows in tokens().items():
        for four, two in zip(rows, before[name]):
            assert np.array_equal(np.array(four).reshape(4, -1)[:2].reshape(-1), two)
    write_job(spec.parent)


def test_checkpoints_that_do_not_match_are_refused(built, ray_address, tmp_path):
    spec, _ = built
    job = load_job(spec)
    checkpoint = checkpoint_of(Planner(job).built_shards("codec"))
    with pytest.raises(CheckpointError, match="levels 6 asked, but its checkpoint has 4 levels"):
        load_codec(CodecConfig(name="tokenmill", stage="codec", levels=6), trained=checkpoint)
    # a pretrained checkpoint must have the stage's sample rate and levels: both values are named
    folder = shards_folder(spec, "codec")
    other = tmp_path / "job.yaml"
    other.write_text(f"""
name: refused
storage: {job.storage}
stages:
  rate: {{kind: train-audio-codec, pretrained: "{folder}", sample_rate: 16000, levels: 4}}
  levels: {{kind: train-audio-codec, pretrained: "{folder}", levels: 8}}
  fits: {{kind: train-audio-codec, pretrained: "{folder}", levels: 4}}
  tokens6: {{kind: tokenize-speech, inputs: [speech], codec: {{name: tokenmill, stage: fits, levels: 6}}}}
  speech: {{kind: ingest-speech, corpus: demo-espeak, parts: [demo-24], download_dir: {spec.parent / "corpora"},
           samples_per_shard: 8}}
""")
    results = {r.name: r for r in run(load_job(other), address=ray_address)}
    markers = {name: StageLedger(Storage(job.storage), name).read_markers() for name in ("rate", "levels", "tokens6")}
    assert "its sample_rate is 24000, the stage's sample_rate is 16000" in markers["rate"]["codec"].error
    assert "its levels is 4, the stage's levels is 8" in markers["levels"]["codec"].error
    assert results["fits"].built == 1 and "steps" not in results["fits"].figures
    assert all("levels 6 asked, but its checkpoint has 4 levels" in m.error for m in markers["tokens6"].values())


def test_a_killed_worker_recovers_from_the_last_checkpoint(ray_address, tmp_path):
    spec = write_job(tmp_path, steps=100, checkpoint_every=20)
    run(load_job(spec), stages=["speech"], address=ray_address)
    assert_recovers_after_worker_kill(spec, "codec", "codec", ray_address)


def test_bad_utterances_are_skipped_in_training_and_counted(built, tmp_path):
    spec, _ = built
    tar = bad_speech_shard(tmp_path / "bad.tar")
    settings = CodecTrainSettings(batch_size=4, crop_seconds=0.2, shuffle_buffer=2, holdout_share=0.0)
    batches = train_crops([str(tar)], TINY_MODEL, settings, 0, 1, 0)
    crops = torch.cat([next(batches) for _ in range(3)])
    assert crops.shape == (12, 1, 4800) and torch.isfinite(crops).all() and crops.abs().max() <= 0.31
    stage = load_job(spec).stages["codec"].stage
    output = ShardOutput([], samples=0)
    stage.evaluate(trained_model(spec), (str(tar),), tmp_path, output)
    assert output.failures == {"shorter than one codec frame": 1, "NaN or infinite samples": 1, "silent": 1,
                               "corrupt audio (LibsndfileError)": 1, "no audio in sample": 1, "clipped": 1}
    assert output.stats["failed_keys"] == ["b-short", "c-nan", "d-silent", "e-corrupt", "g-no-audio", "h-clipped"]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["utterances"] == 0 and report["train_hours"] == pytest.approx(2 / 3600, abs=1e-4)
    assert "skipped" in report["calibration"]    # not demo-espeak speech


def test_codec_spec_errors_name_the_key(tmp_path):
    def problems(stages: str) -> dict[str, str]:
        text = ("name: bad\nstorage: runs\nstages:\n  speech: {kind: ingest-speech, corpus: demo-espeak, parts: [demo-8]}\n"
                + stages)
        with pytest.raises(SpecError) as error:
            parse_job(text, "bad.yaml", tmp_path)
        return dict(error.value.problems)

    found = problems("  codec: {kind: train-audio-codec, inputs: [speech], strides: [3, 7]}\n"
                     "  a: {kind: tokenize-speech, inputs: [speech], codec: {name: tokenmill, stage: nowhere, levels: 2}}\n"
                     "  b: {kind: tokenize-speech, inputs: [speech], codec: {name: tokenmill, levels: 2, bandwidth: 6}}\n")
    assert "multiple of the hop 21" in found["stages.codec.sample_rate"]
    assert "no stage named 'nowhere'" in found["stages.a.codec.stage"]
    assert "unknown key" in found["stages.b.codec.bandwidth"] and "required property" in found["stages.b.codec"]
    # once every reference exists: a codec stage of the wrong kind, more levels than it trains
    text = ("  codec: {kind: train-audio-codec, inputs: [speech], levels: 4}\n"
            "  a: {kind: tokenize-speech, inputs: [speech], codec: {name: tokenmill, stage: speech, levels: 2}}\n"
            "  b: {kind: tokenize-speech, inputs: [speech], codec: {name: tokenmill, stage: codec, levels: 6}}\n")
    found = problems(text)
    assert found["stages.a.codec.stage"] == "stage 'speech' is of kind ingest-speech, not train-audio-codec"
    assert found["stages.b.codec.levels"] == "6 levels asked, but stage codec trains 4"
    text = ("name: ok\nstorage: runs\nstages:\n  speech: {kind: ingest-speech, corpus: demo-espeak, parts: [demo-8]}\n"
            + text.replace("stage: speech", "stage: codec").replace("levels: 6", "levels: 4"))
    job = parse_job(text, "ok.yaml", tmp_path)
    assert job.stages["b"].depends_on == ["speech", "codec"]
