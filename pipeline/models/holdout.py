"""Which documents a token model never trains on, so its evaluation measures generalisation.

`key`: a share of sample keys (the same split every stage uses, shard_stream.is_held_out).
`combinations`: for captions of the demo shapes corpus, a share of (color, shape kind) pairs is held
out (no color or kind twice while the share allows), and every caption holding such a pair with it:
evaluation then asks for attribute combinations the model has never seen. Documents whose text is
not a shapes caption fall back to the key split.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

from pipeline.data.shard_stream import is_held_out

POLICIES = ("key", "combinations")


@lru_cache(maxsize=None)
def held_out_pairs(share: float) -> frozenset[tuple[str, str]]:
    """The held-out (color, kind) pairs: a fixed share of all of them (at least one), chosen in hash
    order so that no color and no kind is held out twice while the share allows: every color then
    still trains with all kinds but one, and a held-out pair asks for attributes the model knows well
    (held out by hash alone, red lost three of its six kinds)."""
    from pipeline.demo.shapes import COLORS, SHAPE_KINDS

    pairs = [(c, k) for c in COLORS for k in SHAPE_KINDS]
    ranked = sorted(pairs, key=lambda p: zlib.crc32(f"{p[0]}/{p[1]}".encode()))
    wanted = max(1, round(share * len(pairs)))
    chosen: list[tuple[str, str]] = []
    for color, kind in ranked:
        if len(chosen) < wanted and all(color != c and kind != k for c, k in chosen):
            chosen.append((color, kind))
    return frozenset(chosen + [p for p in ranked if p not in chosen][:wanted - len(chosen)])


@dataclass(frozen=True)
class HoldOut:
    policy: str = "key"
    share: float = 0.1

    def __call__(self, key: str, caption: str | None = None) -> bool:
        """Whether the document of `key` (with `caption`, for image-text documents) is held out."""
        if self.policy == "combinations" and caption is not None:
            from pipeline.demo.shapes import parse_caption

            try:
                scene = parse_caption(caption)
            except ValueError:
                return is_held_out(key, self.share)
            return any((s.color, s.kind) in held_out_pairs(self.share) for s in scene.shapes)
        return is_held_out(key, self.share)
