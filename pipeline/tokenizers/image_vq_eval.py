"""Held-out evaluation of an image VQ tokenizer: PSNR, SSIM, codebook usage, and a picture of it."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import torch
from PIL import Image

from pipeline.data.image_shards import ImageSample, to_images, to_tensor
from pipeline.tokenizers.image_vq import VQAutoencoder, psnr, ssim


@dataclass
class Evaluation:
    images: int = 0
    psnr: float = 0.0                 # dB, data range 1 ([0, 1] pixels), mean over images
    ssim: float = 0.0
    usage: float = 0.0                # share of the codebook used on these images
    perplexity: float = 0.0           # exp(entropy) of the code distribution
    failures: Counter = field(default_factory=Counter)    # reason -> count (undecodable samples)
    failed_keys: list[str] = field(default_factory=list)
    pairs: list[tuple[str, Image.Image, Image.Image]] = field(default_factory=list)   # caption, original, recon

    def figures(self) -> dict:
        return {"images": self.images, "psnr": round(self.psnr, 2), "ssim": round(self.ssim, 4),
                "usage": round(self.usage, 4), "perplexity": round(self.perplexity, 1)}


@torch.no_grad()
def evaluate(model: VQAutoencoder, samples: Iterable[ImageSample], *, limit: int = 512, batch_size: int = 64,
             device: str | torch.device = "cpu") -> Evaluation:
    """Encode and decode up to `limit` decodable samples; undecodable ones are counted by reason."""
    model.eval()
    result = Evaluation()
    counts = torch.zeros(model.config.num_codes, dtype=torch.long)
    psnr_sum = ssim_sum = 0.0
    batch: list[ImageSample] = []

    def flush():
        nonlocal psnr_sum, ssim_sum
        images = to_tensor([s.image for s in batch]).to(device)
        codes = model.encode(images)
        recon = model.decode(codes)
        a, b = (recon + 1) / 2, (images + 1) / 2
        psnr_sum += psnr(a, b).item() * len(batch)
        ssim_sum += ssim(a, b).item() * len(batch)
        counts.add_(torch.bincount(codes.flatten().cpu(), minlength=counts.numel()))
        originals = to_images(images)
        result.pairs += [(s.caption, o, r) for s, o, r in zip(batch, originals, to_images(recon))]
        result.images += len(batch)
        batch.clear()

    for sample in samples:
        if sample.image is None:
            result.failures[sample.error or "undecodable"] += 1
            result.failed_keys.append(sample.key)
            continue
        batch.append(sample)
        if len(batch) == min(batch_size, limit - result.images):
            flush()
        if result.images >= limit:
            break
    if batch:
        flush()
    if result.images:
        result.psnr, result.ssim = psnr_sum / result.images, ssim_sum / result.images
        p = counts[counts > 0].double() / counts.sum()
        result.usage = (counts > 0).double().mean().item()
        result.perplexity = torch.exp(-(p * p.log()).sum()).item()
    return result


def comparison_grid(pairs: list[tuple[str, Image.Image, Image.Image]], columns: int = 8) -> Image.Image:
    """Originals on odd rows, their reconstructions right below, `columns` per row."""
    pairs = pairs[: columns * 4]
    side = pairs[0][1].width
    rows = (len(pairs) + columns - 1) // columns
    grid = Image.new("RGB", (columns * side, rows * 2 * side), (255, 255, 255))
    for i, (_, original, recon) in enumerate(pairs):
        x, y = (i % columns) * side, (i // columns) * 2 * side
        grid.paste(original, (x, y))
        grid.paste(recon, (x, y + side))
    return grid
