"""Helpers of the tests in tests/serve/: a fake UNet for the step loop, a local Ray cluster with Serve,
HTTP calls and the one-line JSON error check."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass

import requests

from litefocus.serve.denoiser import StepLoop

CLIENT_TIMEOUT_S = 60  # every HTTP call of the tests is bounded


# ---- the step loop without Ray --------------------------------------------------------------------
@dataclass(eq=False)
class FakeSlot:
    rows: int
    steps: int
    step: int = 0
    name: str = ""

    @property
    def done(self) -> bool:
        return self.step >= self.steps


class FakeUNet:
    """``capacity`` rows per step; ``step`` records which slots ran together and can be held
    (``gate``) or made to fail (``fail``)."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self.calls: list[list[str]] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.fail: Exception | None = None
        self.stats = {"calls": 0, "rows_used": 0, "rows_run": 0}

    def step(self, slots) -> None:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        assert sum(s.rows for s in slots) <= self.capacity
        self.calls.append([s.name for s in slots])
        if self.fail is not None:
            raise self.fail
        for s in slots:
            s.step += 1
        rows = sum(s.rows for s in slots)
        self.stats["calls"] += 1
        self.stats["rows_used"] += rows
        self.stats["rows_run"] += self.capacity


def new_loop(capacity: int = 4, queue_size: int = 8) -> tuple[StepLoop, FakeUNet, list]:
    unet = FakeUNet(capacity)
    events: list = []
    loop = StepLoop(unet, queue_size=queue_size, observer=lambda event, **v: events.append((event, v)))
    return loop, unet, events


# ---- a local cluster ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(port: int) -> None:
    import ray
    from ray import serve

    from litefocus.serve.proxy import CALLBACK, CALLBACK_ENV

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ[CALLBACK_ENV] = CALLBACK  # the proxy's own errors in JSON too (its actor inherits it)
    ray.init(
        address="local",  # a new cluster, whatever another one left in /tmp/ray
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        logging_level="WARNING",
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})


def stop_cluster() -> None:
    import ray

    ray.shutdown()  # the whole local cluster goes, Serve's actors with it


def denoiser_actor_names(deployment: str) -> list[str]:
    import ray

    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if deployment in a["name"] and a["name"].startswith("SERVE_REPLICA")
    ]


# ---- HTTP -------------------------------------------------------------------------------------------
class Client:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def generate(self, body, timeout: float = CLIENT_TIMEOUT_S, **kw) -> requests.Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        return requests.post(f"{self.url}/v1/generate", data=data, headers=headers, timeout=timeout, **kw)

    def get(self, path: str) -> dict:
        r = requests.get(f"{self.url}{path}", timeout=CLIENT_TIMEOUT_S)
        assert r.status_code == 200, r.text
        return r.json()

    def stats(self) -> dict:
        return self.get("/v1/stats")["total"]

    def wait_for(self, predicate, timeout: float = 20.0, what: str = "a condition") -> dict:
        """Poll /v1/stats until ``predicate(stats)``; the last stats."""
        end = time.monotonic() + timeout
        while True:
            s = self.stats()
            if predicate(s):
                return s
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {what}; stats {s}")
            time.sleep(0.2)


def assert_json_error(r: requests.Response, status: int, field: str | None = None) -> dict:
    assert r.status_code == status, f"{r.status_code}: {r.text[:300]}"
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error", "field"}, body
    assert body["error"] and "\n" not in body["error"], body
    if field is not None:
        assert body["field"] == field, body
    return body
