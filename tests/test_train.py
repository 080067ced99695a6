"""The `train` stage end to end on a real local Ray: tiny decoder, VALL-E and Parti models trained on
packed shards of the demo corpora, evaluated, sampled, recovering in the same fit when a worker is killed; and its bad input."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import assert_recovers_after_worker_kill
from token_models_job import DECODER, DIGITS_DECODER, TRAIN
from pipeline.cli import app
from pipeline.data import packed_rows, packing, token_shards
from pipeline.ledger import StageLedger
from pipeline.models import token_model
from pipeline.models.holdout import HoldOut, held_out_pairs
from pipeline.models.train_tasks import TASK_NAMES, TokenModelTask, TokenTrainSettings, decoder_batch, decoder_loss
from pipeline.monitor.status import job_status
from pipeline.spec import SpecError, load_job, parse_job
from pipeline.stages.base import checkpoint_of
from pipeline.stages.train import TrainWork, image_code_levels
from pipeline.storage import Storage
from pipeline.tokenizers import image_vq
from pipeline.tokenizers.vocab import build as build_vocab
from pipeline.workflow import Planner, run

def shards(spec: Path, stage: str) -> Path:
    return Path(Storage(load_job(spec).storage).path(f"{stage}/shards"))


def marker_stats(spec: Path, stage: str) -> dict:
    return StageLedger(Storage(load_job(spec).storage), stage).read_markers()["model"].stats


def stage_input(spec: Path, name: str):
    """Train stage `name` of the built job and the one ShardInput it would build now."""
    job = load_job(spec)
    planner = Planner(job)
    stage = job.stages[name].stage
    (item,) = stage.inputs({"sequences": planner.built_shards("sequences")},
                           {k: planner.built_shards(v) for k, v in stage.references().items()})
    return stage, item


def states(spec: Path) -> dict[str, str]:
    """{stage: state} of the job as `status` plans it now."""
    return {name: s["state"] for name, s in job_status(load_job(spec))["stages"].items()}


def training_task(spec: Path, name: str):
    """The train_loop task that train stage `name` of the built job gives its workers."""
    stage, item = stage_input(spec, name)
    return stage.task(item.payload)


def test_models_train_report_metrics_and_evaluate(token_models_job):
    spec = token_models_job
    for stage, losses in (("decoder", ("loss_t2i", "loss_i2t")), ("valle", ("loss_tts_ar", "loss_tts_nar")),
                          ("parti", ("loss_t2i",))):
        stats = marker_stats(spec, stage)
        assert stats["steps"] == 6 and stats["parameters"] > 10_000
        report = json.loads((shards(spec, stage) / "eval.json").read_text())
        assert report["documents"] > 0 and all(np.isfinite(report[k]) for k in losses), report
        assert report["perplexity"] == pytest.approx(np.exp(report["loss"]), rel=1e-2)
        metrics = [json.loads(line) for line in (shards(spec, stage) / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == list(range(1, 7))
        assert all(m["tokens_per_s"] > 0 and 0 <= m["data_wait"] <= 1 and m["step_seconds"] > 0 for m in metrics)
    decoder = json.loads((shards(spec, "decoder") / "eval.json").read_text())
    assert decoder["t2i"]["samples"] == 2 and decoder["t2i"]["scored"] == 2      # held-out shapes captions
    assert {"fidelity_color", "fidelity_kind", "fidelity_position", "fidelity_color_and_kind"} <= set(decoder["t2i"])
    assert decoder["i2t"]["samples"] == 2 and "i2t_fidelity_color" in decoder["i2t"]
    assert "fidelity_color" in marker_stats(spec, "decoder")                   # the summary carries them
    digits = token_model.load(shards(spec, "decoder"))             # FSQ 8x6x5 image codes: digit embeddings
    assert tuple(digits.config.image_code_levels) == (8, 6, 5)
    assert digits.config.image_code_start == digits.vocab.range("image").offset
    audio = digits.vocab.range("audio:0").offset                   # its softmax: its tasks' ids, not the speech's
    assert [tuple(r) for r in digits.config.output_ranges] == packing.task_ranges(digits.vocab, ("t2i", "i2t"))
    assert not any(lo <= audio < hi for lo, hi in digits.config.output_ranges)
    pngs = sorted(shards(spec, "decoder").glob("t2i-*.png"))
    assert len(pngs) == 2 and all(Image.open(png).size == (32, 32) for png in pngs)
    valle = json.loads((shards(spec, "valle") / "eval.json").read_text())
    assert valle["tts"]["samples"] == 2 and valle["tts"]["scored"] == 2 and valle["tts"]["tts_mcd"] > 0
    audio, rate = sf.read(shards(spec, "valle") / "tts-00.wav")
    assert rate == 24000 and audio.ndim == 1 and np.isfinite(audio).all()
    parti = json.loads((shards(spec, "parti") / "eval.json").read_text())
    assert parti["t2i"]["samples"] == 2


def test_documents_longer_than_the_context_are_counted_as_not_trained(token_models_job):
    """The decoder trains on windows of 40 tokens: every longer t2i / i2t document is a failed sample
    with its reason (its key kept), and no window holds one."""
    spec = token_models_job
    task = training_task(spec, "decoder")
    lengths = {(key, task_name): length for url in task.files
               for key, task_name, length in packed_rows.document_index(url)}
    longer = sum(length > 40 for (_, name), length in lengths.items() if name.removeprefix("cm3:") in ("t2i", "i2t"))
    marker = StageLedger(Storage(load_job(spec).storage), "decoder").read_markers()["model"]
    reasons = {r: n for r, n in marker.failures.items() if "longer than context 40" in r}
    assert longer > 0 and sum(reasons.values()) == longer, (marker.failures, longer)
    assert set(marker.stats["failed_keys"]) <= {key for key, _ in lengths}
    batches = task.batches(0, 1, 0)
    for _ in range(4):
        batch = next(batches)
        assert batch["tokens"].shape[1] == 40 and (batch["doc_ids"] >= 0).any()


def test_held_out_documents_never_train(token_models_job):
    """With `combinations`, every document whose caption holds a held-out (color, kind) pair is held
    out, and a training batch holds none of them."""
    task = training_task(token_models_job, "decoder")
    held = [d for url in task.files for row in packed_rows.iter_rows(url) for d in packed_rows.documents(url, row)
            if d.task in ("t2i", "i2t") and task.filter.held_out(d)]
    assert held and all(any(pair in task.filter.caption(d) for pair in (f"{c} {k}" for c, k in held_out_pairs(0.2)))
                        for d in held)
    batches = task.batches(0, 1, 0)
    assert all((next(batches)["targets"] != -100).any() for _ in range(4))
    # in a batch, a held-out document (or one of another task) is padding: no attention, no target
    url = next(u for u in task.files if any(task.filter.held_out(d) for r in packed_rows.iter_rows(u)
                                                for d in packed_rows.documents(u, r) if d.task in ("t2i", "i2t")))
    row = next(r for r in packed_rows.iter_rows(url) if not all(task.filter.trains(d) for d in packed_rows.documents(url, r)))
    docs = list(packed_rows.documents(url, row))
    kept = [task.filter.trains(d) for d in docs]
    batch = decoder_batch(task.vocab, [(random.Random(0), (row, kept))], 0.0)
    for d, (doc, keep) in enumerate(zip(docs, kept)):
        start = row["doc_starts"][d]
        inside = slice(start, start + len(doc.tokens))
        assert bool((batch["doc_ids"][0, inside] == d).all()) == keep
        assert bool((batch["targets"][0, inside] != -100).any()) == keep


def test_loader_resumes_exactly_and_ranks_are_disjoint(token_models_job):
    task = training_task(token_models_job, "valle")
    from_start = task.batches(0, 1, 0)
    first = [next(from_start) for _ in range(5)]
    resumed = next(task.batches(0, 1, 3))            # grad_accum 1: step 3 is the 4th batch
    assert all(torch.equal(resumed[k], first[3][k]) for k in resumed)
    ranks = [next(task.batches(r, 2, 0))["ar_tokens"] for r in (0, 1)]
    assert not torch.equal(ranks[0], ranks[1])


def test_decoder_batch_targets_only_target_parts_and_blanks_captions():
    vocab = build_vocab(text_size=20, image_codes=8)
    from pipeline.data import packing

    doc = packing.t2i(vocab, "k", [3, 4, 5], np.array([1, 2, 3, 4]))
    row = {"tokens": np.concatenate([doc.tokens, [vocab.special("<pad>")] * 4]), "doc_starts": [0],
           "doc_lengths": [len(doc.tokens)], "doc_targets": [doc.target], "doc_tasks": ["t2i"], "doc_keys": ["k"]}
    batch = decoder_batch(vocab, [(random.Random(0), (row, [True]))], cfg_dropout=0.0)
    targets = batch["targets"][0]
    positions = torch.nonzero(targets != -100).flatten().tolist()
    assert positions == list(range(doc.target - 1, len(doc.tokens) - 1))       # <boi> predicts the first code
    assert targets[positions].tolist() == doc.tokens[doc.target:].tolist()
    assert set(batch["task_ids"][0, positions].tolist()) == {TASK_NAMES.index("t2i")}
    assert (batch["doc_ids"][0, len(doc.tokens):] == -1).all()
    blanked = decoder_batch(vocab, [(random.Random(0), (row, [True]))], cfg_dropout=1.0)["tokens"][0]
    assert (blanked[2:doc.target - 1] == vocab.special("<pad>")).all() and torch.equal(blanked[doc.target:], batch["tokens"][0][doc.target:])


def test_task_weights_weigh_each_tasks_target_tokens_in_the_decoder_loss():
    vocab = build_vocab(text_size=20, image_codes=8)
    from pipeline.data import packing

    docs = [packing.t2i(vocab, "a", [3, 4, 5], np.array([1, 2, 3, 4])), packing.i2t(vocab, "b", [6, 7], np.array([5, 6]))]
    tokens = np.concatenate([d.tokens for d in docs])
    row = {"tokens": tokens, "doc_starts": [0, len(docs[0].tokens)], "doc_lengths": [len(d.tokens) for d in docs],
           "doc_targets": [d.target for d in docs], "doc_tasks": ["t2i", "i2t"], "doc_keys": ["a", "b"]}
    batch = decoder_batch(vocab, [(random.Random(0), (row, [True, True]))], cfg_dropout=0.0)
    torch.manual_seed(0)
    net = token_model.build("decoder", token_model.model_config({"arch": "decoder", "n_layer": 1, "d_model": 32,
                                                                  "n_head": 2}, vocab))
    counted = batch["targets"] != -100
    ce = torch.nn.functional.cross_entropy(net(batch["tokens"], batch["doc_ids"], only=counted).float(),
                                           batch["targets"][counted], reduction="none")
    is_i2t = batch["task_ids"][counted] == TASK_NAMES.index("i2t")
    assert 0 < int(is_i2t.sum()) < len(ce)
    plain, stats = decoder_loss(net, batch)
    assert torch.allclose(plain, ce.mean())
    weights = TokenModelTask("decoder", None, TokenTrainSettings(task_weights={"i2t": 4}), [], "{}", ("t2i", "i2t")).target_weights
    assert weights.tolist() == [4.0 if t.endswith("i2t") else 1.0 for t in TASK_NAMES]        # cm3:i2t too
    weighted, same_stats = decoder_loss(net, batch, weights)
    expected = (ce[~is_i2t].sum() + 4 * ce[is_i2t].sum()) / (int((~is_i2t).sum()) + 4 * int(is_i2t.sum()))
    assert torch.allclose(weighted, expected) and not torch.allclose(weighted, plain)
    assert same_stats == stats                            # per-task figures stay unweighted means


def test_holdout_policies():
    pairs = held_out_pairs(0.1)
    color, kind = sorted(pairs)[0]
    policy = HoldOut("combinations", 0.1)
    assert policy("any-key", f"a small {color} {kind} at the top left on a gray background")
    assert not policy("any-key", "a small " + next(f"{c} {k}" for c in ("red", "blue", "green")
                                               for k in ("circle", "square") if (c, k) not in pairs)
                      + " at the top left on a gray background")
    assert policy("k", "not a shapes caption") == HoldOut("key", 0.1)("k")      # falls back to the key split


def test_held_out_pairs_spread_over_colors_and_kinds():
    from pipeline.demo.shapes import COLORS, SHAPE_KINDS

    for share in (0.02, 0.1, 0.125):                    # 1, 5 and 6 of the 48 pairs: no color or kind twice
        pairs = held_out_pairs(share)
        assert len(pairs) == max(1, round(share * 48))
        assert len({c for c, _ in pairs}) == len({k for _, k in pairs}) == len(pairs)
    wide = held_out_pairs(0.25)                          # 12 pairs: more than there are kinds
    assert len(wide) == 12 and {k for _, k in wide} == set(SHAPE_KINDS) and {c for c, _ in wide} <= set(COLORS)


def test_sample_cli_writes_images_captions_and_speech(token_models_job, tmp_path):
    spec = token_models_job
    speech = shards(spec, "valle") / "tts-00.wav"             # any recording serves as a prompt

    def sample(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "sample", str(spec), *args, "--out", str(tmp_path)],
                              capture_output=True, text=True, timeout=300)

    t2i = sample("--stage", "decoder", "--task", "t2i", "--text", "a small red circle at the center on a gray background",
                 "--count", "2", "--rerank", "2")
    assert t2i.returncode == 0, t2i.stderr
    assert [Image.open(p).size for p in t2i.stdout.split()] == [(32, 32), (32, 32)]
    i2t = sample("--stage", "decoder", "--task", "i2t", "--image", t2i.stdout.split()[0], "--temperature", "0",
                 "--i2t-cfg-scale", "2", "--i2t-rerank", "3")
    assert i2t.returncode == 0, i2t.stderr
    assert isinstance(json.loads(i2t.stdout), str)          # one quoted caption (a 6-step model says little)
    tts = sample("--stage", "valle", "--task", "tts", "--text", "hello there", "--prompt-audio", str(speech))
    assert tts.returncode == 0, tts.stderr
    audio, rate = sf.read(tts.stdout.strip())
    assert rate == 24000 and np.isfinite(audio).all()
    usage = CliRunner()                                       # usage errors: in this process, no model to sample
    wrong = usage.invoke(app, ["sample", str(spec), "--stage", "valle", "--task", "t2i", "--text", "a red circle"])
    assert wrong.exit_code == 2 and "valle model does not sample images" in wrong.stderr
    missing = usage.invoke(app, ["sample", str(spec), "--stage", "nope", "--task", "t2i", "--text", "x"])
    assert missing.exit_code == 2 and "nope" in missing.stderr


def test_rerun_does_nothing_a_sampling_change_reevaluates_and_a_config_change_is_stale(token_models_job, ray_address):
    spec = token_models_job
    again = {r.name: r for r in run(load_job(spec), stages=["decoder", "valle", "parti"], address=ray_address)}
    assert all(r.built == 0 for r in again.values())
    original, before = spec.read_text(), marker_stats(spec, "parti")
    trained_files = {name: (shards(spec, "parti") / name).read_bytes() for name in ("model.safetensors", "metrics.jsonl")}
    try:
        spec.write_text(original.replace("grad_accum: 2, steps: 6", "grad_accum: 2, cfg_scale: 1.5, steps: 6"))
        (parti,) = run(load_job(spec), stages=["parti"], address=ray_address)
        assert parti.built == 1 and marker_stats(spec, "parti")["run"] == before["run"]   # evaluated again ...
        assert {name: (shards(spec, "parti") / name).read_bytes() for name in trained_files} == trained_files  # ... only
        spec.write_text(original.replace("grad_accum: 2, steps: 6", "grad_accum: 2, steps: 5"))
        # a training key: the stage is stale and its Ray Train run is a new one, so it trains from step 0
        assert job_status(load_job(spec))["stages"]["parti"]["state"] == "stale"
        stage, item = stage_input(spec, "parti")
        assert stage.run_name(item) != before["run"]
    finally:
        spec.write_text(original)


def test_a_bumped_arch_version_retrains_that_archs_stages_alone(token_models_job, monkeypatch):
    spec = token_models_job
    valle, item = stage_input(spec, "valle")
    parti, _ = stage_input(spec, "parti")
    assert valle.fingerprint_config()["arch_version"] == token_model.arch("valle").version > 1
    assert "arch_version" not in parti.fingerprint_config()            # version 1: fingerprints as before versions
    before, run_before = states(spec), valle.run_name(item)
    archs = token_model._archs()
    monkeypatch.setattr(token_model, "_archs", lambda: {**archs, "valle": replace(archs["valle"], version=99)})
    after = states(spec)
    assert after.pop("valle") == "stale" and before.pop("valle") != "stale" and after == before
    assert valle.run_name(item) != run_before                           # a new Ray Train run: trains from step 0


def test_bad_input_is_refused_with_a_clear_message(token_models_job, ray_address, tmp_path):
    spec = token_models_job
    job = load_job(spec)
    storage = Storage(job.storage)
    model = token_model.load(shards(spec, "decoder"))
    other = build_vocab(text_size=5, image_codes=4)
    token_model.save(model.net, "decoder", other, tmp_path / "foreign")
    plain_vq = image_vq.save(image_vq.VQAutoencoder(image_vq.VQConfig(image_size=32, channels=8, codebook_size=256,
                                                                      latent_dim=16, kmeans_init=False)), tmp_path / "vq")
    (tmp_path / "job.yaml").write_text(spec.read_text() + f"""\
  foreign: {{kind: train, inputs: [sequences], model: {DECODER}, pretrained: "{tmp_path / 'foreign'}"}}
  greedy: {{kind: train, inputs: [sequences], model: {DECODER}, workers: 3, {TRAIN}}}
  plain-vq: {{kind: train-image-tokenizer, pretrained: "{plain_vq}", eval_images: 4}}
  digits-elsewhere: {{kind: train, inputs: [sequences], model: {DIGITS_DECODER}, image_tokenizer: plain-vq, {TRAIN}}}
""")
    stages = ["foreign", "greedy", "plain-vq", "digits-elsewhere"]
    results = {r.name: r for r in run(load_job(tmp_path / "job.yaml"), stages=stages, address=ray_address)}
    assert [results[s].failed_shards for s in stages] == [1, 1, 0, 1]
    foreign = StageLedger(storage, "foreign").read_markers()["model"].error
    assert other.fingerprint[:16] in foreign and model.vocab.fingerprint[:16] in foreign
    greedy = StageLedger(storage, "greedy").read_markers()["model"].error
    assert "requests 3 workers x 1 CPU = 3 CPU; the cluster has 2 CPU" in greedy
    elsewhere = StageLedger(storage, "digits-elsewhere").read_markers()["model"].error
    assert "image_code_digits: the image_tokenizer stage did not make the packed shards' image codes" in elsewhere
    plain = checkpoint_of(Planner(load_job(tmp_path / "job.yaml")).built_shards("plain-vq"))
    with pytest.raises(ValueError, match="image_code_digits needs an FSQ image tokenizer, not a 'vq' one"):
        image_code_levels(TrainWork((), None, plain, None), build_vocab(text_size=5, image_codes=256,
                                                                         image_source=plain.digest))
    # an id outside the vocabulary names the shard and the row
    bad = tmp_path / "bad.parquet"
    good = next(iter(Planner(job).built_shards("sequences").values())).files[0]
    rows = [dict(r) for r in packed_rows.iter_rows(good)][:2]
    rows[1]["tokens"] = rows[1]["tokens"].copy()
    rows[1]["tokens"][5] = 10 ** 6
    columns = {c: [r[c].tolist() if c == "tokens" else r[c] for r in rows] for c in packed_rows.COLUMNS}
    token_shards.write(bad, "packed", {**columns, "source_shard": ["x", "x"]}, {"seq_len": 1024})
    with pytest.raises(ValueError, match=rf"packed shard {bad} row 1: token id 1000000 outside the vocabulary"):
        list(packed_rows.iter_rows(str(bad), model.vocab.size))


def test_a_killed_worker_recovers_and_the_loss_curve_continues(token_models_job, ray_address):
    spec = token_models_job
    spec.write_text(spec.read_text() + f"""\
  long: {{kind: train, inputs: [sequences], model: {DECODER}, tasks: [t2i], steps: 80, batch_size: 1, lr: 0.003,
         optimizer: muon, warmup_steps: 3, checkpoint_every: 10, eval_documents: 4, eval_samples: 0}}
""")
    assert_recovers_after_worker_kill(spec, "long", "model", ray_address)
    metrics = [json.loads(line) for line in (shards(spec, "long") / "metrics.jsonl").read_text().splitlines()]
    resumed_at = marker_stats(spec, "long")["resumed_from"][0]
    before, after = metrics[resumed_at - 5:resumed_at], metrics[resumed_at:resumed_at + 5]
    # the loss curve continues where it stopped (weights and optimizer restored), not from the start
    assert np.mean([m["loss"] for m in after]) < metrics[0]["loss"] - 0.5
    assert after[0]["loss"] < before[-1]["loss"] + 0.3                         # no jump back up


def test_train_spec_errors_name_the_key(tmp_path):
    base = "name: t\nstorage: out\nstages:\n  packed: {kind: pack, text_tokenizer: bpe}\n  bpe: {kind: train-text-tokenizer}\n"
    cases = {
        "  m: {kind: train, inputs: [packed]}\n": ("stages.m", "model"),
        "  m: {kind: train, inputs: [packed], model: {arch: gpt5}}\n": ("stages.m.model", "arch"),
        "  m: {kind: train, inputs: [packed], model: {arch: decoder, layers: 3}}\n": ("stages.m.model.layers", "not a decoder key"),
        "  m: {kind: train, inputs: [packed], model: {arch: decoder, d_model: 100, n_head: 3}}\n": ("stages.m.model.d_model", ""),
        "  m: {kind: train, inputs: [packed], model: {arch: decoder, output_ranges: [[0, 9]]}}\n":
            ("stages.m.model.output_ranges", "set from the vocabulary"),
        "  m: {kind: train, inputs: [packed], model: {arch: valle}, tasks: [t2i]}\n": ("stages.m.tasks", "does not train on"),
        "  m: {kind: train, inputs: [packed], model: {arch: decoder}, holdout: combinations}\n": ("stages.m.text_tokenizer", "required"),
        "  m: {kind: train, inputs: [packed], model: {arch: decoder}, precision: fp16}\n": ("stages.m.precision", "fp16"),
        "  m: {kind: train-image-tokenizer, inputs: [packed], precision: half}\n": ("stages.m.precision", "half"),
        "  m: {kind: train, inputs: [packed], model: {arch: decoder}, optimizer: sgd}\n": ("stages.m.optimizer", "sgd"),
        "  m: {kind: train, inputs: [packed], model: {arch: decoder, image_code_digits: true}}\n":
            ("stages.m.image_tokenizer", "image_code_digits"),
        "  m: {kind: train, inputs: [packed], model: {arch: parti}, rerank: 4}\n": ("stages.m.rerank", "not a parti"),
        "  m: {kind: train, inputs: [packed], model: {arch: decoder}, i2t_rerank: 0}\n": ("stages.m.i2t_rerank", ""),
        "  m: {kind: train, inputs: [packed], model: {arch: decoder}, tasks: [t2i], task_weights: {i2t: 4}}\n":
            ("stages.m.task_weights.i2t", "does not train"),
        "  m: {kind: train, inputs: [packed], model: {arch: decoder}, task_weights: {i2t: 0}}\n": ("stages.m.task_weights", ""),
        "  m: {kind: train, inputs: [packed], model: {arch: decoder}, task_weights: {cm3: 2}}\n": ("stages.m.task_weights", "cm3"),
        "  m: {kind: train, inputs: [packed], model: {arch: valle}, task_weights: {tts: 2}}\n": ("stages.m.task_weights", "valle"),
    }
    for stage, (where, words) in cases.items():
        with pytest.raises(SpecError) as error:
            parse_job(base + stage, tmp_path / "job.yaml")
        assert where in str(error.value) and words in str(error.value), str(error.value)


def test_precision_picks_bf16_autocast_where_the_hardware_has_it():
    from pipeline.train_loop import autocast, cpu_has_bf16, uses_bf16

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert uses_bf16(cuda, "auto") and uses_bf16(cpu, "bf16") and not uses_bf16(cuda, "fp32")
    assert uses_bf16(cpu, "auto") == cpu_has_bf16()
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32, not 'fp16'"):
        uses_bf16(cpu, "fp16")
    layer = torch.nn.Linear(8, 8)
    with autocast(cpu, "bf16"):
        assert layer(torch.ones(2, 8)).dtype == torch.bfloat16
    with autocast(cpu, "fp32"):
        assert layer(torch.ones(2, 8)).dtype == torch.float32
    assert layer.weight.dtype == torch.float32          # autocast leaves the weights in fp32


def test_windows_cut_rows_at_document_boundaries():
    from pipeline.models.train_tasks import windows

    lengths = [3, 4, 2, 6, 9]
    starts = list(np.cumsum([0] + lengths[:-1]))
    row = {"tokens": np.arange(sum(lengths) + 2), "doc_starts": starts, "doc_lengths": lengths, "row": 7,
           "doc_targets": [1] * 5, "doc_tasks": ["t2i"] * 5, "doc_keys": list("abcde")}
    cut = list(windows(row, [True, True, False, True, True], context=8))
    # c does not train, e (9 tokens) is longer than the window: a+b, then d
    assert [w["doc_keys"] for w, _ in cut] == [["a", "b"], ["d"]]
    assert all(len(w["tokens"]) == 8 for w, _ in cut)
    assert cut[0][0]["tokens"][:7].tolist() == list(range(7)) and cut[0][0]["doc_starts"] == [0, 3]
    assert cut[1][0]["tokens"][:6].tolist() == list(range(9, 15))
    assert list(windows(row, [True] * 5, None)) == [(row, [True] * 5)]
