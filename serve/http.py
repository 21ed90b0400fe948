"""The HTTP surface: the request body model, one-line JSON errors, body limits and audio encoding.

Every error a client sees is ``{"error": "<one line: the field and the fix>", "field": "<name>"}``
with a 4xx/5xx status: 400 (not JSON, nested deeper than ``MAX_JSON_DEPTH``, a number Python will not
parse), 404/405 (no such route or method), 408 (the body came too slowly), 413 (body too large), 422
(a field), 503 (queue full, too many requests at once, a replica lost: ``Retry-After``), 504 (timeout),
500 (a failure on our side: still one line of JSON, never a traceback).

``BodyGate`` bounds the requests that are still sending their bodies (slow-body floods): a deadline per
body, and a cap on bodies read at once where a new request evicts the slowest reader.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import re
import time
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from litefocus.runtime.inputs import check_prompt
from litefocus.runtime.options import Conditioning, GenerateOptions

logger = logging.getLogger(__name__)
MAX_JSON_DEPTH = 16  # a request nests 5 deep (conditioning lists); deeper bodies are refused before parsing

FORMATS = ("wav", "f32")
HINTS = {  # what to send instead, per field (the 422 line's fix)
    "prompt": "a non-empty text prompt (or conditioning instead)",
    "conditioning": "gpt2 [B, 8, D], t5 [B, L, D] and t5_mask [B, L] as nested lists (B = 2 guided, 1 not)",
    "seconds": "a number of seconds > 0 (GET /v1/engines lists the buckets)",
    "seed": "an integer in [0, 2**63), or leave it out for a random one",
    "steps": "an integer >= 1",
    "guidance": "a number >= 1 (1 = no guidance)",
    "scheduler": "ddim or dpm++",
    "negative_prompt": "a string, with guidance > 1",
    "format": "wav or f32",
}
OPTION_FIELDS = (  # request field -> GenerateOptions field, checked one at a time to name the culprit
    ("steps", "steps"),
    ("guidance", "guidance_scale"),
    ("scheduler", "scheduler"),
    ("seed", "seed"),
)


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = " ".join(str(message).split())  # one line
        self.field = field
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": self.message, "field": self.field}, status_code=self.status, headers=self.headers
        )


class ConditioningBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    gpt2: list[list[list[float]]]
    t5: list[list[list[float]]]
    t5_mask: list[list[int]]


class GenerateRequest(BaseModel):
    """``POST /v1/generate``. Types here (strict: ``true`` is not 1, ``"10"`` is not 10); values
    are checked by the runtime's own rules."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str | None = None
    conditioning: ConditioningBody | None = None
    seconds: float
    seed: int | None = None
    steps: int = 200
    guidance: float = 3.5
    scheduler: str = "ddim"
    negative_prompt: str | None = None
    format: Literal["wav", "f32"] = "wav"


def field_error(field: str, problem: str, status: int = 422, hint: str | None = None) -> ApiError:
    """One line: the field, the problem and the fix (``HINTS`` unless the problem names one)."""
    if hint is None and not re.search(r"\b(choose|use|send|drop)\b", problem):
        hint = HINTS.get(field.split(".")[0])
    text = problem if problem.startswith(field) else f"{field}: {problem}"
    return ApiError(status, f"{text}; send {hint}" if hint else text, field)


def from_validation(errors: list[dict]) -> ApiError:
    """pydantic's first error as one line naming the field."""
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    field = loc[0] if loc else "body"
    where = ".".join(loc) or "body"
    if err.get("type") == "extra_forbidden":
        known = ", ".join(GenerateRequest.model_fields)
        return ApiError(422, f"{where} is not a field of this request; the fields are {known}", field)
    if err.get("type") == "missing":
        return field_error(field, f"{where} is required")
    return field_error(field, f"{where}: {err.get('msg', 'invalid value')}")


async def read_body(request: Request, limit: int, progress: list | None = None) -> bytes:
    """The body, refused with 413 past ``limit`` bytes (before reading it when the length is declared);
    ``progress[1]`` counts the bytes read so far (for ``BodyGate``)."""
    declared = request.headers.get("content-length")
    too_big = ApiError(413, f"the request body is over {limit} bytes; send a smaller body", "body")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if progress is not None:
            progress[1] = size
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')  # a JSON string, escapes included


def json_depth(raw: bytes) -> int:
    """How deep ``raw`` nests arrays and objects (brackets inside strings do not count): checked
    before ``json.loads``, whose recursion would fail deep inside (RecursionError) or take the stack."""
    bare = np.frombuffer(_JSON_STRING.sub(b'""', raw), np.uint8)
    opens = (bare == ord("[")).astype(np.int32) + (bare == ord("{"))
    closes = (bare == ord("]")).astype(np.int32) + (bare == ord("}"))
    return int(np.cumsum(opens - closes).max(initial=0))


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes, max_depth: int = MAX_JSON_DEPTH):
    """``raw`` as JSON, or a 400 ApiError in one line: not UTF-8 / not JSON, nested deeper than
    ``max_depth``, NaN or Infinity, a float out of range, an integer past Python's digit limit."""
    if json_depth(raw) > max_depth:
        raise ApiError(400, f"the body nests deeper than {max_depth} levels; send a flat JSON object", "body")
    try:
        return json.loads(raw, parse_float=_finite_float, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(
            400, f"the body is not JSON ({e.__class__.__name__}: {str(e)[:200]}); send a JSON object", "body"
        ) from None
    except (ValueError, RecursionError) as e:  # big ints, NaN, 1e999 (and a recursion backstop)
        problem = str(e).split(";")[0][:200] if not isinstance(e, RecursionError) else "nested too deep"
        raise ApiError(
            400, f"the body is not usable JSON: {problem}; send finite, smaller numbers", "body"
        ) from None


def parse_request(raw: bytes) -> GenerateRequest:
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise ApiError(400, f"the body is a JSON {type(body).__name__}; send a JSON object", "body")
    try:
        req = GenerateRequest.model_validate(body)
    except ValidationError as e:
        raise from_validation(e.errors()) from None
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name)
        if text is not None:
            try:
                check_prompt(text, name)
            except ValueError as e:
                raise field_error(name, str(e)) from None
    return req


def options_of(req: GenerateRequest, seed: int, max_steps: int) -> GenerateOptions:
    """The request's ``GenerateOptions`` (validated by the runtime), naming the field that fails."""
    values = {"steps": req.steps, "guidance": req.guidance, "scheduler": req.scheduler, "seed": seed}
    for api, name in OPTION_FIELDS:
        try:
            GenerateOptions(**{name: values[api]})
        except ValueError as e:
            raise field_error(api, str(e)) from None
    if req.steps > max_steps:
        raise field_error(
            "steps",
            f"steps = {req.steps} is over this server's limit of {max_steps}",
            hint=f"steps <= {max_steps}",
        )
    try:
        return GenerateOptions(
            steps=req.steps,
            guidance_scale=req.guidance,
            scheduler=req.scheduler,
            seed=seed,
            negative_prompt=req.negative_prompt,
        )
    except ValueError as e:
        raise field_error("negative_prompt", str(e)) from None


def conditioning_of(body: ConditioningBody) -> Conditioning:
    try:
        return Conditioning(
            gpt2=np.asarray(body.gpt2, np.float32),
            t5=np.asarray(body.t5, np.float32),
            t5_mask=np.asarray(body.t5_mask, np.int32),
        )
    except OverflowError:  # a t5_mask value past int32
        raise field_error(
            "conditioning", "conditioning.t5_mask holds a value past int32; send 0 or 1"
        ) from None
    except ValueError as e:  # ragged lists, wrong ranks or batches, values out of the runtime's bounds
        raise field_error("conditioning", str(e).split("\n")[0]) from None


def audio_response(wave: np.ndarray, sample_rate: int, fmt: str, headers: dict) -> Response:
    """16-bit PCM WAV, or raw little-endian float32 (the rate in ``X-Sample-Rate``)."""
    if not np.isfinite(wave).all():  # never audio from a broken result
        raise ApiError(
            500, "the result holds NaN or infinity; retry with lower guidance or other conditioning", None
        )
    headers = {**headers, "X-Sample-Rate": str(sample_rate)}
    if fmt == "f32":
        data = np.ascontiguousarray(wave, dtype="<f4").tobytes()
        return Response(data, media_type="application/octet-stream", headers=headers)
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, sample_rate, subtype="PCM_16", format="WAV")
    return Response(buf.getvalue(), media_type="audio/wav", headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error of the app in the one-line JSON format: ApiError, FastAPI's own 422s, Starlette's
    404/405 (any HTTPException), and any other exception as a 500 (logged here, one line out)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return from_validation(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return http_error(exc.status_code, str(exc.detail), dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception):
        return internal_error(exc).response()


def http_error(status: int, detail: str, headers: dict | None = None) -> ApiError:
    """Starlette's 404/405/... as one line that says what to do."""
    hint = {
        404: "no such route; see GET /v1/engines, POST /v1/generate, GET /healthz, GET /v1/stats",
        405: "this route does not take that method",
    }.get(status)
    return ApiError(status, f"{detail}: {hint}" if hint else detail, None, headers)


def internal_error(exc: BaseException) -> ApiError:
    """A failure on our side: logged with its traceback here, one line for the client."""
    logger.error("request failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return ApiError(500, f"internal error ({type(exc).__name__}); retry, or report it if it persists", None)


class BodyGate:
    """Bounds the request bodies being read at once (``limit``) and each body's time (``timeout_s``).

    A body that arrives within ``probation_s`` (any real client's: it comes with the headers) is read
    without taking a reader. Slower ones need one of ``limit`` readers; when all are taken, the new
    request evicts the slowest reader (the fewest bytes per second) that has been reading for at least
    ``grace_s``, or else gets 503 with Retry-After at once. A flood of bodies sent byte by byte thus
    holds at most ``limit`` readers, each for at most ``timeout_s``, and never keeps a request whose
    body arrives at once from being read. Pure asyncio: one per ingress replica.

    An answered request leaves the connection open (uvicorn drops what else the client sends): a
    slow-body client that keeps dribbling holds a socket in the proxy, no longer an ingress slot."""

    def __init__(self, limit: int, timeout_s: float, grace_s: float = 1.0, probation_s: float = 0.1):
        self.limit, self.timeout_s, self.grace_s, self.probation_s = limit, timeout_s, grace_s, probation_s
        self.readers: dict[asyncio.Task, list] = {}  # task -> [start, bytes so far]
        self._evicted: set[asyncio.Task] = set()
        self.probation = 0
        self.evicted = 0
        self.timed_out = 0

    async def read(self, request: Request, max_bytes: int) -> bytes:
        progress = [time.monotonic(), 0]
        task = asyncio.ensure_future(read_body(request, max_bytes, progress))
        try:
            if self.probation < self.limit:  # the quick bodies: no reader needed
                self.probation += 1
                try:
                    await asyncio.wait({task}, timeout=self.probation_s)
                finally:
                    self.probation -= 1
                if task.done():
                    return task.result()
            if len(self.readers) - len(self._evicted) >= self.limit and not self._evict():
                raise ApiError(
                    503,
                    f"{self.limit} request bodies are being read already; retry shortly",
                    None,
                    {"Retry-After": "1"},
                )
            self.readers[task] = progress
            left = self.timeout_s - (time.monotonic() - progress[0])
            return await asyncio.wait_for(asyncio.shield(task), max(left, 0.001))
        except asyncio.TimeoutError:
            self.timed_out += 1
            raise ApiError(
                408,
                f"the request body did not arrive within {self.timeout_s:g} s; send it at once",
                "body",
            ) from None
        except asyncio.CancelledError:
            if task in self._evicted:  # evicted, not our caller going away
                raise ApiError(
                    408,
                    "the request body came too slowly and other requests were waiting; send it at once",
                    "body",
                ) from None
            raise
        finally:
            self.readers.pop(task, None)
            self._evicted.discard(task)
            task.cancel()

    def _evict(self) -> bool:
        now = time.monotonic()
        old = [
            (n / (now - t0), t0, task)
            for task, (t0, n) in self.readers.items()
            if now - t0 >= self.grace_s and task not in self._evicted
        ]
        if not old:
            return False
        _, _, task = min(old, key=lambda x: x[:2])  # the slowest; of equals, the oldest
        self._evicted.add(task)
        task.cancel()
        self.evicted += 1
        return True
