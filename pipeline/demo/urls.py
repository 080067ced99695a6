"""`demo://` URL lists: built-in corpora materialized in a local cache and served on loopback."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlparse

from pipeline.storage import cache_dir

SCHEME = "demo://"
CORPORA = ("shapes",)


def is_demo(url: str) -> bool:
    return url.startswith(SCHEME)


def parse(url: str) -> tuple[str, int, int]:
    """(corpus, count, seed) of `demo://shapes?count=N[&seed=S]`; ValueError names what is wrong."""
    parsed = urlparse(url)
    if parsed.netloc not in CORPORA:
        raise ValueError(f"unknown demo corpus {parsed.netloc!r} in {url!r} (known: {', '.join(CORPORA)})")
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    unknown = set(query) - {"count", "seed"}
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(sorted(unknown))} in {url!r} (known: count, seed)")
    try:
        count, seed = int(query.get("count", 1000)), int(query.get("seed", 0))
    except ValueError:
        raise ValueError(f"count and seed must be integers in {url!r}") from None
    if count < 1:
        raise ValueError(f"count must be at least 1 in {url!r}")
    return parsed.netloc, count, seed


def materialize(url: str) -> tuple[Path, Path]:
    """Draw the corpus named by `url` once; returns (its URL-list parquet, the folder to serve)."""
    corpus, count, seed = parse(url)
    from pipeline.demo import shapes

    folder = cache_dir() / "demo" / f"{corpus}-v{shapes.SHAPES_VERSION}-n{count}-s{seed}"
    return shapes.materialize(count, folder, seed=seed), folder


def to_http(url: str, base_url: str) -> str:
    """Rewrite a row's `demo://corpus/file` URL to the local server at `base_url`."""
    return base_url + url[len(SCHEME):] if is_demo(url) else url
