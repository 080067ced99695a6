"""`train`: a unified token model (decoder, VALL-E or Parti; pipeline.models) trained with Ray Train on
packed shards, then evaluated on held-out documents with samples written beside it.

A model stage (pipeline.stages.model_stage): its one output "shard" is the model (`model.safetensors`
+ `config.json` holding the arch, its config and the vocabulary) with `metrics.jsonl`, `eval.json` and
the sample files (t2i-NN.png, tts-NN.wav). Every packed shard must carry the same vocabulary; a `pretrained` model whose vocabulary
differs is refused with both fingerprints. References: `text_tokenizer` (captions for the
`combinations` hold-out and prompts for sampling), `image_tokenizer` (decodes sampled images) and
`codec` (decodes sampled speech), each optional; they enter the fingerprint.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.data import packed_rows
from pipeline.ledger import sha256_of
from pipeline.models import token_model
from pipeline.models.holdout import POLICIES
from pipeline.models.train_tasks import TokenModelTask, TokenTrainSettings, base_task, over_context
from pipeline.stages.base import ShardInput, ShardOutput, SpecProblem, checkpoint_of
from pipeline.stages.model_stage import ModelStage, model_stage_config
from pipeline.stages.tokenize_images import tokenizer_config
from pipeline.stages.train_text_tokenizer import text_tokenizer_of
from pipeline.storage import Checkpoint
from pipeline.tokenizers.config_checks import ConfigError
from pipeline.tokenizers.image_vq import FSQ_LEVELS
from pipeline.tokenizers.text_tokenizer import TextTokenizer


@dataclass
class _OwnKeys:
    model: dict | None = None                # {arch: decoder|valle|parti, <its config keys>}
    tasks: list[str] | None = None           # document tasks trained on (None: every one the arch takes)
    text_tokenizer: str | None = None        # a train-text-tokenizer stage
    image_tokenizer: str | None = None       # a train-image-tokenizer stage
    codec: str | None = None                 # a train-audio-codec stage
    eval_documents: int = 256                # held-out documents scored for loss / perplexity
    eval_samples: int = 16                   # held-out prompts sampled (images, captions, speech)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 3.0                   # t2i classifier-free guidance (1: none)
    i2t_cfg_scale: float = 1.0               # i2t guidance against the caption prior (1: none)
    rerank: int = 1                          # t2i: images sampled per caption, the model keeps its best (decoder)
    i2t_rerank: int = 1                      # i2t: the caption + its likeliest one-token deviations, the best kept


TrainConfig = model_stage_config("TrainConfig", TokenTrainSettings, _OwnKeys)


@dataclass(frozen=True)
class TrainWork:
    """What the model trains on and what evaluation decodes its samples with."""
    files: tuple[str, ...]                   # packed shard URLs
    text: TextTokenizer | None
    image_tokenizer: Checkpoint | None
    codec: Checkpoint | None


def image_code_levels(work: TrainWork, vocab) -> tuple[int, ...]:
    """The FSQ levels of the image tokenizer that made the shards' image codes (model.image_code_digits)."""
    if not vocab.has("image") or vocab.range("image").source != work.image_tokenizer.digest:
        raise ValueError("model.image_code_digits: the image_tokenizer stage did not make the packed shards' image "
                         f"codes (its digest {work.image_tokenizer.digest[:12]}, the shards' "
                         f"{vocab.range('image').source[:12] if vocab.has('image') else 'none: no image range'})")
    config = tokenizer_config(work.image_tokenizer)
    if config.quantizer != "fsq":
        raise ValueError(f"model.image_code_digits needs an FSQ image tokenizer, not a {config.quantizer!r} one")
    return FSQ_LEVELS[config.codebook_size]


class Train(ModelStage):
    kind = "train"
    version = 2                                  # 2: i2t_rerank's candidates are the caption's deviations
    Config = TrainConfig
    Settings = TokenTrainSettings
    shard = "model"
    input_suffix = ".parquet"
    reference_keys = ("text_tokenizer", "image_tokenizer", "codec")
    figures = ()                                 # status_figures picks them from the evaluation
    train_figures = ("loss",)
    evaluation_keys = ("eval_documents", "eval_samples", "temperature", "top_k", "top_p", "cfg_scale", "i2t_cfg_scale",
                       "rerank", "i2t_rerank")
    evaluated_keys = ("holdout_share", "holdout", "tasks")

    @classmethod
    def check(cls, config) -> list[SpecProblem]:
        if not config.model:
            return [SpecProblem(("model",), f"is required: {{arch: {'|'.join(token_model.ARCH_NAMES)}, ...}}")]
        try:
            token_model.check_model_keys(config.model)
        except ConfigError as exc:
            return [SpecProblem(("model", exc.field), exc.message)]
        problems = []
        if config.holdout not in POLICIES:
            problems.append(SpecProblem(("holdout",), f"must be one of {', '.join(POLICIES)}, not {config.holdout!r}"))
        if config.model.get("image_code_digits") and not config.image_tokenizer:
            problems.append(SpecProblem(("image_tokenizer",), "is required by model.image_code_digits (the FSQ levels)"))
        if config.rerank > 1 and "i2t" not in token_model.arch(config.model["arch"]).tasks:
            problems.append(SpecProblem(("rerank",), f"needs a decoder (it reranks images by its own captioning), "
                                                     f"not a {config.model['arch']}"))
        if config.holdout == "combinations" and not config.text_tokenizer:
            problems.append(SpecProblem(("text_tokenizer",), "is required by holdout: combinations (captions)"))
        takes = token_model.arch(config.model["arch"]).tasks
        problems += [SpecProblem(("tasks",), f"{config.model['arch']} does not train on {t!r} (it takes {', '.join(takes)})")
                     for t in config.tasks or () if base_task(t) not in takes]
        if config.task_weights and config.model["arch"] != "decoder":
            problems.append(SpecProblem(("task_weights",), f"weighs a decoder's tasks; a {config.model['arch']} "
                                                           "has its own losses"))
        elif config.task_weights:
            trained = {base_task(t) for t in config.tasks or takes}
            problems += [SpecProblem(("task_weights", t), f"names a task the stage does not train (it trains "
                                                          f"{', '.join(sorted(trained))})")
                         for t in config.task_weights if t not in trained]
        return problems

    def fingerprint_config(self) -> dict:
        """The config, and the arch's version once bumped (in the run name too, so its models retrain)."""
        config = super().fingerprint_config()
        version = token_model.arch(self.config.model["arch"]).version
        return config if version == 1 else {**config, "arch_version": version}

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.config.tasks or token_model.arch(self.config.model["arch"]).tasks)

    def inputs(self, upstream: dict, references: dict | None = None) -> list[ShardInput]:
        (item,) = super().inputs(upstream, references)
        if item.digest is None or (self.references() and references is None):
            return [ShardInput(self.shard, None, None)]
        checkpoints = {key: checkpoint_of(shards) for key, shards in (references or {}).items()}
        work = TrainWork(item.payload, text_tokenizer_of(references["text_tokenizer"]) if "text_tokenizer" in checkpoints else None,
                         checkpoints.get("image_tokenizer"), checkpoints.get("codec"))
        return [ShardInput(self.shard, sha256_of([item.digest, {k: c.digest for k, c in sorted(checkpoints.items())}]), work)]

    def task(self, work: TrainWork) -> TokenModelTask:
        vocab = packed_rows.common_vocab(list(work.files))
        levels = image_code_levels(work, vocab) if self.config.model.get("image_code_digits") else ()
        config = token_model.model_config(self.config.model, vocab, levels, self.tasks)
        return TokenModelTask(self.config.model["arch"], config, self.settings, list(work.files),
                              json.dumps(vocab.to_json()), self.tasks, work.text)

    def load(self, folder: Path) -> token_model.TokenModel:
        return token_model.load(folder)

    def _check_pinned(self, model_config) -> None:
        """A pretrained model must be of the stage's arch (its vocabulary is checked against the shards)."""
        if self.config.pretrained and model_config.__class__ is not token_model.arch(self.config.model["arch"]).config:
            raise ValueError(f"pretrained checkpoint {self.config.pretrained} refused: it is not a {self.config.model['arch']}")

    def status_figures(self, markers: list) -> dict:
        """Steps, held-out loss and perplexity, and every fidelity and TTS figure of the evaluation."""
        stats = markers[0].stats if markers else {}
        return {k: v for k, v in stats.items()
                if k in ("steps", "loss", "perplexity", "i2t_exact") or "fidelity" in k or k.startswith("tts_")}

    def evaluate(self, model: token_model.TokenModel, work: TrainWork, out: Path, output: ShardOutput) -> None:
        from pipeline.models.evaluation import evaluate

        packed_rows.common_vocab(list(work.files), expected=model.vocab.fingerprint)
        evaluate(model, work, self.config, self.tasks, self.storage_root, out, output)
        if model.arch == "decoder" and self.config.context:
            for key, task, _ in over_context(list(work.files), self.tasks, self.config.context):
                output.fail(key, f"{base_task(task)} document longer than context {self.config.context}: not trained")
