"""The image tokenizer stages on a real local Ray: Ray Train training with checkpoints and resume,
held-out evaluation, actor-pool tokenization into Parquet, the decode round trip, incremental
rebuilds and bad images."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import assert_resumes_after_kill, shapes_url_list
from pipeline.data import token_shards
from pipeline.data.image_shards import image_array, to_tensor
from pipeline.roundtrip import RoundTripError, decode_image
from pipeline.spec import SpecError, load_job, parse_job
from pipeline.stages import ShardInput
from pipeline.stages.base import TokenizeWork, checkpoint_of
from pipeline.stages.tokenize_images import load_tokenizer
from pipeline.storage import Storage
from pipeline.workflow import Planner, run

TINY_VQ = ("image_size: 32, channels: 8, codebook_size: 256, latent_dim: 16, batch_size: 8, warmup_steps: 2, "
           "shuffle_buffer: 40, eval_images: 32, log_every: 4")


def write_job(folder: Path, site: str, count: int = 120, steps: int = 12, seed: int = 0,
              checkpoint_every: int = 4) -> Path:
    """A job over the first `count` shapes of the site (a URL list that grows by appending rows)."""
    shapes_url_list(folder / "urls.parquet", site, count)
    spec = folder / "job.yaml"
    spec.write_text(f"""
name: vq-test
storage: runs
stages:
  images: {{kind: ingest-images, url_list: {folder / "urls.parquet"}, image_size: 32, samples_per_shard: 60}}
  vq: {{kind: train-image-tokenizer, inputs: [images], {TINY_VQ}, steps: {steps}, seed: {seed},
       checkpoint_every: {checkpoint_every}, train_shards: 2}}
  tokens: {{kind: tokenize-images, inputs: [images], tokenizer: vq, batch_size: 16}}
""")
    return spec


def token_table(spec: Path, shard: str):
    job = load_job(spec)
    return pq.read_table(Storage(job.storage).path(f"tokens/shards/{shard}.parquet"))


@pytest.fixture(scope="module")
def trained(ray_address, shapes_site, tmp_path_factory):
    """A job whose images, tokenizer and tokens are built once for the module's tests."""
    spec = write_job(tmp_path_factory.mktemp("vq"), shapes_site)
    results = {r.name: r for r in run(load_job(spec), address=ray_address)}
    assert [r.built for r in results.values()] == [2, 1, 2], results
    return spec, results, shapes_site


def test_training_writes_checkpoint_metrics_and_evaluation(trained):
    spec, results, _ = trained
    job = load_job(spec)
    shards = Path(Storage(job.storage).path("vq/shards"))
    metrics = [json.loads(line) for line in (shards / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert {"loss", "psnr", "usage", "perplexity", "lr"} <= set(metrics[0])
    evaluation = json.loads((shards / "eval.json").read_text())
    assert evaluation["images"] > 0 and 5 < evaluation["psnr"] < 60 and 0 < evaluation["ssim"] <= 1
    assert 0 < evaluation["usage"] <= 1
    # the demo corpus gets the content check, on reconstructions and on originals
    assert set(evaluation["content"]) == {"reconstructions", "originals"}
    assert evaluation["content"]["originals"]["color"] > 0.9
    assert Image.open(shards / "reconstructions.png").size[0] == 8 * 32
    figures = results["vq"].figures
    assert figures["steps"] == 12 and figures["psnr"] == evaluation["psnr"] and "kind" in figures
    # the checkpoint loads and is the one Ray Train reported last
    model = load_tokenizer(checkpoint_of(Planner(job).built_shards("vq")))
    assert model.config.image_size == 32 and model.config.num_codes == 256


def test_token_shards_follow_the_schema_and_decode_back(trained, tmp_path):
    spec, _, site = trained
    job = load_job(spec)
    table = token_table(spec, "00000")
    assert table.schema.equals(token_shards.arrow_schema("image_tokens"), check_metadata=False)
    meta = token_shards.metadata(Storage(job.storage).path("tokens/shards/00000.parquet"))
    tokenizer = checkpoint_of(Planner(job).built_shards("vq"))
    assert meta == {"kind": "image", "tokenizer": tokenizer.digest, "codebook_size": 256, "grid": [4, 4],
                    "image_size": 32, "downsample": 8}
    rows = table.to_pylist()
    assert len(rows) == 60 and all(len(r["tokens"]) == 16 and max(r["tokens"]) < 256 for r in rows)
    assert all(r["shape"] == [4, 4] and r["text"] and r["url"].startswith("http://127.0.0.1") for r in rows)
    # round trip: the API and the CLI decode a row with the checkpoint that made it
    row = rows[5]
    model = load_tokenizer(tokenizer)
    expected = model.decode(torch.tensor(row["tokens"]).reshape(1, 4, 4))
    image = decode_image(job, "tokens", key=row["key"])
    assert torch.allclose(to_tensor([np.asarray(image)]), expected, atol=1 / 127.5)
    out = tmp_path / "row.png"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "decode", str(spec), "--stage", "tokens",
                           "--shard", "00000", "--row", "5", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(image))
    with pytest.raises(RoundTripError, match="no key 'nope'"):
        decode_image(job, "tokens", key="nope")
    bad = subprocess.run([sys.executable, "-m", "pipeline.cli", "decode", str(spec), "--stage", "tokens",
                          "--row", "1", "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and "--shard" in bad.stderr


def test_tokens_are_deterministic_for_a_fixed_checkpoint(trained, ray_address):
    spec, _, site = trained
    before = token_table(spec, "00001").column("tokens").to_pylist()
    (forced,) = run(load_job(spec), stages=["tokens"], force=["tokens"], address=ray_address)
    assert forced.built == 2
    assert token_table(spec, "00001").column("tokens").to_pylist() == before


def test_incremental_new_image_shard_then_new_checkpoint(trained, ray_address):
    spec, _, site = trained
    again = {r.name: r.built for r in run(load_job(spec), address=ray_address)}
    assert again == {"images": 0, "vq": 0, "tokens": 0}
    # a third image shard: the tokenizer trains on the first two only, so one token shard is built
    write_job(spec.parent, site, count=180)
    grown = {r.name: r.built for r in run(load_job(spec), address=ray_address)}
    assert grown == {"images": 1, "vq": 0, "tokens": 1}
    # a new checkpoint (another seed) makes every token shard stale
    write_job(spec.parent, site, count=180, seed=1)
    job = load_job(spec)
    planner = Planner(job)
    assert planner.plan("vq").plan.todo() == ["tokenizer"]
    assert planner.plan("tokens").plan.todo() == ["00000", "00001", "00002"]   # they wait for the new checkpoint
    retrained = {r.name: r.built for r in run(job, address=ray_address)}
    assert retrained == {"images": 0, "vq": 1, "tokens": 3}


def test_pretrained_checkpoint_is_used_instead_of_training(trained, ray_address, tmp_path):
    spec, _, site = trained
    job = load_job(spec)
    checkpoint = Storage(job.storage).path("vq/shards")
    other = tmp_path / "job.yaml"
    other.write_text(f"""
name: pretrained
storage: {job.storage}
stages:
  images: {{kind: ingest-images, url_list: {spec.parent / "urls.parquet"}, image_size: 32, samples_per_shard: 60}}
  vq2: {{kind: train-image-tokenizer, inputs: [images], pretrained: "{checkpoint}", eval_images: 16}}
  tokens2: {{kind: tokenize-images, inputs: [images], tokenizer: vq2}}
""")
    results = {r.name: r for r in run(load_job(other), address=ray_address)}
    assert results["vq2"].built == 1 and results["vq2"].figures["psnr"] > 0 and "steps" not in results["vq2"].figures
    ours = pq.read_table(Storage(job.storage).path("tokens2/shards/00000.parquet")).column("tokens").to_pylist()
    assert ours == token_table(spec, "00000").column("tokens").to_pylist()


def test_resume_after_the_driver_is_killed(ray_address, shapes_site, tmp_path):
    spec = write_job(tmp_path, shapes_site, count=60, steps=100, checkpoint_every=20)
    run(load_job(spec), stages=["images"], address=ray_address)
    assert_resumes_after_kill(spec, "vq", "tokenizer", ray_address)


def test_bad_images_are_skipped_with_their_keys_or_converted(trained, tmp_path):
    spec, _, site = trained
    job = load_job(spec)
    tar = tmp_path / "bad.tar"
    good = Image.new("RGB", (32, 32), (200, 30, 30))
    samples = {"a-good": _png(good, "JPEG"), "b-corrupt": b"\xff\xd8\xff\xe0 not really a jpeg",
               "c-gray": _png(Image.new("L", (32, 32), 128)), "d-cmyk": _png(Image.new("CMYK", (32, 32)), "JPEG"),
               "e-rgba": _png(Image.new("RGBA", (32, 32), (0, 0, 0, 0))), "f-big": _png(good.resize((50, 40)))}
    with tarfile.open(tar, "w") as out:
        for key, data in samples.items():
            for name, payload in ((f"{key}.jpg", data), (f"{key}.txt", key.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                out.addfile(info, io.BytesIO(payload))
    stage = job.stages["tokens"].stage
    work = TokenizeWork((str(tar),), checkpoint_of(Planner(job).built_shards("vq")))
    output = stage.build(ShardInput("bad", "digest", work), tmp_path)
    assert output.samples == 5 and output.stats["failed_keys"] == ["b-corrupt"]
    assert sum(output.failures.values()) == 1 and "not a decodable image" in next(iter(output.failures))
    keys = pq.read_table(output.files[0]).column("key").to_pylist()
    assert keys == ["a-good", "c-gray", "d-cmyk", "e-rgba", "f-big"]
    assert image_array(samples["e-rgba"], 32).min() == 255          # transparent -> white
    assert image_array(samples["f-big"], 32).shape == (32, 32, 3)   # resized like training


def test_tokenizer_spec_errors_name_the_key(tmp_path):
    text = """
name: bad
storage: runs
stages:
  images: {kind: ingest-images, url_list: "demo://shapes?count=10", image_size: 32}
  vq: {kind: train-image-tokenizer, inputs: [images], image_size: 36, downsample: 8}
  tokens: {kind: tokenize-images, inputs: [images], tokenizer: vqq}
"""
    with pytest.raises(SpecError) as error:
        parse_job(text, "bad.yaml", tmp_path)
    found = dict(error.value.problems)
    assert "multiple of downsample=8" in found["stages.vq.image_size"]
    assert "no stage named 'vqq'" in found["stages.tokens.tokenizer"]
    no_inputs = text.replace("inputs: [images], image_size: 36", "image_size: 32").replace("vqq", "vq")
    with pytest.raises(SpecError, match="stages.vq: 'inputs' is a required property"):
        parse_job(no_inputs, "bad.yaml", tmp_path)


def _png(image: Image.Image, kind: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, kind)
    return buf.getvalue()
