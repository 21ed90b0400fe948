"""litefocus.serve.jobs and the step loop's progress, without Ray (pure asyncio, fake work and UNet).
The jobs API over HTTP, on a local cluster, is in tests/serve/test_page.py (with the page)."""

from __future__ import annotations

import asyncio
import json
import random
import threading

import pytest
from serve_helpers import FakeSlot, new_loop

from litefocus.serve.denoiser import progress_stream
from litefocus.serve.http import ApiError
from litefocus.serve.jobs import SINK, JobLimits, JobLost, JobManager


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def api_error(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as caught:
        fn(*args)
    e = caught.value
    assert e.message and "\n" not in e.message
    return e


def body(response) -> dict:
    return json.loads(response.body)


# ---- the step loop tells each request where it is ------------------------------------------------
def test_progress_tells_queue_position_then_each_step():
    async def main():
        loop, unet, _ = new_loop(capacity=2)
        unet.gate = threading.Event()
        seen = {"a": [], "b": [], "c": []}
        steps = {"a": random.randint(2, 4), "b": random.randint(1, 3), "c": 2}

        def tell(name):
            return lambda step, n, position: seen[name].append((step, n, position))

        tasks = [
            asyncio.ensure_future(loop.run(FakeSlot(2, steps[k], name=k), progress=tell(k))) for k in "abc"
        ]
        while not unet.entered.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        waiting = (seen["b"][-1][2], seen["c"][-1][2])
        unet.gate.set()
        await asyncio.gather(*tasks)
        return seen, steps, waiting

    seen, steps, waiting = run(main())
    assert waiting == (1, 2)  # b is next in line, c behind it
    for name, n in steps.items():
        ran = [(s, k) for s, k, p in seen[name] if p == 0]
        assert ran == [(0, n)] + [(i, n) for i in range(1, n + 1)], (name, seen[name])
    assert seen["c"][0][2] == 3 and [p for _, _, p in seen["c"]].index(0) > 0


def test_a_failing_progress_callback_does_not_stop_the_batch():
    def boom(*_):
        raise RuntimeError("listener bug")

    async def main():
        loop, _, _ = new_loop(capacity=4)
        return await asyncio.gather(loop.run(FakeSlot(2, 3), progress=boom), loop.run(FakeSlot(2, 2)))

    assert all(s.done for s in run(main()))


def test_progress_stream_yields_progress_then_the_result_and_closing_it_frees_the_slot():
    async def main():
        loop, unet, _ = new_loop(capacity=2)
        n = random.randint(3, 6)
        items = [item async for item in progress_stream(lambda: loop.run(FakeSlot(2, n, name="a")))]
        assert items[-1].name == "a" and items[-1].done
        steps = [i["progress"]["step"] for i in items[:-1]]
        assert (
            steps == sorted(steps) and steps[-1] == n and {i["progress"]["steps"] for i in items[:-1]} == {n}
        )
        unet.gate = threading.Event()
        stream = progress_stream(lambda: loop.run(FakeSlot(2, 1000, name="long")))
        first = await anext(stream)
        assert first["progress"]["queue_position"] == 0
        await stream.aclose()  # the caller went away (Serve cancels the replica's generator)
        unet.gate.set()
        after = await loop.run(FakeSlot(2, 1, name="after"))
        return loop, after

    loop, after = run(main())
    assert after.done and loop.stats.cancelled == 1 and loop.active == 0


# ---- jobs ------------------------------------------------------------------------------------------
def fake_work(steps: int, gate: asyncio.Event | None = None, fail: Exception | None = None):
    """A job's work: reports progress to the job in SINK like the denoiser call does, then audio."""
    from fastapi.responses import Response

    async def work():
        job = SINK.get()
        job.progress(0, steps, 2)
        job.progress(0, steps, 1)
        for k in range(steps + 1):
            job.progress(k, steps, 0)
            await asyncio.sleep(0)
        if gate is not None:
            await gate.wait()
        if fail is not None:
            raise fail
        job.decoding()
        return Response(
            b"RIFFwave", media_type="audio/wav", headers={"X-Seed": "7", "X-Sample-Rate": "16000"}
        )

    return work


HEADERS = {"X-Seed": "7", "X-Bucket": "1p28s-fp32"}


async def until_final(jobs: JobManager, job_id: str) -> dict:
    for _ in range(1000):
        s = jobs.status(job_id)
        if s["state"] in ("done", "failed", "cancelled", "lost"):
            return s
        await asyncio.sleep(0.001)
    raise AssertionError(f"job {job_id} never finished: {s}")


def test_a_job_goes_queued_running_done_with_audio_and_events_end_at_done():
    async def main():
        jobs = JobManager()
        gate = asyncio.Event()
        n = random.randint(2, 5)
        created = jobs.submit(fake_work(n, gate), seconds=1.0, steps=n, headers=HEADERS)
        assert created.status_code == 202
        job_id = body(created)["id"]
        assert created.headers["location"] == f"/v1/jobs/{job_id}" and body(created)["state"] == "queued"
        assert api_error(jobs.audio, job_id).status == 409  # not yet
        events = jobs.events(job_id)
        assert events.media_type == "text/event-stream"
        chunks, stream = [], events.body_iterator
        chunks.append(await anext(stream))
        await asyncio.sleep(0.01)
        running = jobs.status(job_id)
        gate.set()
        chunks += [c async for c in stream]
        return jobs, job_id, n, running, chunks

    jobs, job_id, n, running, chunks = run(main())
    assert (running["state"], running["step"], running["steps"], running["queue_position"]) == (
        "running",
        n,
        n,
        0,
    )
    states = [json.loads(c.split("data: ", 1)[1])["state"] for c in chunks if "data: " in c]
    assert states[-1] == "done" and states[0] in ("queued", "running"), states
    assert jobs.subscribers == 0  # the stream ended and let go


def test_done_audio_failed_lost_and_cancelled_jobs():
    async def main():
        jobs = JobManager()
        ok = body(jobs.submit(fake_work(2), seconds=1.0, steps=2, headers=HEADERS))["id"]
        bad = jobs.submit(
            fake_work(2, fail=ApiError(500, "the decoder failed: boom")), seconds=1, steps=2, headers=HEADERS
        )
        lost = jobs.submit(
            fake_work(2, fail=JobLost("the denoiser replica was lost")), seconds=1, steps=2, headers=HEADERS
        )
        lost2 = jobs.submit(
            fake_work(1, fail=ApiError(503, "the text encoder replica was lost (RayActorError); retry")),
            seconds=1,
            steps=1,
            headers=HEADERS,
        )
        gate = asyncio.Event()
        slow = body(jobs.submit(fake_work(3, gate), seconds=1, steps=3, headers=HEADERS))["id"]
        ids = [ok, body(bad)["id"], body(lost)["id"], body(lost2)["id"]]
        finals = [await until_final(jobs, i) for i in ids]
        await asyncio.sleep(0.01)
        cancelled = jobs.cancel(slow)
        await asyncio.sleep(0.01)
        task_cancelled = jobs.jobs[slow].task.done()
        return jobs, ids, finals, cancelled, task_cancelled, slow

    jobs, ids, finals, cancelled, task_cancelled, slow = run(main())
    assert [f["state"] for f in finals] == ["done", "failed", "lost", "lost"]
    assert finals[0]["seed"] == "7" and finals[0]["bucket"] == "1p28s-fp32" and finals[0]["error"] is None
    assert "decoder failed" in finals[1]["error"] and "lost" in finals[2]["error"]
    audio = jobs.audio(ids[0])
    assert (
        audio.body == b"RIFFwave"
        and audio.headers["x-seed"] == "7"
        and audio.headers["x-sample-rate"] == "16000"
    )
    for i in ids[1:]:
        e = api_error(jobs.audio, i)
        assert e.status == 409 and ("failed" in e.message or "lost" in e.message)
    assert cancelled["state"] == "cancelled" and task_cancelled
    assert jobs.cancel(ids[0])["forgotten"] and api_error(jobs.status, ids[0]).status == 410


def test_unknown_expired_and_other_replica_ids():
    clock = Clock()
    jobs = JobManager(JobLimits(ttl_s=60), clock=clock)

    async def main():
        job_id = body(jobs.submit(fake_work(1), seconds=1, steps=1, headers=HEADERS))["id"]
        await until_final(jobs, job_id)
        return job_id

    job_id = run(main())
    assert jobs.status(job_id)["expires_in_s"] == 60
    clock.now += 61
    e = api_error(jobs.status, job_id)
    assert e.status == 410 and "expired" in e.message and not jobs.jobs
    restarted = JobManager()  # a new ingress replica: the old id is lost, not a 500 and not silently unknown
    e = api_error(restarted.status, job_id)
    assert e.status == 410 and "lost" in e.message and e.field == "id"
    for garbage in ["x", "../../etc", "a" * 5000, "0123abcd-" + "Z" * 15 + "\n"]:
        e = api_error(restarted.audio, garbage)
        assert e.status == 404 and len(e.message) < 200
    e = api_error(restarted.status, restarted.epoch + "-" + "A" * 16)
    assert e.status == 404 and "unknown" in e.message


def test_jobs_are_bounded_in_count_audio_and_subscribers():
    async def main():
        limits = JobLimits(max_jobs=3, max_audio_s=2.5, max_subscribers=2, max_subscribers_per_job=1)
        jobs = JobManager(limits)
        gate = asyncio.Event()
        a = body(jobs.submit(fake_work(1, gate), seconds=1, steps=1, headers=HEADERS))["id"]
        b = body(jobs.submit(fake_work(1, gate), seconds=1, steps=1, headers=HEADERS))["id"]
        with pytest.raises(ApiError) as over_audio:  # 2 s in progress + 1 s > 2.5 s
            jobs.submit(fake_work(1), seconds=1, steps=1, headers=HEADERS)
        small = body(jobs.submit(fake_work(1, gate), seconds=0.5, steps=1, headers=HEADERS))["id"]
        with pytest.raises(ApiError) as over_count:  # 3 jobs in progress
            jobs.submit(fake_work(1), seconds=0.1, steps=1, headers=HEADERS)
        held = jobs.events(a)  # counts at once, started or not
        with pytest.raises(ApiError) as per_job:
            jobs.events(a)
        del held  # dropped unstarted (its client went away): it no longer counts
        s1, s2 = jobs.events(a).body_iterator, jobs.events(b).body_iterator
        await anext(s1), await anext(s2)
        with pytest.raises(ApiError) as in_all:
            jobs.events(small)
        gate.set()
        for i in (a, b, small):
            await until_final(jobs, i)
        [c async for c in s1], [c async for c in s2]
        # finished jobs make room: the oldest go first, then 410
        d = body(jobs.submit(fake_work(1), seconds=1, steps=1, headers=HEADERS))["id"]
        await until_final(jobs, d)
        return jobs, over_audio.value, over_count.value, per_job.value, in_all.value, a, b, d

    jobs, over_audio, over_count, per_job, in_all, a, b, d = run(main())
    for e in (over_audio, over_count, per_job, in_all):
        assert e.status == 429 and e.headers["Retry-After"] and "\n" not in e.message
    assert "2.5 s of audio" in over_audio.message and "at most 3 jobs" in over_count.message
    assert len(jobs.jobs) <= 3 and jobs.subscribers == 0
    assert api_error(jobs.status, a).status == 410 and jobs.status(d)["state"] == "done"


def test_limits_refuse_bad_values_in_one_line():
    for kw, fragment in [
        ({"max_jobs": 0}, "max_jobs must be an integer >= 1"),
        ({"max_jobs": True}, "max_jobs must be an integer >= 1"),
        ({"ttl_s": float("inf")}, "ttl_s must be a number of seconds > 0"),
        ({"max_audio_s": -1}, "max_audio_s must be a number of seconds > 0"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            JobLimits(**kw)
