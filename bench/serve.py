"""``litefocus-bench serve``: throughput and latency of the Ray Serve application under load, with
step-level batching on and off.

    litefocus-bench serve --engines engines --concurrency 1 4 8 16 --requests 32 --seconds 10 --steps 25
    litefocus-bench serve --engines engines --url http://10.0.0.5:8000 --concurrency 8   # a running server

Without ``--url`` it starts a local cluster and deploys the engines once per ``--batching`` mode
(default: on and off). C client threads send N requests in all (``format: f32``); a row per (mode,
concurrency) records requests/minute, p50/p95 latency, and from ``GET /v1/stats`` the UNet calls and
their occupancy (request rows / engine batch rows). Written as ``serve-<device>-<time>.json`` + ``.md``
+ ``.png`` under ``--out`` (default bench/results). Needs no torch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import platform
import shlex
import socket
import threading
import time
from pathlib import Path

import numpy as np

from litefocus.bench.serve_report import git_commit, table_row, versions, write_outputs

logger = logging.getLogger("litefocus.bench.serve")

SCHEMA_VERSION = 1
PROMPTS = (
    "rain on a tin roof",
    "a dog barks in the distance",
    "techno music with a strong upbeat tempo",
    "birds sing in the trees at dawn",
)
COUNTERS = ("unet_calls", "steps", "step_seconds", "rows_used", "rows_available")  # per row: after - before
COUNTERS += ("completed", "rejected", "cancelled")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="litefocus-bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", type=Path, required=True, help="engine directory (deployed, or the server's)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16], help="client threads")
    p.add_argument("--requests", type=int, default=32, help="requests per (mode, concurrency) (default 32)")
    p.add_argument("--seconds", type=float, default=10.0, help="audio seconds per request (default 10)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps per request (default 25)")
    p.add_argument("--guidance", type=float, default=3.5, help="guidance scale (default 3.5: 2 rows each)")
    p.add_argument("--url", help="measure this running server instead of starting one")
    p.add_argument(
        "--batching", nargs="+", choices=["on", "off"], help="modes of the local server (default: on off)"
    )
    p.add_argument("--no-batching", action="store_true", help="the same as --batching off")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="the local server's device")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local cluster (default: all)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default bench/results)")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


# ---- load ------------------------------------------------------------------------------------------
def request_body(i: int, args, conditioning: dict | None) -> dict:
    body = dict(seconds=args.seconds, steps=args.steps, guidance=args.guidance, seed=i, format="f32")
    if conditioning is None:
        body["prompt"] = PROMPTS[i % len(PROMPTS)]
    else:
        body["conditioning"] = conditioning
    return body


def drive(url: str, concurrency: int, n: int, body_of, timeout: float) -> dict:
    """``n`` requests from ``concurrency`` threads; (latencies of the 200s, status counts, wall)."""
    import requests

    lock, next_i = threading.Lock(), [0]
    latencies: list[float] = []
    statuses: dict[str, int] = {}

    def worker():
        with requests.Session() as http:
            while True:
                with lock:
                    i = next_i[0]
                    next_i[0] += 1
                if i >= n:
                    return
                t0 = time.perf_counter()
                try:
                    r = http.post(f"{url}/v1/generate", json=body_of(i), timeout=timeout)
                    status = str(r.status_code)
                except requests.RequestException as e:
                    status = type(e).__name__
                elapsed = time.perf_counter() - t0
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == "200":
                        latencies.append(elapsed)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "statuses": statuses, "wall_s": time.perf_counter() - t0}


def get_json(url: str, path: str) -> dict:
    import requests

    r = requests.get(f"{url}{path}", timeout=30)
    r.raise_for_status()
    return r.json()


def settled_stats(url: str) -> dict:
    """The denoisers' counters once their last reports arrived (they report when idle)."""
    last = None
    for _ in range(20):
        now = get_json(url, "/v1/stats")["total"]
        if now == last:
            return now
        last = now
        time.sleep(0.3)
    return last


def measure(url: str, mode: str, concurrency: int, args, conditioning) -> dict:
    before = settled_stats(url)
    run = drive(url, concurrency, args.requests, lambda i: request_body(i, args, conditioning), args.timeout)
    after = settled_stats(url)
    d = {k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS}
    ok, lat = run["statuses"].get("200", 0), run["latencies"]
    row = {
        "batching": mode,
        "concurrency": concurrency,
        "requests": args.requests,
        "ok": ok,
        "statuses": run["statuses"],
        "wall_s": run["wall_s"],
        "requests_per_min": 60.0 * ok / run["wall_s"] if run["wall_s"] else None,
        **{f"latency_p{q}_s": float(np.percentile(lat, q)) if lat else None for q in (50, 95)},
        "occupancy": d["rows_used"] / d["rows_available"] if d["rows_available"] else None,
        "step_ms": 1000 * d["step_seconds"] / d["steps"] if d["steps"] else None,
        **d,
    }
    logger.info(
        "batching | clients | ok | req/min | p50 s | p95 s | occupancy | UNet calls: %s", table_row(row)
    )
    return row


CONDITIONING_BODY_BYTES = 8 << 20


def random_conditioning(engines: Path, seconds: float) -> dict | None:
    """None when the engines have a text encoder (prompts are sent); else random conditioning of
    the bucket's widths (random-weights exports have no text engine)."""
    from litefocus.runtime import Runtime

    rt = Runtime.load(engines)
    if rt.manifest.text is not None:
        return None
    shapes = rt.entries[rt.bucket_for(seconds)].unet.contract.shapes()
    rng = np.random.default_rng(0)
    gpt2 = rng.standard_normal((2, *shapes["encoder_hidden_states"][1:]), dtype=np.float32)
    _, text_len, t5_dim = shapes["encoder_hidden_states_1"]
    # a prompt's length of T5 tokens (the server pads to the engine's): 2 x 16 x 1024 floats in JSON
    # are ~0.7 MB, the full 128 would be ~5 MB (the local server takes CONDITIONING_BODY_BYTES)
    t5 = rng.standard_normal((2, min(16, text_len), t5_dim), dtype=np.float32)
    return {"gpt2": gpt2.tolist(), "t5": t5.tolist(), "t5_mask": np.ones(t5.shape[:2], np.int32).tolist()}


# ---- a local server ----------------------------------------------------------------------------------
class LocalServer:
    """A local Ray cluster with the application deployed in one batching mode at a time."""

    def __init__(self, args):
        import ray
        from ray import serve

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args
        quiet = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
        ray.init(address="local", num_cpus=args.num_cpus, **quiet)  # "local": never an older cluster
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})

    def deploy(self, batching: bool) -> None:
        from ray import serve

        from litefocus.serve.app import build_app

        a = self.args
        queue = max(64, *a.concurrency)
        settings = dict(
            engines=str(a.engines.resolve()),
            device=a.device,
            batching=batching,
            timeout_s=a.timeout,
            max_body_bytes=CONDITIONING_BODY_BYTES,  # random-weight engines: conditioning in the body
        )
        serve.run(build_app({**settings, "queue_size": queue}), name="litefocus-bench", route_prefix="/")

    def close(self) -> None:
        import ray

        ray.shutdown()


# ---- main -------------------------------------------------------------------------------------------------
def check_args(p: argparse.ArgumentParser, args) -> list[str]:
    if min(args.requests, args.steps, *args.concurrency) < 1:
        p.error("--requests, --steps and --concurrency must be >= 1")
    if not args.seconds > 0 or not args.timeout > 0 or args.guidance < 1:
        p.error("--seconds and --timeout must be > 0, --guidance >= 1")
    if not (args.engines / "manifest.json").is_file():
        p.error(f"--engines {args.engines} has no manifest.json; pass a directory litefocus-export wrote")
    if args.url and (args.batching or args.no_batching or args.num_cpus):
        p.error("--url measures a running server as it is: drop --batching/--no-batching/--num-cpus")
    if args.url:
        return ["as served"]  # one pass; the row records the server's own mode
    if args.no_batching and args.batching:
        p.error("give --batching or --no-batching, not both")
    return ["off"] if args.no_batching else list(dict.fromkeys(args.batching or ["on", "off"]))


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    modes = check_args(p, args)
    try:
        conditioning = random_conditioning(args.engines, args.seconds)
    except ValueError as e:
        p.error(str(e).splitlines()[0])
    created = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    record = {
        "benchmark": "litefocus-bench serve",
        "schema_version": SCHEMA_VERSION,
        "created": created,
        "command": shlex.join(["litefocus-bench", "serve", *(argv if argv is not None else [])]),
        "device_type": "remote" if args.url else args.device,
        "device": f"server {args.url}" if args.url else f"{args.device}, {platform.machine()}",
        "git": git_commit(),
        "versions": versions(),
        "options": {
            "server": args.url or "local",
            "engines": str(args.engines),
            "seconds": args.seconds,
            "steps": args.steps,
            "guidance": args.guidance,
            "requests": args.requests,
            "concurrency": args.concurrency,
        },
        "rows": [],
    }
    server = None
    try:
        if args.url is None:
            server = LocalServer(args)
        for mode in modes:
            if server is not None:
                server.deploy(batching=mode == "on")
                url = server.url
            else:
                url = args.url.rstrip("/")
                mode = "on" if get_json(url, "/v1/engines").get("batching", True) else "off"
            drive(
                url, 1, 2, lambda i: request_body(i, args, conditioning), args.timeout
            )  # warm-up: sessions open
            for c in args.concurrency:
                record["rows"].append(measure(url, mode, c, args, conditioning))
    except KeyboardInterrupt:
        logger.error("interrupted: writing the rows measured so far")
    except OSError as e:  # the server is unreachable, or a port is taken
        logger.error("litefocus-bench serve: %s: %s", type(e).__name__, e)
        return 1
    finally:
        if server is not None:
            server.close()
    paths = write_outputs(record, args.out)
    logger.info("wrote %s", ", ".join(str(x) for x in paths))
    return 0 if record["rows"] and all(r["ok"] == r["requests"] for r in record["rows"]) else 1
