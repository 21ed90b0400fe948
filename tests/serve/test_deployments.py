"""litefocus.serve.deployments without a cluster: the denoiser's settings, the stats board and its sums,
and the application graph ``build_app`` binds (binding is pure: nothing starts, nothing is opened)."""

from __future__ import annotations

import dataclasses
import pickle
import random

import pytest

from litefocus.serve import app as serve_app
from litefocus.serve import deployments
from litefocus.serve.denoiser import LoopStats
from litefocus.serve.deployments import DenoiserSettings, summarize
from litefocus.serve.settings import ServeSettings

COUNTERS = tuple(LoopStats().to_dict())


def _counters() -> dict:
    c = {k: random.randint(0, 50) for k in COUNTERS}
    c["rows_available"] = c["rows_used"] + random.randint(0, 50)
    return c


# ---- the denoiser's settings ---------------------------------------------------------------------------
def test_denoiser_settings_are_frozen_picklable_and_default_like_the_server():
    s = DenoiserSettings(f"/engines/{random.randrange(1000)}", "1p28s-fp32", queue_size=random.randint(1, 99))
    assert pickle.loads(pickle.dumps(s)) == s  # Serve ships it to every replica
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.bucket = "other"  # type: ignore[misc]
    server = ServeSettings(engines="e")
    d = DenoiserSettings("e", "b")
    assert (d.backend, d.device, d.batching, d.queue_size) == (
        server.backend,
        server.device,
        server.batching,
        server.queue_size,
    )


# ---- the stats board ------------------------------------------------------------------------------------
def test_summarize_sums_counters_per_bucket_and_counts_live_replicas_only():
    live = {
        f"r{i}": {"bucket": random.choice("ab"), "counters": _counters()} for i in range(random.randint(1, 6))
    }
    dead = {
        f"d{i}": {"bucket": random.choice("abc"), "counters": _counters()}
        for i in range(random.randint(0, 4))
    }
    out = summarize(live, dead)
    reports = [*live.values(), *dead.values()]
    assert set(out["buckets"]) == {r["bucket"] for r in reports}
    for bucket, sums in out["buckets"].items():
        mine = [r["counters"] for r in reports if r["bucket"] == bucket]
        assert sums["replicas"] == sum(r["bucket"] == bucket for r in live.values())
        for k in COUNTERS:
            assert sums[k] == sum(c[k] for c in mine)
        expected = sums["rows_used"] / sums["rows_available"] if sums["rows_available"] else None
        assert sums["occupancy"] == expected
    total = out["total"]
    assert total["replicas"] == len(live)
    assert all(total[k] == sum(r["counters"][k] for r in reports) for k in COUNTERS)


def test_summarize_of_nothing_has_every_counter_at_zero():
    assert summarize({}, {}) == {
        "buckets": {},
        "total": {"replicas": 0, **LoopStats().to_dict(), "occupancy": None},
    }


def test_the_board_buries_replicas_silent_for_stale_s(monkeypatch):
    board = deployments.StatsBoard.func_or_class()  # outside Ray: no actors to ask, silence decides
    now = [1000.0]
    monkeypatch.setattr(deployments.time, "monotonic", lambda: now[0])
    quiet, chatty = _counters(), _counters()
    board.report("quiet", "a", quiet)
    now[0] += deployments.STALE_S / 2
    board.report("chatty", "a", chatty)
    assert board.snapshot()["total"]["replicas"] == 2
    now[0] += deployments.STALE_S / 2 + 0.1  # quiet is now silent past STALE_S; chatty is not
    snap = board.snapshot()
    assert snap["total"]["replicas"] == 1 and set(board.dead) == {"quiet"}
    assert snap["total"]["admitted"] == quiet["admitted"] + chatty["admitted"]  # the dead still count
    ledger = board.report("quiet", "a", quiet)  # it was only slow: its report brings it back
    assert "quiet" not in ledger and board.snapshot()["total"]["replicas"] == 2


def test_a_ledger_never_buries_a_replica_that_reports():
    board = deployments.StatsBoard.func_or_class()
    live, gone = _counters(), _counters()
    board.report("r1", "a", live)
    ledger = {"r1": {"bucket": "a", "counters": _counters()}, "r0": {"bucket": "a", "counters": gone}}
    assert set(board.report("r2", "a", _counters(), ledger)) == {"r0"}
    assert set(board.live) == {"r1", "r2"} and board.dead["r0"]["counters"] == gone


# ---- the application graph --------------------------------------------------------------------------------
class FakeRuntime:
    """What ``build_app`` reads of an engine directory: its buckets."""

    def __init__(self, buckets: list[dict]):
        self._buckets = buckets

    def buckets(self) -> list[dict]:
        return self._buckets


def _build(monkeypatch, buckets: list[dict], **args):
    loaded = []

    def load(engines, backend="auto", **kw):
        loaded.append((engines, backend, kw))
        return FakeRuntime(buckets)

    monkeypatch.setattr(serve_app.Runtime, "load", staticmethod(load))
    app = serve_app.build_app({"engines": "/srv/engines", **args})
    assert loaded == [("/srv/engines", args.get("backend", "auto"), {})]  # the manifest only
    return app._bound_deployment


def test_build_app_binds_one_denoiser_per_bucket_with_its_settings(monkeypatch):
    buckets = [
        {"name": "1p28s-fp32", "seconds": 1.28, "batch_sizes": [2, 4, 8]},
        {"name": "10p24s fp16/x", "seconds": 10.24, "batch_sizes": [1, random.choice([2, 4])]},
    ]
    queue, batching = random.randint(1, 20), random.choice([True, False])
    ingress = _build(monkeypatch, buckets, queue_size=queue, batching=batching, backend="onnxruntime")
    settings, text, denoisers, decoder, board = ingress.init_args
    assert ServeSettings.from_args(settings).queue_size == queue
    assert list(denoisers) == [b["name"] for b in buckets]
    for b in buckets:
        d = denoisers[b["name"]]._bound_deployment
        assert d.name == serve_app.deployment_name(b["name"]) and d.name.startswith("Denoiser-")
        assert " " not in d.name and "/" not in d.name
        own, their_board = d.init_args
        assert own == DenoiserSettings("/srv/engines", b["name"], "onnxruntime", "cpu", batching, queue)
        assert their_board is board  # one board for every denoiser and the ingress
        assert d.max_queued_requests == queue
        assert d.max_ongoing_requests == 2 * queue + b["batch_sizes"][-1]
    assert text._bound_deployment.init_args == ("/srv/engines", "onnxruntime")
    assert decoder._bound_deployment.init_args == ("/srv/engines", "onnxruntime", "cpu")
    assert board._bound_deployment.name == "StatsBoard"


def test_build_app_sizes_the_ingress_and_aims_denoiser_autoscaling_at_a_full_batch(monkeypatch):
    readers, inflight, reserve = (random.randint(1, 100) for _ in range(3))
    batch = random.choice([2, 4, 8, 16])
    ingress = _build(
        monkeypatch,
        [{"name": "b", "seconds": 1.28, "batch_sizes": [1, batch]}],
        max_body_readers=readers,
        max_inflight=inflight,
        ingress_reserve=reserve,
        scaling={"denoiser": {"min_replicas": 1, "max_replicas": 3}},
        cpus={"denoiser": 2.0},
        resources={"denoiser": {"denoiser_node": 1}},
    )
    assert ingress.name == "Ingress" and ingress.max_ongoing_requests == readers + inflight + reserve
    denoiser = ingress.init_args[2]["b"]._bound_deployment
    auto = denoiser._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, max(1, batch // 2))
    assert denoiser.ray_actor_options["num_cpus"] == 2.0
    assert denoiser.ray_actor_options["resources"] == {"denoiser_node": 1.0}
