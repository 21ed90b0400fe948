"""The slow-body soak: ``litefocus-serve`` under a flood of connections that send their bodies one byte
at a time, while /healthz is probed and valid generate requests run: a server whose request bodies
trickle in must still answer its health probe and serve the requests that arrive whole.

    python bench/soak.py --engines DIR --minutes 5            # 300 slow connections for 5 minutes

Starts ``litefocus-serve`` (a local Ray cluster) on a free port, waits for /healthz, holds
``--connections`` slow-body connections open (a connection the server answers or closes is opened
again), probes /healthz every ``--probe-every`` s and sends valid generate requests one after another;
writes one JSON row to ``bench/results/soak-<utc>.json``: /healthz latency percentiles and failures,
generate completions and statuses, and what the flood's connections were answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

logger = logging.getLogger("litefocus.bench.soak")
RESULTS = Path(__file__).resolve().parent / "results"
PROBE_TIMEOUT_S = 5.0  # a /healthz answer slower than this counts as failed


class SlowBodyFlood:
    """``n`` connections to ``host:port`` that each send a POST /v1/generate head declaring
    ``length`` bytes and then one byte every ``interval`` s, answered or not, until the server closes
    the connection; it is then opened again after ``pause`` s. Runs its own event loop on a thread
    (``start``/``stop``); ``statuses`` counts the answers by status code (``closed``: none)."""

    def __init__(self, host: str, port: int, n: int, interval: float = 1.0, pause: float = 1.0):
        self.host, self.port, self.n, self.interval, self.pause = host, port, n, interval, pause
        self.length = 100_000
        self.opened = 0
        self.open_now = 0
        self.statuses: Counter = Counter()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()

    def start(self) -> SlowBodyFlood:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        tasks = [asyncio.ensure_future(self._one()) for _ in range(self.n)]
        await self._stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self) -> None:
        head = (
            f"POST /v1/generate HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {self.length}\r\n\r\n"
        ).encode()
        while True:  # like slowhttptest: dribble until the server closes the connection, then reopen
            writer = None
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
                self.opened += 1
                self.open_now += 1
                writer.write(head)
                await writer.drain()
                answer = asyncio.ensure_future(reader.readline())
                closed = asyncio.ensure_future(self._until_closed(reader, answer))
                while not closed.done():
                    writer.write(b" ")
                    await writer.drain()
                    await asyncio.wait({closed}, timeout=self.interval)
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                if writer is not None:
                    self.open_now -= 1
                    writer.close()
            await asyncio.sleep(self.pause)

    async def _until_closed(self, reader: asyncio.StreamReader, answer: asyncio.Future) -> None:
        line = (await answer).split()
        self.statuses[line[1].decode() if len(line) > 1 else "closed"] += 1
        while await reader.read(4096):  # the rest of the answer; then b"" when the server closes
            pass


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    a = np.asarray(values)
    return {
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
    }


def probe_health(url: str, stop: threading.Event, every: float, out: dict) -> None:
    """GET /healthz every ``every`` s: latencies of the 200s, and the failures (status or error)."""
    import requests

    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            r = requests.get(f"{url}/healthz", timeout=PROBE_TIMEOUT_S)
            dt = time.perf_counter() - t0
            if r.status_code == 200:
                out["latency_s"].append(dt)
            else:
                out["failures"][str(r.status_code)] += 1
        except requests.RequestException as e:
            out["failures"][type(e).__name__] += 1
        stop.wait(max(0.0, every - (time.perf_counter() - t0)))


def generate_loop(url: str, body: dict, stop: threading.Event, out: dict) -> None:
    """Valid generate requests, one after another: statuses and the latencies of the 200s."""
    import requests

    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            r = requests.post(f"{url}/v1/generate", json=body, timeout=120)
            out["statuses"][str(r.status_code)] += 1
            if r.status_code == 200:
                out["latency_s"].append(time.perf_counter() - t0)
            else:
                stop.wait(0.2)
        except requests.RequestException as e:
            out["statuses"][type(e).__name__] += 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, server: subprocess.Popen, timeout: float) -> dict:
    import requests

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server.poll() is not None:
            raise RuntimeError(f"litefocus-serve exited with {server.returncode} before it was ready")
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return requests.get(f"{url}/v1/engines", timeout=5).json()
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"litefocus-serve was not ready within {timeout:g} s")


def soak(url: str, info: dict, args) -> dict:
    host, port = url.removeprefix("http://").split(":")
    bucket = info["buckets"][0]
    if not info.get("text"):
        raise ValueError("these engines have no text encoder; the soak sends prompts: export with --text")
    body = {"prompt": "rain on a tin roof", "seconds": bucket["seconds"], "steps": args.steps, "seed": 1}
    health = {"latency_s": [], "failures": Counter()}
    gen = {"latency_s": [], "statuses": Counter()}
    flood = SlowBodyFlood(host, int(port), args.connections).start()
    stop = threading.Event()
    threads = [
        threading.Thread(target=probe_health, args=(url, stop, args.probe_every, health), daemon=True),
        threading.Thread(target=generate_loop, args=(url, body, stop, gen), daemon=True),
    ]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    peak_open = 0
    while time.monotonic() - t0 < args.minutes * 60:
        time.sleep(1)
        peak_open = max(peak_open, flood.open_now)
    stop.set()
    for t in threads:
        t.join(150)
    flood.stop()
    return {
        "kind": "soak",
        "minutes": args.minutes,
        "connections": args.connections,
        "flood_peak_open": peak_open,
        "flood_opened": flood.opened,
        "flood_answers": dict(flood.statuses),
        "healthz": {
            "ok": len(health["latency_s"]),
            "failures": dict(health["failures"]),
            **{f"latency_{k}_s": v for k, v in percentiles(health["latency_s"]).items()},
        },
        "generate": {
            "completed": len(gen["latency_s"]),
            "statuses": dict(gen["statuses"]),
            **{f"latency_{k}_s": v for k, v in percentiles(gen["latency_s"]).items()},
        },
        "request": body,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.splitlines()[0])
    p.add_argument("--engines", type=Path, required=True, help="engine directory (with a text encoder)")
    p.add_argument("--minutes", type=float, default=5.0, help="how long the flood lasts (5)")
    p.add_argument("--connections", type=int, default=300, help="slow-body connections (300)")
    p.add_argument("--steps", type=int, default=10, help="steps of each generate request (10)")
    p.add_argument("--probe-every", type=float, default=0.5, help="seconds between /healthz probes (0.5)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where the JSON row goes (bench/results)")
    p.add_argument("--url", help="soak a running server instead of starting one (http://host:port)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for /healthz (300)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.minutes <= 0 or args.connections < 1 or args.steps < 1:
        raise SystemExit("bench/soak.py: --minutes > 0, --connections >= 1 and --steps >= 1")
    server = None
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable,
            "-m",
            "litefocus.serve.cli",
            "--engines",
            str(args.engines),
            "--port",
            str(port),
        ]
        fd, log = tempfile.mkstemp(prefix="soak-server-", suffix=".log")
        logger.info("litefocus-serve on port %d; its log: %s", port, log)
        server = subprocess.Popen([*cmd, "-q"], stdout=fd, stderr=subprocess.STDOUT)
        os.close(fd)
    try:
        info = wait_ready(url, server, args.ready_timeout) if server else _engines(url)
        logger.info("soaking %s: %d slow-body connections for %g min", url, args.connections, args.minutes)
        row = soak(url, info, args)
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    row["utc"] = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"soak-{row['utc']}.json"
    path.write_text(json.dumps(row, indent=2) + "\n")
    logger.info("healthz %s; generate %s; wrote %s", row["healthz"], row["generate"], path)
    return 0


def _engines(url: str) -> dict:
    import requests

    return requests.get(f"{url}/v1/engines", timeout=10).json()


if __name__ == "__main__":
    raise SystemExit(main())
