"""Image VQ tokenizer: a small conv VQ autoencoder in the VQGAN / LlamaGen family.

An image (B, 3, H, W) in [-1, 1] is encoded to a grid of discrete codes (B, H/f, W/f), read in
raster order as tokens, and decoded back. The quantizer comes from vector-quantize-pytorch:
"vq" (VectorQuantize: EMA codebook, k-means init, dead-code replacement, low-dim or cosine codes),
"fsq" (finite scalar quantization) or "lfq" (lookup-free). Quantizers always see channel-last
vectors (B, N, D), which sidesteps the library's image-fmap paths.

Training is the caller's business (a stage with checkpoints); this module gives the model, its
loss, exact save/load and the image metrics psnr / ssim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.tokenizers import model_files
from pipeline.tokenizers.config_checks import require
from pipeline.tokenizers.fp32_quantizer import quantize_fp32

QUANTIZERS = ("vq", "fsq", "lfq")
NORMS = ("group", "layer", "none")
# FSQ levels per target codebook size (Mentzer et al. 2023, table 1); the product is the real K.
FSQ_LEVELS = {256: (8, 6, 5), 1024: (8, 5, 5, 5), 4096: (7, 5, 5, 5, 5), 16384: (8, 8, 8, 6, 5)}


@dataclass
class VQConfig:
    image_size: int = 64
    downsample: int = 8                 # f: codes form an (H/f, W/f) grid
    channels: int = 32                  # base width of the conv stacks (full-resolution convs only)
    channel_mult: tuple[int, ...] = (1, 2, 4)   # one per downsampling level: log2(f) entries
    res_blocks: int = 2                 # residual blocks per level (after its downsampling)
    norm: str = "layer"                 # "group": GroupNorm(32) (8 groups when C % 32), "layer": GroupNorm(1)
                                        # (keeps per-image colour: 32 groups on 32 channels is instance norm,
                                        # which erases flat backgrounds), "none"
    pixel_shuffle: bool = True          # first/last level: space-to-depth / depth-to-space instead of
                                        # full-resolution convs (about 2x faster training on CPU)
    latent_dim: int = 64                # encoder output / quantizer input dimension
    quantizer: str = "vq"               # "vq" | "fsq" | "lfq"
    codebook_size: int = 1024           # K; fsq: a key of FSQ_LEVELS, lfq: a power of two
    codebook_dim: int = 16              # vq: codes live in this low dimension (projected in/out)
    cosine: bool = False                # vq: l2-normalized codes and cosine similarity
    kmeans_init: bool = True            # vq: codebook from k-means on the first batch
    ema_decay: float = 0.8              # vq: EMA decay of the codebook
    dead_code_threshold: float = 1.0    # vq: replace codes whose EMA cluster size falls below this;
                                        # keep it well under tokens-per-batch / K, or codes churn every step
    commitment_weight: float = 0.25     # vq / lfq commitment loss weight
    entropy_weight: float = 0.1         # lfq: entropy (usage) loss weight
    l1_weight: float = 0.0              # reconstruction loss terms, on [-1, 1] pixels; L1 alone stalls
    l2_weight: float = 1.0              # near 21 dB on flat-background images (it predicts per-pixel medians)
    edge_weight: float = 0.1            # L1 between Sobel gradients of recon and target
    foreground_weight: float = 0.0      # extra L1 weight on pixels far from the border-median color

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        levels = int(math.log2(self.downsample)) if self.downsample > 0 else 0
        checks = [
            ("downsample", self.downsample in (8, 16), f"must be 8 or 16, not {self.downsample}"),
            ("image_size", self.image_size > 0 and self.image_size % max(self.downsample, 1) == 0,
             f"{self.image_size} must be a positive multiple of downsample={self.downsample}"),
            ("channels", self.channels > 0 and self.channels % 8 == 0, f"must be a positive multiple of 8, not {self.channels}"),
            ("channel_mult", len(self.channel_mult) == levels and all(m > 0 for m in self.channel_mult),
             f"needs log2(downsample)={levels} positive entries, not {self.channel_mult}"),
            ("res_blocks", self.res_blocks >= 0, f"must be >= 0, not {self.res_blocks}"),
            ("norm", self.norm in NORMS, f"must be one of {NORMS}, not {self.norm!r}"),
            ("latent_dim", self.latent_dim > 0, f"must be positive, not {self.latent_dim}"),
            ("quantizer", self.quantizer in QUANTIZERS, f"must be one of {QUANTIZERS}, not {self.quantizer!r}"),
            ("codebook_size", 256 <= self.codebook_size <= 16384, f"must be in 256..16384, not {self.codebook_size}"),
            ("codebook_dim", self.codebook_dim > 0, f"must be positive, not {self.codebook_dim}"),
        ]
        if self.quantizer == "fsq":
            checks.append(("codebook_size", self.codebook_size in FSQ_LEVELS,
                           f"fsq supports {sorted(FSQ_LEVELS)}, not {self.codebook_size}"))
        if self.quantizer == "lfq":
            checks.append(("codebook_size", self.codebook_size & (self.codebook_size - 1) == 0,
                           f"lfq needs a power of two, not {self.codebook_size}"))
        require("VQConfig", checks)

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_codes(self) -> int:
        """Real codebook size (fsq: the product of its levels, e.g. 1000 for 1024)."""
        return math.prod(FSQ_LEVELS[self.codebook_size]) if self.quantizer == "fsq" else self.codebook_size


def _norm(channels: int, kind: str = "group") -> nn.Module:
    if kind == "none":
        return nn.Identity()
    return nn.GroupNorm(1 if kind == "layer" else 8 if channels % 32 else 32, channels, eps=1e-6)


class ResBlock(nn.Module):
    """x (B, Cin, h, w) -> (B, Cout, h, w): two norm-SiLU-conv layers plus a skip."""

    def __init__(self, c_in: int, c_out: int, norm: str = "group"):
        super().__init__()
        self.body = nn.Sequential(_norm(c_in, norm), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
                                  _norm(c_out, norm), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        return self.skip(x) + self.body(x)


def _widths(config: VQConfig) -> list[int]:
    return [config.channels * m for m in config.channel_mult]


class Encoder(nn.Module):
    """images (B, 3, H, W) -> latents (B, latent_dim, H/f, W/f). Each level halves the resolution
    with a stride-2 conv and then runs its res blocks, so no res block works at full resolution
    (the cheap choice on CPU: full-resolution blocks cost about 4x a level below). With pixel_shuffle
    the first level is a space-to-depth (B, 12, H/2, W/2) and a conv, so nothing runs at full resolution."""

    def __init__(self, config: VQConfig):
        super().__init__()
        c = config.channels
        widths = _widths(config)
        if config.pixel_shuffle:                                             # (B, 12, H/2, W/2) -> (B, C0, H/2, W/2)
            layers: list[nn.Module] = [nn.PixelUnshuffle(2), nn.Conv2d(12, widths[0], 3, padding=1)]
        else:
            layers = [nn.Conv2d(3, c, 3, padding=1)]                         # (B, C, H, W)
        for level, width in enumerate(widths):
            if level or not config.pixel_shuffle:
                layers.append(nn.Conv2d(c, width, 4, stride=2, padding=1)) # (h, w) -> (h/2, w/2)
            layers += [ResBlock(width, width, config.norm) for _ in range(config.res_blocks)]
            c = width
        layers += [ResBlock(c, c, config.norm), _norm(c, config.norm), nn.SiLU(), nn.Conv2d(c, config.latent_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """latents (B, latent_dim, h, w) -> images (B, 3, h*f, w*f); mirrors the encoder: res blocks,
    then nearest 2x upsampling and a conv, per level; with pixel_shuffle the last level ends in a conv to
    (B, 12, H/2, W/2) and depth-to-space instead."""

    def __init__(self, config: VQConfig):
        super().__init__()
        widths = _widths(config)[::-1] + [config.channels]                   # deepest level first
        c = widths[0]
        layers: list[nn.Module] = [nn.Conv2d(config.latent_dim, c, 3, padding=1), ResBlock(c, c, config.norm)]
        for level, (width, next_width) in enumerate(zip(widths, widths[1:])):
            layers += [ResBlock(width, width, config.norm) for _ in range(config.res_blocks)]
            if level == len(widths) - 2 and config.pixel_shuffle:           # (B, C0, H/2, W/2) -> (B, 3, H, W)
                layers += [_norm(width, config.norm), nn.SiLU(), nn.Conv2d(width, 12, 3, padding=1), nn.PixelShuffle(2)]
                break
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, next_width, 3, padding=1)]
        else:
            c = widths[-1]                                                   # (B, C, H, W)
            layers += [_norm(c, config.norm), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


def _make_quantizer(config: VQConfig) -> nn.Module:
    from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize

    if config.quantizer == "fsq":
        return FSQ(levels=list(FSQ_LEVELS[config.codebook_size]), dim=config.latent_dim)
    if config.quantizer == "lfq":
        return LFQ(dim=config.latent_dim, codebook_size=config.codebook_size,
                   entropy_loss_weight=config.entropy_weight, commitment_loss_weight=config.commitment_weight)
    return VectorQuantize(dim=config.latent_dim, codebook_size=config.codebook_size, codebook_dim=config.codebook_dim,
                          use_cosine_sim=config.cosine, kmeans_init=config.kmeans_init, decay=config.ema_decay,
                          threshold_ema_dead_code=config.dead_code_threshold, commitment_weight=config.commitment_weight)


class VQAutoencoder(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = _make_quantizer(config)
        self.decoder = Decoder(config)

    def quantize(self, z):
        """z (B, D, h, w) -> quantized (B, D, h, w), indices (B, h, w), aux loss (scalar)."""
        b, d, h, w = z.shape
        flat = z.flatten(2).transpose(1, 2)                          # (B, h*w, D), raster order
        out = quantize_fp32(self.quantizer, flat)
        quantized, indices = out[0], out[1]
        aux = out[2] if len(out) > 2 else quantized.new_zeros(())    # fsq has no aux loss
        quantized = quantized.transpose(1, 2).reshape(b, d, h, w)
        return quantized, indices.reshape(b, h, w), aux.sum()

    def codes_to_latents(self, indices):
        """indices (B, h, w) -> quantized latents (B, D, h, w)."""
        b, h, w = indices.shape
        flat = indices.reshape(b, h * w)
        if self.config.quantizer == "vq":
            z = self.quantizer.get_output_from_indices(flat)        # codebook lookup + project_out: (B, h*w, D)
        else:
            z = self.quantizer.indices_to_codes(flat)                 # (B, h*w, D), projections included
        return z.transpose(1, 2).reshape(b, -1, h, w)

    def forward(self, images):
        """images (B, 3, H, W) in [-1, 1] -> recon (B, 3, H, W), indices (B, H/f, W/f), aux loss."""
        quantized, indices, aux = self.quantize(self.encoder(images))
        return self.decoder(quantized), indices, aux

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> codes (B, H/f, W/f) long, in [0, num_codes)."""
        return self.quantize(self.encoder(images))[1].long()

    @torch.no_grad()
    def decode(self, indices) -> torch.Tensor:
        """codes (B, H/f, W/f) -> images (B, 3, H, W) clamped to [-1, 1]."""
        return self.decoder(self.codes_to_latents(indices.long())).clamp(-1, 1)

    def loss(self, images) -> tuple[torch.Tensor, dict[str, float]]:
        """Total training loss and a dict of floats: loss, recon, aux, psnr, usage (fraction of K in batch), perplexity."""
        return self.objective(images, *self(images))

    def objective(self, images, recon, indices, aux) -> tuple[torch.Tensor, dict[str, float]]:
        """`loss` from forward()'s outputs, so that a DDP wrapper can run the forward pass."""
        c = self.config
        l1 = (recon - images).abs()                                   # (B, 3, H, W)
        rec = c.l1_weight * l1.mean() + c.l2_weight * (recon - images).pow(2).mean()
        if c.edge_weight:
            rec = rec + c.edge_weight * (sobel(recon) - sobel(images)).abs().mean()
        if c.foreground_weight:
            rec = rec + c.foreground_weight * (l1 * foreground_mask(images)).mean()
        total = rec + aux
        with torch.no_grad():
            counts = torch.bincount(indices.flatten().long(), minlength=c.num_codes).float()
            p = counts / counts.sum()
            perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
            stats = {"loss": total.item(), "recon": rec.item(), "aux": float(aux),
                     "psnr": psnr((recon.clamp(-1, 1) + 1) / 2, (images + 1) / 2).item(),
                     "usage": (counts > 0).float().mean().item(), "perplexity": perplexity.item()}
        return total, stats


def sobel(x):
    """x (B, C, H, W) -> stacked horizontal and vertical Sobel gradients (B, 2C, H, W), per channel."""
    kx = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]], device=x.device, dtype=x.dtype)
    kernel = torch.stack([kx, kx.T]).unsqueeze(1).repeat(x.shape[1], 1, 1, 1)   # (2C, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1])


def foreground_mask(images, scale: float = 0.2):
    """images (B, 3, H, W) in [-1, 1] -> weights (B, 1, H, W) in [0, 1]: distance from the border-median
    color (the flat background of the demo shapes), saturating at `scale` (0.2 = 26 of 255 levels)."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]       # (B, 3, 1, 1)
    distance = (images - background).norm(dim=1, keepdim=True)       # (B, 1, H, W)
    return (distance / scale).clamp(max=1.0)


def psnr(a, b) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per batch mean, for images (B, C, H, W) in [0, 1]
    (data range 1: map [-1, 1] tensors with (x + 1) / 2, uint8 with x / 255 first)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)   # (B,)
    return (10 * torch.log10(1.0 / mse)).mean()


def ssim(a, b, window: int = 7) -> torch.Tensor:
    """Mean structural similarity for images (B, C, H, W) in [0, 1] (data range 1, so C1 = 0.01²,
    C2 = 0.03²), with a uniform `window` x `window` filter over valid positions."""
    a, b = a.float(), b.float()
    pool = lambda x: F.avg_pool2d(x, window, stride=1)
    mu_a, mu_b = pool(a), pool(b)
    var_a, var_b = pool(a * a) - mu_a ** 2, pool(b * b) - mu_b ** 2
    cov = pool(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean()


def save(model: VQAutoencoder, folder: str | Path) -> Path:
    """Write `model.safetensors` (all weights and buffers, codebook included) and `config.json`."""
    return model_files.save(model, folder)


def load(folder: str | Path, device: str = "cpu") -> VQAutoencoder:
    """The model saved in `folder`, in eval mode; encodes to the very tokens the saved model did."""
    return model_files.load(VQAutoencoder, VQConfig, folder, device)
