"""The worker deployments behind the HTTP ingress (``serve/app.py``):

* ``TextConditioner`` (CPU): prompt -> ``Conditioning`` with the engine directory's text engine;
* ``Denoiser``, one deployment per bucket: owns the whole sampling loop of its requests (a
  ``StepLoop`` over a ``BatchedUNet``); returns the final latents, never intermediate ones;
* ``Decoder``: final latents -> waveform;
* ``StatsBoard`` (one replica): the denoiser replicas' counters, summed for ``GET /v1/stats``:
  the latest report of each live replica plus a ledger of the replicas that died. The counters live
  in the replicas (each reports every ``HEARTBEAT_S`` and keeps a copy of the ledger), so a restarted
  board is whole again at their next report; a replica counts while its actor is alive.

Each deployment answers ``ping`` (``GET /healthz`` asks them all).

Metrics (``ray.serve.metrics``, exported with Ray's own Prometheus metrics): per bucket, the queue
depth and running requests (gauges), step latency and batch occupancy (histograms: rows used /
rows of the engine batch that ran), UNet calls and rows (counters).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ray import serve
from ray.serve import metrics

from litefocus.runtime import Runtime
from litefocus.runtime.batching import BatchedUNet, decode_waveform, new_slot
from litefocus.serve.denoiser import LoopStats, QueueFull, StepLoop, progress_stream

logger = logging.getLogger(__name__)

STEP_MS_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
OCCUPANCY_BOUNDARIES = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
REPORT_EVERY_S = 0.5  # a busy denoiser sends its counters to the StatsBoard at most this often
HEARTBEAT_S = 1.0  # an idle one sends them this often (a restarted board hears from every replica)
STALE_S = 30.0  # a replica not heard from this long counts as dead (when Ray cannot be asked)
REPLICA_PREFIX = "SERVE_REPLICA::"  # Ray Serve's replica actor names (ReplicaID.to_full_id_str)


@serve.deployment(name="TextConditioner")
class TextConditioner:
    """prompt -> Conditioning ([negative, prompt] when guided); the encoder opens on first use."""

    def __init__(self, engines: str, backend: str = "auto"):
        self.runtime = Runtime.load(engines, backend=backend, device="cpu")
        self.worker = _one_thread("litefocus-text")

    def ping(self) -> bool:
        return True

    async def encode(self, prompt: str, negative_prompt: str | None, guided: bool):
        encoder = await _run(self.worker, self.runtime.text_encoder)
        return await _run(self.worker, encoder, prompt, negative_prompt, guided)


@serve.deployment(name="Decoder")
class Decoder:
    """Final latents [1, 8, T, 16] of a bucket -> float32 waveform of ``int(seconds * 16000)``."""

    def __init__(self, engines: str, backend: str = "auto", device: str = "cpu"):
        self.runtime = Runtime.load(engines, backend=backend, device=device)
        self.worker = _one_thread("litefocus-decode")

    def ping(self) -> bool:
        return True

    async def decode(self, bucket: str, latents, seconds: float):
        # the bucket's primary entry holds its decode graph (opened once, on first use)
        entry = await _run(self.worker, self.runtime.open_entry, bucket, ("decode",))  # no UNet here
        return await _run(self.worker, decode_waveform, entry.decode, latents, seconds)


@serve.deployment(name="StatsBoard", num_replicas=1, ray_actor_options={"num_cpus": 0})
class StatsBoard:
    """Counters of the denoiser replicas: the latest report of each live one (``live``) and the last
    counters of those that died (``dead``, the ledger; a copy goes back to every reporting replica,
    which sends it again with its next report: a restarted board gets it back). Lost: the counters
    of a replica's last REPORT_EVERY_S before it died, and a death that the board learnt of less than
    HEARTBEAT_S before the board itself died (no live replica had its copy of the ledger yet)."""

    def __init__(self):
        self.live: dict[str, dict] = {}
        self.dead: dict[str, dict] = {}

    def report(self, replica: str, bucket: str, counters: dict, ledger: dict | None = None) -> dict:
        for rid, rep in (ledger or {}).items():
            if rid not in self.live:
                self.dead.setdefault(rid, rep)
        self.dead.pop(replica, None)
        self.live[replica] = {"bucket": bucket, "counters": counters, "time": time.monotonic()}
        self._bury(_live_replicas())  # the ledger that goes back is current
        return self.dead

    def snapshot(self) -> dict:
        self._bury(_live_replicas())
        return summarize(self.live, self.dead)

    def _bury(self, alive: set[str] | None) -> None:
        """Move the replicas that are gone (not among Ray's actors; or silent for STALE_S) to the ledger."""
        now = time.monotonic()
        for rid, rep in list(self.live.items()):
            known = alive is not None and rid.startswith(REPLICA_PREFIX)
            if (known and rid not in alive) or now - rep["time"] > STALE_S:
                self.dead[rid] = {"bucket": rep["bucket"], "counters": rep["counters"]}
                del self.live[rid]


def summarize(live: dict, dead: dict) -> dict:
    """``GET /v1/stats``: per bucket and in total, the counters of live and dead replicas summed;
    ``replicas`` counts the live ones only."""
    buckets: dict[str, dict] = {}
    for reports, alive in ((live, True), (dead, False)):
        for rep in reports.values():
            total = buckets.setdefault(rep["bucket"], {"replicas": 0})
            total["replicas"] += int(alive)
            for k, v in rep["counters"].items():
                total[k] = total.get(k, 0) + v
    overall: dict = {"replicas": 0, **LoopStats().to_dict()}  # every counter, 0 before any report
    for b in buckets.values():
        for k, v in b.items():
            overall[k] = overall.get(k, 0) + v
    for d in (*buckets.values(), overall):
        d["occupancy"] = d["rows_used"] / d["rows_available"] if d.get("rows_available") else None
    return {"buckets": buckets, "total": overall}


def _live_replicas() -> set[str] | None:
    """The names of the Serve replica actors alive now (None when Ray cannot say)."""
    try:
        import ray

        if not ray.is_initialized():  # outside a cluster (tests): nothing to ask
            return None
        names = ray.util.list_named_actors(all_namespaces=True)
    except Exception as e:  # noqa: BLE001 - stats are best effort
        logger.warning("could not list the replicas: %s", e)
        return None
    return {a["name"] for a in names if a["name"].startswith(REPLICA_PREFIX)}


@dataclass(frozen=True)
class DenoiserSettings:
    """What one bucket's ``Denoiser`` replica runs: the engines, its bucket and how it batches.
    One picklable value, so that ``build_app`` binds it (and Serve ships it to each replica) as a whole."""

    engines: str  # the engine directory
    bucket: str  # the bucket (engine entry) whose requests this deployment runs
    backend: str = "auto"
    device: str = "cpu"
    batching: bool = True  # step-level batching (False: one request per UNet call)
    queue_size: int = 64  # waiting requests per replica (then QueueFull: 503 + Retry-After)


@serve.deployment(name="Denoiser")
class Denoiser:
    """One bucket's running batch (see ``litefocus.serve.denoiser.StepLoop``)."""

    def __init__(self, settings: DenoiserSettings, stats_board=None):
        bucket = settings.bucket
        self.bucket = bucket
        self.runtime = Runtime.load(settings.engines, backend=settings.backend, device=settings.device)
        self.group = self.runtime.batch_group(bucket, modules=("unet",))  # the decoder decodes
        self.unet = BatchedUNet(self.group, batching=settings.batching)
        self.batching = settings.batching
        self.loop = StepLoop(self.unet, queue_size=settings.queue_size, observer=self._observe)
        self.board = stats_board
        self.replica = _replica_id()
        self._reported = 0.0
        self._report_task: asyncio.Task | None = None
        self._ledger: dict = {}  # the board's ledger of dead replicas, sent back with each report
        try:  # inside a replica: report every HEARTBEAT_S while idle too
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        except RuntimeError:  # no event loop (tests)
            self._heartbeat = None
        tags = ("bucket",)
        self.m_queue = metrics.Gauge("litefocus_queue_depth", "requests waiting for a slot", tag_keys=tags)
        self.m_active = metrics.Gauge(
            "litefocus_running_requests", "requests in the running batch", tag_keys=tags
        )
        self.m_step = metrics.Histogram(
            "litefocus_step_latency_ms", "one denoising step of the running batch", STEP_MS_BOUNDARIES, tags
        )
        self.m_occupancy = metrics.Histogram(
            "litefocus_batch_occupancy", "rows used / rows of the engine batch", OCCUPANCY_BOUNDARIES, tags
        )
        self.m_calls = metrics.Counter("litefocus_unet_calls", "UNet engine calls", tag_keys=tags)
        self.m_rows_used = metrics.Counter("litefocus_rows_used", "request rows in UNet calls", tag_keys=tags)
        self.m_rows_run = metrics.Counter("litefocus_rows_available", "rows UNet calls ran", tag_keys=tags)
        for m in (self.m_queue, self.m_active, self.m_step, self.m_occupancy, self.m_calls):
            m.set_default_tags({"bucket": bucket})
        for m in (self.m_rows_used, self.m_rows_run):
            m.set_default_tags({"bucket": bucket})
        logger.info(
            "denoiser %s: batch sizes %s, %d rows per step", bucket, self.unet.sizes, self.loop.capacity
        )

    async def denoise(self, cond, options) -> dict:
        """The request's final latents, or an error the ingress turns into a response."""
        try:
            slot = new_slot(cond, options, self.unet.contract, self.runtime.schedule, self.bucket)
        except ValueError as e:
            text = str(e)
            field = (
                "steps" if text.startswith("steps") else "guidance" if "--batch 1" in text else "conditioning"
            )
            return {"status": 422, "error": text, "field": field}
        try:
            slot = await self.loop.run(slot)
        except QueueFull as e:
            return {"status": 503, "error": str(e), "field": None, "retry_after": e.retry_after}
        except ValueError as e:
            return {"status": 422, "error": str(e), "field": "guidance"}
        return {"latents": slot.latents, "seed": slot.seed, "steps": slot.steps}

    async def denoise_stream(self, cond, options):
        """``denoise`` with progress, for ``handle.options(stream=True)`` (the jobs API,
        ``litefocus.serve.jobs``): ``{"progress": {step, steps, queue_position}}`` items, then
        ``denoise``'s dict. Cancelling the stream frees the request's slot at the next step boundary."""
        async for item in progress_stream(lambda: self.denoise(cond, options)):
            yield item

    def stats(self) -> dict:
        return {"bucket": self.bucket, "replica": self.replica, **self.loop.stats.to_dict()}

    def check_health(self) -> None:  # Ray Serve restarts a replica whose loop died
        if not self.loop.healthy():
            raise RuntimeError(f"the step loop of {self.bucket} stopped")

    def ping(self) -> bool:
        self.check_health()
        return True

    def __del__(self):
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.close()

    # ---- metrics and the stats board ----------------------------------------------------------
    def _observe(self, event: str, **v) -> None:
        if event == "queue":
            self.m_queue.set(v["depth"])
            self.m_active.set(v["active"])
            if v["depth"] == 0 and v["active"] == 0:
                self._report(force=True)
            return
        self.m_step.observe(1000.0 * v["seconds"])
        if v["rows_available"]:
            self.m_occupancy.observe(v["rows_used"] / v["rows_available"])
        self.m_calls.inc(v["calls"])
        self.m_rows_used.inc(v["rows_used"])
        self.m_rows_run.inc(v["rows_available"])
        self._report()

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.board is None or (not force and now - self._reported < REPORT_EVERY_S):
            return
        self._reported = now
        counters = self.loop.stats.to_dict()
        try:
            response = self.board.report.remote(self.replica, self.bucket, counters, self._ledger)
        except Exception as e:  # noqa: BLE001 - stats are best effort, serving goes on
            logger.warning("could not report stats: %s", e)
            return
        self._report_task = asyncio.ensure_future(self._settle(response))

    async def _settle(self, response) -> None:
        try:
            ledger = await response
        except Exception as e:  # noqa: BLE001
            logger.debug("stats report failed: %s", e)
            return
        if isinstance(ledger, dict):
            self._ledger = ledger

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            if time.monotonic() - self._reported >= HEARTBEAT_S:
                self._report(force=True)


def _one_thread(name: str) -> ThreadPoolExecutor:
    """One call at a time per replica: ONNX Runtime already spreads one call over the cores, and
    concurrent calls would only oversubscribe them (and slow the denoisers' steps beside them)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)


async def _run(executor: ThreadPoolExecutor, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.to_full_id_str()  # its actor's name
    except Exception:  # noqa: BLE001 - outside a replica (tests)
        return f"local-{id(object())}"
