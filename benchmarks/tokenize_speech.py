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


def write_jobs(work: Path, args) -> tuple[Path, Path]:
    """The ingest-only job (run once as a command) and the whole job; one storage per corpus shape."""
    stem = work / f"speech-{args.minutes:g}-{args.samples_per_shard}"
    ingest, job = stem.with_name(f"{stem.name}-ingest.yaml"), stem.with_suffix(".yaml")
    manifest = make_corpus(work / f"corpus-{args.minutes:g}", args.minutes)
    head = f"storage: {job.with_suffix('')}-storage\nray: {{address: null}}\nstages:\n"
    speech_stage = (f"  speech: {{kind: ingest-speech, corpus: manifest, manifest: {manifest}, phonemes: false, "
                    f"samples_per_shard: {args.samples_per_shard}}}\n")
    ingest.write_text(f"name: {ingest.stem}\n{head}{speech_stage}")
    options = "".join(f", {k}: {v}" for k, v in (("batch_seconds", args.batch_seconds), ("actors", args.actors),
                                                  ("prefetch", args.prefetch)) if v is not None)
    job.write_text(f"name: {job.stem}\n{head}{speech_stage}  tokens: {{kind: tokenize-speech, inputs: [speech], "
                   f"codec: {{bandwidth: {BANDWIDTH}, pretrained: false}}{options}}}\n")
    return ingest, job


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20)   # less: the ~2 s of actor start and planning weigh more
    parser.add_argument("--samples-per-shard", type=int, default=16)
    parser.add_argument("--batch-seconds", type=float, default=None, help="stage batch (default: the stage's own)")
    stage_arguments(parser, "/tmp/tokenmill-bench-tokenize-speech", "the corpus and the ingested shards")
    args = parser.parse_args()
    args.work = work_dir(args)
    ingested, job, tars = ingest_once(*write_jobs(args.work, args), "speech")
    ray_start = connect(job)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stage = job.stages["tokens"].stage
    placement = stage.placement(executor.cluster_resources(), len(tars))

    utterances = ingested["status"]["samples"]
    codec = load_codec(stage.config.codec, device)
    limit = stage.batch_samples(device, codec.sample_rate)
    batches, seconds = decoded_batches(tars, codec, limit, device)
    codec.encode(batches[0])     # warm-up (cuDNN, allocator)
    print(machine(device, ray_start, placement))
    print(f"{seconds / 60:.2f} min of audio, {utterances} utterances of 2-15 s in {len(tars)} shards "
          f"of {args.samples_per_shard}; EnCodec 24 kHz at {BANDWIDTH:g} kbps ({codec.n_q} codebooks); batches of "
          f"<= {limit / codec.sample_rate:g} s padded ({len(batches)} batches)")

    bare, stage_timings = contest(args.repeat, lambda: bare_loop(codec.encode, batches, device),
                                  lambda: stage_run(job, "tokens", utterances, len(tars)), seconds, "s of audio")
    verdict(bare, stage_timings, seconds, "s of audio", f"codec.encode on padded batches, 1 process, "
            f"{torch.get_num_threads()} threads", "codec builds included")
    print(f"real-time factor (seconds of work per second of audio): bare loop {bare / seconds:.4f}, "
          f"stage {stage_timings['wall'] / seconds:.4f}")


if __name__ == "__main__":
    main()
