"""Token rows back to media: find a row of a token stage and decode it with the stage's tokenizer."""
from __future__ import annotations

from PIL import Image

from pipeline.data import token_shards
from pipeline.data.image_shards import to_images
from pipeline.spec import JobSpec
from pipeline.stages.tokenize_images import TokenizeImages, load_tokenizer, tokenizer_of
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


def decode_image(job: JobSpec, stage: str, **where) -> Image.Image:
    """The image a row of a tokenize-images stage decodes to (see find_row for `where`)."""
    import torch

    spec = job.stages.get(stage)
    if spec is None or not isinstance(spec.stage, TokenizeImages):
        raise RoundTripError(f"{stage!r} is not a tokenize-images stage of job {job.name}")
    planner = Planner(job)     # reads each stage's markers once for both lookups
    found, meta = find_row(planner, stage, **where)
    tokenizer_stage = spec.stage.config.tokenizer
    shards = planner.built_shards(tokenizer_stage)
    if not shards or None in shards.values():
        raise RoundTripError(f"tokenizer stage {tokenizer_stage} is not built")
    tokenizer = tokenizer_of(shards)
    if meta.get("tokenizer") != tokenizer.digest:
        raise RoundTripError(f"the token shard was made by another checkpoint of {tokenizer_stage} "
                             "(it is stale): run the job again")
    model = load_tokenizer(tokenizer)
    h, w = found["shape"]
    codes = torch.tensor(found["tokens"], dtype=torch.long).reshape(1, h, w)
    return to_images(model.decode(codes))[0]
