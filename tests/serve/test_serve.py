"""litefocus.serve: the step loop alone (a fake UNet), then the Ray Serve application on a local
cluster over tiny engines with a text engine (one bucket, UNet batches 2, 4 and 8)."""

from __future__ import annotations

import asyncio
import io
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import soundfile as sf
import yaml
from serve_helpers import (
    FakeSlot,
    assert_json_error,
    denoiser_actor_names,
    new_loop,
)

from litefocus.bench.soak import SlowBodyFlood
from litefocus.export.build import export_engines
from litefocus.export.plan import ExportOptions
from litefocus.runtime import GenerateOptions, Runtime
from litefocus.serve import cli as serve_cli
from litefocus.serve.denoiser import QueueFull
from litefocus.serve.deployments import HEARTBEAT_S
from litefocus.serve.settings import ServeSettings
from tiny_models import T5_MAX_LENGTH, save_tiny_pipeline

SECONDS = 1.0  # one bucket (1.28 s exact); requests ask for 0.3 .. 1.28 s
SERVER = {
    "queue_size": 8,
    "timeout_s": 5.0,
    "cpus": {"text": 0.5, "decoder": 0.5, "denoiser": 1.0},
    "body_timeout_s": 4.0,  # the slow-body flood: small numbers for CI
    "max_body_readers": 16,
    "max_inflight": 32,
}
TOL = 1e-4
LONG = 999  # steps: the most DDIM takes here; seconds per request at any speed


# ---- the step loop, without Ray --------------------------------------------------------------------
def test_requests_join_and_leave_at_step_boundaries():
    async def main():
        loop, unet, events = new_loop(capacity=4)
        a, b, c = FakeSlot(2, 3, name="a"), FakeSlot(2, 1, name="b"), FakeSlot(2, 2, name="c")
        results = await asyncio.gather(loop.run(a), loop.run(b), loop.run(c))
        return loop, unet, events, results

    loop, unet, events, results = asyncio.run(main())
    assert [s.name for s in results] == ["a", "b", "c"] and all(s.done for s in results)
    # a and b fill the 4 rows; b leaves after one step and c joins at that boundary (in order)
    assert unet.calls == [["a", "b"], ["a", "c"], ["a", "c"]]
    s = loop.stats
    assert (s.steps, s.unet_calls, s.rows_used, s.rows_available, s.completed) == (3, 3, 12, 12, 3)
    assert any(e == "step" for e, _ in events) and events[-1] == ("queue", {"depth": 0, "active": 0})


def test_queue_full_and_oversized_requests():
    async def main():
        loop, unet, _ = new_loop(capacity=2, queue_size=1)
        unet.gate = threading.Event()
        first = asyncio.ensure_future(loop.run(FakeSlot(2, 1, name="first")))
        while not unet.entered.is_set():  # first is running: its step is held at the gate
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(loop.run(FakeSlot(2, 1, name="second")))  # waits
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as full:
            await loop.run(FakeSlot(1, 1))
        assert full.value.retry_after >= 1 and "queue" in str(full.value)
        with pytest.raises(ValueError, match="does not fit"):
            await loop.run(FakeSlot(3, 1))
        unet.gate.set()
        await asyncio.gather(first, second)
        return loop

    loop = asyncio.run(main())
    assert (loop.stats.rejected, loop.stats.completed) == (1, 2)


def test_cancelled_requests_leave_the_queue_and_the_batch():
    async def main():
        loop, unet, _ = new_loop(capacity=2)
        unet.gate = threading.Event()
        running = asyncio.ensure_future(loop.run(FakeSlot(2, 5, name="running")))
        while not unet.entered.is_set():
            await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(loop.run(FakeSlot(2, 1, name="waiting")))
        await asyncio.sleep(0.01)
        assert (loop.depth, loop.active) == (1, 1)
        waiting.cancel()  # leaves the queue at once
        running.cancel()  # leaves the batch at the next boundary: the step in flight completes
        await asyncio.sleep(0.01)
        assert loop.depth == 0
        unet.gate.set()
        after = await loop.run(FakeSlot(1, 2, name="after"))
        return loop, unet, after

    loop, unet, after = asyncio.run(main())
    assert after.done and unet.calls == [["running"], ["after"], ["after"]]
    assert loop.stats.cancelled == 2


def test_a_failed_step_fails_its_requests_and_the_loop_goes_on():
    async def main():
        loop, unet, _ = new_loop(capacity=4)
        unet.fail = RuntimeError("engine exploded")
        with pytest.raises(RuntimeError, match="denoising failed: RuntimeError: engine exploded"):
            await loop.run(FakeSlot(2, 3))
        unet.fail = None
        slot = await loop.run(FakeSlot(2, 2))
        assert loop.healthy()
        return loop, slot

    loop, slot = asyncio.run(main())
    assert slot.done and loop.stats.failed == 1


# ---- settings, CLI and the Serve config ----------------------------------------------------------
def test_settings_refuse_bad_values_in_one_line():
    for args, fragment in [
        ({}, "args need engines"),
        ({"engines": "e", "bogus": 1}, "unknown setting(s) bogus"),
        ({"engines": "e", "queue_size": 0}, "queue_size must be an integer >= 1"),
        ({"engines": "e", "device": "tpu"}, "device 'tpu' is unknown"),
        (
            {"engines": "e", "scaling": {"denoiser": {"min_replicas": 3, "max_replicas": 2}}},
            "below min_replicas",
        ),
        ({"engines": "e", "scaling": {"gpu": 1}}, "unknown deployment 'gpu'"),
    ]:
        with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            ServeSettings.from_args(args)


def test_cli_flag_errors_exit_2_with_one_line(tmp_path, capsys):
    for argv, fragment in [
        (["--engines", str(tmp_path / "missing")], "does not exist"),
        (["--engines", str(tmp_path), "--replicas", "gpu=2"], "KIND one of ingress"),
        (["--engines", str(tmp_path), "--autoscale", "denoiser=4"], "MIN:MAX"),
        (["--engines", str(tmp_path), "--detach"], "--detach needs --address"),
    ]:
        with pytest.raises(SystemExit) as stop:
            serve_cli.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and fragment in err[-1], err


def test_the_serving_app_imports_no_torch():
    probe = (
        "import sys, litefocus.serve.app, litefocus.serve.cli;"
        "print(','.join(m for m in ('torch', 'diffusers', 'litefocus.export') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ---- the application on a local cluster -------------------------------------------------------------
@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    pipe = tmp_path_factory.mktemp("tiny-pipeline")
    save_tiny_pipeline(pipe)
    out = tmp_path_factory.mktemp("serve") / "engines"
    export_engines(
        ExportOptions(
            seconds=(SECONDS,),
            out=out,
            model=str(pipe),
            batches=(2, 4, 8),
            text_len=T5_MAX_LENGTH,
            quiet=True,
        )
    )
    return out


def test_write_config_round_trips_through_build_app(engines, tmp_path):
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from litefocus.serve.app import build_app

    path = tmp_path / "serve.yaml"
    argv = ["--engines", str(engines), "--write-config", str(path), "--no-batching", "--queue-size", "3"]
    argv += ["--replicas", "text=2", "--autoscale", "denoiser=1:4:6", "--port", "8123", "-q"]
    assert serve_cli.main(argv) == 0
    config = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(config)  # what `serve deploy` checks
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8123}
    (app,) = config["applications"]
    assert app["import_path"] == "litefocus.serve.app:build_app"
    settings = ServeSettings.from_args(app["args"])
    assert settings.engines == str(engines.resolve()) and not settings.batching and settings.queue_size == 3
    assert settings.scaling_of("text").options() == {"num_replicas": 2}
    assert settings.scaling_of("denoiser").options() == {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 6.0}
    }
    assert ServeSettings.from_args(settings.to_args()) == settings
    assert isinstance(build_app(app["args"]), Application)


@pytest.fixture(scope="module")
def runtime(engines):
    with Runtime.load(engines, backend="onnxruntime") as rt:
        yield rt


def test_healthz_and_engines(server):
    assert server.get("/healthz") == {"status": "ok", "buckets": ["1p28s-fp32"], "text": True}
    info = server.get("/v1/engines")
    assert info["buckets"] == [
        {"name": "1p28s-fp32", "seconds": 1.28, "batch_sizes": [2, 4, 8], "max_rows": 8}
    ]
    assert info["limits"] == {
        "max_seconds": 1.28,
        "max_steps": 1000,
        "queue_size": 8,
        "timeout_s": 5.0,
        "max_body_bytes": 1 << 20,
    }
    assert info["batching"] is True and info["text"] is True


BAD = [  # body, status, field
    ({"prompt": "a dog barks", "seconds": 2.5}, 422, "seconds"),
    ({"prompt": "  ", "seconds": 1}, 422, "prompt"),
    ({"seconds": 1}, 422, "prompt"),
    ({"prompt": "rain", "seconds": 1, "steps": 0}, 422, "steps"),
    ({"prompt": "rain", "seconds": 1, "steps": 5000}, 422, "steps"),
    ({"prompt": "rain", "seconds": 1, "scheduler": "euler"}, 422, "scheduler"),
    ({"prompt": "rain", "seconds": 1, "guidance": 0.5}, 422, "guidance"),
    ({"prompt": "rain", "seconds": 1, "format": "mp3"}, 422, "format"),
    ({"prompt": "rain", "seconds": "long"}, 422, "seconds"),
    ({"prompt": "rain", "seconds": 1, "temperature": 1}, 422, "temperature"),
    ({"prompt": "rain", "seconds": 1, "conditioning": {"gpt2": [], "t5": [], "t5_mask": []}}, 422, "prompt"),
    (  # conditioning of the wrong widths: one 422 before it reaches a batch (never a 500 for all)
        {
            "seconds": 1,
            "conditioning": {
                "gpt2": [[[0.0] * 4] * 8] * 2,
                "t5": [[[0.0] * 4] * 3] * 2,
                "t5_mask": [[1] * 3] * 2,
            },
        },
        422,
        "conditioning",
    ),
    ({"seconds": 1, "steps": 1000, "prompt": "rain"}, 422, "steps"),  # DDIM: at most 999 here
    (  # the scheduler's limit is checked at the ingress, before conditioning reaches a denoiser
        {
            "seconds": 1,
            "steps": 1000,
            "conditioning": {
                "gpt2": [[[0.0] * 4] * 8] * 2,
                "t5": [[[0.0] * 4] * 3] * 2,
                "t5_mask": [[1] * 3] * 2,
            },
        },
        422,
        "steps",
    ),
    ({"seconds": 1, "seed": True, "prompt": "rain"}, 422, "seed"),  # strict: true is not 1
    (b"{not json", 400, "body"),
    (b"[1, 2]", 400, "body"),
    (b'{"prompt": "' + b"a" * (10 << 20) + b'", "seconds": 1}', 413, "body"),
]


@pytest.mark.parametrize("body, status, field", BAD, ids=[f"{s}-{f}-{i}" for i, (_, s, f) in enumerate(BAD)])
def test_bad_requests_name_the_field(server, body, status, field):
    error = assert_json_error(server.generate(body), status, field)
    if field not in ("body", "temperature"):
        assert field in error["error"]


def test_concurrent_requests_match_the_runtime_alone(server, runtime):
    cases = [  # prompt, seconds, steps, scheduler, guidance
        ("a dog barks", 1.0, 3, "ddim", 3.5),
        ("rain falls on a roof", 0.5, 2, "dpm++", 3.5),
        ("a cat meows", 1.2, 4, "ddim", 1.0),
        ("piano and drums play", 0.8, 3, "ddim", 2.0),
        ("techno music", 1.28, 2, "ddim", 3.5),
        ("a man speaks", 0.3, 4, "dpm++", 1.0),
        ("water flows in a stream", 1.0, 3, "ddim", 3.5),
        ("thunder and wind", 0.7, 2, "ddim", 5.0),
    ]
    bodies = [
        {
            "prompt": p,
            "seconds": s,
            "steps": k,
            "scheduler": sch,
            "guidance": g,
            "seed": 100 + i,
            "format": "f32",
        }
        for i, (p, s, k, sch, g) in enumerate(cases)
    ]
    before = server.stats()
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(server.generate, bodies))
    for body, r in zip(bodies, responses, strict=True):
        assert r.status_code == 200, r.text
        assert r.headers["X-Seed"] == str(body["seed"]) and r.headers["X-Bucket"] == "1p28s-fp32"
        assert r.headers["X-Sample-Rate"] == "16000"
        got = np.frombuffer(r.content, "<f4")
        options = GenerateOptions(
            steps=body["steps"],
            guidance_scale=body["guidance"],
            scheduler=body["scheduler"],
            seed=body["seed"],
        )
        alone = runtime.generate(body["prompt"], body["seconds"], options, progress=False).waveform
        assert got.shape == alone.shape == (int(body["seconds"] * 16000),)
        assert float(np.abs(got - alone).max()) <= TOL
    after = server.wait_for(lambda s: s["completed"] >= before.get("completed", 0) + 8, what="the stats")
    steps = sum(b["steps"] for b in bodies)
    assert after["unet_calls"] - before.get("unet_calls", 0) < steps  # requests shared UNet calls


def test_wav_and_a_drawn_seed_reproduce(server):
    r = server.generate({"prompt": "a dog barks", "seconds": 0.5, "steps": 2})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    wave, rate = sf.read(io.BytesIO(r.content), dtype="float32")
    assert rate == 16000 and wave.shape == (8000,) and sf.info(io.BytesIO(r.content)).subtype == "PCM_16"
    seed = int(r.headers["X-Seed"])
    again = server.generate(
        {"prompt": "a dog barks", "seconds": 0.5, "steps": 2, "seed": seed, "format": "f32"}
    )
    assert float(np.abs(np.frombuffer(again.content, "<f4") - wave).max()) <= 1.5 / 32768


def test_full_queue_is_503_with_retry_after_and_gone_clients_free_their_slots(server):
    before = server.stats()
    blockers = {"prompt": "a dog barks", "seconds": 1, "steps": LONG, "seed": 1}  # 4 x 2 rows fill the batch
    held = []

    def block():
        try:
            server.generate(blockers, timeout=2.5)  # then gives up: the disconnect frees the slot
        except Exception as e:  # noqa: BLE001 - the client timeout is the point
            held.append(type(e).__name__)

    threads = [threading.Thread(target=block) for _ in range(4)]
    for t in threads:
        t.start()
    server.wait_for(lambda s: s["admitted"] >= before.get("admitted", 0) + 4, what="the blockers")
    quick = {"prompt": "rain falls", "seconds": 0.5, "steps": 2, "format": "f32"}
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(server.generate, [quick] * 12))  # 8 wait, the rest find the queue full
    for t in threads:
        t.join(30)
    assert held == ["ReadTimeout"] * 4
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(503) >= 1 and set(statuses) <= {200, 503}, statuses
    for r in responses:
        if r.status_code == 503:
            assert_json_error(r, 503)
            assert int(r.headers["Retry-After"]) >= 1
    server.wait_for(
        lambda s: (
            s["cancelled"] - before.get("cancelled", 0) == 4
            and s["completed"] - before.get("completed", 0) == statuses.count(200)
            and s["rejected"] - before.get("rejected", 0) == statuses.count(503)
        ),
        what="4 cancellations and the quick requests",
    )


def test_timeout_is_504_and_frees_the_slots(server):
    before = server.stats()
    body = {"prompt": "a dog barks", "seconds": 1, "steps": LONG}  # 4 x 999 steps at batch 8: far past 5 s
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(server.generate, [body] * 4))
    assert 4.5 < time.monotonic() - t0 < 90  # 5 s timeout; the upper bound only catches a hang
    for r in responses:
        assert "timeout of 5 s" in assert_json_error(r, 504)["error"]
    server.wait_for(lambda s: s["cancelled"] >= before.get("cancelled", 0) + 4, what="the cancellations")


def test_the_serving_benchmark_records_rows(server, engines, tmp_path):
    import json

    from litefocus.bench import main as bench_main

    argv = ["serve", "--engines", str(engines), "--url", server.url, "--concurrency", "1", "3"]
    argv += ["--requests", "3", "--seconds", "0.5", "--steps", "2", "--out", str(tmp_path), "-q"]
    assert bench_main(argv) == 0
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("serve-remote-*.json")]
    assert [(r["batching"], r["concurrency"], r["ok"]) for r in record["rows"]] == [
        ("on", 1, 3),
        ("on", 3, 3),
    ]
    for r in record["rows"]:
        assert r["requests_per_min"] > 0 and r["latency_p95_s"] >= r["latency_p50_s"] > 0
        assert r["unet_calls"] >= 2 and 0 < r["occupancy"] <= 1
    assert (
        len(list(tmp_path.glob("serve-remote-*.md"))) == len(list(tmp_path.glob("serve-remote-*.png"))) == 1
    )


def _conditioning(value: float = 0.0, mask: int = 1) -> dict:
    return {
        "seconds": 1,
        "steps": 2,
        "conditioning": {
            "gpt2": [[[value] * 4] * 8] * 2,
            "t5": [[[0.0] * 4] * 3] * 2,
            "t5_mask": [[1, 1, mask]] * 2,
        },
    }


def _hostile_bodies() -> list:
    """Bodies that gave plain-text 500s, a JSON TypeError or NaN audio (now 400/422 in one line); fresh
    sizes each run: nesting past the depth limit, integers past Python's 4300 digits, ..."""
    depth, digits = random.randint(20, 100_000), random.randint(4301, 20_000)  # under 1 MiB
    big = random.randint(2**31, 2**62)
    return [  # body, status, field
        (b"[" * depth + b"]" * depth, 400, "body"),
        (b'{"a": ' * depth + b"1" + b"}" * depth, 400, "body"),
        (b'{"prompt": "rain", "seconds": 1, "seed": ' + b"7" * digits + b"}", 400, "body"),
        (b'{"prompt": "rain", "seconds": NaN}', 400, "body"),
        (b'{"prompt": "rain", "seconds": 1e999}', 400, "body"),
        (b'{"prompt": "\\ud800 rain", "seconds": 1}', 422, "prompt"),
        (b'{"prompt": "rain", "seconds": 1, "negative_prompt": "\\udfff"}', 422, "negative_prompt"),
        ({"prompt": "rain", "seconds": 1, "steps": 2, "guidance": 1e308}, 422, "guidance"),
        ({"prompt": "rain", "seconds": 1e-300, "steps": 2}, 422, "seconds"),
        (_conditioning(mask=big), 422, "conditioning"),
        (_conditioning(value=3e38), 422, "conditioning"),
    ]


def test_hostile_bodies_are_one_line_json_errors(server):
    for body, status, field in _hostile_bodies():
        assert_json_error(server.generate(body), status, field)


def test_routes_and_methods_that_do_not_exist_and_the_docs_are_json_404_405(server):
    for method, path, status in [
        ("GET", "/no/such/route", 404),
        ("GET", "/v1/generate", 405),
        ("DELETE", "/healthz", 405),
        ("GET", "/docs", 404),  # the docs and the schema only with --docs
        ("GET", "/redoc", 404),
        ("GET", "/openapi.json", 404),
    ]:
        assert_json_error(requests.request(method, server.url + path, timeout=30), status)


def test_a_slow_body_flood_leaves_health_and_generate_working(server):
    """300 connections sending their bodies a byte a second (the old ingress took ~264 requests at
    once: /healthz and every generate request then timed out)."""
    port = int(server.url.rsplit(":", 1)[1])
    flood = SlowBodyFlood("127.0.0.1", port, 300).start()
    body = {"prompt": "rain falls", "seconds": 0.5, "steps": 2, "format": "f32"}
    generated: list = []

    def generate():  # retried while the server answers 503 (busy): it must get through
        end = time.monotonic() + 20
        while time.monotonic() < end:
            r = server.generate(body, timeout=30)
            generated.append(r.status_code)
            if r.status_code != 503:
                return
            time.sleep(0.2)

    try:
        time.sleep(3)  # the flood is open
        client = threading.Thread(target=generate)
        client.start()
        latencies = []
        end = time.monotonic() + 20
        while time.monotonic() < end:
            t0 = time.monotonic()
            r = requests.get(f"{server.url}/healthz", timeout=10)
            latencies.append(time.monotonic() - t0)
            assert r.status_code == 200, r.text
            time.sleep(0.5)
        client.join(30)
    finally:
        flood.stop()
    assert max(latencies) < 2.0, sorted(latencies)[-5:]
    assert generated and generated[-1] == 200, generated
    assert flood.opened >= 300 and set(flood.statuses) & {"408", "503"}, (flood.opened, flood.statuses)


def _poll(url: str, path: str, seconds: float = 60.0, until=lambda status, body: status == 200, wait=10):
    """GET until ``until(status, body)`` (or the time is up): every answer on the way (status, JSON)."""
    seen, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        r = requests.get(url + path, timeout=wait)
        assert r.headers["content-type"].startswith("application/json"), r.text[:200]
        seen.append((r.status_code, r.json()))
        if until(*seen[-1]):
            break
        time.sleep(0.2)
    return seen


def test_a_killed_denoiser_fails_its_request_cleanly_and_serving_goes_on(server):
    import ray

    (name,) = denoiser_actor_names("Denoiser-1p28s-fp32")
    before = server.stats()
    result = {}
    body = {"prompt": "a dog barks", "seconds": 1, "steps": LONG}
    thread = threading.Thread(target=lambda: result.setdefault("r", server.generate(body)))
    thread.start()
    server.wait_for(lambda s: s["steps"] > before.get("steps", 0), what="the request to run")
    ray.kill(ray.get_actor(name, namespace="serve"))
    thread.join(30)
    down = _poll(server.url, "/healthz", until=lambda status, body: status == 503)  # until Serve restarts it
    health = down + _poll(server.url, "/healthz")
    r = result["r"]
    assert "lost" in assert_json_error(r, 503)["error"] and r.headers["Retry-After"]
    end = time.monotonic() + 60  # Serve starts a new replica; the next requests succeed
    while True:
        r = server.generate({"prompt": "rain falls", "seconds": 0.5, "steps": 2, "seed": 3})
        if r.status_code == 200 or time.monotonic() > end:
            break
        assert_json_error(r, r.status_code)
        assert r.status_code in (503, 504)
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    assert health[-1][0] == 200, health[-1]
    assert any(code == 503 and "denoiser 1p28s-fp32" in b["error"] for code, b in health), health
    # /v1/stats: the one live replica, the dead one's counters kept
    stats = server.wait_for(
        lambda s: s["replicas"] == 1 and s["completed"] > before["completed"], what="1 replica"
    )
    (board,) = [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "StatsBoard" in a["name"]
    ]
    time.sleep(2 * HEARTBEAT_S)  # the live replica has its copy of the dead one's counters
    ray.kill(ray.get_actor(board, namespace="serve"))  # the counters survive the board's restart
    seen = []
    end = time.monotonic() + 60
    while time.monotonic() < end:
        seen = _poll(server.url, "/v1/stats")
        total = seen[-1][1].get("total", {})
        if seen[-1][0] == 200 and total.get("completed", 0) >= stats["completed"] and total["replicas"] == 1:
            break
        time.sleep(0.5)
    assert seen[-1][0] == 200 and seen[-1][1]["total"]["completed"] >= stats["completed"], (stats, seen[-3:])
    assert seen[-1][1]["total"]["admitted"] >= stats["admitted"] and seen[-1][1]["total"]["replicas"] == 1
    # a killed ingress: the request it held and every answer until Serve restarted it are JSON
    (ingress,) = [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "Ingress" in a["name"]
    ]
    thread = threading.Thread(target=lambda: result.__setitem__("r", server.generate(body)))
    thread.start()
    server.wait_for(lambda s: s["admitted"] > seen[-1][1]["total"]["admitted"], what="the request to run")
    ray.kill(ray.get_actor(ingress, namespace="serve"))
    thread.join(60)
    assert_json_error(result["r"], 503)
    assert _poll(server.url, "/healthz", wait=60)[-1][0] == 200  # the proxy holds it until a replica is up
