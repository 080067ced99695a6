"""Benchmark: the `tokenize-speech` stage against a bare loop running the same codec on the same audio.

Speech-like 16 kHz FLAC utterances of 2-15 s (the generator of benchmarks/ingest_speech.py), listed
in a manifest, are ingested once by `tokenmill run` into 24 kHz speech shards that later invocations
reuse. It measures seconds of audio per second of:

- stage: `workflow.run(job, stages=["tokens"], force=["tokens"])` in this process, on a local Ray
  that is already started (its start-up is timed and printed apart): planning, the actor pool
  (actor start, codec build and seeding), streaming and decoding the FLAC, encoding, Parquet writes
  and markers, every shard rebuilt;
- bare loop: `codec.encode(batch)` in this process with torch's default thread count, over the same
  audio already decoded and padded into the stage's batches (per shard, the same windows and length
  batches) on the device the stage uses (cuda when there is one).

Both run `--repeat` times, alternating which goes first; medians. Target: stage/bare >= 0.85 on CPU.
Also printed: each one's real-time factor (seconds of work per second of audio). The codec is the
seeded EnCodec (`pretrained: false`), the real architecture at the real cost, with no download.
On a GPU machine the same command runs unchanged.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
import torch
from ingest_speech import RATE, SPEAKERS, speech
from timing import bare_loop, connect, contest, ingest_once, machine, stage_arguments, stage_run, verdict, work_dir

from pipeline import executor
from pipeline.data.speech_shards import iter_samples
from pipeline.stages.tokenize_speech import WINDOW_BATCHES, length_batches, padded_batch, windows
from pipeline.tokenizers.audio_codec import load_codec

BANDWIDTH = 6.0


def make_corpus(folder: Path, minutes: float) -> Path:
    """FLAC utterances and the manifest listing them (made once per corpus size)."""
    manifest = folder / "manifest.tsv"
    if manifest.exists():
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    rng, rows, seconds = np.random.default_rng(0), ["id\taudio\ttext\tspeaker"], 0.0
    while seconds < minutes * 60:
        n, speaker = len(rows) - 1, list(SPEAKERS)[(len(rows) - 1) % len(SPEAKERS)]
        audio = speech(rng, rng.uniform(2, 15), SPEAKERS[speaker] * rng.uniform(0.9, 1.1))
        buffer = io.BytesIO()
        sf.write(buffer, audio, RATE, format="FLAC", subtype="PCM_16")
        (folder / f"{n:05d}.flac").write_bytes(buffer.getvalue())
        rows.append(f"{n:05d}\t{n:05d}.flac\tutterance number {n}\t{speaker}")
        seconds += len(audio) / RATE
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def speech_jobs(work: Path, args, name: str, stages: str) -> tuple[Path, Path]:
    """The ingest-only job of the corpus (run once as a command) and the whole job, the speech stage
    and `stages` (YAML lines); one storage per job name and corpus shape."""
    stem = work / f"{name}-{args.minutes:g}-{args.samples_per_shard}"
    ingest, job = stem.with_name(f"{stem.name}-ingest.yaml"), stem.with_suffix(".yaml")
    manifest = make_corpus(work / f"corpus-{args.minutes:g}", args.minutes)
    head = f"storage: {job.with_suffix('')}-storage\nray: {{address: null}}\nstages:\n"
    speech_stage = (f"  speech: {{kind: ingest-speech, corpus: manifest, manifest: {manifest}, phonemes: false, "
                    f"samples_per_shard: {args.samples_per_shard}}}\n")
    ingest.write_text(f"name: {ingest.stem}\n{head}{speech_stage}")
    job.write_text(f"name: {job.stem}\n{head}{speech_stage}{stages}")
    return ingest, job


def stage_options(args, *names: str) -> str:
    """`, key: value` for each of the tokenize-speech options `names` given on the command line."""
    return "".join(f", {k}: {getattr(args, k)}" for k in names if getattr(args, k) is not None)


def write_jobs(work: Path, args) -> tuple[Path, Path]:
    """The ingest-only job and the whole job: the speech stage and tokens by the seeded EnCodec."""
    return speech_jobs(work, args, "speech", f"  tokens: {{kind: tokenize-speech, inputs: [speech], codec: "
                       f"{{bandwidth: {BANDWIDTH}, pretrained: false}}"
                       f"{stage_options(args, 'batch_seconds', 'actors', 'prefetch')}}}\n")


def decoded_batches(tars: list[str], codec, limit: int, device: str) -> tuple[list[torch.Tensor], float]:
    """The shards' audio decoded and padded on `device` into the batches the stage makes; seconds of audio."""
    batches, samples = [], 0
    for tar in tars:
        audios = [s.audio for s in iter_samples(tar, codec.sample_rate) if s.audio is not None]
        samples += sum(map(len, audios))
        for window in windows(audios, WINDOW_BATCHES * limit):
            batches += [padded_batch([window[i] for i in batch], codec.hop_length).to(device)
                        for batch in length_batches([len(a) for a in window], limit, codec.hop_length)]
    return batches, samples / codec.sample_rate


def compare(job, codec, tars: list[str], utterances: int, repeat: int, device: str, what: str, load_note: str) -> None:
    """The job's `tokens` stage against a bare `codec.encode` loop over the same padded batches, `repeat`
    times alternating: both figures, the RATIO line and the real-time factors."""
    limit = job.stages["tokens"].stage.batch_samples(device, codec.sample_rate)
    batches, seconds = decoded_batches(tars, codec, limit, device)
    codec.encode(batches[0])     # warm-up (cuDNN, allocator)
    print(f"{seconds / 60:.2f} min of audio, {utterances} utterances of 2-15 s in {len(tars)} shards; {what} "
          f"({codec.n_q} codebooks); batches of <= {limit / codec.sample_rate:g} s padded ({len(batches)} batches)")
    bare, stage_timings = contest(repeat, lambda: bare_loop(codec.encode, batches, device),
                                  lambda: stage_run(job, "tokens", utterances, len(tars)), seconds, "s of audio")
    verdict(bare, stage_timings, seconds, "s of audio", f"codec.encode on padded batches, 1 process, "
            f"{torch.get_num_threads()} threads", load_note)
    print(f"real-time factor (seconds of work per second of audio): bare loop {bare / seconds:.4f}, "
          f"stage {stage_timings['wall'] / seconds:.4f}")


def corpus_arguments(parser: argparse.ArgumentParser, work: str) -> None:
    """The corpus's options (--minutes, --samples-per-shard), then every stage-vs-bare-loop benchmark's."""
    parser.add_argument("--minutes", type=float, default=20)   # less: the ~2 s of actor start and planning weigh more
    parser.add_argument("--samples-per-shard", type=int, default=16)
    stage_arguments(parser, work, "the corpus and the ingested shards")


def ingest_and_connect(args, write: Callable) -> tuple[dict, object, list[str], str]:
    """Ingest the corpus once (the jobs `write(work, args)` writes), start Ray and print the machine line:
    the ingest figures, the whole job, the speech tars, the device."""
    args.work = work_dir(args)
    ingested, job, tars = ingest_once(*write(args.work, args), "speech")
    ray_start = connect(job)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(machine(device, ray_start, job.stages["tokens"].stage.placement(executor.cluster_resources(), len(tars))))
    return ingested, job, tars, device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-seconds", type=float, default=None, help="stage batch (default: the stage's own)")
    corpus_arguments(parser, "/tmp/tokenmill-bench-tokenize-speech")
    args = parser.parse_args()
    ingested, job, tars, device = ingest_and_connect(args, write_jobs)
    stage = job.stages["tokens"].stage

    codec = load_codec(stage.config.codec, device)
    compare(job, codec, tars, ingested["status"]["samples"], args.repeat, device,
            f"EnCodec 24 kHz at {BANDWIDTH:g} kbps", "codec builds included")


if __name__ == "__main__":
    main()
