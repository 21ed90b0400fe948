"""Jobs: the asynchronous shape of ``POST /v1/generate`` (submit, follow, fetch, cancel), and the page.

    POST   /v1/jobs              same body as /v1/generate -> 202 {"id", ...} (Location: /v1/jobs/<id>)
    GET    /v1/jobs/<id>         state (queued, running, decoding, done, failed, cancelled, lost),
                                 step of steps, queue_position (1 = next in the denoiser's queue)
    GET    /v1/jobs/<id>/events  Server-Sent Events: the state as it changes; ends at a final state
    GET    /v1/jobs/<id>/audio   the audio (headers X-Seed, X-Bucket, X-Sample-Rate); 409 until done
    DELETE /v1/jobs/<id>         cancels (down to the denoiser: the slot leaves at the next step);
                                 a finished job is forgotten
    GET    /                     one self-contained HTML page to listen (``page.html``)

``JobManager`` is pure asyncio (no Ray): the ingress hands it ``work()``, a coroutine function that
returns the audio ``Response``. A job's denoiser call streams progress (``denoise_call``: the
``Denoiser.denoise_stream`` method) into the job while ``SINK`` holds it in the job's context.

Bounds (``JobLimits``): jobs kept (any state), seconds of audio kept or in progress, finished jobs'
lifetime (a reaper), event subscribers per job and in all. Jobs live in the ingress replica that made
them: an id from a restarted ingress (or another replica) is 410 "lost", never a 500.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import secrets
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from litefocus.serve.http import ApiError

logger = logging.getLogger(__name__)

FINAL = ("done", "failed", "cancelled", "lost")
STATES = ("queued", "running", "decoding", *FINAL)
ID = re.compile(r"[0-9a-f]{8}-[A-Za-z0-9_-]{16}")
REPLICA_LOST = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError)
# the job whose denoiser call runs in this context (set by JobManager in the job's own task)
SINK: contextvars.ContextVar = contextvars.ContextVar("litefocus_job", default=None)


@dataclass(frozen=True)
class JobLimits:
    max_jobs: int = 64  # jobs kept, in any state (past it: the oldest finished goes, or 429)
    max_audio_s: float = 1200.0  # seconds of audio kept or in progress, all jobs together (~77 MB f32)
    ttl_s: float = 600.0  # a finished job (and its audio) is kept this long
    max_subscribers: int = 64  # open event streams, all jobs together
    max_subscribers_per_job: int = 4
    heartbeat_s: float = 15.0  # an SSE comment line this often keeps proxies from closing a quiet stream
    reap_every_s: float = 5.0

    def __post_init__(self):
        for name in ("max_jobs", "max_subscribers", "max_subscribers_per_job"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("max_audio_s", "ttl_s", "heartbeat_s", "reap_every_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < float("inf"):
                raise ValueError(f"{name} must be a number of seconds > 0, got {v!r}")


class JobLost(Exception):
    """The replica running the job went away under it."""


@dataclass(eq=False)
class Job:
    id: str
    seconds: float
    steps: int
    headers: dict
    state: str = "queued"
    step: int = 0
    queue_position: int | None = None
    error: str | None = None
    finished: float | None = None  # monotonic
    audio: Response | None = None
    task: asyncio.Task | None = None
    version: int = 0
    streams: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # its open event streams
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def progress(self, step: int, steps: int, queue_position: int) -> None:
        """The denoiser's progress (``queue_position`` 0: in the running batch)."""
        if self.final or self.state == "decoding":
            return
        self._set(
            "running" if queue_position == 0 else "queued",
            step=step,
            steps=steps,
            queue_position=queue_position,
        )

    def decoding(self) -> None:
        if not self.final:
            self._set("decoding", step=self.steps, queue_position=0)

    def _set(self, state: str, **values) -> None:
        assert state in STATES, state
        self.state = state
        for k, v in values.items():
            setattr(self, k, v)
        self.version += 1
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()  # wakes every subscriber; they wait on the new event next

    def snapshot(self, now: float, ttl_s: float) -> dict:
        expires = None if self.finished is None else max(0.0, round(self.finished + ttl_s - now, 1))
        return {
            "id": self.id,
            "state": self.state,
            "step": self.step,
            "steps": self.steps,
            "queue_position": self.queue_position,
            "seconds": self.seconds,
            "seed": self.headers.get("X-Seed"),
            "bucket": self.headers.get("X-Bucket"),
            "error": self.error,
            "expires_in_s": expires,
        }


class JobManager:
    """The jobs of one ingress replica (see the module docstring). Call from its event loop."""

    def __init__(self, limits: JobLimits | None = None, clock=time.monotonic):
        self.limits = limits or JobLimits()
        self.clock = clock
        self.epoch = secrets.token_hex(4)  # ids of another (or a restarted) replica do not start with it
        self.jobs: dict[str, Job] = {}  # in creation order
        self.expired: deque[str] = deque(maxlen=4 * self.limits.max_jobs)
        # one ticket per event stream, held by the stream: a stream that ends, or is dropped unstarted
        # (its client went away before the first byte), lets go of its ticket
        self.streams: weakref.WeakSet = weakref.WeakSet()
        self._reaper: asyncio.Task | None = None

    # ---- the endpoints -----------------------------------------------------------------------
    def submit(self, work, *, seconds: float, steps: int, headers: dict) -> JSONResponse:
        """Start ``work()`` as a job: 202 with its state and ``Location``; 429 when full."""
        self.reap()
        self._make_room(seconds)
        job = Job(f"{self.epoch}-{secrets.token_urlsafe(12)}", float(seconds), int(steps), dict(headers))
        self.jobs[job.id] = job
        job.task = asyncio.get_running_loop().create_task(self._run(job, work), name=f"job-{job.id}")
        self._ensure_reaper()
        location = f"/v1/jobs/{job.id}"
        return JSONResponse(self._snapshot(job), status_code=202, headers={"Location": location})

    def status(self, job_id: str) -> dict:
        return self._snapshot(self.get(job_id))

    def audio(self, job_id: str) -> Response:
        job = self.get(job_id)
        if job.state != "done":
            why = f": {job.error}" if job.error else ""
            raise ApiError(
                409,
                f"job {job.id} is {job.state}{why}; its audio is ready when its state is done "
                f"(GET /v1/jobs/{job.id} or /events)",
                "id",
            )
        a = job.audio
        return Response(a.body, media_type=a.media_type, headers=_x_headers(a))

    def cancel(self, job_id: str) -> dict:
        """Cancel a job in progress (kept, state cancelled); forget a finished one."""
        job = self.get(job_id)
        if job.final:
            self._drop(job)
            return {**self._snapshot(job), "forgotten": True}
        job.task.cancel()  # down to the denoiser: the streaming call is cancelled
        self._finish(job, "cancelled", "cancelled by DELETE /v1/jobs/<id>")
        return self._snapshot(job)

    def events(self, job_id: str) -> StreamingResponse:
        job = self.get(job_id)
        lim = self.limits
        if len(self.streams) >= lim.max_subscribers or len(job.streams) >= lim.max_subscribers_per_job:
            raise ApiError(
                429,
                f"too many event streams (at most {lim.max_subscribers_per_job} per job and "
                f"{lim.max_subscribers} in all); poll GET /v1/jobs/{job.id} instead",
                None,
                {"Retry-After": "5"},
            )
        ticket = _Ticket()
        self.streams.add(ticket)
        job.streams.add(ticket)
        return StreamingResponse(
            self._stream(job, ticket),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def get(self, job_id: str) -> Job:
        self.reap()
        job = self.jobs.get(job_id)
        if job is not None:
            return job
        if not ID.fullmatch(job_id):
            raise ApiError(404, f"{job_id[:40]!r} is not a job id; POST /v1/jobs returns one", "id")
        if job_id in self.expired:
            raise ApiError(
                410,
                f"job {job_id} expired (finished jobs are kept {self.limits.ttl_s:g} s, at most "
                f"{self.limits.max_jobs}); submit it again with its seed for the same audio",
                "id",
            )
        if not job_id.startswith(self.epoch + "-"):
            raise ApiError(
                410,
                f"job {job_id} is lost: it was made by an ingress replica that restarted or by "
                "another replica; submit it again with its seed for the same audio",
                "id",
            )
        raise ApiError(404, f"job {job_id} is unknown to this server; POST /v1/jobs returns ids", "id")

    # ---- running and bounding -------------------------------------------------------------------
    async def _run(self, job: Job, work) -> None:
        SINK.set(job)  # this task's own context: the denoiser call inside work() streams into job
        try:
            response = await work()
        except asyncio.CancelledError:
            self._finish(job, "cancelled", "cancelled by DELETE /v1/jobs/<id>")
            return
        except JobLost as e:
            self._finish(job, "lost", str(e))
        except ApiError as e:
            lost = e.status == 503 and "lost" in e.message
            self._finish(job, "lost" if lost else "failed", e.message)
        except Exception as e:  # noqa: BLE001 - the job says what failed; serving goes on
            logger.exception("job %s failed", job.id)
            self._finish(job, "failed", f"{type(e).__name__}: {str(e)[:200]}")
        else:
            job.audio = response
            self._finish(job, "done", None)

    def _finish(self, job: Job, state: str, error: str | None) -> None:
        if job.final:
            return
        job.finished = self.clock()
        job._set(state, error=None if error is None else " ".join(error.split()))
        if state != "done":
            job.audio = None

    def _make_room(self, seconds: float) -> None:
        """Drop the oldest finished jobs while the new one does not fit; 429 if it still does not."""
        lim = self.limits
        for job in [j for j in self.jobs.values() if j.final]:
            if len(self.jobs) < lim.max_jobs and self._audio_s() + seconds <= lim.max_audio_s:
                break
            self._drop(job)
        if len(self.jobs) >= lim.max_jobs or self._audio_s() + seconds > lim.max_audio_s:
            raise ApiError(
                429,
                f"{len(self.jobs)} jobs with {self._audio_s():g} s of audio are in progress (this server "
                f"runs at most {lim.max_jobs} jobs and {lim.max_audio_s:g} s of audio); retry later",
                None,
                {"Retry-After": "5"},
            )

    def _audio_s(self) -> float:  # audio kept (done) or to come (in progress)
        return sum(j.seconds for j in self.jobs.values() if j.state == "done" or not j.final)

    def reap(self) -> None:
        """Drop finished jobs older than the TTL."""
        now = self.clock()
        for job in [j for j in self.jobs.values() if j.final and now - j.finished > self.limits.ttl_s]:
            self._drop(job)

    def _drop(self, job: Job) -> None:
        self.jobs.pop(job.id, None)
        self.expired.append(job.id)
        job.audio = None

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever(), name="job-reaper")

    async def _reap_forever(self) -> None:
        while self.jobs:
            await asyncio.sleep(self.limits.reap_every_s)
            self.reap()

    def close(self) -> None:
        for job in list(self.jobs.values()):
            if job.task is not None:
                job.task.cancel()
        if self._reaper is not None:
            self._reaper.cancel()

    def _snapshot(self, job: Job) -> dict:
        return job.snapshot(self.clock(), self.limits.ttl_s)

    @property
    def subscribers(self) -> int:
        return len(self.streams)

    async def _stream(self, job: Job, ticket: _Ticket):
        try:
            seen = -1
            while True:
                changed = job.changed
                if job.version != seen:
                    seen = job.version
                    yield f"id: {seen}\ndata: {json.dumps(self._snapshot(job))}\n\n"
                if job.final:
                    return
                try:
                    await asyncio.wait_for(changed.wait(), self.limits.heartbeat_s)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
        finally:
            self.streams.discard(ticket)
            job.streams.discard(ticket)


class _Ticket:
    """An open event stream (weakly counted)."""


# ---- the denoiser call of a job (Ray) --------------------------------------------------------------
def denoise_call(handle, cond, options):
    """The denoiser call for ``Ingress._denoise``: the plain ``denoise`` outside a job; inside one
    (``SINK`` set) a task over the streaming ``denoise_stream`` that feeds the job its progress."""
    job = SINK.get()
    if job is None:
        return handle.denoise.remote(cond, options)
    return asyncio.ensure_future(_stream_denoise(handle, cond, options, job))


async def _stream_denoise(handle, cond, options, job: Job) -> dict:
    stream = handle.options(stream=True).denoise_stream.remote(cond, options)
    try:
        async for item in stream:
            if "progress" in item:
                p = item["progress"]
                job.progress(p["step"], p["steps"], p["queue_position"])
            else:
                if "latents" in item:
                    job.decoding()
                return item
    except asyncio.CancelledError:
        stream.cancel()  # the replica's generator is cancelled: the slot leaves the batch
        raise
    except REPLICA_LOST as e:
        raise JobLost(
            f"the denoiser replica was lost under this job ({type(e).__name__}); submit it again "
            "with its seed for the same audio"
        ) from None
    raise RuntimeError("the denoiser's stream ended without a result")


# ---- the page ---------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _page() -> str:
    return resources.files("litefocus.serve").joinpath("page.html").read_text(encoding="utf-8")


def page_response() -> HTMLResponse:
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})


def _x_headers(response: Response) -> dict:
    return {k: v for k, v in response.headers.items() if k.lower().startswith("x-")}
