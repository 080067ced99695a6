"""`ingest-images`: LAION-style URL lists downloaded by img2dataset into WebDataset shards.

One shard per slice of `samples_per_shard` rows. Each shard runs img2dataset's own
`Downloader` (threads, per-URL retries, timeouts, resizing, X-Robots-Tag checks) in one
Ray task, so shards retry independently, which img2dataset's ray distributor cannot do.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import url_list
from pipeline.demo import urls as demo_urls
from pipeline.demo.server import LocalServer
from pipeline.stages.base import ShardInput, ShardOutput, SpecProblem, Stage

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations otherwise calls the network on import


@dataclass
class IngestImagesConfig:
    url_list: str
    url_col: str = "url"
    caption_col: str | None = "caption"
    image_size: int = 256
    resize_mode: str = "center_crop"          # no | keep_ratio | center_crop | border
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_image_area: float = 89_478_485        # pixels; PIL's decompression-bomb limit
    max_aspect_ratio: float | None = None
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    user_agent_token: str | None = None
    samples_per_shard: int = 1000
    thread_count: int = 32
    timeout: float = 10.0                     # seconds per URL
    retries: int = 1                          # per URL


# Reasons are the stable part of img2dataset's error messages, so that counts aggregate.
_REASONS = [
    (re.compile(r"HTTP Error (\d+)"), lambda m: f"http {m.group(1)}"),
    (re.compile(r"Connection refused"), lambda m: "connection refused"),
    (re.compile(r"timed? ?out", re.I), lambda m: "timeout"),
    (re.compile(r"X-Robots-Tag"), lambda m: "disallowed by X-Robots-Tag"),
    (re.compile(r"decoding error"), lambda m: "not a decodable image"),
    (re.compile(r"area too large"), lambda m: "over the pixel limit"),
    (re.compile(r"too small"), lambda m: "under the minimum size"),
    (re.compile(r"aspect ratio too large"), lambda m: "aspect ratio over the limit"),
    (re.compile(r"Name or service not known|getaddrinfo|nodename"), lambda m: "unknown host"),
]


def failure_reason(message: str | None) -> str:
    """A short, aggregatable reason for one of img2dataset's per-sample error messages."""
    message = message or "unknown error"
    for pattern, reason in _REASONS:
        match = pattern.search(message)
        if match:
            return reason(match)
    return re.sub(r"\d+", "N", message)[:80]


class IngestImages(Stage):
    kind = "ingest-images"
    version = 1
    Config = IngestImagesConfig
    execution_keys = frozenset({"thread_count", "timeout", "retries"})

    def __init__(self, name: str, config: IngestImagesConfig, storage_root: str = ""):
        super().__init__(name, config, storage_root)
        self.url_base: str | None = None   # set while a demo corpus is being served

    @classmethod
    def check(cls, config: IngestImagesConfig) -> list[SpecProblem]:
        if config.encode_format == "png" and not 0 <= config.encode_quality <= 9:   # img2dataset's rule
            return [SpecProblem(("encode_quality",), f"for png it is the zlib compression level 0-9, not "
                                                     f"{config.encode_quality} (95 is a jpg/webp quality)")]
        try:
            files = cls._files(config)
        except (ValueError, OSError) as exc:
            return [SpecProblem(("url_list",), str(exc))]
        key_of = {config.url_col: "url_col", config.caption_col: "caption_col", None: "url_list"}
        return [SpecProblem((key_of[column],), message)
                for column, message in url_list.check_columns(files, [c for c in key_of if c])]

    @staticmethod
    def _files(config: IngestImagesConfig) -> list[str]:
        if demo_urls.is_demo(config.url_list):
            return [str(demo_urls.materialize(config.url_list)[0])]
        return url_list.list_files(config.url_list)

    def libraries(self) -> dict[str, str]:
        from importlib.metadata import version

        libs = {"img2dataset": version("img2dataset"), "opencv": version("opencv-python-headless")}
        if demo_urls.is_demo(self.config.url_list):
            from pipeline.demo.shapes import SHAPES_VERSION
            libs["demo-shapes"] = str(SHAPES_VERSION)
        return libs

    def inputs(self, upstream: dict, references: dict | None = None) -> list[ShardInput]:
        files = self._files(self.config)
        return [ShardInput(piece.shard, digest, piece)
                for piece, digest in url_list.cached_slices(files, self.config.samples_per_shard)]

    @contextmanager
    def session(self) -> Iterator["IngestImages"]:
        if not demo_urls.is_demo(self.config.url_list):
            yield self
            return
        _, folder = demo_urls.materialize(self.config.url_list)
        with LocalServer(folder) as server:
            self.url_base = server.base_url
            try:
                yield self
            finally:
                self.url_base = None

    def build(self, item: ShardInput, workdir: Path) -> ShardOutput:
        from img2dataset.downloader import Downloader
        from img2dataset.resizer import Resizer
        from img2dataset.writer import WebDatasetSampleWriter

        c = self.config
        columns = self._write_input(item.payload, workdir / "input.arrow")
        resizer = Resizer(
            image_size=c.image_size, resize_mode=c.resize_mode, resize_only_if_bigger=c.resize_only_if_bigger,
            encode_quality=c.encode_quality, encode_format=c.encode_format, min_image_size=c.min_image_size,
            max_image_area=c.max_image_area, max_aspect_ratio=c.max_aspect_ratio or float("inf"))
        out = workdir / "out"
        out.mkdir()
        downloader = Downloader(
            sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=c.thread_count,
            save_caption=c.caption_col is not None, extract_exif=False, output_folder=str(out),
            column_list=columns, timeout=c.timeout, number_sample_per_shard=c.samples_per_shard,
            oom_shard_count=len(item.shard), compute_hash="sha256", verify_hash_type=None,
            encode_format=c.encode_format, retries=c.retries, user_agent_token=c.user_agent_token,
            disallowed_header_directives=c.disallowed_header_directives or None, blurring_bbox_col=None)
        downloader.download_shard((int(item.shard), str(workdir / "input.arrow")))
        return self._summarize(item.shard, out)

    def _write_input(self, piece: url_list.Slice, path: Path) -> list[str]:
        """Write the slice as the Arrow file img2dataset reads; returns its column list."""
        c = self.config
        table = url_list.read_slice(piece)
        renames = {c.url_col: "url", **({c.caption_col: "caption"} if c.caption_col else {})}
        table = table.rename_columns([renames.get(n, n) for n in table.column_names])
        if self.url_base:
            table = table.set_column(table.schema.get_field_index("url"), "url", pa.array(
                [demo_urls.to_http(u, self.url_base) for u in table.column("url").to_pylist()], pa.string()))
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        # url first, then caption, then every extra column, which img2dataset keeps in key.json
        return ["url"] + (["caption"] if c.caption_col else []) + \
            [n for n in table.column_names if n not in ("url", "caption")]

    @staticmethod
    def _summarize(shard: str, out: Path) -> ShardOutput:
        files = [out / f"{shard}.tar", out / f"{shard}.parquet", out / f"{shard}_stats.json"]
        status = pq.read_table(files[1], columns=["status", "error_message"]).to_pydict()
        output = ShardOutput(files=files, samples=0)
        for state, message in zip(status["status"], status["error_message"]):
            if state == "success":
                output.samples += 1
            else:
                output.failures[failure_reason(message)] += 1
        output.stats = {"bytes": files[0].stat().st_size}
        return output
