"""Neural audio codecs behind one small interface: waveforms (B, 1, S) <-> codes (B, n_q, T).

`load_codec(CodecConfig)` gives an `AudioCodec`; `CODECS` maps each codec name to its loader.

`encodec` is EnCodec's causal 24 kHz model (the `encodec` package): 75 frames a second of 320
samples, residual codebooks of 1024 codes at 0.75 kbps each, so `bandwidth` 1.5 / 3 / 6 / 12 / 24
kbps means 2 / 4 / 8 / 16 / 32 codebooks. Its weights come from
- `checkpoint`: a local file, or a folder holding EnCodec's encodec_24khz-d7cc33bc.th, used offline.
  As torch hub names checkpoints, the hex after the last '-' is the start of the file's sha256;
  a file whose sha256 does not start with it is refused;
- no checkpoint: torch hub's download and cache (~/.cache/torch/hub/checkpoints), checked the same way;
- `pretrained: false`: no weights, for tests and the offline demo. The architecture is initialised
  from a fixed seed, and its codebooks, which EnCodec leaves all zero until k-means runs on the
  first training batch (every frame would be code 0), are seeded deterministically by
  `seed_codebooks` (digest "seeded-v1"). Tokens from such a codec exercise the pipeline and mean
  nothing; its decoder turns them into noise.

`tokenmill` is the codec a `train-audio-codec` stage trained (`stage`), used at its first `levels`
codebooks; its digest is that stage's output digest, and its files come as a `Checkpoint`. A
checkpoint with fewer levels than asked is refused, naming both.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from pipeline.storage import Checkpoint, file_digest
from pipeline.tokenizers import audio_codec_model

ENCODEC_BANDWIDTHS = (1.5, 3.0, 6.0, 12.0, 24.0)
ENCODEC_CHECKPOINT = "encodec_24khz-d7cc33bc.th"
SEEDED_DIGEST = "seeded-v1"     # the digest of seeded weights: bump it with any change to the seeding
SEED = 0


class CheckpointError(ValueError):
    """A checkpoint that is missing, unnamed or not the file its name says."""


@dataclass(frozen=True)
class CodecConfig:
    bandwidth: float | None = None   # encodec: kbps, how many codebooks are used
    name: str = "encodec"
    checkpoint: str | None = None    # encodec: local file or folder; None: torch hub's download and cache
    pretrained: bool = True          # encodec: false: seeded weights, for tests and the offline demo
    stage: str | None = None         # tokenmill: the train-audio-codec stage whose codec is used
    levels: int | None = None        # tokenmill: codebooks used, the first `levels` it was trained with

    def __post_init__(self):
        if self.name not in CODECS:
            raise ValueError(f"CodecConfig.name {self.name!r} is not a codec (known: {', '.join(CODECS)})")
        if self.name == "tokenmill":
            if not self.stage or not isinstance(self.levels, int) or self.levels < 1:
                raise ValueError(f"CodecConfig: the tokenmill codec needs a stage and levels >= 1, "
                                 f"not {self.stage!r} and {self.levels!r}")
            if self.bandwidth is not None or self.checkpoint:
                raise ValueError("CodecConfig: bandwidth and checkpoint are encodec keys; the tokenmill codec "
                                 "takes stage and levels")
            return
        if self.bandwidth not in ENCODEC_BANDWIDTHS:
            raise ValueError(f"CodecConfig.bandwidth {self.bandwidth} is not one of {ENCODEC_BANDWIDTHS}")
        if self.stage or self.levels:
            raise ValueError("CodecConfig: stage and levels are tokenmill keys; encodec picks codebooks by bandwidth")
        object.__setattr__(self, "bandwidth", float(self.bandwidth))   # 6 and 6.0 fingerprint alike

    def describe(self) -> dict:
        """What of the codec decides its tokens, for fingerprints: not a checkpoint's path, so a moved
        checkpoint stays fresh; a tokenmill codec's weights enter as its stage's digest (a reference)."""
        if self.name == "tokenmill":
            return {"name": self.name, "levels": self.levels}
        return {"name": self.name, "bandwidth": self.bandwidth, "weights": codec_digest(self)}


class AudioCodec:
    """What stages need of a codec. Codes of an utterance are trimmed to `frames(samples)`."""
    name: str
    sample_rate: int
    hop_length: int       # samples per frame
    frame_rate: float     # frames per second
    n_q: int              # codebooks used per frame
    codebook_size: int
    digest: str           # identifies the weights

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, 1, S) float in [-1, 1] -> (B, n_q, ceil(S / hop_length)) long codes."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, n_q, T) codes -> (B, 1, T * hop_length) waveform."""
        raise NotImplementedError

    def frames(self, samples: int) -> int:
        return -(-samples // self.hop_length)

    @property
    def bandwidth(self) -> float:
        """kbps the codes carry: n_q x log2(codebook_size) bits a frame."""
        return self.n_q * math.log2(self.codebook_size) * self.frame_rate / 1000


class TokenmillCodec(AudioCodec):
    def __init__(self, model: audio_codec_model.AudioCodecModel, levels: int, digest: str):
        c = model.config
        self.model, self.digest, self.name, self.n_q = model, digest, "tokenmill", levels
        self.sample_rate, self.hop_length, self.frame_rate = c.sample_rate, c.hop_length, c.frame_rate
        self.codebook_size = c.codebook_size

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        return self.model.encode(wav, self.n_q)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes)


class Encodec(AudioCodec):
    def __init__(self, model, bandwidth: float, digest: str):
        model.set_target_bandwidth(bandwidth)
        self.model, self.digest = model, digest
        self.name, self.sample_rate, self.frame_rate = "encodec", model.sample_rate, model.frame_rate
        self.hop_length = math.prod(model.encoder.ratios)
        self.n_q = model.quantizer.get_num_quantizers_for_bandwidth(model.frame_rate, bandwidth)
        self.codebook_size = model.quantizer.bins

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        ((codes, _),) = self.model.encode(wav)   # one frame: the 24 kHz model does not segment
        return codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode([(codes, None)])


def codec_digest(config: CodecConfig) -> str:
    """The digest of the weights `config` names, known without reading them."""
    if not config.pretrained:
        return SEEDED_DIGEST
    return name_digest(_checkpoint_path(config.checkpoint) if config.checkpoint else Path(ENCODEC_CHECKPOINT))


def name_digest(path: Path) -> str:
    """The sha256 prefix a torch-hub-style file name carries (`encodec_24khz-d7cc33bc.th` -> d7cc33bc)."""
    match = re.search(r"-([0-9a-f]{8,64})\.", path.name)
    if match is None:
        raise CheckpointError(f"{path.name}: the name carries no sha256 prefix (NAME-<hex>.th, as torch hub "
                              "names checkpoints)")
    return match.group(1)


def checkpoint_file(checkpoint: str) -> Path:
    """The weights file `checkpoint` names, verified against the digest in its name."""
    path = _checkpoint_path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    expected, actual = name_digest(path), file_digest(path)[1]
    if not actual.startswith(expected):
        raise CheckpointError(f"{path}: refused: its sha256 is {actual[:len(expected)]}... ({actual}), "
                              f"but its name says {expected}")
    return path


def _checkpoint_path(checkpoint: str) -> Path:
    path = Path(checkpoint).expanduser()
    return path / ENCODEC_CHECKPOINT if path.is_dir() else path


@lru_cache(maxsize=2)
def load_codec(config: CodecConfig, device: str = "cpu", trained: Checkpoint | None = None) -> AudioCodec:
    """The codec in eval mode on `device`, built once per process; `trained` is what the tokenmill
    codec's stage built (encodec ignores it)."""
    return CODECS[config.name](config, device, trained)


def _load_tokenmill(config: CodecConfig, device: str, trained: Checkpoint | None) -> TokenmillCodec:
    if trained is None:
        raise CheckpointError(f"the tokenmill codec needs the checkpoint of stage {config.stage}, which is not built")
    model = audio_codec_model.load(trained.local("audio-codecs"), device)
    if config.levels > model.config.levels:
        raise CheckpointError(f"codec stage {config.stage} refused: levels {config.levels} asked, "
                              f"but its checkpoint has {model.config.levels} levels")
    return TokenmillCodec(model, config.levels, trained.digest)


def _load_encodec(config: CodecConfig, device: str, trained: Checkpoint | None = None) -> Encodec:
    from encodec import EncodecModel

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(SEED)    # the architecture's initialisation: the seeded codec's weights
        warnings.simplefilter("ignore", FutureWarning)   # encodec's torch.nn.utils.weight_norm
        model = EncodecModel.encodec_model_24khz(pretrained=False)
    if config.pretrained:
        model.load_state_dict(_encodec_state(config.checkpoint))
    else:
        seed_codebooks(model)
    return Encodec(model.eval().to(device), config.bandwidth, codec_digest(config))


def _encodec_state(checkpoint: str | None) -> dict:
    if checkpoint:
        return torch.load(checkpoint_file(checkpoint), map_location="cpu", weights_only=True)
    from encodec.model import ROOT_URL

    # EnCodec's own path (EncodecModel._get_pretrained): torch hub's cache, checked by the name's digest
    return torch.hub.load_state_dict_from_url(ROOT_URL + ENCODEC_CHECKPOINT, map_location="cpu", check_hash=True)


@torch.no_grad()
def seed_codebooks(model) -> None:
    """Make an untrained EncodecModel's codes follow its input, deterministically. The encoder's conv
    biases are zeroed (random ones add a constant that swamps the input's part of the output), then
    level k's codes are drawn from a Gaussian with the mean and covariance of the residual frames
    that levels < k leave of a fixed synthetic signal, so codes spread over what the encoder outputs.
    The arithmetic is float64, so that the float32 codes do not depend on torch's thread count."""
    generator = torch.Generator().manual_seed(SEED)
    for name, param in model.encoder.named_parameters():
        if name.endswith(".bias"):
            param.zero_()
    signal = _seeding_signal(generator, model.sample_rate).double()
    frames = model.encoder.double()(signal)[0].T   # (T, D); float64 weights hold float32 ones exactly
    model.encoder.float()
    for layer in model.quantizer.vq.layers:
        mean = frames.mean(0)
        mixing = torch.randn(layer.codebook_size, len(frames), generator=generator, dtype=torch.float64)
        codebook = (mean + mixing @ (frames - mean) / math.sqrt(len(frames) - 1)).float()   # (K, D)
        layer.codebook.copy_(codebook)
        frames = frames - codebook.double()[torch.cdist(frames, codebook.double()).argmin(1)]   # the residual


def _seeding_signal(generator: torch.Generator, rate: int, seconds: float = 2.0) -> torch.Tensor:
    """(1, 1, S) speech-like sound: quarter-second segments, each a mix of 10 harmonics of a wobbling
    pitch (80-300 Hz) and of noise, at a loudness spread over 40 dB."""
    segments, length = int(seconds * 4), rate // 4

    def per_segment(low: float, high: float) -> torch.Tensor:   # (S,): one uniform draw per segment
        return (low + (high - low) * torch.rand(segments, generator=generator)).repeat_interleave(length)

    t = torch.arange(segments * length, dtype=torch.float64) / rate
    pitch = per_segment(80, 300).double() * (1 + 0.1 * torch.sin(2 * math.pi * 3 * t))
    phase = 2 * math.pi * torch.cumsum(pitch, 0) / rate
    voiced = sum(torch.sin(k * phase) / k for k in range(1, 11)).float()
    noise = torch.randn(len(t), generator=generator)
    voicing, loudness = per_segment(0, 1), 10 ** per_segment(-2, 0)
    return (0.3 * loudness * (voicing * voiced / 2 + (1 - voicing) * 0.3 * noise)).view(1, 1, -1)


CODECS = {"encodec": _load_encodec, "tokenmill": _load_tokenmill}
