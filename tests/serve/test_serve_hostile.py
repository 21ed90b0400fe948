"""litefocus.serve against hostile clients, without Ray: the JSON parser's bounds, the slow-body gate,
the error handlers, the stats ledger and the ingress limits among the settings. The same cases over
HTTP on a local cluster are in tests/serve/test_serve.py."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from litefocus.serve import cli as serve_cli
from litefocus.serve import deployments
from litefocus.serve.http import ApiError, BodyGate, install_error_handlers, json_depth, parse_request
from litefocus.serve.settings import ServeSettings


# ---- the body parser ---------------------------------------------------------------------------------
def test_json_depth_counts_brackets_outside_strings_only():
    depth = random.randint(1, 50)
    assert json_depth(b"[" * depth + b"]" * depth) == depth
    assert json_depth(b'{"a": "[[[[{{{{\\" [[", "b": [[1]]}') == 3
    assert json_depth(b'{"prompt": "' + b"[" * 100_000 + b'"}') == 1


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nests deeper than"),
        (b'{"seconds": 1, "seed": ' + b"9" * 5000 + b"}", "4300 digits"),
        (b'{"seconds": NaN}', "NaN is not a JSON number"),
        (b'{"seconds": -Infinity}', "Infinity is not a JSON number"),
        (b'{"seconds": 1e999}', "out of range"),
        (b'{"seconds": 1', "not JSON"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_unusable_json_is_a_400_in_one_line(raw, fragment):
    with pytest.raises(ApiError) as e:
        parse_request(raw)
    assert e.value.status == 400 and e.value.field == "body" and fragment in e.value.message
    assert "\n" not in e.value.message and "set_int_max_str_digits" not in e.value.message


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_prompts_that_are_not_text_are_422_naming_the_field(field):
    for bad in ("\\ud800", "a\\u0000b", "x" * 5000):
        raw = f'{{"seconds": 1, "prompt": "rain", "{field}": "{bad}"}}'.encode()
        with pytest.raises(ApiError) as e:
            parse_request(raw)
        assert (e.value.status, e.value.field) == (422, field) and field in e.value.message


# ---- the slow-body gate ---------------------------------------------------------------------------------
class FakeRequest:
    """A body of ``chunks`` bytes arriving one every ``every`` seconds."""

    def __init__(self, chunks: int, every: float):
        self.headers: dict = {}
        self.chunks, self.every = chunks, every

    async def stream(self):
        for _ in range(self.chunks):
            await asyncio.sleep(self.every)
            yield b" "


def test_a_body_that_takes_too_long_is_a_408():
    async def main():
        gate = BodyGate(limit=4, timeout_s=0.3)
        t0 = time.monotonic()
        with pytest.raises(ApiError) as e:
            await gate.read(FakeRequest(1000, 0.05), 1 << 20)
        return e.value, time.monotonic() - t0, gate

    error, took, gate = asyncio.run(main())
    assert error.status == 408 and "0.3 s" in error.message and took < 2
    assert gate.readers == {} and gate.timed_out == 1


def test_quick_bodies_need_no_reader_slow_ones_evict_the_slowest_or_get_503():
    async def main():
        gate = BodyGate(limit=2, timeout_s=30, grace_s=0.5, probation_s=0.1)

        def slow(every):
            return asyncio.ensure_future(gate.read(FakeRequest(1000, every), 1 << 20))

        a, b = slow(0.5), slow(0.05)
        await asyncio.sleep(0.15)  # both past probation: they hold the two readers
        with pytest.raises(ApiError) as busy:  # a third slow body, the readers younger than grace
            await gate.read(FakeRequest(1000, 0.05), 1 << 20)
        quick = await gate.read(FakeRequest(3, 0), 1 << 20)  # arrives at once: no reader needed
        assert gate.evicted == 0 and len(gate.readers) == 2
        await asyncio.sleep(0.4)
        d = slow(0.05)  # the readers are past grace now: d evicts the slowest (a)
        await asyncio.sleep(0.2)
        evicted = a.exception() if a.done() else None
        for t in (b, d):  # their callers go away: a cancellation, not an answer
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
        return busy.value, quick, evicted, gate

    busy, quick, evicted, gate = asyncio.run(main())
    assert busy.status == 503 and busy.headers["Retry-After"] == "1"
    assert quick == b"   "
    assert isinstance(evicted, ApiError) and evicted.status == 408 and "too slowly" in evicted.message
    assert gate.evicted == 1 and gate.readers == {} and gate.probation == 0


# ---- every error in one line of JSON --------------------------------------------------------------------
def test_404_405_and_unexpected_exceptions_are_one_line_json():
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom():
        raise KeyError("a bug\nover two lines")

    client = TestClient(app, raise_server_exceptions=False)
    for method, path, status in [("GET", "/nope", 404), ("POST", "/boom", 405), ("GET", "/boom", 500)]:
        r = client.request(method, path)
        assert r.status_code == status and r.headers["content-type"] == "application/json"
        body = r.json()
        assert set(body) == {"error", "field"} and "\n" not in body["error"], body
    assert "KeyError" in body["error"] and "a bug" not in body["error"]  # no internals to the client


# ---- the stats ledger -----------------------------------------------------------------------------------
def _counters(n: int) -> dict:
    return {"admitted": n, "completed": n, "rows_used": 2 * n, "rows_available": 4 * n}


def test_stats_count_live_replicas_and_keep_the_dead_across_a_board_restart(monkeypatch):
    board_cls = deployments.StatsBoard.func_or_class
    a, b = "SERVE_REPLICA::app#Denoiser-x#a", "SERVE_REPLICA::app#Denoiser-x#b"
    na, nb = random.randint(1, 100), random.randint(1, 100)
    board = board_cls()
    board.report(a, "x", _counters(na))
    board.report(b, "x", _counters(nb))
    monkeypatch.setattr(deployments, "_live_replicas", lambda: {b})  # a was killed
    snap = board.snapshot()["total"]
    assert snap["replicas"] == 1 and snap["completed"] == na + nb and snap["occupancy"] == 0.5
    ledger = board.report(b, "x", _counters(nb + 1))  # what b keeps and sends with its next report
    reborn = board_cls()  # the board was killed: b's next report brings the ledger back
    reborn.report(b, "x", _counters(nb + 1), ledger)
    snap = reborn.snapshot()["total"]
    assert snap["replicas"] == 1 and snap["completed"] == na + nb + 1
    monkeypatch.setattr(deployments, "_live_replicas", lambda: set())
    assert reborn.snapshot()["total"]["replicas"] == 0  # counters stay, replicas do not


# ---- settings and flags -----------------------------------------------------------------------------------
def test_limits_are_settings_and_docs_are_off_unless_asked(tmp_path):
    s = ServeSettings.from_args({"engines": "e"})
    assert (s.body_timeout_s, s.max_body_readers, s.max_inflight, s.ingress_reserve, s.docs) == (
        10.0,
        64,
        256,
        64,
        False,
    )
    for args, fragment in [
        ({"body_timeout_s": 0}, "body_timeout_s must be a finite number > 0"),
        ({"max_body_readers": 0}, "max_body_readers must be an integer >= 1"),
        ({"max_inflight": True}, "max_inflight must be an integer >= 1"),
        ({"docs": "yes"}, "docs must be true or false"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            ServeSettings.from_args({"engines": "e", **args})
    args = serve_cli.build_parser().parse_args(["--engines", str(tmp_path), "--docs"])
    assert serve_cli.settings_from_args(args).docs is True
