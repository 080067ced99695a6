"""`train-image-tokenizer`: train the image VQ autoencoder with Ray Train, then evaluate it.

A model stage: its single output "shard" is the checkpoint (`model.safetensors` + `config.json`)
with `metrics.jsonl`, `eval.json` and `reconstructions.png`. Its input digest covers every image
shard it trained on, and the checkpoint's digest enters the fingerprint of every stage that
uses it. Ray Train keeps its checkpoints under `{stage}/checkpoints/`, named by the stage and
input fingerprints, so rerunning after a crash resumes from the latest one.

With `pretrained: <folder or URL holding model.safetensors and config.json>` nothing is trained:
the checkpoint is copied (and evaluated when the stage has inputs).
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path

from pipeline.data.image_shards import is_held_out, iter_samples
from pipeline.ledger import sha256_of
from pipeline.stages.base import ShardInput, ShardOutput, SpecProblem, Stage, UpstreamShard, training_input
from pipeline.storage import Storage, fetch, file_digest
from pipeline.tokenizers import image_vq
from pipeline.tokenizers.image_vq import ConfigError, VQConfig
from pipeline.tokenizers.image_vq_eval import Evaluation, comparison_grid, evaluate
from pipeline.tokenizers.image_vq_train import METRICS_FILE, PROGRESS_FILE, TrainJob, TrainSettings, train_loop

SHARD = "tokenizer"
CHECKPOINT_FILES = ("model.safetensors", "config.json")
SCORED_FIGURES = ("psnr", "ssim", "usage", "perplexity", "kind", "color", "position", "size")


@dataclass
class _StageKeys:
    workers: int = 2                   # Ray Train workers (DDP ranks)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0       # > 0: NCCL + bf16 autocast
    eval_images: int = 512             # held-out images evaluated
    train_shards: int | None = None    # use only the first N input shards (by id): appending shards
                                       # then leaves the tokenizer, and every token shard, as they are
    max_failures: int = 2              # Ray Train restarts from the latest checkpoint
    pretrained: str | None = None


# The stage's keys: the model's (VQConfig), the recipe's (TrainSettings) and its own, all flat.
TrainImageTokenizerConfig = make_dataclass(
    "TrainImageTokenizerConfig",
    [(f.name, f.type, field(default=f.default)) for cls in (VQConfig, TrainSettings, _StageKeys)
     for f in fields(cls)])


def _subset(cls, config) -> dict:
    return {f.name: getattr(config, f.name) for f in fields(cls)}


class TrainImageTokenizer(Stage):
    kind = "train-image-tokenizer"
    version = 1
    Config = TrainImageTokenizerConfig
    execution_keys = frozenset({"checkpoint_every", "log_every", "cpus_per_worker", "max_failures"})
    num_cpus = 0.0          # the shard task only drives Ray Train; its workers claim the CPUs

    @classmethod
    def check(cls, config) -> list[SpecProblem]:
        try:
            VQConfig(**_subset(VQConfig, config))
        except ConfigError as exc:
            return [SpecProblem((exc.field,), exc.message)]
        return []

    def fingerprint_config(self) -> dict:
        config = super().fingerprint_config()
        if self.config.pretrained:   # only the checkpoint and what evaluation looks at matter
            return {k: config[k] for k in ("pretrained", "holdout_share", "eval_images")}
        return config

    def libraries(self) -> dict[str, str]:
        from importlib.metadata import version

        return {"torch": version("torch"), "vector-quantize-pytorch": version("vector-quantize-pytorch")}

    @property
    def model_config(self) -> VQConfig:
        return VQConfig(**_subset(VQConfig, self.config))

    def inputs(self, upstream: dict[str, dict[str, UpstreamShard | None]],
               references: dict | None = None) -> list[ShardInput]:
        data_digest, tars = training_input(upstream, self.config.train_shards)
        if self.config.pretrained:
            digest = sha256_of({"checkpoint": _pretrained_digest(self.config.pretrained), "data": data_digest})
            return [ShardInput(SHARD, digest, tars)]
        return [ShardInput(SHARD, data_digest, tars)]

    def build(self, item: ShardInput, workdir: Path) -> ShardOutput:
        out = workdir / "out"
        out.mkdir()
        if self.config.pretrained:
            fetch([f"{self.config.pretrained.rstrip('/')}/{name}" for name in CHECKPOINT_FILES], out)
            stats: dict = {"pretrained": self.config.pretrained}
        else:
            stats = self._train(item, out)
        model = image_vq.load(out)
        stats["parameters"] = sum(p.numel() for p in model.parameters())
        files = [out / name for name in CHECKPOINT_FILES] + ([out / METRICS_FILE] if not self.config.pretrained else [])
        output = ShardOutput(files=files, samples=0, stats=stats)
        if item.payload:
            evaluation = self._evaluate(model, item.payload)
            output.samples, output.failures = evaluation.images, evaluation.failures
            figures, content = evaluation.figures(), _content_scores(evaluation)
            report = {**figures, "content": content, "failed_keys": evaluation.failed_keys[:100]}
            (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
            comparison_grid(evaluation.pairs).save(out / "reconstructions.png")
            files += [out / "eval.json", out / "reconstructions.png"]
            stats.update({k: v for k, v in figures.items() if k in SCORED_FIGURES})
            stats.update({k: round(v, 3) for k, v in content.get("reconstructions", {}).items() if k in SCORED_FIGURES})
        return output

    def _train(self, item: ShardInput, out: Path) -> dict:
        """Run (or resume) the Ray Train job; copy its final checkpoint into `out`."""
        import ray.train
        from ray.train.torch import TorchTrainer

        c = self.config
        storage = Storage(self.storage_root)
        job = TrainJob(self.model_config, TrainSettings(**_subset(TrainSettings, c)), sorted(item.payload),
                       storage.root, f"{self.name}/{METRICS_FILE}")
        run_name = "run-" + sha256_of({"config": self.fingerprint_config(), "input": item.digest})[:16]
        trainer = TorchTrainer(
            train_loop, train_loop_config=job.to_dict(),
            scaling_config=ray.train.ScalingConfig(
                num_workers=c.workers, use_gpu=c.gpus_per_worker > 0,
                resources_per_worker={"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if c.gpus_per_worker else {})}),
            run_config=ray.train.RunConfig(
                name=run_name, storage_path=storage.url(f"{self.name}/checkpoints"),
                failure_config=ray.train.FailureConfig(max_failures=c.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
        result = trainer.fit()
        with result.checkpoint.as_directory() as folder:
            for name in CHECKPOINT_FILES + (METRICS_FILE,):
                (out / name).write_bytes((Path(folder) / name).read_bytes())
            progress = json.loads((Path(folder) / PROGRESS_FILE).read_text())
        last = json.loads((out / METRICS_FILE).read_text().splitlines()[-1])
        return {"steps": progress["step"], "resumed_from": progress["starts"][1:], "train_seconds": last["seconds"],
                "train_psnr": last["psnr"], "run": run_name}

    def _evaluate(self, model, tars: tuple[str, ...]) -> Evaluation:
        size, share = model.config.image_size, self.config.holdout_share
        held_out = (s for url in sorted(tars) for s in iter_samples(url, size) if is_held_out(s.key, share))
        return evaluate(model, held_out, limit=self.config.eval_images)

    def status_figures(self, markers: list) -> dict:
        stats = markers[0].stats if markers else {}
        return {k: stats[k] for k in ("steps",) + SCORED_FIGURES if k in stats}


def _content_scores(evaluation: Evaluation) -> dict:
    """Demo shapes only: what the analyzer reads back from reconstructions (and from originals)."""
    from pipeline.demo.analyzer import score_many
    from pipeline.demo.shapes import parse_caption

    try:
        scenes = [parse_caption(caption) for caption, _, _ in evaluation.pairs]
    except ValueError:
        return {}   # not the demo corpus: no ground truth to check content against
    if not scenes:
        return {}
    return {"reconstructions": score_many((scene, r) for scene, (_, _, r) in zip(scenes, evaluation.pairs)),
            "originals": score_many((scene, o) for scene, (_, o, _) in zip(scenes, evaluation.pairs))}


def _pretrained_digest(location: str) -> str:
    """Digest of an external checkpoint's files (hashed in a temporary local copy)."""
    with tempfile.TemporaryDirectory() as folder:
        fetch([f"{location.rstrip('/')}/{name}" for name in CHECKPOINT_FILES], folder)
        return sha256_of([file_digest(Path(folder) / name)[1] for name in CHECKPOINT_FILES])
