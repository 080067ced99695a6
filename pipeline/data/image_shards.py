"""Read image-text WebDataset shards (img2dataset's layout) as decoded, model-ready samples.

A shard is streamed member by member from any fsspec URL, so memory holds one sample at a time.
Images go through one transform, `image_array`, shared by training and tokenization: any mode
(grayscale, CMYK, RGBA, palette) becomes RGB, and an image of another size is center-cropped to
a square and resized the way img2dataset's center_crop does.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

from pipeline.data.shard_stream import decoded_samples

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class ImageSample:
    """One sample of a shard: the decoded image (uint8 H x W x 3) or why it could not be."""
    key: str
    image: np.ndarray | None
    caption: str
    meta: dict = field(default_factory=dict)
    error: str | None = None


def image_array(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 array (size, size, 3). Raises ValueError if undecodable."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:   # PIL raises a zoo of types for broken files
        raise ValueError(f"not a decodable image ({type(exc).__name__})") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        canvas = Image.new("RGB", image.size, (255, 255, 255))   # transparent pixels become white
        canvas.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        image = canvas
    image = image.convert("RGB")
    if image.size != (size, size):
        image = ImageOps.fit(image, (size, size), Image.Resampling.LANCZOS)   # center crop, then resize
    return np.asarray(image)


def to_tensor(arrays: list[np.ndarray]):
    """uint8 arrays (H, W, 3) -> float tensor (B, 3, H, W) in [-1, 1]."""
    import torch

    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0


def to_images(batch) -> list[Image.Image]:
    """Float tensor (B, 3, H, W) in [-1, 1] -> PIL RGB images."""
    pixels = ((batch.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


def iter_samples(url: str, size: int) -> Iterator[ImageSample]:
    """Decoded samples of one shard; a sample that cannot be decoded carries its error instead."""
    for fields in decoded_samples(url, IMAGE_EXTENSIONS, lambda data: image_array(data, size), "caption", "image"):
        yield ImageSample(*fields)
