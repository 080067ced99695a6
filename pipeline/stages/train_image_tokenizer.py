"""`train-image-tokenizer`: train the image VQ autoencoder with Ray Train, then evaluate it.

A model stage (pipeline.stages.model_stage): its single output "shard" is the checkpoint
(`model.safetensors` + `config.json`) with `metrics.jsonl`, `eval.json` and `reconstructions.png`.
With `pretrained: <folder or URL holding model.safetensors and config.json>` nothing is trained:
the checkpoint is copied (and evaluated when the stage has inputs).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.image_shards import iter_samples
from pipeline.data.shard_stream import is_held_out
from pipeline.stages.base import ShardOutput
from pipeline.stages.model_stage import ModelStage, model_stage_config
from pipeline.tokenizers import image_vq
from pipeline.tokenizers.image_vq import VQAutoencoder, VQConfig
from pipeline.tokenizers.image_vq_eval import Evaluation, comparison_grid, evaluate
from pipeline.tokenizers.image_vq_train import VQTask, VQTrainSettings


@dataclass
class _OwnKeys:
    eval_images: int = 512             # held-out images evaluated


# The stage's keys: the model's (VQConfig), the recipe's (VQTrainSettings), its own and every model stage's.
TrainImageTokenizerConfig = model_stage_config("TrainImageTokenizerConfig", VQConfig, VQTrainSettings, _OwnKeys)


class TrainImageTokenizer(ModelStage):
    kind = "train-image-tokenizer"
    version = 1
    Config = TrainImageTokenizerConfig
    ModelConfig = VQConfig
    Settings = VQTrainSettings
    shard = "tokenizer"
    figures = ("psnr", "ssim", "usage", "perplexity", "kind", "color", "position", "size")
    train_figures = ("psnr",)
    evaluation_keys = ("eval_images",)

    def task(self, files: list[str]) -> VQTask:
        return VQTask(self.model_config, self.settings, sorted(files))

    def load(self, folder: Path) -> VQAutoencoder:
        return image_vq.load(folder)

    def evaluate(self, model: VQAutoencoder, tars: tuple[str, ...], out: Path, output: ShardOutput) -> None:
        size, share = model.config.image_size, self.config.holdout_share
        held_out = (s for url in sorted(tars) for s in iter_samples(url, size) if is_held_out(s.key, share))
        evaluation = evaluate(model, held_out, limit=self.config.eval_images)
        output.samples, output.failures = evaluation.images, evaluation.failures
        figures, content = evaluation.figures(), _content_scores(evaluation)
        report = {**figures, "content": content, "failed_keys": evaluation.failed_keys[:100]}
        (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
        comparison_grid(evaluation.pairs).save(out / "reconstructions.png")
        output.files += [out / "eval.json", out / "reconstructions.png"]
        output.stats.update({k: v for k, v in figures.items() if k in self.figures})
        output.stats.update({k: round(v, 3) for k, v in content.get("reconstructions", {}).items() if k in self.figures})


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
