"""Benchmark: the `ingest-speech` stage against a plain one-core decode -> resample -> FLAC loop.

A LibriSpeech-layout part of `--minutes` of synthetic 16 kHz speech-like FLAC (2-15 s utterances, 4
speakers) is served as `dev-clean` (the recipe knows only official parts) by a separate process on
127.0.0.1. An untimed warm-up `tokenmill run` (a job of its own; it warms Ray and caches too) fetches and
extracts it into the download folder the timed jobs share: the server's hits prove they fetch nothing.
Timed as whole commands in fresh processes (hours of audio per minute of wall time):
- baseline: one process, one thread: each extracted FLAC through soundfile.read -> mono ->
  torchaudio.functional.resample 16k -> 24k -> soundfile FLAC (PCM_16) into a folder;
- tokenmill: `tokenmill run` of an ingest-speech job (24 kHz) on a local Ray of num_cpus=P, with
  phonemes off, then on (users' default), each its own job and storage; Ray start-up included.
Target (phonemes off), per core: (tokenmill / P) / (baseline / 1) >= 0.9. Also printed: P plain loops
at once on the same cores (each on 1/P of the files), which is this machine's ceiling for any
parallel implementation, and, start-up left out, the shards' span against the baseline's loop alone. Checked: samples =
utterances, and status hours = the corpus's duration (within 1%).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from speech_corpora import pack  # noqa: E402
from timing import timed_run  # noqa: E402

RATE, TARGET_RATE, PART, ARCHIVE = 16000, 24000, "dev-clean", "dev-clean.tar.gz"
SPEAKERS = {"1089": 105.0, "2277": 128.0, "3570": 196.0, "6930": 224.0}   # speaker -> mean pitch, Hz
WORDS = ("THE AND OF TO A IN THAT HE WAS IT HIS HAD WITH AS FOR YOU BUT AT ON SHE NOT BE THEY ALL BY ONE WHICH THIS "
         "FROM SO SAID HAVE WHEN THERE UPON LITTLE GREAT NIGHT HOUSE WATER MOTHER AGAIN THOUGHT BEAUTIFUL").split()
SERVE = ("import json, sys\nfrom pipeline.demo.server import LocalServer\n"
         "with LocalServer(sys.argv[1]) as server:\n    print(server.base_url, flush=True)\n"
         "    for _ in sys.stdin:\n        print(json.dumps(server.hits), flush=True)\n")
# The plain loop as a command of its own: extracted part, output folder, target rate on argv.
BASELINE = ("import sys, time\nfrom pathlib import Path\nimport soundfile as sf, torch, torchaudio\n"
            "torch.set_num_threads(1)\nroot, out, rate = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])\n"
            "index, count = int(sys.argv[4]), int(sys.argv[5])   # this process's share of the files\n"
            "started = time.perf_counter()\nfor src in sorted(root.glob('*/*/*/*/*.flac'))[index::count]:\n"
            "    samples, sr = sf.read(src, dtype='float32', always_2d=True)\n"
            "    audio = torchaudio.functional.resample(torch.from_numpy(samples.mean(axis=1)), sr, rate)\n"
            "    sf.write(out / src.name, audio.clamp(-1, 1).numpy(), rate, format='FLAC', subtype='PCM_16')\n"
            "print(time.perf_counter() - started)\n")


def speech(rng: np.random.Generator, seconds: float, f0: float) -> np.ndarray:
    """Speech-like float32: 8 harmonics of a wandering pitch, syllables, pauses, breath noise."""
    n = int(seconds * RATE)
    pitch = f0 * (1 + 0.12 * np.sin(2 * np.pi * rng.uniform(0.3, 1.2) * np.arange(n) / RATE + rng.uniform(0, 6))
                  + 0.05 * np.cumsum(rng.normal(0, 1, n)) / np.sqrt(n))
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 9))
    syllables = np.sin(np.pi * np.cumsum(rng.uniform(2, 6, n)) / RATE) ** 2
    pauses = np.repeat(rng.random(n // 4000 + 1) > 0.15, 4000)[:n]
    noise = 0.01 * rng.normal(0, 1, n) * syllables + 0.001 * rng.normal(0, 1, n)
    return (0.15 * voiced * syllables * pauses + noise).astype(np.float32)


def make_corpus(archive: Path, minutes: float) -> dict:
    """LibriSpeech/{PART}/{spk}/{ch}/{spk}-{ch}-{n:04d}.flac + trans.txt, packed; returns its figures."""
    rng = np.random.default_rng(0)
    files, lines, seconds, n = {}, {}, 0.0, 0
    while seconds < minutes * 60:
        spk = list(SPEAKERS)[n % len(SPEAKERS)]
        folder, uid = f"LibriSpeech/{PART}/{spk}/{100 + n % 3}", f"{spk}-{100 + n % 3}-{n:04d}"
        audio = speech(rng, rng.uniform(2, 15), SPEAKERS[spk] * rng.uniform(0.9, 1.1))
        buffer = io.BytesIO()
        sf.write(buffer, audio, RATE, format="FLAC", subtype="PCM_16")
        files[f"{folder}/{uid}.flac"] = buffer.getvalue()
        words = rng.choice(WORDS, max(1, round(len(audio) / RATE * rng.uniform(2.3, 3.0))))
        lines.setdefault(f"{folder}/{spk}-{100 + n % 3}.trans.txt", []).append(f"{uid} {' '.join(words)}")
        seconds, n = seconds + len(audio) / RATE, n + 1
    flac = sum(map(len, files.values()))
    files.update({name: ("\n".join(text) + "\n").encode() for name, text in lines.items()})
    return {"sha256": pack(files, archive), "utterances": n, "seconds": seconds,
            "flac_ratio": flac / (2 * RATE * seconds)}


def hits(server: subprocess.Popen) -> dict:
    """Requests per path the server has answered so far."""
    server.stdin.write("\n")
    server.stdin.flush()
    return json.loads(server.stdout.readline())


def run_baseline(root: Path, out: Path, processes: int = 1) -> tuple[float, float]:
    """(whole command, slowest loop) seconds of `processes` plain loops at once, each on its share of files."""
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    loops = [subprocess.Popen([sys.executable, "-c", BASELINE, root, out, str(TARGET_RATE), str(i), str(processes)],
                              env=env, stdout=subprocess.PIPE, text=True) for i in range(processes)]
    seconds = [float(loop.communicate()[0]) for loop in loops]
    if any(loop.returncode for loop in loops):
        sys.exit("a baseline loop failed")
    return time.perf_counter() - started, max(seconds)


def write_job(path: Path, base_url: str, sha256: str, download_dir: Path, args, phonemes: bool) -> Path:
    path.write_text(f"name: '{path.stem}'\nstorage: '{path.with_suffix('')}-storage'\nray: {{num_cpus: {args.cpus}}}\n"
                    f"stages:\n  speech: {{kind: ingest-speech, corpus: librispeech, parts: [{PART}], base_url: "
                    f"'{base_url}', checksums: {{{ARCHIVE}: {sha256}}}, download_dir: '{download_dir}', sample_rate: "
                    f"{TARGET_RATE}, samples_per_shard: {args.samples_per_shard}, "
                    f"phonemes: {str(phonemes).lower()}}}\n")
    return path


def run_tokenmill(job: Path, env: dict, corpus: dict) -> dict:
    """Time `tokenmill run` as a whole command; check sample count and status hours against the corpus."""
    run = timed_run(job, job.parent / f"{job.stem}-storage", "speech", env)
    status = run["status"]
    if status["samples"] != corpus["utterances"]:
        sys.exit(f"{job.stem}: {status['samples']} samples, but the corpus has {corpus['utterances']} utterances")
    if abs(status["hours"] * 3600 - corpus["seconds"]) > 0.01 * corpus["seconds"]:
        sys.exit(f"{job.stem}: status says {status['hours']} h, but the corpus lasts {corpus['seconds'] / 3600:.4f} h")
    return {"wall": run["wall"], "stage": run["record"]["last_run"]["seconds"], "samples": status["samples"],
            "span": run["span"], "hours": status["hours"], "shards": status["shards_done"], "line": run["line"]}


def compare(tmp: Path, base_url: str, corpus: dict, args, env: dict) -> None:
    """The baseline, then tokenmill with phonemes off and on; hours of audio per minute and the ratios."""
    base, loop = run_baseline(tmp / "corpora" / "librispeech" / PART, tmp / "baseline")
    if (written := len(list((tmp / "baseline").glob("*.flac")))) != corpus["utterances"]:
        sys.exit(f"baseline wrote {written} files for {corpus['utterances']} utterances")
    rate, work = {"baseline": corpus["seconds"] / 60 / base}, {"baseline": corpus["seconds"] / 60 / loop}
    print(f"baseline (1 process, 1 thread): {written} files in {base:.2f} s = {rate['baseline']:.3f} h of audio/min "
          f"(whole command; the loop alone {loop:.2f} s = {work['baseline']:.3f} h/min)")
    both, _ = run_baseline(tmp / "corpora" / "librispeech" / PART, tmp / "baseline-parallel", args.cpus)
    rate["parallel"] = corpus["seconds"] / 60 / both
    print(f"baseline, {args.cpus} plain loops at once on the same cores: {both:.2f} s = {rate['parallel']:.3f} h/min: "
          f"this machine's own ceiling per core is {rate['parallel'] / rate['baseline'] / args.cpus:.3f}")
    for label in ["phonemes off"] + ["phonemes on"] * args.phonemes:
        job = write_job(tmp / f"{label.replace(' ', '-')}.yaml", base_url, corpus["sha256"], tmp / "corpora", args,
                        label == "phonemes on")
        run = run_tokenmill(job, env, corpus)
        rate[label], work[label] = corpus["seconds"] / 60 / run["wall"], corpus["seconds"] / 60 / run["span"]
        print(f"tokenmill, {label}: {run['samples']} samples, {run['shards']} shards, {run['hours']} h in "
              f"{run['wall']:.2f} s = {rate[label]:.3f} h of audio/min (whole command; stage {run['stage']:.2f} s "
              f"with Ray start-up; first shard start to last shard end {run['span']:.2f} s = {work[label]:.3f} h/min)"
              f"\n  last run said: {run['line']}")
    for label in ("phonemes off", "phonemes on")[:1 + args.phonemes]:
        plain = rate[label] / rate["baseline"]
        verdict = f"  target >= 0.9  {'PASS' if plain / args.cpus >= 0.9 else 'FAIL'}" if label[-1] == "f" else ""
        print(f"RATIO tokenmill ({label}) / baseline: per core {plain / args.cpus:.3f}, plain {plain:.3f}{verdict}"
              f"\n  vs {args.cpus} plain loops at once: {rate[label] / rate['parallel']:.3f}; shards' span / baseline "
              f"loop alone: per core {work[label] / work['baseline'] / args.cpus:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=120)
    parser.add_argument("--cpus", type=int, default=2, help="P, the Ray num_cpus of tokenmill")
    parser.add_argument("--samples-per-shard", type=int, default=50)
    parser.add_argument("--phonemes", action=argparse.BooleanOptionalAction, default=True, help="time it on too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-speech-") as name:
        tmp = Path(name)
        env = {**os.environ, "TOKENMILL_CACHE": str(tmp / "cache")}
        (tmp / "www").mkdir()   # the server's root
        corpus = make_corpus(tmp / "www" / ARCHIVE, args.minutes)
        server = subprocess.Popen([sys.executable, "-c", SERVE, tmp / "www"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            base_url = server.stdout.readline().strip()
            job = write_job(tmp / "warm-up.yaml", base_url, corpus["sha256"], tmp / "corpora", args, True)
            warm = run_tokenmill(job, env, corpus)   # untimed: downloads and extracts the part
            fetched = hits(server)
            print(f"machine: {os.cpu_count()} CPUs; corpus: {corpus['seconds'] / 60:.2f} min of 16 kHz mono FLAC "
                  f"(at {corpus['flac_ratio']:.2f} of PCM_16's size), {corpus['utterances']} utterances of 2-15 s, "
                  f"{len(SPEAKERS)} speakers -> {TARGET_RATE} Hz; tokenmill P={args.cpus}, {args.samples_per_shard} "
                  f"samples/shard\nwarm-up run (untimed): {warm['wall']:.1f} s, server hits {fetched}")
            compare(tmp, base_url, corpus, args, env)
            if (after := hits(server)) != fetched:
                sys.exit(f"the timed runs downloaded: server hits {after} after the warm-up's {fetched}")
            print("the timed runs fetched nothing (server hits unchanged) and found the part extracted")
        finally:
            server.stdin.close()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
