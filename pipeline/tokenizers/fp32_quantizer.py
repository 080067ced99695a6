"""Quantizers run in fp32 under any autocast: nearest-code distances, k-means and EMA codebook
updates lose codes in bf16 (the image tokenizer's and the codec's training autocast their convolutions)."""
from __future__ import annotations

import torch
from torch import nn


def quantize_fp32(quantizer: nn.Module, latents: torch.Tensor):
    """quantizer(latents) with latents cast to fp32 and autocast off; the quantizer's outputs as they are."""
    with torch.autocast(latents.device.type, enabled=False):
        return quantizer(latents.float())
