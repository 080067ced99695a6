"""`tokenmill`: the command line. Each command parses arguments, calls one function, prints.

Exit codes: 0 ok, 1 failure of work, 2 bad usage or spec.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.spec import JobSpec, SpecError, load_job

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn image-text pairs and speech into token shards and train token models on Ray.")
EXIT_OK, EXIT_WORK_FAILED, EXIT_USAGE = 0, 1, 2
STANDARD_STATUS_KEYS = {"state", "shards_done", "shards_total", "samples", "failures", "shards_stale",
                        "shards_missing", "shards_failed", "orphans", "failure_reasons", "last_error"}


def _load(path: str) -> JobSpec:
    try:
        return load_job(path)
    except SpecError as exc:
        print(f"spec error:\n{exc}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None


def _stage_names(job: JobSpec, names: Optional[str], option: str) -> list[str]:
    wanted = [n.strip() for n in (names or "").split(",") if n.strip()]
    unknown = [n for n in wanted if n not in job.stages]
    if unknown:
        print(f"{option}: no stage named {', '.join(unknown)} in {job.source} "
              f"(stages: {', '.join(job.stages)})", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE)
    return wanted


@app.command()
def run(job_file: str = typer.Argument(..., metavar="JOB.yaml"),
        stages: Optional[str] = typer.Option(None, help="Comma-separated stages to run (default: all)."),
        force: Optional[str] = typer.Option(None, help="Comma-separated stages to rebuild from scratch."),
        prune: bool = typer.Option(False, help="Delete outputs whose source shard no longer exists."),
        address: Optional[str] = typer.Option(None, help="Ray address; overrides the spec's ray.address.")):
    """Build every shard that is not done, stage by stage in dependency order."""
    from pipeline.monitor.progress import StageProgress
    from pipeline.workflow import run as run_job

    job = _load(job_file)
    results = run_job(job, stages=_stage_names(job, stages, "--stages"), force=_stage_names(job, force, "--force"),
                      prune=prune, address=address, progress=StageProgress)
    exit_code = EXIT_OK
    for result in results:
        spec = job.stages[result.name]
        failed = result.failed(spec.execution.max_failure_share)
        reasons = ", ".join(f"{r}: {n}" for r, n in result.totals.reasons.items())
        print(f"{result.name}: {'FAILED' if failed else 'ok'}: built {result.built} shard(s), "
              f"{result.totals.samples} samples, {result.totals.failures} failed samples"
              + (f" ({reasons})" if reasons else "") + (f"; {result.skipped}" if result.skipped else "")
              + (f"; {result.waiting} shard(s) wait for unbuilt inputs" if result.waiting else "")
              + (f"\n  {_figures(result.figures)}" if result.figures else "")
              + "".join(f"\n  {error}" for error in result.prepare_errors))
        exit_code = EXIT_WORK_FAILED if failed else exit_code
    raise typer.Exit(exit_code)


@app.command()
def status(job_file: str = typer.Argument(..., metavar="JOB.yaml"),
           as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
           watch: bool = typer.Option(False, "--watch", help="Refresh a live table until no stage runs."),
           interval: float = typer.Option(2.0, min=0.1, help="--watch: seconds between refreshes."),
           address: Optional[str] = typer.Option(None, help="--watch: also ask this Ray cluster (dashboard URL, "
                                                 "e.g. http://HEAD:8265) about the job's Ray jobs and tasks.")):
    """Show each stage's state from its completion markers (live with --watch)."""
    from pipeline.monitor.status import job_status

    if watch:
        from pipeline.monitor.watch import watch as watch_job

        if as_json:
            print("--json and --watch do not go together: --json prints one object", file=sys.stderr)
            raise typer.Exit(EXIT_USAGE)

        watch_job(_load(job_file), interval, address)
        return
    report = job_status(_load(job_file))
    if as_json:
        print(json.dumps(report, indent=1))
        return
    table = Table(title=f"job {report['job']}")
    for column in ("stage", "state", "shards", "samples", "failures", "top failure reasons"):
        table.add_column(column, justify="right" if column in ("shards", "samples", "failures") else "left")
    figures = {}
    for name, s in report["stages"].items():
        reasons = ", ".join(f"{r} ({n})" for r, n in list(s["failure_reasons"].items())[:3])
        table.add_row(name, s["state"], f"{s['shards_done']}/{s['shards_total']}", str(s["samples"]),
                      str(s["failures"]), reasons)
        figures[name] = _figures({k: v for k, v in s.items() if k not in STANDARD_STATUS_KEYS})
    console = Console()
    console.print(table)
    for name, line in figures.items():     # below the table: a column of them would be squeezed unreadable
        if line:
            console.print(f"{name}: {line}", highlight=False, soft_wrap=True)


@app.command()
def decode(job_file: str = typer.Argument(..., metavar="JOB.yaml"),
           stage: str = typer.Option(..., help="A token stage (tokenize-images or tokenize-speech)."),
           key: Optional[str] = typer.Option(None, help="The sample's key (searched in every shard)."),
           shard: Optional[str] = typer.Option(None, help="Look in this shard only."),
           row: Optional[int] = typer.Option(None, help="Row index within --shard."),
           out: str = typer.Option(..., help="Where to write the decoded file (PNG for images, WAV for speech).")):
    """Decode one row of a token shard back to media, with the tokenizer or codec that made it."""
    from pipeline.roundtrip import RoundTripError, decode_to_file

    job = _load(job_file)
    _stage_names(job, stage, "--stage")
    if (key is None) == (row is None) or (row is not None and shard is None):
        print("give either --key, or --shard with --row", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE)
    try:
        written = decode_to_file(job, stage, out, key=key, shard=shard, row=row)
    except RoundTripError as exc:
        print(f"decode: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None
    print(written)


@app.command()
def sample(job_file: str = typer.Argument(..., metavar="JOB.yaml"),
           stage: str = typer.Option(..., help="A built train stage."),
           task: str = typer.Option(..., help="t2i (caption -> PNG), tts (text + prompt WAV -> WAV) or i2t (image -> caption)."),
           text: Optional[str] = typer.Option(None, help="t2i: the caption; tts: what to say."),
           prompt_audio: Optional[str] = typer.Option(None, help="tts: a WAV/FLAC of the voice (its first 3 s)."),
           image: Optional[str] = typer.Option(None, help="i2t: an image file."),
           out: str = typer.Option("samples", help="Folder for the PNGs / WAVs."),
           count: int = typer.Option(1, min=1, help="Samples to draw."),
           temperature: float = typer.Option(1.0, min=0.0), top_k: int = typer.Option(0, min=0),
           top_p: float = typer.Option(1.0, min=0.0, max=1.0),
           cfg_scale: float = typer.Option(3.0, min=0.0, help="t2i classifier-free guidance (1: none)."),
           i2t_cfg_scale: float = typer.Option(1.0, min=0.0, help="i2t guidance against the caption prior (1: none)."),
           rerank: int = typer.Option(1, min=1, help="t2i: images sampled per sample, the model keeps its best (decoder)."),
           i2t_rerank: int = typer.Option(1, min=1, help="i2t: the caption and its N-1 likeliest one-token "
                                           "deviations, the model keeps its best (decoder)."),
           seed: int = typer.Option(0)):
    """Sample a trained token model: captions to images, text to speech, images to captions."""
    from pipeline.models.samplers import TASKS, SamplingError, SamplingSettings
    from pipeline.sample import SampleError, Sampler

    needs = {"t2i": ("--text", text), "tts": ("--text", text), "i2t": ("--image", image)}
    if task not in TASKS or needs[task][1] is None or (task == "tts" and prompt_audio is None):
        print(f"--task must be one of {', '.join(TASKS)}; t2i needs --text, tts --text and --prompt-audio, "
              "i2t --image", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE)
    job = _load(job_file)
    _stage_names(job, stage, "--stage")
    settings = SamplingSettings(temperature, top_k, top_p, cfg_scale, seed, i2t_cfg_scale, rerank, i2t_rerank)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        sampler = Sampler(job, stage)
        if task == "t2i":
            written = [str(p) for p in sampler.t2i(text, folder, count, settings)]
        elif task == "tts":
            written = [str(p) for p in sampler.tts(text, Path(prompt_audio), folder, count, settings)]
        else:
            written = [json.dumps(caption) for caption in sampler.i2t(Path(image), count, settings)]   # quoted
    except (SampleError, SamplingError, ValueError) as exc:
        print(f"sample: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None
    print("\n".join(written))


@app.command()
def submit(job_file: str = typer.Argument(..., metavar="JOB.yaml"),
           address: str = typer.Option(..., envvar="RAY_API_SERVER_ADDRESS",
                                       help="The head's Ray jobs endpoint, e.g. http://127.0.0.1:8265."),
           wait: bool = typer.Option(False, help="Stream the job's logs; exit 0 if it succeeds, 1 if not.")):
    """Run a job spec on a Ray cluster through the Ray Jobs API."""
    from pipeline.submit import SubmitError, follow, submit as submit_job

    job = _load(job_file)
    try:
        submission_id = submit_job(job, address, warn=lambda message: print(f"warning: {message}", file=sys.stderr))
        print(f"submitted {submission_id}", flush=True)
        if not wait:
            return
        info = follow(address, submission_id)
    except SubmitError as exc:
        print(f"submit: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None
    print(f"job {submission_id}: {info.status.value}" + (f": {info.message}" if info.status.value != "SUCCEEDED" else ""))
    raise typer.Exit(EXIT_OK if info.status.value == "SUCCEEDED" else EXIT_WORK_FAILED)


@app.command()
def jobs(address: str = typer.Option(..., envvar="RAY_API_SERVER_ADDRESS",
                                     help="The head's Ray jobs endpoint, e.g. http://127.0.0.1:8265."),
         as_json: bool = typer.Option(False, "--json", help="Print one JSON list.")):
    """List the jobs submitted to a Ray cluster, oldest first."""
    from pipeline.submit import SubmitError, list_submissions

    try:
        rows = list_submissions(address)
    except SubmitError as exc:
        print(f"jobs: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    columns = ("state", "submission_id", "start", "end", "job", "user")
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in columns}
    for row in [dict(zip(columns, columns))] + rows:
        print("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip())


@app.command()
def report(job_file: str = typer.Argument(..., metavar="JOB.yaml"),
           out: str = typer.Option("report.html", help="The HTML file to write (one self-contained page).")):
    """Write one self-contained HTML page about the job: DAG, stage tables, curves, samples."""
    from pipeline.monitor.report import write_report

    job = _load(job_file)
    folder = Path(out).resolve().parent
    if not folder.is_dir() or Path(out).is_dir():
        print(f"--out: cannot write {out}: " + ("it is a folder" if Path(out).is_dir() else f"no folder {folder}"),
              file=sys.stderr)
        raise typer.Exit(EXIT_USAGE)
    written = write_report(job, out)
    print(f"{written} ({written.stat().st_size / 1e6:.1f} MB)")


def _figures(figures: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in figures.items())


def main() -> None:
    from pipeline.storage import StorageError

    try:
        app()
    except StorageError as exc:     # a missing bucket or an unreachable endpoint, from any command
        print(exc, file=sys.stderr)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
