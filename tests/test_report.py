"""`tokenmill report`: one self-contained HTML page from a real finished job (tests/token_models_job.py:
tiny tokenizers, pack, a decoder, a VALL-E and a Parti with samples), rendered in headless Chromium; a
job where nothing ran; bad paths."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from token_models_job import write_job
from pipeline.monitor.status import job_status
from pipeline.spec import load_job

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parent.parent / "test-artifacts" / "report.png"


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, driven by playwright (whose own browsers are never installed)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium, as root)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def report(spec: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "report", str(spec), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)


class PageLoad:
    """A file:// page loaded in Chromium, with every request it made and every error it logged."""

    def __init__(self, browser, path: Path):
        self.page = browser.new_page(viewport={"width": 1400, "height": 900})
        self.requests, self.errors = [], []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url[:80]}"))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(path.as_uri(), wait_until="load")

    def all(self, selector: str, expression: str) -> list:
        return self.page.eval_on_selector_all(selector, f"els => els.map(e => {expression})")


def test_report_of_a_finished_job_renders_in_chromium(token_models_job, browser, tmp_path):
    built, out = token_models_job, tmp_path / "report.html"
    made = report(built, out)
    assert made.returncode == 0, made.stderr
    assert out.stat().st_size < 5_000_000
    job, status = load_job(built), job_status(load_job(built))["stages"]
    loaded = PageLoad(browser, out)
    page = loaded.page
    page.wait_for_function("[...document.querySelectorAll('audio')].every(a => a.readyState >= 1)", timeout=20_000)
    assert loaded.errors == []
    assert all(url == out.as_uri() or url.startswith("data:") for url in loaded.requests), loaded.requests

    # the DAG: a box per stage coloured by its state, an arrow per input or reference (the decoder's documents
    # longer than its context are failed samples, more than its max_failure_share: the stage shows as failed)
    assert dict(zip(loaded.all("svg.dag g.node", "e.dataset.stage"), loaded.all("svg.dag g.node", "e.dataset.state"))) \
        == {name: s["state"] for name, s in status.items()} == {**{name: "done" for name in job.stages}, "decoder": "failed"}
    assert len(loaded.all("svg.dag path.edge", "1")) == sum(len(s.depends_on) for s in job.stages.values())

    # plots: loss per task and tokens/s per model, codebook usage per tokenizer, utterance durations
    def series(stage: str) -> dict:
        names = loaded.all(f"#stage-{stage} path.series", "e.querySelector('title').textContent")
        points = loaded.all(f"#stage-{stage} path.series", "e.getAttribute('d').split(/[ML]/).length - 1")
        return dict(zip(names, points))

    assert {"loss", "loss_t2i", "tokens/s"} <= set(series("decoder"))      # its i2t documents exceed its context
    assert {"loss", "loss_tts_ar", "loss_tts_nar", "tokens/s"} <= set(series("valle"))
    steps = (Path(job.storage) / "decoder" / "shards" / "metrics.jsonl").read_text().count("\n")
    decoder = series("decoder")                      # a point per step that has the metric (a task's loss: the
    assert steps == 6 and decoder["loss"] == decoder["tokens/s"] == steps     # steps whose batch held that task)
    assert all(0 < points <= steps for points in decoder.values())
    assert len(loaded.all("#stage-vq rect.bar", "1")) == 1 and len(loaded.all("#stage-codec rect.bar", "1")) == 2
    heights = loaded.all("#stage-speech rect.bar", "e.getBBox().height")
    assert heights and max(heights) > 0
    assert page.text_content("#stage-speech svg.chart").count(f"({status['speech']['samples']})") == 1

    # media: the tokenizer's reconstructions, the decoder's samples, the codec's and VALL-E's speech
    images = dict(zip(loaded.all("img", "e.alt"), loaded.all("img", "e.naturalWidth")))
    assert set(images) == {"reconstructions.png", "t2i-00.png", "t2i-01.png"} and min(images.values()) > 0
    durations = loaded.all("audio", "e.duration")
    assert len(durations) >= 3 and min(durations) > 0
    assert "tts-00.wav" in page.inner_text("#stage-valle .media")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    print(f"report screenshot: {SCREENSHOT}")


def test_report_of_a_job_where_nothing_ran(browser, tmp_path):
    spec = write_job(tmp_path, "http://127.0.0.1:9/")        # never fetched: nothing runs
    made = report(spec, tmp_path / "report.html")
    assert made.returncode == 0, made.stderr
    loaded = PageLoad(browser, tmp_path / "report.html")
    assert loaded.errors == []
    assert "Nothing has run yet" in loaded.page.inner_text("#nothing-ran")
    assert set(loaded.all("svg.dag g.node", "e.dataset.state")) == {"pending"}
    assert loaded.all("img", "1") == [] and loaded.all("audio", "1") == []


def test_report_bad_paths(tmp_path):
    missing = report(tmp_path / "nope.yaml", tmp_path / "report.html")
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr and "cannot read job spec" in missing.stderr
    spec = write_job(tmp_path, "http://127.0.0.1:9/")
    no_folder = report(spec, tmp_path / "absent" / "report.html")
    assert no_folder.returncode == 2 and f"no folder {tmp_path / 'absent'}" in no_folder.stderr
    assert not (tmp_path / "absent").exists()
