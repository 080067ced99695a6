"""What training the image VQ autoencoder adds to the shared Ray Train loop (pipeline.train_loop):
its recipe keys, a stream of shuffled image batches, its loss and its product files.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from pipeline.data.image_shards import iter_samples, to_tensor
from pipeline.data.shard_stream import is_held_out, shuffled_batches
from pipeline.tokenizers import image_vq
from pipeline.tokenizers.image_vq import VQAutoencoder, VQConfig
from pipeline.train_loop import TrainSettings


@dataclass
class VQTrainSettings(TrainSettings):
    shuffle_buffer: int = 1000         # decoded images held per worker for shuffling


def train_batches(files: list[str], size: int, s: VQTrainSettings, rank: int, world: int,
                  start_step: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches (B, 3, size, size) of this worker's training images (shard_stream's
    shuffled_batches). Seeded by (seed, rank, start step), so a resumed run is deterministic too,
    though it does not replay the interrupted epoch."""
    def images(url: str) -> Iterator:
        return (sample.image for sample in iter_samples(url, size)
                if sample.image is not None and not is_held_out(sample.key, s.holdout_share))

    return shuffled_batches(files, images, to_tensor, batch_size=s.batch_size, buffer=s.shuffle_buffer,
                            rng=random.Random(f"{s.seed}/{rank}/{start_step}"), rank=rank, world=world, what="images")


@dataclass
class VQTask:
    """The train_loop task of the image tokenizer."""
    model_config: VQConfig
    settings: VQTrainSettings
    files: list[str]                    # WebDataset tar URLs

    def build(self) -> VQAutoencoder:
        return VQAutoencoder(self.model_config)

    def batches(self, rank: int, world: int, start_step: int) -> Iterator[torch.Tensor]:
        return train_batches(self.files, self.model_config.image_size, self.settings, rank, world, start_step)

    def loss(self, net, model: VQAutoencoder, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        recon, indices, aux = net(images)
        return model.objective(images, recon.float(), indices, aux)

    def save(self, model: VQAutoencoder, folder: Path) -> None:
        image_vq.save(model, folder)
