"""What training tokenmill's audio codec adds to the shared Ray Train loop (pipeline.train_loop): its
recipe keys, a stream of random crops of the training utterances, its loss and its product files.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from pipeline.data.shard_stream import is_held_out, shuffled_batches
from pipeline.data.speech_shards import audio_problem, iter_samples
from pipeline.tokenizers import audio_codec_model
from pipeline.tokenizers.audio_codec_model import AudioCodecModel, CodecModelConfig
from pipeline.train_loop import TrainSettings


@dataclass
class CodecTrainSettings(TrainSettings):
    steps: int = 1000
    batch_size: int = 8                # crops per worker
    lr: float = 2e-3
    warmup_steps: int = 50
    crop_seconds: float = 1.0          # training examples: random windows of this length
    shuffle_buffer: int = 256          # crops held per worker for shuffling
    checkpoint_every: int = 100
    precision: str = "fp32"            # bf16 (auto on a bf16 CPU) gains only 1.24x on its LSTM and
                                       # convolutions, and the codec's quality in bf16 is unmeasured


def crops(audio: torch.Tensor, length: int, rng: random.Random) -> list[torch.Tensor]:
    """Random windows (length,) of a waveform (S,), one per `length` of it (at least one); a shorter
    waveform is zero-padded after its end."""
    if len(audio) <= length:
        return [torch.nn.functional.pad(audio, (0, length - len(audio)))]
    return [audio[start:start + length] for start in
            (rng.randrange(len(audio) - length + 1) for _ in range(round(len(audio) / length)))]


def train_crops(files: list[str], config: CodecModelConfig, s: CodecTrainSettings, rank: int, world: int,
                start_step: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches (B, 1, crop) of this worker's training utterances, the crop a whole
    number of frames (shard_stream's shuffled_batches). Held-out keys and utterances with an
    audio_problem (silent, clipped, NaN, shorter than a frame, undecodable) are skipped; the stage
    counts them. Seeded by (seed, rank, start step)."""
    rng = random.Random(f"{s.seed}/{rank}/{start_step}")
    length = max(1, round(s.crop_seconds * config.frame_rate)) * config.hop_length

    def windows(url: str) -> Iterator[torch.Tensor]:
        for sample in iter_samples(url, config.sample_rate):
            if sample.error or is_held_out(sample.key, s.holdout_share) or audio_problem(sample.audio, config.hop_length):
                continue
            yield from crops(sample.audio, length, rng)

    return shuffled_batches(files, windows, lambda batch: torch.stack(batch).unsqueeze(1), batch_size=s.batch_size,
                            buffer=s.shuffle_buffer, rng=rng, rank=rank, world=world, what="utterances")


@dataclass
class CodecTask:
    """The train_loop task of the audio codec."""
    model_config: CodecModelConfig
    settings: CodecTrainSettings
    files: list[str]                    # speech WebDataset tar URLs

    def build(self) -> AudioCodecModel:
        return AudioCodecModel(self.model_config)

    def batches(self, rank: int, world: int, start_step: int) -> Iterator[torch.Tensor]:
        return train_crops(self.files, self.model_config, self.settings, rank, world, start_step)

    def loss(self, net, model: AudioCodecModel, wav: torch.Tensor) -> tuple[torch.Tensor, dict]:
        recon, codes, commit = net(wav)
        return model.objective(wav, recon.float(), codes, commit)

    def save(self, model: AudioCodecModel, folder: Path) -> None:
        audio_codec_model.save(model, folder)
