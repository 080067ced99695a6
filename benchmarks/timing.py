"""What the benchmarks share: `tokenmill run` timed as a whole command, and what it left behind."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def timed_run(job: Path, storage: Path, stage: str, env: dict) -> dict:
    """Run `tokenmill run JOB` (exit on failure); its wall time, status, stage record, markers, last line."""
    started = time.perf_counter()
    done = subprocess.run([BIN / "tokenmill", "run", job], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"tokenmill run {job} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    status = json.loads(subprocess.run([BIN / "tokenmill", "status", job, "--json"], env=env, check=True,
                                       capture_output=True, text=True).stdout)["stages"][stage]
    markers = [json.loads(p.read_text()) for p in (storage / stage / "_state").glob("*.json")]
    return {"wall": wall, "status": status, "record": json.loads((storage / stage / "_stage.json").read_text()),
            "span": max(m["finished"] for m in markers) - min(m["started"] for m in markers),
            "line": done.stdout.strip().splitlines()[-1]}
