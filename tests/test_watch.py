"""`tokenmill status --watch` against a real run: a job run in one process, watched from others."""
from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time

from conftest import write_job, write_url_list
from pipeline.monitor.status import job_status
from pipeline.spec import load_job

SHARDS, PER_SHARD = 8, 3
# `tokenmill ARGS` as a terminal's foreground job gets it: Ctrl-C raises KeyboardInterrupt. A child inherits
# an ignored or blocked SIGINT from the test process (something earlier in a full pytest session leaves it
# so), and Python then installs no handler: the watch would never see the Ctrl-C this test sends.
AS_ON_A_TERMINAL = ("import runpy, signal, sys; signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
                    "signal.signal(signal.SIGINT, signal.default_int_handler); sys.argv[0] = 'tokenmill'; "
                    "runpy.run_module('pipeline.cli', run_name='__main__')")


def start_slow_run(web, tmp_path, ray_address: str) -> tuple[subprocess.Popen, str]:
    """A `tokenmill run` of 8 shards of images, once its stage is running; the images are served with a
    delay each once the test opens the server's gate."""
    urls = [web.url(f"gated/good-{i}.jpg") for i in range(SHARDS * PER_SHARD)]
    url_list = write_url_list(tmp_path / "urls.parquet", urls)
    spec = write_job(tmp_path / "job.yaml", tmp_path / "out",
                     f"  images: {{kind: ingest-images, url_list: {url_list}, image_size: 32, "
                     f"samples_per_shard: {PER_SHARD}, thread_count: 1, timeout: 120, retries: 0}}\n")
    run = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(spec), "--address", ray_address],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    threading.Thread(target=run.wait, daemon=True).start()   # reap it at once, as a shell would: a zombie
                                                             # still answers kill(pid, 0) and looks alive
    job, deadline = load_job(spec), time.time() + 90
    while job_status(job)["stages"]["images"]["state"] != "running":
        assert time.time() < deadline and run.poll() is None, "the run never started its stage"
        time.sleep(0.2)
    return run, str(spec)


def read_pty_until(fd: int, needle: bytes, seconds: float) -> bytes:
    """What a pseudo-terminal shows until `needle` appears, it closes, or time runs out."""
    seen, deadline = b"", time.time() + seconds
    while needle not in seen and time.time() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:          # the other side closed (Linux: EIO)
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_watch_follows_a_run_until_it_is_done(ray_address, web, tmp_path):
    run, spec = start_slow_run(web, tmp_path, ray_address)
    try:
        # on a terminal: the table is redrawn in place; Ctrl-C ends the watch with the table and exit 0
        master, slave = pty.openpty()
        on_tty = subprocess.Popen([sys.executable, "-c", AS_ON_A_TERMINAL, "status", spec, "--watch", "--interval", "0.5"],
                                  stdout=slave, stderr=slave, env={**os.environ, "COLUMNS": "150"})
        os.close(slave)
        shown = read_pty_until(master, "│ images │ running".encode(), 90)    # its loop is drawing the table
        on_tty.send_signal(signal.SIGINT)
        shown += read_pty_until(master, b"\x00", 30)
        assert on_tty.wait(30) == 0
        os.close(master)
        text = shown.decode(errors="replace")
        assert "\x1b[" in text and "samples/s" in text and "│ images │ running" in text, text

        # off a terminal: plain lines per refresh, the final table, and the watch ends by itself; the
        # downloads start once it has shown the stage running, so it sees them all however loaded the machine
        watched = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "status", spec, "--watch",
                                    "--interval", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = watched.stdout.readline()
        web.gate.set()
        out, err = watched.communicate(timeout=120)
        assert watched.returncode == 0, err
        assert run.poll() == 0, "the watch ended before the run"
    finally:
        web.gate.set()
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    lines = [line for line in (first + out).splitlines() if "[images]" in line]
    done = [int(re.search(rf" (\d+)/{SHARDS} shards", line).group(1)) for line in lines]
    assert done == sorted(done) and len(set(done)) >= 3, first + out      # progress rose refresh by refresh
    assert " running " in lines[0] and f" done {SHARDS}/{SHARDS} shards, {SHARDS * PER_SHARD} samples" in lines[-1]
    assert any(re.search(r"running .* [1-9][\d.]* samples/s, ETA \d+s", line) for line in lines), out
    assert re.search(rf"│ images │ done +│ ━+ │ +{SHARDS}/{SHARDS} │ +{SHARDS * PER_SHARD} │", out)


def test_watch_with_json_is_a_usage_error(tmp_path):
    spec = write_job(tmp_path / "job.yaml", tmp_path / "out",
                     "  images: {kind: ingest-images, url_list: 'demo://shapes?count=4'}\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", str(spec), "--watch", "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--json and --watch" in proc.stderr
