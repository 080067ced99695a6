"""Token rows back to media: find a row of a token stage and decode it with what made it (the image
tokenizer's checkpoint, the audio codec)."""
from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.data import token_shards
from pipeline.data.image_shards import to_images
from pipeline.spec import JobSpec
from pipeline.stages import Stage
from pipeline.stages.base import checkpoint_of
from pipeline.stages.tokenize_images import TokenizeImages, load_tokenizer
from pipeline.stages.tokenize_speech import TokenizeSpeech
from pipeline.storage import Checkpoint
from pipeline.tokenizers.audio_codec import codec_digest, load_codec
from pipeline.workflow import Planner


class RoundTripError(ValueError):
    """The row cannot be found or decoded; the message says why."""


def find_row(planner: Planner, stage: str, *, key: str | None = None, shard: str | None = None,
             row: int | None = None) -> tuple[dict, dict]:
    """(row, file metadata) of a built token shard, by key (searching every shard, or `shard`)
    or by `shard` and `row` index."""
    built = {s: up for s, up in planner.built_shards(stage).items() if up is not None}
    if shard is not None:
        if shard not in built:
            raise RoundTripError(f"stage {stage} has no built shard {shard!r} (built: {', '.join(sorted(built)) or 'none'})")
        built = {shard: built[shard]}
    for _, up in sorted(built.items()):
        url = next(u for u in up.files if u.endswith(".parquet"))
        found = token_shards.read_row(url, key=key, row=row)
        if found is not None:
            return found, token_shards.metadata(url)
    wanted = f"key {key!r}" if key is not None else f"row {row}"
    raise RoundTripError(f"no {wanted} in the built shards of stage {stage}")


def _token_row(job: JobSpec, stage: str, kind: type[Stage], **where) -> tuple[Stage, Planner, dict, dict]:
    """(the stage, a planner, row, file metadata) of a row of a `kind` stage (see find_row for `where`)."""
    spec = job.stages.get(stage)
    if spec is None or not isinstance(spec.stage, kind):
        raise RoundTripError(f"{stage!r} is not a {kind.kind} stage of job {job.name}")
    planner = Planner(job)     # reads each stage's markers once for every lookup
    return (spec.stage, planner, *find_row(planner, stage, **where))


def built_checkpoint(planner: Planner, stage: str, what: str) -> Checkpoint:
    """What model stage `stage` built; RoundTripError naming it (as the `what` stage) if it is not built."""
    shards = planner.built_shards(stage)
    if not shards or None in shards.values():
        raise RoundTripError(f"{what} stage {stage} is not built")
    return checkpoint_of(shards)


def decode_image(job: JobSpec, stage: str, **where) -> Image.Image:
    """The image a row of a tokenize-images stage decodes to (see find_row for `where`)."""
    import torch

    token_stage, planner, found, meta = _token_row(job, stage, TokenizeImages, **where)
    tokenizer = built_checkpoint(planner, token_stage.config.tokenizer, "tokenizer")
    if meta.get("tokenizer") != tokenizer.digest:
        raise RoundTripError(f"the token shard was made by another checkpoint of {token_stage.config.tokenizer} "
                             "(it is stale): run the job again")
    model = load_tokenizer(tokenizer)
    h, w = found["shape"]
    codes = torch.tensor(found["tokens"], dtype=torch.long).reshape(1, h, w)
    return to_images(model.decode(codes))[0]


def decode_speech(job: JobSpec, stage: str, **where) -> tuple[np.ndarray, int]:
    """(waveform float32 (S,), sample rate) a row of a tokenize-speech stage decodes to (see find_row
    for `where`); S is the utterance's length."""
    import torch

    token_stage, planner, found, meta = _token_row(job, stage, TokenizeSpeech, **where)
    config = token_stage.config.codec
    trained = None
    if config.name == "tokenmill":
        trained = built_checkpoint(planner, config.stage, "codec")
    digest = trained.digest if trained else codec_digest(config)
    if (meta.get("codec_name"), meta.get("codec")) != (config.name, digest):
        raise RoundTripError(f"the token shard was made by codec {meta.get('codec_name')} {meta.get('codec')}, not by "
                             f"the stage's {config.name} {digest} (it is stale): run the job again")
    codec = load_codec(config, trained=trained)
    n_q, frames = found["shape"]
    codes = torch.tensor(found["tokens"], dtype=torch.long).reshape(1, n_q, frames)
    wav = codec.decode(codes)[0, 0, :round(found["duration"] * codec.sample_rate)]   # (S,): frames * hop, trimmed
    return wav.numpy(), codec.sample_rate


def decode_to_file(job: JobSpec, stage: str, out: str, **where) -> str:
    """Decode a row into `out`: a 32-bit float WAV for speech tokens, an image (format by extension)
    for image tokens. Returns what was written, in words."""
    spec = job.stages.get(stage)
    if spec is not None and isinstance(spec.stage, TokenizeSpeech):
        import soundfile as sf

        wav, rate = decode_speech(job, stage, **where)
        sf.write(out, wav, rate, format="WAV", subtype="FLOAT")
        return f"{out}: {len(wav) / rate:.2f} s at {rate} Hz"
    image = decode_image(job, stage, **where)
    image.save(out)
    return f"{out}: {image.width}x{image.height}"
