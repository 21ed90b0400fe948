"""The jobs API (POST /v1/jobs, progress events, audio, cancel) and the page (GET /) over HTTP, on ONE
local Ray cluster over tiny engines with a text engine; the page in a real headless Chromium.

The browser: Playwright (PyPI) drives the Chromium of the npm package @sparticuz/chromium that
.ci/browser.sh installs under .cache/browser (Playwright's own download needs the internet). Without
it the browser test skips, except under CI=true, where it fails."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from serve_helpers import (
    CLIENT_TIMEOUT_S,
    Client,
    assert_json_error,
    denoiser_actor_names,
)

from litefocus.export.build import export_engines
from litefocus.export.plan import ExportOptions
from tiny_models import T5_MAX_LENGTH, save_tiny_pipeline

REPO = Path(__file__).resolve().parents[2]
BROWSER = REPO / ".cache" / "browser"
SERVER = {"queue_size": 8, "timeout_s": 5.0, "cpus": {"text": 0.5, "decoder": 0.5, "denoiser": 1.0}}
FINAL = ("done", "failed", "cancelled", "lost")
LONG = 999  # steps: seconds per job at any speed
TOL = 1e-4
WORDS = ["a dog barks", "rain falls on a roof", "a cat meows", "piano and drums play", "thunder and wind"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """One bucket (1.28 s), one UNet batch of 8 rows (4 guided requests): one UNet export, for speed."""
    pipe = tmp_path_factory.mktemp("tiny-pipeline")
    save_tiny_pipeline(pipe)
    out = tmp_path_factory.mktemp("jobs") / "engines"
    options = ExportOptions(
        seconds=(1.0,), out=out, model=str(pipe), batches=(8,), text_len=T5_MAX_LENGTH, quiet=True
    )
    export_engines(options)
    return out


def submit(server: Client, body: dict) -> str:
    r = requests.post(f"{server.url}/v1/jobs", json=body, timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["Location"] == f"/v1/jobs/{job['id']}" and job["state"] in ("queued", "running")
    return job["id"]


def status(server: Client, job_id: str) -> dict:
    return server.get(f"/v1/jobs/{job_id}")


def wait_state(server: Client, job_id: str, predicate, timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        s = status(server, job_id)
        if predicate(s):
            return s
        assert time.monotonic() < end, f"timed out; job {s}"
        time.sleep(0.1)


def events(server: Client, job_id: str) -> list[dict]:
    """Every state the event stream sends, to its end (a final state)."""
    with requests.get(f"{server.url}/v1/jobs/{job_id}/events", stream=True, timeout=CLIENT_TIMEOUT_S) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [
            json.loads(line[5:]) for line in r.iter_lines(decode_unicode=True) if line.startswith("data:")
        ]


def test_the_page_is_one_self_contained_html_document(server):
    r = requests.get(f"{server.url}/", timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert len(html) < 20_000 and html.count("<html") == 1
    assert not re.search(r"""(src|href|action)\s*=\s*["']?(https?:)?//|@import|url\(|<link""", html, re.I)
    for element in (
        "prompt",
        "negative",
        "seconds",
        "steps",
        "scheduler",
        "guidance",
        "seed",
        "bar",
        "player",
    ):
        assert f'id="{element}"' in html
    assert "EventSource" in html and "/v1/engines" in html


def test_a_job_streams_progress_and_gives_the_audio_of_generate(server):
    rng = random.Random()
    body = {
        "prompt": rng.choice(WORDS),
        "seconds": round(rng.uniform(0.3, 1.28), 2),
        "steps": rng.randint(3, 6),
        "scheduler": rng.choice(["ddim", "dpm++"]),
        "guidance": rng.choice([1.0, 3.5]),
        "seed": rng.randrange(2**63),
        "format": "f32",
    }
    job_id = submit(server, body)
    states = events(server, job_id)
    assert states[-1]["state"] == "done", states
    running = [s["step"] for s in states if s["state"] == "running"]
    assert running == sorted(running) and set(running) <= set(range(body["steps"] + 1)), states
    assert {s["steps"] for s in states} == {body["steps"]} and states[-1]["seed"] == str(body["seed"])
    job = requests.get(f"{server.url}/v1/jobs/{job_id}/audio", timeout=CLIENT_TIMEOUT_S)
    direct = server.generate(body)
    assert job.status_code == direct.status_code == 200, job.text
    for h in ("X-Seed", "X-Bucket", "X-Sample-Rate"):
        assert job.headers[h] == direct.headers[h]
    a, b = np.frombuffer(job.content, "<f4"), np.frombuffer(direct.content, "<f4")
    assert a.shape == b.shape == (int(body["seconds"] * 16000),) and float(np.abs(a - b).max()) <= TOL


def test_bad_bodies_and_ids_are_one_line_json_errors(server):
    url = f"{server.url}/v1/jobs"
    for body, code, field in [
        ({"prompt": " ", "seconds": 1}, 422, "prompt"),
        ({"prompt": "rain", "seconds": 1, "steps": 5000}, 422, "steps"),
        ({"prompt": "rain", "seconds": 9}, 422, "seconds"),
        ({"prompt": "rain", "seconds": 1, "bogus": 1}, 422, "bogus"),
    ]:
        assert_json_error(requests.post(url, json=body, timeout=CLIENT_TIMEOUT_S), code, field)
    assert_json_error(requests.post(url, data=b"{not json", timeout=CLIENT_TIMEOUT_S), 400, "body")
    for path in ["nope", "0123abcd-" + "A" * 16, "0123abcd-" + "A" * 16 + "/audio"]:
        r = requests.get(f"{url}/{path}", timeout=CLIENT_TIMEOUT_S)
        assert r.status_code in (404, 410)  # another (or a restarted) replica's id: 410 "lost"
        assert_json_error(r, r.status_code, "id")
    e = assert_json_error(requests.delete(f"{url}/0123abcd-{'B' * 16}", timeout=CLIENT_TIMEOUT_S), 410, "id")
    assert "lost" in e["error"]


def test_delete_cancels_down_to_the_denoiser_and_waiting_jobs_know_their_place(server):
    before = server.stats()
    body = {"prompt": "a dog barks", "seconds": 1, "steps": LONG}  # guided: 2 rows; 4 fill the 8 rows
    ids = [submit(server, {**body, "seed": i}) for i in range(5)]
    queued = wait_state(server, ids[4], lambda s: s["state"] == "queued" and s["queue_position"] == 1)
    running = [wait_state(server, i, lambda s: s["state"] == "running" and s["step"] >= 1) for i in ids[:4]]
    assert queued["steps"] == LONG and all(s["queue_position"] == 0 for s in running)
    assert_json_error(requests.get(f"{server.url}/v1/jobs/{ids[0]}/audio", timeout=CLIENT_TIMEOUT_S), 409)
    for i in ids:
        r = requests.delete(f"{server.url}/v1/jobs/{i}", timeout=CLIENT_TIMEOUT_S)
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert events(server, ids[0])[-1]["state"] == "cancelled"  # a final state: the stream ends at once
    server.wait_for(  # the denoiser freed the five slots (four left the running batch)
        lambda s: s["cancelled"] - before.get("cancelled", 0) >= 5, what="the cancellations"
    )
    quick = submit(server, {"prompt": "rain falls", "seconds": 0.5, "steps": 2})
    assert events(server, quick)[-1]["state"] == "done"


def chromium() -> dict | None:
    """{path, args} of the npm @sparticuz/chromium under .cache/browser, or None."""
    if shutil.which("node") is None or not (BROWSER / "node_modules" / "@sparticuz" / "chromium").is_dir():
        return None
    script = (
        "const c = require('@sparticuz/chromium').default;"
        "c.executablePath().then((p) => console.log(JSON.stringify({path: p, args: c.args})))"
    )
    out = subprocess.run(["node", "-e", script], cwd=BROWSER, capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout) if out.returncode == 0 else None


def browser_or_skip() -> dict:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        found = None
    else:
        found = chromium()
    if found is None:
        why = "no headless browser: run .ci/browser.sh (npm @sparticuz/chromium) and pip install playwright"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {why}")
        pytest.skip(why)
    return found


def test_the_page_generates_and_plays_in_a_browser(server):
    from playwright.sync_api import sync_playwright

    found = browser_or_skip()
    seconds = round(random.uniform(0.5, 1.2), 2)
    args = [a for a in found["args"] if not a.startswith("--headless")]  # Playwright sets headless
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=found["path"], args=args, headless=True, timeout=60_000)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('seconds').max !== ''")  # limits from /v1/engines
            assert float(page.get_attribute("#seconds", "max")) == 1.28
            page.fill("#prompt", random.choice(WORDS))
            page.fill("#seconds", str(seconds))
            page.fill("#steps", "3")
            page.click("#generate")
            page.wait_for_selector("#result", state="visible")
            duration = page.wait_for_function(
                "(() => { const d = document.getElementById('player').duration; return d > 0 && d; })"
            ).json_value()
            seed = page.text_content("#seed-used")
            href = page.get_attribute("#download", "href")
        finally:
            browser.close()
    assert abs(duration - seconds) < 0.01, (duration, seconds)
    assert re.fullmatch(r"[0-9]+", seed) and re.fullmatch(
        r"/v1/jobs/[0-9a-f]{8}-[A-Za-z0-9_-]{16}/audio", href
    )
    r = requests.get(server.url + href, timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 200 and r.headers["X-Seed"] == seed and r.headers["content-type"] == "audio/wav"


def test_a_lost_denoiser_replica_says_its_job_is_lost(server):  # last: the replica restarts after it
    import ray

    (name,) = denoiser_actor_names("Denoiser-1p28s-fp32")
    job_id = submit(server, {"prompt": "a dog barks", "seconds": 1, "steps": LONG})
    wait_state(server, job_id, lambda s: s["state"] == "running" and s["step"] >= 1)
    listener: dict = {}
    thread = threading.Thread(target=lambda: listener.setdefault("states", events(server, job_id)))
    thread.start()
    ray.kill(ray.get_actor(name, namespace="serve"))
    lost = wait_state(server, job_id, lambda s: s["state"] in FINAL, timeout=30)
    thread.join(30)
    assert lost["state"] == "lost" and "lost" in lost["error"], lost
    assert listener["states"][-1]["state"] == "lost"
    e = assert_json_error(requests.get(f"{server.url}/v1/jobs/{job_id}/audio", timeout=CLIENT_TIMEOUT_S), 409)
    assert "lost" in e["error"]
