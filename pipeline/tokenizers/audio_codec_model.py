"""tokenmill's own neural audio codec: a small SoundStream / EnCodec-style model.

A waveform (B, 1, S) at `sample_rate` goes through a causal conv encoder that downsamples by
`strides` (2 x 4 x 5 x 8 = 320 samples a frame: 75 frames a second at 24 kHz, EnCodec's token rate),
an LSTM at the frame rate, and a residual vector quantizer (vector-quantize-pytorch's ResidualVQ:
`levels` codebooks of `codebook_size` codes, k-means init, EMA updates, dead-code replacement).
Quantizer dropout trains with a random number of levels each step, so any prefix of the levels
decodes. The decoder mirrors the encoder with transposed convs.

Every conv is causal (padded on the left only): a frame's codes depend only on the audio up to its
end, so an utterance's tokens do not depend on what is batched or padded after it, and a stream can
be encoded as it comes. Losses: L1 on the waveform, multi-resolution STFT (spectral convergence + log
magnitude) and L1 on log-mel, plus the quantizer's commitment loss; no discriminator yet.

Training is the caller's business (pipeline.train_loop); this module gives the model, its loss and
exact save/load.
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

STFT_RESOLUTIONS = ((512, 128), (1024, 256), (2048, 512))   # (n_fft, hop) of the multi-resolution STFT loss
MEL_BANDS = 80                                              # log-mel loss, on the 1024-point STFT


@dataclass
class CodecModelConfig:
    sample_rate: int = 24000
    strides: tuple[int, ...] = (2, 4, 5, 8)   # encoder downsampling in order; their product is the hop
    channels: int = 16                  # width at the full rate, doubled by each downsampling...
    max_channels: int = 128             # ...up to this
    res_units: int = 1                  # dilated residual units per level (dilations 1, 3, 9, ...)
    kernel_size: int = 7
    latent_dim: int = 64                # per frame: encoder output, quantizer input
    lstm_layers: int = 1                # at the frame rate, with a skip (0: none)
    levels: int = 8                     # residual codebooks
    codebook_size: int = 1024
    codebook_dim: int = 64              # codes live in this dimension (projected from latent_dim if it differs)
    quantizer_dropout: bool = True      # a random number of levels (1..levels) per step: any prefix decodes
    kmeans_init: bool = True            # codebooks from k-means on the first batch a level sees
    ema_decay: float = 0.99
    dead_code_threshold: float = 0.5    # replace codes whose EMA count per step falls below this; a step has
                                        # (frames per batch) / codebook_size per code on average
    commitment_weight: float = 1.0
    waveform_weight: float = 0.1        # L1 on samples in [-1, 1]
    stft_weight: float = 1.0            # multi-resolution STFT, summed over STFT_RESOLUTIONS
    mel_weight: float = 1.0             # L1 on natural-log mel magnitudes

    def __post_init__(self):
        self.strides = tuple(self.strides)
        hop = math.prod(self.strides) if self.strides and all(s > 0 for s in self.strides) else 0
        require("CodecModelConfig", [
            ("strides", hop > 0, f"must be positive integers, not {self.strides}"),
            ("sample_rate", self.sample_rate > 0 and hop > 0 and self.sample_rate % hop == 0,
             f"{self.sample_rate} must be a positive multiple of the hop {hop} (the product of strides), "
             "for a whole number of frames a second"),
            ("channels", self.channels > 0, f"must be positive, not {self.channels}"),
            ("max_channels", self.max_channels >= self.channels, f"must be >= channels={self.channels}, not {self.max_channels}"),
            ("res_units", self.res_units >= 0, f"must be >= 0, not {self.res_units}"),
            ("kernel_size", self.kernel_size > 0 and self.kernel_size % 2 == 1, f"must be odd and positive, not {self.kernel_size}"),
            ("latent_dim", self.latent_dim > 0, f"must be positive, not {self.latent_dim}"),
            ("lstm_layers", self.lstm_layers >= 0, f"must be >= 0, not {self.lstm_layers}"),
            ("levels", 1 <= self.levels <= 32, f"must be in 1..32, not {self.levels}"),
            ("codebook_size", 2 <= self.codebook_size <= 65536, f"must be in 2..65536 (tokens are uint16), not {self.codebook_size}"),
            ("codebook_dim", self.codebook_dim > 0, f"must be positive, not {self.codebook_dim}"),
            ("ema_decay", 0 < self.ema_decay < 1, f"must be in (0, 1), not {self.ema_decay}"),
        ])

    @property
    def hop_length(self) -> int:
        return math.prod(self.strides)

    @property
    def frame_rate(self) -> int:
        return self.sample_rate // self.hop_length

    def widths(self) -> list[int]:
        """Channels before each downsampling and after the last: len(strides) + 1 entries."""
        return [min(self.channels * 2 ** i, self.max_channels) for i in range(len(self.strides) + 1)]


class CausalConv(nn.Conv1d):
    """Conv1d padded on the left only: (B, Cin, L) -> (B, Cout, L / stride); L must be a multiple of stride."""

    def forward(self, x):
        pad = self.dilation[0] * (self.kernel_size[0] - 1) + 1 - self.stride[0]
        return super().forward(F.pad(x, (pad, 0)))


class CausalConvTranspose(nn.ConvTranspose1d):
    """ConvTranspose1d with kernel 2 x stride, trimmed on the right: (B, Cin, L) -> (B, Cout, L * stride)."""

    def forward(self, x):
        return super().forward(x)[..., : x.shape[-1] * self.stride[0]]


class ResUnit(nn.Module):
    """x (B, C, L) -> (B, C, L): ELU, dilated causal conv, ELU, 1x1 conv, plus the input."""

    def __init__(self, channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.body = nn.Sequential(nn.ELU(), CausalConv(channels, channels, kernel_size, dilation=dilation),
                                  nn.ELU(), nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        return x + self.body(x)


class FrameLSTM(nn.Module):
    """x (B, C, T) -> (B, C, T): LSTM over frames plus a skip, as in EnCodec."""

    def __init__(self, channels: int, layers: int):
        super().__init__()
        self.lstm = nn.LSTM(channels, channels, layers, batch_first=True)

    def forward(self, x):
        return x + self.lstm(x.transpose(1, 2))[0].transpose(1, 2)


def _level(c: CodecModelConfig, width: int) -> list[nn.Module]:
    return [ResUnit(width, c.kernel_size, 3 ** j) for j in range(c.res_units)]


class Encoder(nn.Module):
    """(B, 1, S) -> (B, latent_dim, S / hop); S a multiple of the hop."""

    def __init__(self, c: CodecModelConfig):
        super().__init__()
        widths = c.widths()
        layers: list[nn.Module] = [CausalConv(1, widths[0], c.kernel_size)]
        for stride, width, wider in zip(c.strides, widths, widths[1:]):
            layers += _level(c, width) + [nn.ELU(), CausalConv(width, wider, 2 * stride, stride=stride)]
        if c.lstm_layers:
            layers.append(FrameLSTM(widths[-1], c.lstm_layers))
        layers += [nn.ELU(), CausalConv(widths[-1], c.latent_dim, 3)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """(B, latent_dim, T) -> (B, 1, T * hop): the encoder mirrored, upsampling with transposed convs."""

    def __init__(self, c: CodecModelConfig):
        super().__init__()
        widths = c.widths()[::-1]
        layers: list[nn.Module] = [CausalConv(c.latent_dim, widths[0], c.kernel_size)]
        if c.lstm_layers:
            layers.append(FrameLSTM(widths[0], c.lstm_layers))
        for stride, width, narrower in zip(c.strides[::-1], widths, widths[1:]):
            layers += [nn.ELU(), CausalConvTranspose(width, narrower, 2 * stride, stride=stride)] + _level(c, narrower)
        layers += [nn.ELU(), CausalConv(widths[-1], 1, c.kernel_size)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class SpectralLoss(nn.Module):
    """Multi-resolution STFT loss (spectral convergence + L1 of log magnitudes, per resolution) and
    L1 of log-mel magnitudes, between waveforms (B, 1, S). Windows and the mel filterbank are
    non-persistent buffers: they stay out of the checkpoint."""

    def __init__(self, sample_rate: int):
        super().__init__()
        import torchaudio

        for n_fft, _ in STFT_RESOLUTIONS:
            self.register_buffer(f"window_{n_fft}", torch.hann_window(n_fft), persistent=False)
        fbank = torchaudio.functional.melscale_fbanks(1024 // 2 + 1, 0.0, sample_rate / 2, MEL_BANDS, sample_rate)
        self.register_buffer("mel_fbank", fbank, persistent=False)   # (freqs, MEL_BANDS)

    def forward(self, recon, target) -> tuple[torch.Tensor, torch.Tensor]:
        """(stft loss summed over resolutions, log-mel L1)."""
        stft = recon.new_zeros(())
        mel = None
        for n_fft, hop in STFT_RESOLUTIONS:
            a, b = (torch.stft(x.squeeze(1), n_fft, hop, window=getattr(self, f"window_{n_fft}"), return_complex=True)
                    .abs().clamp_min(1e-5) for x in (recon, target))   # (B, freqs, frames)
            stft = stft + (b - a).norm() / b.norm() + (b.log() - a.log()).abs().mean()
            if n_fft == 1024:
                ma, mb = (torch.einsum("bft,fm->bmt", x, self.mel_fbank).clamp_min(1e-5).log() for x in (a, b))
                mel = (ma - mb).abs().mean()
        return stft, mel


class AudioCodecModel(nn.Module):
    def __init__(self, config: CodecModelConfig):
        super().__init__()
        from vector_quantize_pytorch import ResidualVQ

        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = ResidualVQ(
            dim=config.latent_dim, num_quantizers=config.levels, codebook_size=config.codebook_size,
            codebook_dim=config.codebook_dim, quantize_dropout=config.quantizer_dropout,
            kmeans_init=config.kmeans_init, decay=config.ema_decay,
            threshold_ema_dead_code=config.dead_code_threshold, commitment_weight=config.commitment_weight)
        self.decoder = Decoder(config)
        self.spectral = SpectralLoss(config.sample_rate)

    def padded(self, wav):
        """(B, 1, S) -> (B, 1, T * hop) with T = ceil(S / hop): zeros after the end (causal: no code before
        the last frame changes)."""
        return F.pad(wav, (0, -wav.shape[-1] % self.config.hop_length))

    def quantize(self, z):
        """latents (B, D, T) -> quantized (B, D, T), codes (B, levels, T) (-1: a level dropped this step),
        commitment loss (scalar)."""
        quantized, codes, commit = quantize_fp32(self.quantizer, z.transpose(1, 2))   # channel-last (B, T, D)
        return quantized.transpose(1, 2), codes.transpose(1, 2), commit.sum()

    def forward(self, wav):
        """wav (B, 1, S), S a multiple of the hop -> recon (B, 1, S), codes (B, levels, S / hop), commitment."""
        quantized, codes, commit = self.quantize(self.encoder(wav))
        return self.decoder(quantized), codes, commit

    @torch.no_grad()
    def encode(self, wav, levels: int | None = None) -> torch.Tensor:
        """wav (B, 1, S) in [-1, 1] -> codes (B, levels, ceil(S / hop)) long, in [0, codebook_size).
        Residual quantization is greedy, so the first n levels are the codes of an n-level encoding."""
        codes = self.quantize(self.encoder(self.padded(wav)))[1]
        return codes[:, : levels or self.config.levels]

    @torch.no_grad()
    def decode(self, codes) -> torch.Tensor:
        """codes (B, n, T) of the first n <= levels levels -> wav (B, 1, T * hop) clamped to [-1, 1]."""
        n = codes.shape[1]
        if not 1 <= n <= self.config.levels:
            raise ValueError(f"codes of {n} levels; this codec has 1..{self.config.levels}")
        full = F.pad(codes.long(), (0, 0, 0, self.config.levels - n), value=-1)   # -1: a level's code is zero
        latents = self.quantizer.get_output_from_indices(full.transpose(1, 2))   # (B, T, D)
        return self.decoder(latents.transpose(1, 2)).clamp(-1, 1)

    def objective(self, wav, recon, codes, commit) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss from forward()'s outputs (so that a DDP wrapper runs the forward pass) and float
        stats: loss, l1, stft, mel, commit, levels (used this step) and usage (share of each used level's
        codes that occur in the batch, mean over levels)."""
        c = self.config
        l1 = (recon - wav).abs().mean()
        stft, mel = self.spectral(recon, wav)
        total = c.waveform_weight * l1 + c.stft_weight * stft + c.mel_weight * mel + commit
        with torch.no_grad():
            used = [level for level in codes.transpose(0, 1).flatten(1) if level[0] >= 0]   # (B*T,) per level kept
            usage = sum(torch.unique(level).numel() for level in used) / (len(used) * c.codebook_size)
            stats = {"loss": total.item(), "l1": l1.item(), "stft": stft.item(), "mel": mel.item(),
                     "commit": float(commit), "levels": len(used), "usage": usage}
        return total, stats


def save(model: AudioCodecModel, folder: str | Path) -> Path:
    """Write `model.safetensors` (weights and codebooks) and `config.json`."""
    return model_files.save(model, folder)


def load(folder: str | Path, device: str = "cpu") -> AudioCodecModel:
    """The codec saved in `folder`, in eval mode; encodes to the very codes the saved model did."""
    return model_files.load(AudioCodecModel, CodecModelConfig, folder, device)
