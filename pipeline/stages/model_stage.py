"""What every model stage shares: one output "shard", the trained model, made by the shared Ray Train
loop (pipeline.train_loop) or copied from a `pretrained` checkpoint, then evaluated on held-out data.

A subclass names its model config (whose ConfigError names the field), its recipe (a TrainSettings
subclass) and its own keys; its Config is all of them plus ModelStageKeys, flat (`model_stage_config`).
It says how to build the train_loop task, load the saved model and evaluate it. The shard's input
digest covers every input shard trained on, and its output digest enters the fingerprint of every
stage that uses it. Ray Train keeps its checkpoints under `{stage}/checkpoints/`, named by the stage
and input fingerprints, so rerunning after a crash resumes from the latest one.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, ClassVar

from pipeline.ledger import sha256_of
from pipeline.stages.base import ShardInput, ShardOutput, SpecProblem, Stage, UpstreamShard, training_input
from pipeline.storage import Storage, fetch, file_digest
from pipeline.tokenizers.config_checks import ConfigError
from pipeline.tokenizers.model_files import FILES as CHECKPOINT_FILES
from pipeline.train_loop import METRICS_FILE, PROGRESS_FILE, TrainJob, TrainSettings, TrainTask, train_loop


@dataclass
class ModelStageKeys:
    workers: int = 2                   # Ray Train workers (DDP ranks)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0       # > 0: NCCL (and, with precision auto, bf16 autocast)
    train_shards: int | None = None    # use only the first N input shards (by id): appending shards
                                       # then leaves the model, and every stage using it, as they are
    max_failures: int = 2              # Ray Train restarts from the latest checkpoint
    pretrained: str | None = None      # a folder/URL with model.safetensors + config.json: train nothing


def model_stage_config(name: str, *parts: type) -> type:
    """A stage's Config dataclass: the fields of `parts` (model config, recipe, own keys) and of
    ModelStageKeys, flat, as they appear in the YAML."""
    return make_dataclass(name, [(f.name, f.type, field(default=f.default))
                                 for cls in (*parts, ModelStageKeys) for f in fields(cls)])


def subset(cls: type, config: Any) -> dict:
    """The values of `config` for the fields of dataclass `cls`."""
    return {f.name: getattr(config, f.name) for f in fields(cls)}


class ModelStage(Stage):
    shard: ClassVar[str]                          # the one output shard's name
    ModelConfig: ClassVar[type]                   # raises ConfigError naming a field
    Settings: ClassVar[type[TrainSettings]]
    figures: ClassVar[tuple[str, ...]]            # stats that run and status show, besides "steps"
    input_suffix: ClassVar[str] = ".tar"          # the input files it trains on
    train_figures: ClassVar[tuple[str, ...]] = ()  # last step's metrics kept in stats as train_<name>
    evaluation_keys: ClassVar[tuple[str, ...]] = ()   # own keys that only evaluation reads (kept with pretrained):
                                                      # changing one re-evaluates the trained model, not retrains it
    evaluated_keys: ClassVar[tuple[str, ...]] = ("holdout_share",)   # training keys evaluation reads too
    pinned_keys: ClassVar[tuple[str, ...]] = ()   # model keys a pretrained checkpoint must match
    execution_keys = frozenset({"checkpoint_every", "log_every", "cpus_per_worker", "max_failures"})
    num_cpus = 0.0          # the shard task only drives Ray Train; its workers claim the CPUs

    def task(self, payload: Any) -> TrainTask:
        """The train_loop task training on the payload of the shard (`inputs`): input file URLs."""
        raise NotImplementedError

    def load(self, folder: Path) -> Any:
        """The model saved in `folder` (CHECKPOINT_FILES), in eval mode; it has a `.config`."""
        raise NotImplementedError

    def evaluate(self, model: Any, payload: Any, out: Path, output: ShardOutput) -> None:
        """Evaluate on the held-out samples of the payload's files: files written to `out` join output.files, figures
        output.stats, and the samples evaluated and failed output.samples and output.failures."""
        raise NotImplementedError

    @classmethod
    def check(cls, config) -> list[SpecProblem]:
        try:
            cls.ModelConfig(**subset(cls.ModelConfig, config))
        except ConfigError as exc:
            return [SpecProblem((exc.field,), exc.message)]
        return []

    @property
    def model_config(self):
        return self.ModelConfig(**subset(self.ModelConfig, self.config))

    @property
    def settings(self) -> TrainSettings:
        return self.Settings(**subset(self.Settings, self.config))

    def fingerprint_config(self) -> dict:
        config = super().fingerprint_config()
        if self.config.pretrained:   # only the checkpoint, what evaluation looks at and what it must match
            return {k: config[k] for k in ("pretrained", *self.evaluated_keys, *self.evaluation_keys, *self.pinned_keys)}
        return config

    def run_name(self, item: ShardInput) -> str:
        """The Ray Train run's name: its config (less what only evaluation reads) and input. A rerun of
        the same name resumes from the run's latest checkpoint, so after a change of evaluation keys
        alone it restores the finished model and trains no step."""
        config = {k: v for k, v in self.fingerprint_config().items() if k not in self.evaluation_keys}
        return "run-" + sha256_of({"config": config, "input": item.digest})[:16]

    def libraries(self) -> dict[str, str]:
        from importlib.metadata import version

        return {"torch": version("torch"), "vector-quantize-pytorch": version("vector-quantize-pytorch")}

    def inputs(self, upstream: dict[str, dict[str, UpstreamShard | None]],
               references: dict | None = None) -> list[ShardInput]:
        data_digest, files = training_input(upstream, self.config.train_shards, self.input_suffix)
        if self.config.pretrained:
            digest = sha256_of({"checkpoint": _pretrained_digest(self.config.pretrained), "data": data_digest})
            return [ShardInput(self.shard, digest, files)]
        return [ShardInput(self.shard, data_digest, files)]

    def build(self, item: ShardInput, workdir: Path) -> ShardOutput:
        out = workdir / "out"
        out.mkdir()
        if self.config.pretrained:
            fetch([f"{self.config.pretrained.rstrip('/')}/{name}" for name in CHECKPOINT_FILES], out)
            stats: dict = {"pretrained": self.config.pretrained}
        else:
            stats = self._train(item, out)
        model = self.load(out)
        self._check_pinned(model.config)
        stats["parameters"] = sum(p.numel() for p in model.parameters())
        files = [out / name for name in CHECKPOINT_FILES] + ([out / METRICS_FILE] if not self.config.pretrained else [])
        output = ShardOutput(files=files, samples=0, stats=stats)
        if item.payload:
            self.evaluate(model, item.payload, out, output)
        return output

    def _check_pinned(self, model_config) -> None:
        """Refuse a pretrained checkpoint whose pinned keys differ from the stage's, naming both values."""
        for key in self.pinned_keys:
            theirs, ours = getattr(model_config, key), getattr(self.config, key)
            if theirs != ours:
                raise ValueError(f"pretrained checkpoint {self.config.pretrained} refused: its {key} is {theirs}, "
                                 f"the stage's {key} is {ours}")

    def _train(self, item: ShardInput, out: Path) -> dict:
        """Run (or resume) the Ray Train job; copy its final checkpoint into `out`."""
        import ray.train
        from ray.train.torch import TorchTrainer

        c = self.config
        storage = Storage(self.storage_root)
        job = TrainJob(self.task(item.payload), storage.root, f"{self.name}/{METRICS_FILE}")
        _check_resources(self.name, c)
        run_name = self.run_name(item)
        checkpoints, filesystem = storage.arrow(f"{self.name}/checkpoints")
        trainer = TorchTrainer(
            train_loop, train_loop_config={"job": job},
            scaling_config=ray.train.ScalingConfig(
                num_workers=c.workers, use_gpu=c.gpus_per_worker > 0,
                resources_per_worker={"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if c.gpus_per_worker else {})}),
            run_config=ray.train.RunConfig(
                name=run_name, storage_path=checkpoints, storage_filesystem=filesystem,
                failure_config=ray.train.FailureConfig(max_failures=c.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
        result = trainer.fit()
        with result.checkpoint.as_directory() as folder:
            for name in CHECKPOINT_FILES + (METRICS_FILE,):
                (out / name).write_bytes((Path(folder) / name).read_bytes())
            progress = json.loads((Path(folder) / PROGRESS_FILE).read_text())
        last = json.loads((out / METRICS_FILE).read_text().splitlines()[-1])
        return {"steps": progress["step"], "resumed_from": progress["starts"][1:], "train_seconds": last["seconds"],
                **{f"train_{k}": last[k] for k in self.train_figures}, "run": run_name}

    def status_figures(self, markers: list) -> dict:
        stats = markers[0].stats if markers else {}
        return {k: stats[k] for k in ("steps",) + self.figures if k in stats}


def _check_resources(stage: str, c) -> None:
    """Refuse, naming both, a Ray Train request the cluster cannot ever hold (Ray would wait forever)."""
    import ray

    total = ray.cluster_resources()
    for resource, each in (("CPU", c.cpus_per_worker), ("GPU", c.gpus_per_worker)):
        if each and c.workers * each > total.get(resource, 0):
            raise ValueError(f"stage {stage} requests {c.workers} workers x {each:g} {resource} = "
                             f"{c.workers * each:g} {resource}; the cluster has {total.get(resource, 0):g} {resource}")


def _pretrained_digest(location: str) -> str:
    """Digest of an external checkpoint's files (hashed in a temporary local copy)."""
    with tempfile.TemporaryDirectory() as folder:
        fetch([f"{location.rstrip('/')}/{name}" for name in CHECKPOINT_FILES], folder)
        return sha256_of([file_digest(Path(folder) / name)[1] for name in CHECKPOINT_FILES])
