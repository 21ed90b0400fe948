"""The worker deployments behind the HTTP ingress (``serve/app.py``):

* ``TextConditioner`` (CPU): prompt -> ``Conditioning`` with the engine directory's text engine;
* ``Denoiser``, one deployment per bucket: owns the whole sampling loop of its requests (a
  ``StepLoop`` over a ``BatchedUNet``); returns the final latents, never intermediate ones;
* ``Decoder``: final latents -> waveform;
* ``StatsBoard`` (one replica): the denoiser replicas' counters, summed for ``GET /v1/stats``.

Metrics (``ray.serve.metrics``, exported with Ray's own Prometheus metrics): per bucket, the queue
depth and running requests (gauges), step latency and batch occupancy (histograms: rows used /
rows of the engine batch that ran), UNet calls and rows (counters).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve
from ray.serve import metrics

from litefocus.runtime import Runtime
from litefocus.runtime.batching import BatchedUNet, decode_waveform, new_slot
from litefocus.serve.denoiser import QueueFull, StepLoop

logger = logging.getLogger(__name__)

STEP_MS_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
OCCUPANCY_BOUNDARIES = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
REPORT_EVERY_S = 0.5  # a busy denoiser sends its counters to the StatsBoard at most this often


@serve.deployment(name="TextConditioner")
class TextConditioner:
    """prompt -> Conditioning ([negative, prompt] when guided); the encoder opens on first use."""

    def __init__(self, engines: str, backend: str = "auto"):
        self.runtime = Runtime.load(engines, backend=backend, device="cpu")
        self.worker = _one_thread("litefocus-text")

    async def encode(self, prompt: str, negative_prompt: str | None, guided: bool):
        encoder = await _run(self.worker, self.runtime.text_encoder)
        return await _run(self.worker, encoder, prompt, negative_prompt, guided)


@serve.deployment(name="Decoder")
class Decoder:
    """Final latents [1, 8, T, 16] of a bucket -> float32 waveform of ``int(seconds * 16000)``."""

    def __init__(self, engines: str, backend: str = "auto", device: str = "cpu"):
        self.runtime = Runtime.load(engines, backend=backend, device=device)
        self.worker = _one_thread("litefocus-decode")

    async def decode(self, bucket: str, latents, seconds: float):
        # the bucket's primary entry holds its decode graph (opened once, on first use)
        entry = await _run(self.worker, self.runtime.open_entry, bucket, ("decode",))  # no UNet here
        return await _run(self.worker, decode_waveform, entry.decode, latents, seconds)


@serve.deployment(name="StatsBoard", num_replicas=1, ray_actor_options={"num_cpus": 0})
class StatsBoard:
    """Latest counters of every denoiser replica (replicas that died keep their last report)."""

    def __init__(self):
        self.reports: dict[str, dict] = {}

    def report(self, replica: str, bucket: str, counters: dict) -> None:
        self.reports[replica] = {"bucket": bucket, "counters": counters, "time": time.time()}

    def snapshot(self) -> dict:
        buckets: dict[str, dict] = {}
        for rep in self.reports.values():
            total = buckets.setdefault(rep["bucket"], {"replicas": 0})
            total["replicas"] += 1
            for k, v in rep["counters"].items():
                total[k] = total.get(k, 0) + v
        overall: dict = {}
        for b in buckets.values():
            for k, v in b.items():
                overall[k] = overall.get(k, 0) + v
        for d in (*buckets.values(), overall):
            d["occupancy"] = d["rows_used"] / d["rows_available"] if d.get("rows_available") else None
        return {"buckets": buckets, "total": overall}


@serve.deployment(name="Denoiser")
class Denoiser:
    """One bucket's running batch (see ``litefocus.serve.denoiser.StepLoop``)."""

    def __init__(
        self,
        engines: str,
        bucket: str,
        backend: str = "auto",
        device: str = "cpu",
        batching: bool = True,
        queue_size: int = 64,
        stats_board=None,
    ):
        self.bucket = bucket
        self.runtime = Runtime.load(engines, backend=backend, device=device)
        self.group = self.runtime.batch_group(bucket, modules=("unet",))  # the decoder decodes
        self.unet = BatchedUNet(self.group, batching=batching)
        self.batching = batching
        self.loop = StepLoop(self.unet, queue_size=queue_size, observer=self._observe)
        self.board = stats_board
        self.replica = _replica_id()
        self._reported = 0.0
        self._report_task: asyncio.Task | None = None
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

    def stats(self) -> dict:
        return {"bucket": self.bucket, "replica": self.replica, **self.loop.stats.to_dict()}

    def check_health(self) -> None:  # Ray Serve restarts a replica whose loop died
        if not self.loop.healthy():
            raise RuntimeError(f"the step loop of {self.bucket} stopped")

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
            response = self.board.report.remote(self.replica, self.bucket, counters)
        except Exception as e:  # noqa: BLE001 - stats are best effort, serving goes on
            logger.warning("could not report stats: %s", e)
            return
        self._report_task = asyncio.ensure_future(_settle(response))


def _one_thread(name: str) -> ThreadPoolExecutor:
    """One call at a time per replica: ONNX Runtime already spreads one call over the cores, and
    concurrent calls would only oversubscribe them (and slow the denoisers' steps beside them)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)


async def _run(executor: ThreadPoolExecutor, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


async def _settle(response) -> None:
    try:
        await response
    except Exception as e:  # noqa: BLE001
        logger.debug("stats report failed: %s", e)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (tests)
        return f"local-{id(object())}"
