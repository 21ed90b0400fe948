"""litefocus.serve.http without Ray: the request model and its one-line errors, bounded body reads,
the option and conditioning checks, audio encoding and the error handlers of a FastAPI app. (The
slow-body gate's eviction and the JSON depth bounds are in test_serve_hostile.py.)"""

from __future__ import annotations

import asyncio
import io
import json
import random
import string

import numpy as np
import pytest
import soundfile as sf
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from litefocus.serve.http import (
    FORMATS,
    HINTS,
    MAX_JSON_DEPTH,
    ApiError,
    BodyGate,
    ConditioningBody,
    GenerateRequest,
    audio_response,
    conditioning_of,
    field_error,
    from_validation,
    install_error_handlers,
    options_of,
    parse_json,
    parse_request,
    read_body,
)


def _word(n: int = 8) -> str:
    return "".join(random.choices(string.ascii_lowercase, k=n))


def _body(**fields) -> bytes:
    return json.dumps({"prompt": _word(), "seconds": 1.0, **fields}).encode()


# ---- ApiError and the one-line messages -----------------------------------------------------------------
def test_api_error_is_one_line_json_with_its_status_and_headers():
    status = random.choice([400, 408, 413, 422, 503, 504])
    words = [_word() for _ in range(5)]
    retry = str(random.randint(1, 9))
    e = ApiError(status, "\n  ".join(words), "seed", {"Retry-After": retry})
    assert e.message == " ".join(words)  # newlines and runs of spaces collapse
    r = e.response()
    assert r.status_code == status and r.headers["Retry-After"] == retry
    assert json.loads(r.body) == {"error": " ".join(words), "field": "seed"}


def test_field_error_names_the_field_and_adds_its_hint_unless_the_problem_says_the_fix():
    field = random.choice(sorted(HINTS))
    problem = f"{_word()} is wrong"
    e = field_error(field, problem)
    assert (e.status, e.field) == (422, field)
    assert e.message == f"{field}: {problem}; send {HINTS[field]}"
    assert field_error(field, f"{field} = 3 is wrong").message.startswith(f"{field} = 3 is wrong; send ")
    fixed = field_error(field, f"{_word()}: choose another")  # the problem already says what to do
    assert "; send" not in fixed.message
    assert field_error("x", "bad", status=400, hint="y").message == "x: bad; send y"
    assert field_error("steps.inner", "bad").message.endswith(HINTS["steps"])  # the hint of the top field


def test_from_validation_names_unknown_missing_and_invalid_fields():
    unknown = from_validation([{"type": "extra_forbidden", "loc": ("body", "colour"), "msg": "x"}])
    assert unknown.field == "colour" and unknown.status == 422
    assert all(name in unknown.message for name in GenerateRequest.model_fields)
    missing = from_validation([{"type": "missing", "loc": ("seconds",), "msg": "Field required"}])
    assert missing.field == "seconds" and "seconds is required" in missing.message
    nested = from_validation([{"type": "int_type", "loc": ("conditioning", "t5_mask", 0, 1), "msg": "bad"}])
    assert nested.field == "conditioning" and nested.message.startswith("conditioning.t5_mask.0.1: bad")
    assert from_validation([{"type": "x", "loc": ()}]).field == "body"


# ---- the request body -------------------------------------------------------------------------------------
def test_parse_request_returns_the_typed_request():
    fields = {
        "seed": random.randrange(2**63),
        "steps": random.randint(1, 500),
        "guidance": random.uniform(1, 10),
        "scheduler": random.choice(["ddim", "dpm++"]),
        "negative_prompt": _word(),
        "format": random.choice(FORMATS),
        "seconds": random.uniform(0.1, 80),
    }
    req = parse_request(_body(**fields))
    assert isinstance(req, GenerateRequest)
    assert {k: getattr(req, k) for k in fields} == fields


@pytest.mark.parametrize(
    "fields, status, field",
    [
        ({"steps": True}, 422, "steps"),  # strict: true is not 1
        ({"steps": "10"}, 422, "steps"),  # nor "10" 10
        ({"seconds": "1"}, 422, "seconds"),
        ({"format": "mp3"}, 422, "format"),
        ({"colour": "red"}, 422, "colour"),
        ({"prompt": "a\x00b"}, 422, "prompt"),
        ({"negative_prompt": 3}, 422, "negative_prompt"),
        (
            {"conditioning": {"gpt2": [[[1.0]]], "t5": [[[1.0]]], "t5_mask": [[1]], "x": 1}},
            422,
            "conditioning",
        ),
    ],
)
def test_parse_request_refuses_wrong_types_with_the_field(fields, status, field):
    with pytest.raises(ApiError) as e:
        parse_request(_body(**fields))
    assert (e.value.status, e.value.field) == (status, field)
    assert "\n" not in e.value.message


def test_parse_request_refuses_bodies_that_are_not_an_object():
    value = random.choice([[1, 2], "text", 3, None])
    with pytest.raises(ApiError) as e:
        parse_request(json.dumps(value).encode())
    assert e.value.status == 400 and e.value.field == "body" and "send a JSON object" in e.value.message


def test_parse_json_keeps_finite_numbers_and_the_depth_limit_is_inclusive():
    value = {"a": [random.uniform(-1e300, 1e300) for _ in range(5)], "b": random.randrange(10**30)}
    assert parse_json(json.dumps(value).encode()) == value
    deep = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert parse_json(deep) is not None
    with pytest.raises(ApiError) as e:
        parse_json(b"[" + deep + b"]")
    assert e.value.status == 400 and str(MAX_JSON_DEPTH) in e.value.message


# ---- options and conditioning --------------------------------------------------------------------------
def test_options_of_builds_the_runtime_options():
    steps, guidance, seed = random.randint(1, 100), random.uniform(1.5, 9), random.randrange(2**63)
    req = parse_request(_body(steps=steps, guidance=guidance, negative_prompt="noise"))
    opts = options_of(req, seed, max_steps=100)
    assert (opts.steps, opts.guidance_scale, opts.seed, opts.negative_prompt) == (
        steps,
        guidance,
        seed,
        "noise",
    )
    assert opts.scheduler == "ddim"


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"steps": 0}, "steps"),
        ({"guidance": 0.5}, "guidance"),
        ({"scheduler": "euler"}, "scheduler"),
        ({"guidance": 1.0, "negative_prompt": "hiss"}, "negative_prompt"),
    ],
)
def test_options_of_names_the_request_field_that_fails(fields, field):
    with pytest.raises(ApiError) as e:
        options_of(parse_request(_body(**fields)), 1, max_steps=1000)
    assert (e.value.status, e.value.field) == (422, field)


def test_options_of_refuses_steps_over_the_server_limit_with_the_limit_as_fix():
    limit = random.randint(1, 500)
    with pytest.raises(ApiError) as e:
        options_of(parse_request(_body(steps=limit + 1)), 1, max_steps=limit)
    assert e.value.field == "steps" and e.value.message.endswith(f"send steps <= {limit}")
    assert options_of(parse_request(_body(steps=limit)), 1, max_steps=limit).steps == limit


def test_conditioning_of_converts_nested_lists_to_arrays():
    b, length, d = random.choice([1, 2]), random.randint(1, 6), random.randint(1, 4)
    rng = np.random.default_rng()
    gpt2, t5 = rng.standard_normal((b, 8, d)), rng.standard_normal((b, length, d))
    mask = rng.integers(0, 2, (b, length))
    body = ConditioningBody(gpt2=gpt2.tolist(), t5=t5.tolist(), t5_mask=mask.tolist())
    cond = conditioning_of(body)
    assert cond.gpt2.dtype == np.float32 and cond.t5_mask.dtype == np.int32
    np.testing.assert_array_equal(cond.gpt2, gpt2.astype(np.float32))
    np.testing.assert_array_equal(cond.t5, t5.astype(np.float32))
    np.testing.assert_array_equal(cond.t5_mask, mask)


@pytest.mark.parametrize(
    "gpt2, t5, mask, fragment",
    [
        ([[[1.0, 2.0], [1.0]]], [[[1.0]]], [[1]], ""),  # ragged
        ([[[1.0]]], [[[1.0]]], [[2**40]], "past int32"),
        ([[[1.0]]], [[[1.0]]], [[2]], "t5_mask"),
        ([[[1.0]] * 8] * 2, [[[1.0]]], [[1]], "mismatch"),
    ],
)
def test_conditioning_of_refuses_bad_arrays_as_a_conditioning_422(gpt2, t5, mask, fragment):
    with pytest.raises(ApiError) as e:
        conditioning_of(ConditioningBody(gpt2=gpt2, t5=t5, t5_mask=mask))
    assert (e.value.status, e.value.field) == (422, "conditioning")
    assert fragment in e.value.message and "\n" not in e.value.message


# ---- audio ----------------------------------------------------------------------------------------------
def test_audio_response_f32_is_the_raw_little_endian_samples():
    wave = np.random.default_rng().uniform(-1, 1, random.randint(1, 5000)).astype(np.float32)
    rate = random.choice([16000, 22050, 44100])
    r = audio_response(wave, rate, "f32", {"X-Seed": "7"})
    assert r.media_type == "application/octet-stream"
    assert r.headers["X-Sample-Rate"] == str(rate) and r.headers["X-Seed"] == "7"
    np.testing.assert_array_equal(np.frombuffer(r.body, "<f4"), wave)


def test_audio_response_wav_is_16_bit_pcm_of_the_wave():
    wave = np.random.default_rng().uniform(-0.9, 0.9, random.randint(100, 5000)).astype(np.float32)
    r = audio_response(wave, 16000, "wav", {})
    assert r.media_type == "audio/wav" and r.headers["X-Sample-Rate"] == "16000"
    info = sf.info(io.BytesIO(r.body))
    assert (info.samplerate, info.subtype, info.frames) == (16000, "PCM_16", len(wave))
    back, _ = sf.read(io.BytesIO(r.body), dtype="float32")
    np.testing.assert_allclose(back, wave, atol=1.5 / 32768)


def test_audio_response_refuses_non_finite_waves_as_a_500():
    wave = np.zeros(random.randint(2, 100), np.float32)
    wave[random.randrange(len(wave))] = random.choice([np.nan, np.inf, -np.inf])
    with pytest.raises(ApiError) as e:
        audio_response(wave, 16000, random.choice(FORMATS), {})
    assert e.value.status == 500 and "NaN or infinity" in e.value.message


# ---- bounded body reads and the error handlers, over a FastAPI app ---------------------------------------
def _app(limit: int) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    gate = BodyGate(limit=4, timeout_s=5)

    @app.post("/read")
    async def read(request: Request):
        return {"size": len(await read_body(request, limit))}

    @app.post("/gate")
    async def gated(request: Request):
        return {"size": len(await gate.read(request, limit))}

    @app.post("/generate")
    async def generate(request: Request):
        return {"seconds": parse_request(await read_body(request, limit)).seconds}

    @app.get("/typed")
    async def typed(n: int):
        return {"n": n}

    return app


@pytest.mark.parametrize("route", ["/read", "/gate"])
def test_bodies_up_to_the_limit_are_read_larger_ones_are_413(route):
    limit = random.randint(10, 5000)
    client = TestClient(_app(limit), raise_server_exceptions=False)
    assert client.post(route, content=b"x" * limit).json() == {"size": limit}
    r = client.post(route, content=b"x" * (limit + 1))
    assert r.status_code == 413 and r.json()["field"] == "body" and str(limit) in r.json()["error"]

    def chunks():  # no content-length: refused while it streams
        for _ in range(limit // 10 + 2):
            yield b"y" * 10

    r = client.post(route, content=chunks())
    assert r.status_code == 413 and r.json()["field"] == "body"


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    class Declared:
        headers = {"content-length": "1000"}

        async def stream(self):
            raise AssertionError("the body was read")
            yield b""  # pragma: no cover

    with pytest.raises(ApiError) as e:
        asyncio.run(read_body(Declared(), 999))
    assert e.value.status == 413


def test_the_app_answers_every_error_in_one_line_of_json():
    client = TestClient(_app(1 << 16), raise_server_exceptions=False)
    seconds = random.uniform(0.1, 80)
    assert client.post("/generate", content=_body(seconds=seconds)).json() == {"seconds": seconds}
    cases = [
        (client.post("/generate", content=b"{not json"), 400, "body"),
        (client.post("/generate", content=_body(steps="1")), 422, "steps"),
        (client.get("/typed", params={"n": "x"}), 422, "query"),  # FastAPI's own validation: query.n
        (client.get("/missing"), 404, None),
        (client.get("/read"), 405, None),
    ]
    for r, status, field in cases:
        assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
        body = r.json()
        assert set(body) == {"error", "field"} and body["field"] == field and "\n" not in body["error"]
    assert cases[2][0].json()["error"].startswith("query.n: ")
    assert "GET /v1/engines" in cases[3][0].json()["error"]  # a 404 names the routes
