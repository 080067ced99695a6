"""`tokenize-speech`: speech shards -> Parquet shards of audio codec codes, one per speech shard, same id.

Shards run on a pool of Ray actors; each builds the codec once (on its GPU when it has one) and
keeps it across shards. Inside a shard a background thread streams and decodes the FLAC while the
codec encodes. Utterances are encoded in batches of similar length: a window of decoded utterances
is sorted by length and cut into batches of at most `batch_seconds` of padded audio. Each utterance
is zero-padded to whole frames first; both codecs are causal, so its codes do not depend on the
padding after it (but for float rounding), and they are trimmed to ceil(samples / hop) frames. Rows
keep the shard's order.
The codec is EnCodec (`codec: {name: encodec, bandwidth, ...}`) or the one a train-audio-codec stage
trained (`codec: {name: tokenmill, stage, levels}`: a reference, so that stage's digest enters the
fingerprint and every shard waits while it is not built). The codec's name, bandwidth or levels and
weights digest are in the fingerprint: another codec or checkpoint makes every token shard stale, a
new speech shard adds one.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from pipeline.data import token_shards
from pipeline.data.shard_stream import prefetched
from pipeline.data.speech_shards import SpeechSample, audio_problem, iter_samples
from pipeline.stages.base import (ActorStage, ShardInput, ShardOutput, SpecProblem, Stage, TokenizeWork, UpstreamShard,
                                   tokenize_inputs)
from pipeline.tokenizers.audio_codec import AudioCodec, CheckpointError, CodecConfig, checkpoint_file, load_codec

SCHEMA = "speech_tokens"
BATCH_SECONDS = {"cpu": 5.0, "cuda": 600.0}   # CPU convolutions are fastest on cache-sized calls; GPUs want wide ones
WINDOW_BATCHES = 4                             # utterances sorted by length together: this many batches' worth


@dataclass
class TokenizeSpeechConfig:
    codec: CodecConfig                     # {name: encodec, bandwidth, checkpoint, pretrained}
                                           # or {name: tokenmill, stage, levels}
    batch_seconds: float | None = None     # padded audio per encoder call (default: BATCH_SECONDS)
    actors: int | None = None              # default: one per CPU, or one per GPU when the cluster has GPUs
    gpus_per_actor: float | None = None    # default: 1 when the cluster has GPUs, else 0
    prefetch: int = 64                     # decoded utterances kept ready per actor

    def __post_init__(self):
        if isinstance(self.codec, dict):   # from the YAML spec
            self.codec = CodecConfig(**self.codec)


def windows(items: Iterable, limit: int, size: Callable = len) -> Iterator[list]:
    """Consecutive runs of `items` whose sizes add up to at least `limit` (the last run may hold less)."""
    run, total = [], 0
    for item in items:
        run.append(item)
        total += size(item)
        if total >= limit:
            yield run
            run, total = [], 0
    if run:
        yield run


def length_batches(lengths: list[int], limit: int, hop_length: int) -> list[list[int]]:
    """Indices of `lengths` grouped shortest first into batches whose padded size (count x longest,
    in whole frames) stays within `limit` samples; a longer utterance goes alone."""
    batches, batch = [], []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        padded = -(-lengths[i] // hop_length) * hop_length
        if batch and (len(batch) + 1) * padded > limit:
            batches.append(batch)
            batch = []
        batch.append(i)
    return batches + [batch] if batch else batches


def padded_batch(audios: list, hop_length: int):
    """Waveforms (S_i,) -> (B, 1, S) zero-padded to the longest one's whole frames, so that every
    utterance is followed by zeros up to its own last frame's end."""
    import torch

    batch = torch.nn.utils.rnn.pad_sequence(audios, batch_first=True)   # (B, max S_i)
    return torch.nn.functional.pad(batch, (0, -batch.shape[1] % hop_length)).unsqueeze(1)


def encode_window(codec: AudioCodec, audios: list, limit: int, device: str) -> list:
    """Codes (n_q, ceil(S_i / hop)) uint16 of each waveform, in order, encoded in length batches."""
    out = [None] * len(audios)
    for batch in length_batches([len(a) for a in audios], limit, codec.hop_length):
        wav = padded_batch([audios[i] for i in batch], codec.hop_length).to(device)
        codes = codec.encode(wav).cpu()   # (B, n_q, T)
        for row, i in enumerate(batch):
            out[i] = codes[row, :, :codec.frames(len(audios[i]))].numpy().astype("uint16")
    return out


class TokenizeSpeech(ActorStage):
    kind = "tokenize-speech"
    version = 2                            # 2: clipped utterances are skipped
    Config = TokenizeSpeechConfig
    reference_keys = ("codec.stage",)
    execution_keys = frozenset({"batch_seconds", "actors", "gpus_per_actor", "prefetch"})

    @classmethod
    def check(cls, config: TokenizeSpeechConfig) -> list[SpecProblem]:
        codec = config.codec
        if codec.checkpoint and not codec.pretrained:
            return [SpecProblem(("codec", "checkpoint"), "pretrained: false builds the codec without weights: "
                                                         "drop the checkpoint or the pretrained: false")]
        if codec.checkpoint:
            try:
                checkpoint_file(codec.checkpoint)   # hashes the file: a wrong one is refused before any work
            except CheckpointError as exc:
                return [SpecProblem(("codec", "checkpoint"), str(exc))]
        return []

    def check_references(self, referenced: dict[str, Stage]) -> list[SpecProblem]:
        codec = referenced.get("codec.stage")
        if codec is None:
            return []
        if codec.kind != "train-audio-codec":
            return [SpecProblem(("codec", "stage"),
                                f"stage {codec.name!r} is of kind {codec.kind}, not train-audio-codec")]
        if not codec.config.pretrained and self.config.codec.levels > codec.config.levels:
            return [SpecProblem(("codec", "levels"), f"{self.config.codec.levels} levels asked, but stage {codec.name} "
                                                     f"trains {codec.config.levels}")]
        return []

    def fingerprint_config(self) -> dict:
        return {**{k: v for k, v in asdict(self.config).items() if k not in self.execution_keys},
                "codec": self.config.codec.describe()}

    def libraries(self) -> dict[str, str]:
        from importlib.metadata import version

        if self.config.codec.name == "tokenmill":
            return {"torch": version("torch"), "vector-quantize-pytorch": version("vector-quantize-pytorch")}
        libs = {"encodec": version("encodec")}
        if not self.config.codec.pretrained:
            libs["torch"] = version("torch")   # seeded weights come from torch's random generator
        return libs

    def inputs(self, upstream: dict[str, dict[str, UpstreamShard | None]],
               references: dict | None = None) -> list[ShardInput]:
        return tokenize_inputs(upstream, references, "codec.stage")   # a tokenmill codec's checkpoint

    def batch_samples(self, device: str, sample_rate: int) -> int:
        """Padded samples per encoder call on `device`."""
        return round((self.config.batch_seconds or BATCH_SECONDS[device]) * sample_rate)

    def build(self, item: ShardInput, workdir: Path) -> ShardOutput:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        work: TokenizeWork = item.payload
        codec = load_codec(self.config.codec, device, work.checkpoint)
        limit = self.batch_samples(device, codec.sample_rate)
        columns: dict[str, list] = {n: [] for n in token_shards.arrow_schema(SCHEMA).names}
        output = ShardOutput([], samples=0)

        def good(samples: Iterable[SpeechSample]) -> Iterator[SpeechSample]:
            for sample in samples:
                problem = sample.error or audio_problem(sample.audio, codec.hop_length)
                if problem:
                    output.fail(sample.key, problem)
                else:
                    yield sample

        decoded = (s for tar in work.tars
                   for s in prefetched(iter_samples(tar, codec.sample_rate), self.config.prefetch))
        for window in windows(good(decoded), WINDOW_BATCHES * limit, lambda s: len(s.audio)):
            for sample, codes in zip(window, encode_window(codec, [s.audio for s in window], limit, device)):
                columns["key"].append(sample.key)
                columns["tokens"].append(codes.reshape(-1))   # codebook-major
                columns["shape"].append(list(codes.shape))
                columns["text"].append(sample.text)
                columns["phonemes"].append(sample.meta.get("phonemes"))
                columns["speaker"].append(str(sample.meta.get("speaker") or ""))
                columns["duration"].append(len(sample.audio) / codec.sample_rate)
                columns["source_shard"].append(item.shard)
                columns["source"].append(json.dumps(sample.meta, sort_keys=True))
        output.files.append(token_shards.write(workdir / f"{item.shard}.parquet", SCHEMA, columns, {
            "kind": "audio", "codec": codec.digest, "codec_name": codec.name, "bandwidth": codec.bandwidth,
            "n_q": codec.n_q, "codebook_size": codec.codebook_size, "frame_rate": codec.frame_rate,
            "sample_rate": codec.sample_rate}))
        output.samples = len(columns["key"])
        output.stats.update(seconds=round(sum(columns["duration"]), 3), tokens=sum(map(len, columns["tokens"])))
        return output

    def status_figures(self, markers: list) -> dict:
        return {"hours": round(sum(m.stats.get("seconds", 0) for m in markers) / 3600, 4),
                "tokens": sum(m.stats.get("tokens", 0) for m in markers)}
