"""The Ray Serve application: an HTTP ingress (FastAPI) over the worker deployments.

    POST /v1/generate   {prompt | conditioning, seconds, seed, steps, guidance, scheduler,
                         negative_prompt, format: "wav" | "f32"} -> audio/wav or raw float32 LE
                        (headers X-Seed, X-Bucket, X-Sample-Rate)
    GET  /healthz       {"status": "ok", ...}
    GET  /v1/engines    buckets (name, seconds, batch sizes, max rows) and the limits
    GET  /v1/stats      the denoisers' counters: UNet calls, rows used / available (occupancy)

``build_app(args)`` is the application builder: ``import_path: litefocus.serve.app:build_app`` in a
``serve deploy`` config, with ``args`` as in ``ServeSettings`` (``litefocus-serve --write-config``).
"""

import asyncio
import logging
import re
import secrets
import time

from fastapi import FastAPI, Request
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve import metrics
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)

from litefocus.buckets import SAMPLE_RATE
from litefocus.runtime import Runtime
from litefocus.runtime.batching import capacity
from litefocus.runtime.sampling import make_sampler
from litefocus.serve.deployments import Decoder, Denoiser, DenoiserSettings, StatsBoard, TextConditioner
from litefocus.serve.http import (
    ApiError,
    BodyGate,
    audio_response,
    conditioning_of,
    field_error,
    install_error_handlers,
    internal_error,
    options_of,
    parse_request,
)
from litefocus.serve.jobs import JobManager, denoise_call, page_response
from litefocus.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

LOST = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError)
LATENCY_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500]
HEALTH_TIMEOUT_S = 1.0  # /healthz waits at most this for the deployments' answers
HEALTH_CACHE_S = 1.0  # and reuses an answer this long (a flood of /healthz costs one probe a second)
WATCH_S = 2.0  # a running denoiser call is checked on this often
LOST_PROBES = 2  # and given up (503) after this many failed probes in a row
STATS_S = 5.0  # GET /v1/stats waits this long for the board
RETRY = {"Retry-After": "2"}
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")

api = FastAPI(title="litefocus", description="LiteFocus text-to-audio on Ray Serve")
install_error_handlers(api)


def deployment_name(bucket: str) -> str:
    return "Denoiser-" + re.sub(r"[^A-Za-z0-9_.-]", "_", bucket)


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, settings: dict, text, denoisers: dict, decoder, stats_board):
        self.settings = ServeSettings.from_args(settings)
        self.runtime = Runtime.load(self.settings.engines, backend=self.settings.backend)
        self.buckets = self.runtime.buckets()  # from the manifest: nothing opened here
        self.max_seconds = self.buckets[-1]["seconds"]
        self.has_text = self.runtime.manifest.text is not None
        self.text, self.denoisers, self.decoder, self.board = text, denoisers, decoder, stats_board
        s = self.settings
        self.gate = BodyGate(s.max_body_readers, s.body_timeout_s)  # slow-body floods: bounded
        self.inflight = 0  # generate requests past their body (at most s.max_inflight)
        self._health: tuple[float, list[str]] | None = None
        self._probe: asyncio.Future | None = None
        if not s.docs:  # /docs, /redoc and /openapi.json only with the docs setting (--docs)
            api.router.routes[:] = [
                r for r in api.router.routes if getattr(r, "path", None) not in DOCS_PATHS
            ]
        self.jobs = JobManager()  # the jobs API (litefocus.serve.jobs)
        self.m_requests = metrics.Counter(
            "litefocus_requests", "generate requests by status", tag_keys=("status", "bucket")
        )
        self.m_latency = metrics.Histogram(
            "litefocus_request_latency_s",
            "generate latency, body to audio",
            LATENCY_BOUNDARIES_S,
            ("bucket",),
        )

    # ---- endpoints -----------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self):
        """200 when every deployment a request needs answers; else 503 naming the ones that do not."""
        down = await self._not_running()
        if down:
            return ApiError(
                503, f"not ready: {', '.join(down)} not running; retry shortly", None, {"Retry-After": "2"}
            ).response()
        return {"status": "ok", "buckets": [b["name"] for b in self.buckets], "text": self.has_text}

    @api.get("/v1/engines")
    async def engines(self) -> dict:
        s = self.settings
        rows = [{**b, "max_rows": capacity(b["batch_sizes"], s.batching)} for b in self.buckets]
        limits = {
            "max_seconds": self.max_seconds,
            "max_steps": s.max_steps,
            "queue_size": s.queue_size,
            "timeout_s": s.timeout_s,
            "max_body_bytes": s.max_body_bytes,
        }
        return {"buckets": rows, "limits": limits, "batching": s.batching, "text": self.has_text}

    @api.get("/v1/stats")
    async def stats(self) -> dict:
        try:  # a board that is being restarted: Serve would hold the call until it is back
            return await asyncio.wait_for(self._call(self.board.snapshot.remote(), "stats board"), STATS_S)
        except asyncio.TimeoutError:
            raise ApiError(
                503, f"no answer from the stats board in {STATS_S:g} s; retry", None, RETRY
            ) from None

    @api.post("/v1/generate")
    async def generate(self, request: Request):
        t0, status, bucket = time.perf_counter(), 500, ""
        try:
            raw = await self.gate.read(request, self.settings.max_body_bytes)
            if self.inflight >= self.settings.max_inflight:
                raise ApiError(
                    503,
                    f"{self.inflight} requests are in flight here; retry shortly",
                    None,
                    {"Retry-After": "1"},
                )
            self.inflight += 1
            try:
                bucket, response = await self._generate(raw)
            finally:
                self.inflight -= 1
            status = response.status_code
            return response
        except ApiError as e:
            status = e.status
            return e.response()
        except asyncio.CancelledError:  # the client went away: nothing to answer
            status = 499
            raise
        except Exception as e:  # noqa: BLE001 - one line of JSON, never a traceback
            return internal_error(e).response()
        finally:
            self.m_requests.inc(tags={"status": str(status), "bucket": bucket})
            if status == 200:
                self.m_latency.observe(time.perf_counter() - t0, tags={"bucket": bucket})

    # ---- jobs and the page (litefocus.serve.jobs) ------------------------------------------------
    @api.post("/v1/jobs", status_code=202)
    async def create_job(self, request: Request):
        raw = await self.gate.read(request, self.settings.max_body_bytes)  # slow bodies: as /v1/generate
        req, cond, bucket, options, headers = self._prepare(raw)

        async def work():
            wave = await self._pipeline(req, cond, bucket, options, headers)
            return audio_response(wave, SAMPLE_RATE, req.format, headers)

        return self.jobs.submit(work, seconds=req.seconds, steps=options.steps, headers=headers)

    @api.get("/v1/jobs/{job_id}")
    async def job_status(self, job_id: str) -> dict:
        return self.jobs.status(job_id)

    @api.get("/v1/jobs/{job_id}/events")
    async def job_events(self, job_id: str):
        return self.jobs.events(job_id)

    @api.get("/v1/jobs/{job_id}/audio")
    async def job_audio(self, job_id: str):
        return self.jobs.audio(job_id)

    @api.delete("/v1/jobs/{job_id}")
    async def cancel_job(self, job_id: str) -> dict:
        return self.jobs.cancel(job_id)

    @api.get("/", include_in_schema=False)
    async def page(self):
        return page_response()

    # ---- the request -----------------------------------------------------------------------------
    async def _generate(self, raw: bytes):
        s = self.settings
        req, cond, bucket, options, headers = self._prepare(raw)
        try:
            wave = await asyncio.wait_for(self._pipeline(req, cond, bucket, options, headers), s.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(
                504,
                f"the request took longer than this server's timeout of {s.timeout_s:g} s; "
                "ask for fewer steps or seconds, or retry later",
                None,
            ) from None
        return bucket, audio_response(wave, SAMPLE_RATE, req.format, headers)

    def _prepare(self, raw: bytes):
        """The checked request (POST /v1/generate and POST /v1/jobs): req, cond, bucket, options, headers."""
        s = self.settings
        req = parse_request(raw)
        bucket = self._bucket(req.seconds)
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        options = options_of(req, seed, s.max_steps)
        try:  # the scheduler's own limits (DDIM's last usable step count) too, before any work starts
            make_sampler(options.scheduler, self.runtime.schedule, options.steps)
        except ValueError as e:
            raise field_error("steps", str(e)) from None
        cond = None
        if req.conditioning is not None:
            if req.prompt is not None:
                raise field_error("prompt", "send prompt or conditioning, not both")
            if req.negative_prompt is not None:
                raise field_error(
                    "negative_prompt", "negative_prompt goes with a prompt; with conditioning it is row 0"
                )
            cond = conditioning_of(req.conditioning)
        elif req.prompt is None or not req.prompt.strip():
            raise field_error("prompt", "prompt is missing or empty")
        elif not self.has_text:
            raise ApiError(
                422, "prompt: these engines have no text encoder; send conditioning instead", "prompt"
            )
        headers = {"X-Seed": str(seed), "X-Bucket": bucket}
        return req, cond, bucket, options, headers

    def _bucket(self, seconds: float) -> str:
        if seconds * SAMPLE_RATE < 1:  # not one sample (e.g. 1e-300): no work for nothing
            raise field_error("seconds", f"seconds = {seconds:g} is less than one sample (1/{SAMPLE_RATE} s)")
        try:
            return self.runtime.bucket_for(seconds)
        except ValueError as e:
            if seconds > self.max_seconds:
                raise ApiError(
                    422,
                    f"seconds = {seconds:g} is longer than the largest bucket ({self.max_seconds:g} s); "
                    f"send seconds <= {self.max_seconds:g}",
                    "seconds",
                ) from None
            raise field_error("seconds", str(e)) from None

    async def _pipeline(self, req, cond, bucket: str, options, headers: dict):
        if cond is None:
            cond = await self._call(
                self.text.encode.remote(req.prompt, options.negative_prompt, options.guided), "text encoder"
            )
        result = await self._denoise(bucket, cond, options)
        if "error" in result:
            extra = {"Retry-After": str(result["retry_after"])} if "retry_after" in result else {}
            raise ApiError(result["status"], result["error"], result.get("field"), {**headers, **extra})
        return await self._call(self.decoder.decode.remote(bucket, result["latents"], req.seconds), "decoder")

    async def _denoise(self, bucket: str, cond, options) -> dict:
        """The bucket's denoiser call. A replica lost under it is a 503 (Retry-After): the client
        retries, with the X-Seed it got for the same result, once Serve has restarted the replica."""
        if f"denoiser {bucket}" in await self._not_running():  # e.g. its node is gone: 503 now, no wait
            raise ApiError(
                503, f"the denoiser {bucket} has no replica that answers; retry shortly", None, RETRY
            )
        call = denoise_call(self.denoisers[bucket], cond, options)  # a job's call streams its progress
        return await self._watched(self._call(call, f"denoiser {bucket}"), f"denoiser {bucket}")

    async def _watched(self, call, name: str):
        """``call``, answered 503 once ``name`` has failed LOST_PROBES probes in a row while it runs: a
        request whose replica (or node) is lost under it ends in seconds, not at the timeout."""
        task = asyncio.ensure_future(call)
        misses = 0
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=WATCH_S)
                if done:
                    return task.result()
                misses = misses + 1 if name in await self._not_running() else 0
                if misses >= LOST_PROBES:
                    raise ApiError(503, f"the {name} replica was lost under this request; retry", None, RETRY)
        finally:
            if not task.done():
                task.cancel()  # _call cancels the deployment call: the replica frees the slot

    # ---- readiness ---------------------------------------------------------------------------------
    async def _not_running(self) -> list[str]:
        """The deployments a request needs that do not answer a ping within HEALTH_TIMEOUT_S (one
        probe at a time, its answer reused for HEALTH_CACHE_S: cheap and bounded under a flood)."""
        if self._health is not None and time.monotonic() - self._health[0] < HEALTH_CACHE_S:
            return self._health[1]
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._ping_all())
        return await asyncio.shield(self._probe)

    async def _ping_all(self) -> list[str]:
        targets = {"decoder": self.decoder, **{f"denoiser {b}": d for b, d in self.denoisers.items()}}
        if self.has_text:
            targets = {"text encoder": self.text, **targets}
        alive = await asyncio.gather(*[self._ping(h) for h in targets.values()])
        down = [name for name, ok in zip(targets, alive, strict=True) if not ok]
        self._health = (time.monotonic(), down)
        return down

    @staticmethod
    async def _ping(handle) -> bool:
        """Whether a deployment has a replica that answers (a full one is busy, not down)."""
        response = handle.ping.remote()

        async def answer():
            return await response

        try:
            await asyncio.wait_for(answer(), HEALTH_TIMEOUT_S)
        except BackPressureError:
            return True
        except Exception:  # noqa: BLE001 - lost, failing, not started or too slow: not running
            response.cancel()
            return False
        return True

    @staticmethod
    async def _call(response, what: str):
        """Await a deployment call; cancel it when we are cancelled; Ray failures as ApiError."""
        try:
            return await response
        except (asyncio.CancelledError, RequestCancelledError):
            response.cancel()  # propagate: the downstream replica frees the request's slot
            raise
        except BackPressureError:
            raise ApiError(
                503, f"the {what} is at capacity; retry later", None, {"Retry-After": "1"}
            ) from None
        except LOST as e:
            raise ApiError(
                503,
                f"the {what} replica was lost ({type(e).__name__}); retry: Serve restarts it",
                None,
                {"Retry-After": "2"},
            ) from None
        except RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            logger.error("the %s failed: %s", what, cause)
            raise ApiError(500, f"the {what} failed: {type(cause).__name__}: {str(cause)[:200]}") from None


def build_app(args: dict):
    """The application builder (``import_path: litefocus.serve.app:build_app``)."""
    s = ServeSettings.from_args(args)
    runtime = Runtime.load(s.engines, backend=s.backend)  # the manifest, checked; nothing opened
    buckets = runtime.buckets()

    def options(kind: str, **extra) -> dict:
        actor = {"num_cpus": s.cpus_of(kind), **extra.pop("actor", {})}
        if s.resources_of(kind):  # custom resources pin the kind to the nodes that offer them
            actor["resources"] = s.resources_of(kind)
        return {**s.scaling_of(kind).options(), "ray_actor_options": actor, **extra}

    board = StatsBoard.bind()
    text = TextConditioner.options(**options("text", max_ongoing_requests=64)).bind(s.engines, s.backend)
    decoder_device = "cuda" if s.decoder_gpus > 0 else "cpu"
    decoder = Decoder.options(
        **options("decoder", max_ongoing_requests=64, actor={"num_gpus": s.decoder_gpus})
    ).bind(s.engines, s.backend, decoder_device)
    denoisers = {}
    for b in buckets:
        opts = options(
            "denoiser",
            # past the queue the replica answers "queue full" itself; the router's own queue is a backstop
            max_ongoing_requests=2 * s.queue_size + b["batch_sizes"][-1],
            max_queued_requests=s.queue_size,
            actor={"num_gpus": s.denoiser_gpus},
        )
        auto = opts.get("autoscaling_config")
        if auto is not None and "target_ongoing_requests" not in auto:
            # a replica is busy, not overloaded, while its running batch fills: aim at a full batch
            # of guided requests (Ray's default of 2 would scale out at two requests)
            opts["autoscaling_config"] = {
                **auto,
                "target_ongoing_requests": max(1, b["batch_sizes"][-1] // 2),
            }
        settings = DenoiserSettings(s.engines, b["name"], s.backend, s.device, s.batching, s.queue_size)
        denoisers[b["name"]] = Denoiser.options(name=deployment_name(b["name"]), **opts).bind(settings, board)
    # bodies being read + requests in flight + a reserve that /healthz and /v1/stats always find free
    # (past their caps, generate requests get 503 at once: they never queue in front of /healthz)
    ingress_opts = options(
        "ingress", max_ongoing_requests=s.max_body_readers + s.max_inflight + s.ingress_reserve
    )
    return Ingress.options(**ingress_opts).bind(s.to_args(), text, denoisers, decoder, board)
