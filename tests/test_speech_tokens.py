"""tokenize-speech on a real local Ray over the offline demo corpus (eSpeak NG voices): codec shapes
and frame counts, Parquet token shards, determinism, the decode round trip to WAV, incremental
rebuilds, bad utterances, local checkpoints checked by digest, and spec errors."""
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

from speech_corpora import bad_speech_shard
from pipeline.data import token_shards
from pipeline.data.speech_shards import iter_samples
from pipeline.ledger import StageLedger
from pipeline.roundtrip import RoundTripError, decode_speech
from pipeline.spec import SpecError, load_job, parse_job
from pipeline.stages import ShardInput
from pipeline.stages.base import TokenizeWork
from pipeline.stages.tokenize_speech import length_batches, padded_batch, windows
from pipeline.storage import Storage, file_digest
from pipeline.tokenizers.audio_codec import CodecConfig, checkpoint_file, codec_digest, load_codec
from pipeline.workflow import Planner, run

SEEDED = {"bandwidth": 6, "pretrained": False}


def write_job(folder: Path, parts: str = "[demo-24]", codec: dict = SEEDED, extra: str = "") -> Path:
    """A job over the demo-espeak parts, 8 utterances a shard, tokenized by `codec`."""
    spec = folder / "job.yaml"
    spec.write_text(f"""
name: speech-tokens
storage: runs
stages:
  speech: {{kind: ingest-speech, corpus: demo-espeak, parts: {parts}, download_dir: {folder / "corpora"},
           samples_per_shard: 8}}
  tokens: {{kind: tokenize-speech, inputs: [speech], codec: {json.dumps(codec)}}}
{extra}""")
    return spec


def parse_tokens_job(codec: str, folder: Path):
    """A parsed job of a demo speech stage and a tokens stage with `codec` (a YAML mapping)."""
    return parse_job("name: t\nstorage: s\nstages:\n"
                     "  speech: {kind: ingest-speech, corpus: demo-espeak, parts: [demo-8]}\n"
                     f"  tokens: {{kind: tokenize-speech, inputs: [speech], codec: {codec}}}\n", "job.yaml", folder)


def tokens_of(spec: Path, stage: str = "tokens") -> dict[str, list]:
    """shard -> its token column."""
    folder = Path(Storage(load_job(spec).storage).path(f"{stage}/shards"))
    return {p.stem: pq.read_table(p).column("tokens").to_pylist() for p in sorted(folder.glob("*.parquet"))}


def utterances(spec: Path) -> dict[str, tuple[str, object]]:
    """key -> (speech shard, its 24 kHz waveform)."""
    built = Planner(load_job(spec)).built_shards("speech")
    return {s.key: (shard, s.audio) for shard, up in built.items() for s in iter_samples(up.files[0], 24000)}


@pytest.fixture(scope="module")
def built(ray_address, tmp_path_factory):
    """Speech and tokens built once for the module's tests (24 utterances, 3 shards)."""
    spec = write_job(tmp_path_factory.mktemp("speech-tokens"))
    results = {r.name: r for r in run(load_job(spec), address=ray_address)}
    assert [(r.built, r.totals.failures) for r in results.values()] == [(3, 0), (3, 0)], results
    return spec, results


def test_codec_shapes_frame_counts_and_bandwidths():
    codec = load_codec(CodecConfig(6, pretrained=False))
    assert (codec.sample_rate, codec.hop_length, codec.frame_rate, codec.n_q, codec.codebook_size) == \
        (24000, 320, 75, 8, 1024)
    assert codec.digest == codec_digest(CodecConfig(6.0, pretrained=False)) == "seeded-v1"
    wav = 0.1 * torch.randn(3, 1, 641, generator=torch.Generator().manual_seed(1))
    codes = codec.encode(wav)
    assert codes.shape == (3, 8, 3) == (3, codec.n_q, codec.frames(641)) and codes.dtype == torch.long
    assert [codec.frames(n) for n in (1, 320, 321, 640, 641)] == [1, 1, 2, 2, 3]
    assert codec.decode(codes).shape == (3, 1, 3 * 320)
    assert {b: CodecConfig(b).bandwidth for b in (1.5, 3, 6, 12, 24)} == {1.5: 1.5, 3: 3.0, 6: 6.0, 12: 12.0, 24: 24.0}
    assert load_codec(CodecConfig(1.5, pretrained=False)).n_q == 2
    with pytest.raises(ValueError, match="bandwidth 5.0"):
        CodecConfig(5.0)
    # batches of similar lengths within the padded budget, in whole frames; windows of the stream
    assert length_batches([900, 100, 5000, 300], limit=2880, hop_length=320) == [[1, 3, 0], [2]]
    assert [len(w) for w in windows([4, 4, 1, 9, 2], 8, size=int)] == [2, 2, 1]
    assert padded_batch([torch.ones(5), torch.ones(700)], 320).shape == (2, 1, 960)


def test_token_shards_follow_the_schema(built):
    spec, results = built
    job = load_job(spec)
    audio = utterances(spec)
    assert results["tokens"].figures["hours"] == results["speech"].figures["hours"]
    rows = []
    for shard in ("demo-24-00000", "demo-24-00001", "demo-24-00002"):
        url = Storage(job.storage).path(f"tokens/shards/{shard}.parquet")
        table = pq.read_table(url)
        assert table.schema.equals(token_shards.arrow_schema("speech_tokens"), check_metadata=False)
        assert token_shards.metadata(url) == {"kind": "audio", "codec": "seeded-v1", "codec_name": "encodec",
                                              "bandwidth": 6.0, "n_q": 8, "codebook_size": 1024, "frame_rate": 75,
                                              "sample_rate": 24000}
        keys = [k for k, (s, _) in audio.items() if s == shard]
        assert table.column("key").to_pylist() == keys   # the speech shard's order
        rows += table.to_pylist()
    assert len(rows) == 24 == results["tokens"].totals.samples
    codec = load_codec(CodecConfig(6, pretrained=False))
    agree = 0
    for row in rows:
        wav = audio[row["key"]][1]
        frames = math.ceil(len(wav) / 320)
        assert row["shape"] == [8, frames] and len(row["tokens"]) == 8 * frames and max(row["tokens"]) < 1024
        assert row["duration"] == pytest.approx(len(wav) / 24000, abs=1e-5)
        meta = json.loads(row["source"])
        assert (row["text"], row["speaker"], row["phonemes"]) == (meta["text"], meta["speaker"], meta["phonemes"])
        assert row["phonemes"] and row["source_shard"].startswith("demo-24-")
        alone = codec.encode(padded_batch([wav], 320))[0].numpy()   # the utterance by itself
        agree += (alone == np.array(row["tokens"]).reshape(8, frames)).sum()
    frames = sum(r["shape"][1] for r in rows)
    assert agree / (8 * frames) > 0.99    # batch-mates change codes only through float rounding
    first = np.concatenate([np.array(r["tokens"]).reshape(r["shape"])[0] for r in rows])
    assert len(np.unique(first)) > 150    # seeded codebooks give varied codes, not one


def test_round_trip_to_wav_from_the_api_and_the_cli(built, tmp_path):
    spec, _ = built
    job = load_job(spec)
    row = pq.read_table(Storage(job.storage).path("tokens/shards/demo-24-00001.parquet")).slice(2, 1).to_pylist()[0]
    samples = round(row["duration"] * 24000)
    wav, rate = decode_speech(job, "tokens", key=row["key"])
    assert rate == 24000 and wav.dtype == np.float32 and wav.shape == (samples,) and np.isfinite(wav).all()
    codes = torch.tensor(row["tokens"]).reshape(1, *row["shape"])
    assert np.array_equal(wav, load_codec(CodecConfig(6, pretrained=False)).decode(codes)[0, 0, :samples].numpy())
    for args in (["--key", row["key"]], ["--shard", "demo-24-00001", "--row", "2"]):
        out = tmp_path / "row.wav"
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "decode", str(spec), "--stage", "tokens", *args,
                               "--out", str(out)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "24000 Hz" in proc.stdout
        written, written_rate = sf.read(out, dtype="float32")
        assert written_rate == 24000 and np.array_equal(written, wav)
    with pytest.raises(RoundTripError, match="no key 'nope'"):
        decode_speech(job, "tokens", key="nope")
    with pytest.raises(RoundTripError, match="not a tokenize-speech stage"):
        decode_speech(job, "speech", key=row["key"])


def test_tokens_are_deterministic(built, ray_address):
    spec, _ = built
    before = tokens_of(spec)
    (forced,) = run(load_job(spec), stages=["tokens"], force=["tokens"], address=ray_address)
    assert forced.built == 3 and tokens_of(spec) == before   # new actors, a newly seeded codec


def test_a_local_checkpoint_is_checked_by_digest_and_used(built, ray_address, tmp_path):
    spec, _ = built
    saved = tmp_path / "saved.th"
    torch.save(load_codec(CodecConfig(6, pretrained=False)).model.state_dict(), saved)
    sha = file_digest(saved)[1]
    good = saved.rename(tmp_path / f"encodec_24khz-{sha[:8]}.th")
    assert checkpoint_file(str(good)) == good and codec_digest(CodecConfig(6, checkpoint=str(good))) == sha[:8]
    # the stage loads the saved weights: the seeded codec's tokens, under the checkpoint's digest
    local = write_job(spec.parent, extra=f"  local: {{kind: tokenize-speech, inputs: [speech], "
                                         f"codec: {{bandwidth: 6, checkpoint: {good}}}}}\n")
    (result,) = run(load_job(local), stages=["local"], address=ray_address)
    assert result.built == 3 and tokens_of(local, "local") == tokens_of(local)
    url = Storage(load_job(local).storage).path("local/shards/demo-24-00000.parquet")
    assert token_shards.metadata(url)["codec"] == sha[:8]
    write_job(spec.parent)
    # a folder whose encodec_24khz-d7cc33bc.th is another file is refused, naming both digests
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "encodec_24khz-d7cc33bc.th").write_bytes(good.read_bytes())
    with pytest.raises(SpecError) as error:
        parse_tokens_job(f"{{bandwidth: 6, checkpoint: {folder}}}", tmp_path)
    message = dict(error.value.problems)["stages.tokens.codec.checkpoint"]
    assert "d7cc33bc" in message and sha in message and "refused" in message


def test_incremental_new_speech_shard_then_new_bandwidth(built, ray_address):
    spec, _ = built
    assert {r.name: r.built for r in run(load_job(spec), address=ray_address)} == {"speech": 0, "tokens": 0}
    before = tokens_of(spec)
    # another corpus part: one more speech shard, one more token shard
    write_job(spec.parent, parts="[demo-24, demo-6]")
    assert {r.name: r.built for r in run(load_job(spec), address=ray_address)} == {"speech": 1, "tokens": 1}
    assert {s: t for s, t in tokens_of(spec).items() if s != "demo-6-00000"} == before
    # another bandwidth makes every token shard stale; RVQ levels are a prefix of the 6 kbps ones
    write_job(spec.parent, parts="[demo-24, demo-6]", codec={"bandwidth": 1.5, "pretrained": False})
    job = load_job(spec)
    assert len(Planner(job).plan("tokens").plan.todo()) == 4
    (_, tokens) = run(job, address=ray_address)
    assert tokens.built == 4 and tokens.figures["tokens"] == sum(len(t) for ts in tokens_of(spec).values() for t in ts)
    for shard, rows in before.items():
        for six, low in zip(rows, tokens_of(spec)[shard]):
            assert low == six[:len(low)] and len(low) * 4 == len(six)
    markers = StageLedger(Storage(job.storage), "tokens").read_markers()
    assert sum(m.stats["seconds"] for m in markers.values()) == pytest.approx(tokens.figures["hours"] * 3600, abs=1)


def test_bad_utterances_are_counted_with_their_keys(tmp_path):
    job = parse_tokens_job("{bandwidth: 3, pretrained: false}", tmp_path)
    tar = bad_speech_shard(tmp_path / "bad.tar")
    output = job.stages["tokens"].stage.build(ShardInput("bad", "digest", TokenizeWork((str(tar),), None)), tmp_path)
    assert output.samples == 2 and output.stats["failed_keys"] == ["b-short", "c-nan", "d-silent", "e-corrupt",
                                                                   "g-no-audio", "h-clipped"]
    assert output.failures == {"shorter than one codec frame": 1, "NaN or infinite samples": 1, "silent": 1,
                               "corrupt audio (LibsndfileError)": 1, "no audio in sample": 1, "clipped": 1}
    rows = pq.read_table(output.files[0]).to_pylist()
    assert [(r["key"], r["shape"], r["speaker"]) for r in rows] == [("a-good", [4, 75], "s1"), ("f-48k", [4, 75], "s1")]


def test_speech_token_spec_errors_name_the_key(tmp_path):
    text = """
name: bad
storage: runs
stages:
  speech: {kind: ingest-speech, corpus: demo-espeak, parts: [demo-8]}
  a: {kind: tokenize-speech, inputs: [speech], codec: {bandwidth: 5.0}}
  b: {kind: tokenize-speech, inputs: [speech], codec: {bandwidth: 6, pretrained: false, checkpoint: /x.th}}
  c: {kind: tokenize-speech, inputs: [speech], codec: {bandwidth: 6, checkpoint: /nowhere/enc-0123abcd.th}}
  d: {kind: tokenize-speech, inputs: [speech], codec: {bandwidth: 6, levels: 4}}
  e: {kind: tokenize-speech, inputs: [speech]}
"""
    with pytest.raises(SpecError) as error:
        parse_job(text, "bad.yaml", tmp_path)
    found = dict(error.value.problems)
    assert "5.0 is not one of" in found["stages.a.codec.bandwidth"]
    assert "pretrained: false" in found["stages.b.codec.checkpoint"]
    assert "no such file" in found["stages.c.codec.checkpoint"]
    assert "unknown key" in found["stages.d.codec.levels"]
    assert "'codec' is a required property" in found["stages.e"]
