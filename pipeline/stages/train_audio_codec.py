"""`train-audio-codec`: train tokenmill's audio codec (a small SoundStream / EnCodec-style model with a
residual VQ) on speech shards with Ray Train, then evaluate it on held-out utterances.

A model stage (pipeline.stages.model_stage): its single output "shard" is the codec (`model.safetensors`
+ `config.json`) with `metrics.jsonl`, `eval.json` and a few held-out utterances as WAV pairs
(`{key}.original.wav`, `{key}.decoded.wav`). A `tokenize-speech` stage uses it with
`codec: {name: tokenmill, stage: <this stage>, levels: N}`; its digest is in that stage's fingerprint.

Utterances that are silent, clipped, NaN, shorter than a frame or undecodable are skipped in training
and counted, with their keys, in the marker. `eval.json` holds MCD (dB, on the reference's speech
frames), log-mel L1 and SI-SNR at several level counts, codebook usage per level and encode / decode
speed; on the demo-espeak corpus also the TTS-score calibration (pipeline.metrics.tts_score) with
this codec's round trip, so that its figures say whether generated speech can be scored through it.
A `pretrained` checkpoint must have the stage's `sample_rate` and `levels`, or it is refused.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from pipeline.data.shard_stream import is_held_out
from pipeline.data.speech_shards import SpeechSample, audio_problem, iter_samples
from pipeline.stages.base import ShardOutput
from pipeline.stages.model_stage import ModelStage, model_stage_config
from pipeline.tokenizers import audio_codec_model
from pipeline.tokenizers.audio_codec_eval import CodecEvaluation, evaluate
from pipeline.tokenizers.audio_codec_model import AudioCodecModel, CodecModelConfig
from pipeline.tokenizers.audio_codec_train import CodecTask, CodecTrainSettings

CALIBRATED_CORPUS = "demo-espeak"   # calibrate() re-synthesizes its references: eSpeak voices only


@dataclass
class _OwnKeys:
    eval_utterances: int = 64                  # held-out utterances evaluated
    eval_levels: tuple[int, ...] = (1, 2, 4)   # level counts scored besides all of them
    examples: int = 3                          # held-out utterances kept as WAV pairs
    calibration_utterances: int = 10           # demo-espeak only: references of the TTS-score calibration


# The stage's keys: the model's, the recipe's, its own and every model stage's.
TrainAudioCodecConfig = model_stage_config("TrainAudioCodecConfig", CodecModelConfig, CodecTrainSettings, _OwnKeys)


class TrainAudioCodec(ModelStage):
    kind = "train-audio-codec"
    version = 1
    Config = TrainAudioCodecConfig
    ModelConfig = CodecModelConfig
    Settings = CodecTrainSettings
    shard = "codec"
    figures = ("mcd", "mcd_4", "si_snr", "usage", "encode_x_realtime", "decode_x_realtime", "tts_right_below_wrong")
    train_figures = ("mel",)
    evaluation_keys = ("eval_utterances", "eval_levels", "examples", "calibration_utterances")
    pinned_keys = ("sample_rate", "levels")

    def task(self, files: list[str]) -> CodecTask:
        return CodecTask(self.model_config, self.settings, sorted(files))

    def load(self, folder: Path) -> AudioCodecModel:
        return audio_codec_model.load(folder)

    def evaluate(self, model: AudioCodecModel, tars: tuple[str, ...], out: Path, output: ShardOutput) -> None:
        held_out, train_seconds = self._survey(model.config, tars, output)
        evaluation = evaluate(model, ((s.key, s.audio) for s in held_out), levels=self.config.eval_levels,
                              limit=self.config.eval_utterances, examples=self.config.examples)
        output.samples = evaluation.utterances
        report = {**evaluation.to_json(), "train_hours": round(train_seconds / 3600, 4),
                  "calibration": self._calibration(model, held_out)}
        (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
        output.files += [out / "eval.json"] + _examples(evaluation, out, model.config.sample_rate)
        output.stats.update({**evaluation.figures(), "train_hours": report["train_hours"]})
        if "right_below_all_wrong" in report["calibration"]:
            output.stats["tts_right_below_wrong"] = report["calibration"]["right_below_all_wrong"]

    def _survey(self, config: CodecModelConfig, tars: tuple[str, ...],
                output: ShardOutput) -> tuple[list[SpeechSample], float]:
        """One pass over every utterance: those training skipped are counted in `output` by reason (the
        same audio_problem), and the first eval_utterances held-out ones kept. (kept, training seconds)"""
        kept, train_seconds = [], 0.0
        for sample in (s for url in sorted(tars) for s in iter_samples(url, config.sample_rate)):
            problem = sample.error or audio_problem(sample.audio, config.hop_length)
            if problem:
                output.fail(sample.key, problem)
            elif not is_held_out(sample.key, self.config.holdout_share):
                train_seconds += len(sample.audio) / config.sample_rate
            elif len(kept) < self.config.eval_utterances:
                kept.append(sample)
        return kept, train_seconds

    def _calibration(self, model: AudioCodecModel, held_out: list[SpeechSample]) -> dict:
        """The TTS-score calibration through this codec's full-level round trip, on demo-espeak speech."""
        from pipeline.metrics.tts_score import calibrate

        chosen = held_out[: self.config.calibration_utterances]
        if not chosen or any(s.meta.get("corpus") != CALIBRATED_CORPUS for s in chosen):
            return {"skipped": f"only the {CALIBRATED_CORPUS} corpus can be re-synthesized"}

        def roundtrip(audio: np.ndarray) -> np.ndarray:
            wav = torch.from_numpy(np.ascontiguousarray(audio, np.float32)).view(1, 1, -1)
            return model.decode(model.encode(wav))[0, 0, : len(audio)].numpy()

        try:
            return calibrate([(s.text, str(s.meta.get("speaker"))) for s in chosen], model.config.sample_rate,
                             roundtrip, seed=self.config.seed)
        except ValueError as exc:   # fewer than two speakers or texts among them
            return {"skipped": str(exc)}


def _examples(evaluation: CodecEvaluation, out: Path, sample_rate: int) -> list[Path]:
    """The kept held-out utterances and their full-level reconstructions as 32-bit float WAVs."""
    files = []
    for key, original, recon in evaluation.examples:
        for name, audio in ((f"{key}.original.wav", original), (f"{key}.decoded.wav", recon)):
            sf.write(out / name, audio, sample_rate, format="WAV", subtype="FLOAT")
            files.append(out / name)
    return files
