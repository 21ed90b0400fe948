"""The HTTP surface: the request body model, one-line JSON errors, body limits and audio encoding.

Every error a client sees is ``{"error": "<one line: the field and the fix>", "field": "<name>"}``
with a 4xx/5xx status: 400 (not JSON), 413 (body too large), 422 (a field), 503 (queue full or a
replica lost: ``Retry-After``), 504 (timeout), 500 (a failure on our side).
"""

from __future__ import annotations

import io
import json
import re
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError

from litefocus.runtime.sampling import Conditioning, GenerateOptions

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


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past ``limit`` bytes (before reading it when the length is declared)."""
    declared = request.headers.get("content-length")
    too_big = ApiError(413, f"the request body is over {limit} bytes; send a smaller body", "body")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def parse_request(raw: bytes) -> GenerateRequest:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(
            400, f"the body is not JSON ({e.__class__.__name__}: {e}); send a JSON object", "body"
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body is a JSON {type(body).__name__}; send a JSON object", "body")
    try:
        return GenerateRequest.model_validate(body)
    except ValidationError as e:
        raise from_validation(e.errors()) from None


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
    except ValueError as e:  # ragged lists, wrong ranks or batches
        raise field_error("conditioning", str(e).split("\n")[0]) from None


def audio_response(wave: np.ndarray, sample_rate: int, fmt: str, headers: dict) -> Response:
    """16-bit PCM WAV, or raw little-endian float32 (the rate in ``X-Sample-Rate``)."""
    headers = {**headers, "X-Sample-Rate": str(sample_rate)}
    if fmt == "f32":
        data = np.ascontiguousarray(wave, dtype="<f4").tobytes()
        return Response(data, media_type="application/octet-stream", headers=headers)
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, sample_rate, subtype="PCM_16", format="WAV")
    return Response(buf.getvalue(), media_type="audio/wav", headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """FastAPI's own 422s and our ApiError in the one-line format."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return from_validation(list(exc.errors())).response()
