"""litefocus-serve's placement, readiness, exposure and flag errors: pure placement arithmetic, bad
flags and --write-config paths in process, then the CLI as a subprocess on a local one-CPU cluster."""

from __future__ import annotations

import os
import random
import signal
import socket

import numpy as np
import pytest
from cluster_helpers import conditioning_body, post, serve_cli, tiny_engines
from serve_helpers import assert_json_error, free_port

from litefocus.serve import cli as serve_cli_module
from litefocus.serve import placement
from litefocus.serve.settings import ServeSettings


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    return tiny_engines(tmp_path_factory)


# ---- placement arithmetic (no Ray) -------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_default_cpu_shares_fit_the_cluster(seed):
    rng = random.Random(seed)
    buckets, cluster = rng.randint(1, 6), rng.choice([1, 2, 3, 4, 8, 16])
    scaling = (
        {"denoiser": {"min_replicas": 1, "max_replicas": rng.randint(1, 4)}} if rng.random() < 0.5 else {}
    )
    explicit = {"text": 0.5} if rng.random() < 0.5 else {}
    s = placement.fit_cpus(ServeSettings(engines="e", scaling=scaling, cpus=explicit), buckets, cluster)
    most = sum(
        s.cpus_of(k) * placement.replica_range(s, k)[1] * placement.copies(k, buckets)
        for k in ("ingress", "text", "denoiser", "decoder")
    )
    assert most <= cluster + 1e-9, (s.cpus, buckets, cluster)
    assert all(0 < s.cpus_of(k) <= 1 for k in ("text", "denoiser", "decoder"))
    assert s.cpus_of("text") == explicit.get("text", s.cpus_of("text"))
    nodes = {"CPU": float(cluster)}
    assert placement.shortage(s, buckets, nodes, nodes) is None


def test_shortages_name_the_resource_needed_and_had():
    s = ServeSettings(engines="e", cpus={"denoiser": 2.0, "text": 0.5, "decoder": 0.5})
    line = placement.shortage(s, 3, {"CPU": 4.0}, {"CPU": 4.0})
    assert "CPU 7 (text 0.5 x 1, denoiser 2 x 3, decoder 0.5 x 1) but the cluster has 4" in line
    gpu = ServeSettings(engines="e", device="cuda", cpus={"denoiser": 0.1, "text": 0.1, "decoder": 0.1})
    line = placement.shortage(gpu, 2, {"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0})
    assert "GPU 2" in line and "cluster has 1" in line
    pinned = ServeSettings(engines="e", resources={"denoiser": {"denoiser_node": 1}}, cpus={"denoiser": 0.1})
    line = placement.shortage(pinned, 1, {"CPU": 8.0}, {"CPU": 8.0})
    assert "denoiser_node 1" in line and "cluster has 0" in line and "ray start --resources" in line
    spread = {"CPU": 4.0}  # 4 CPUs in all, but 2 on the largest node: a 3-CPU replica fits none
    big = ServeSettings(engines="e", cpus={"denoiser": 3.0, "text": 0.1, "decoder": 0.1})
    line = placement.shortage(big, 1, spread, {"CPU": 2.0})
    assert "one denoiser replica needs CPU 3 but the largest node has 2" in line
    assert "\n" not in line
    late = placement.unplaced(pinned, ["Ingress", "Denoiser-0p64s"], {"CPU": 1.0}, 30)
    assert (
        late.startswith("deployment Denoiser-0p64s could not be placed within 30 s")
        and "denoiser_node" in late
    )


def test_resources_settings_refuse_bad_values_in_one_line():
    for resources, fragment in [
        ({"gpu": {"x": 1}}, "unknown deployment 'gpu'"),
        ({"denoiser": {"CPU": 1}}, "not a custom resource name"),
        ({"denoiser": {"n": 0}}, "must be a finite number > 0"),
        ({"denoiser": {"n": 1.5}}, "whole numbers"),
        ({"denoiser": {}}, "must map resource names"),
        ({"denoiser": {"n": float("nan")}}, "finite number"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            ServeSettings(engines="e", resources=resources)
    s = ServeSettings(engines="e", resources={"denoiser": {"n": 1}})
    assert ServeSettings.from_args(s.to_args()) == s and s.resources_of("denoiser") == {"n": 1.0}


# ---- flags and --write-config in process ----------------------------------------------------------------
def _exit(argv, capsys) -> tuple[int, list[str]]:
    try:
        code = serve_cli_module.main(argv)
    except SystemExit as stop:
        code = stop.code
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    return code, err


def test_bad_write_config_paths_exit_2_with_one_line(engines, tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    a_file = tmp_path / "file.yaml"
    a_file.write_text("x")
    cases = [
        (tmp_path, "is a directory"),
        (tmp_path / "missing" / "serve.yaml", "does not exist"),
        (a_file / "serve.yaml", "does not exist"),
        (fifo, "not a regular file"),
        (tmp_path / ("x" * 300 + ".yaml"), "cannot be written"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((locked / "serve.yaml", "cannot be written"))
    for path, fragment in cases:
        code, err = _exit(["--engines", str(engines), "--write-config", str(path)], capsys)
        assert code == 2 and err[-1].startswith("litefocus-serve: error: ") and fragment in err[-1], (
            path,
            err,
        )
        assert not any("Traceback" in x for x in err), err
    assert a_file.read_text() == "x"


def test_bad_flag_values_exit_with_one_line(engines, capsys):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        cases = [
            (["--ready-timeout", "0"], 2, "--ready-timeout"),
            (["--ready-timeout", "nan"], 2, "--ready-timeout"),
            (["--resources", "denoiser=node"], 2, "KIND=NAME:AMOUNT"),
            (["--resources", "denoiser=node:x"], 2, "KIND=NAME:AMOUNT"),
            (["--resources", "denoiser=CPU:1"], 2, "not a custom resource name"),
            (["--resources", "denoiser=n:-1"], 2, "> 0"),
            (["--cpus", "text=nan"], 2, "cpus.text"),
            (["--metrics", "--address", "auto"], 2, "--metrics"),
            (["--port", str(busy.getsockname()[1])], 1, "is in use"),
            (["--host", "no-such-host.invalid"], 1, "does not resolve"),
            (["--host", "203.0.113.254"], 1, "cannot be bound"),  # TEST-NET: an address of no machine here
        ]
        for extra, status, fragment in cases:
            code, err = _exit(["--engines", str(engines), *extra], capsys)
            assert code == status and err and fragment in err[-1], (extra, err)
            assert not any("Traceback" in x for x in err), err
    finally:
        busy.close()


# ---- the CLI on a local cluster ------------------------------------------------------------------------------
def test_a_cluster_too_small_is_refused_before_deploying(engines):
    """Replicas reserving more CPUs than the cluster has: exit 1 with one line, not a server that hangs."""
    cli = serve_cli("--engines", engines, "--num-cpus", "1", "--cpus", "denoiser=2", "--port", free_port())
    try:
        assert cli.p.wait(120) == 1, cli.tail()
    finally:
        cli.stop(10)
    errors = [x for x in cli.lines if x.startswith("litefocus-serve:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(cli.lines), cli.tail()
    assert "needs CPU" in errors[0] or "need CPU 2." in errors[0], errors
    assert "but the cluster has 1;" in errors[0], errors


def test_defaults_fit_one_cpu_wait_until_ready_and_listen_on_loopback_only(engines):
    """On a one-CPU local cluster with default flags the app becomes ready (the CLI says so only then)
    and answers; every port of the cluster it started listens on loopback; SIGTERM ends it cleanly."""
    port = free_port()
    cli = serve_cli("--engines", engines, "--num-cpus", "1", "--port", port)
    try:
        cli.wait_for(r"INFO serving .* at http://127\.0\.0\.1", timeout=300)
        url = f"http://127.0.0.1:{port}"
        seed = random.randrange(1 << 30)
        r = post(url, conditioning_body(engines, seed), timeout=60)
        assert r.status_code == 200, r.text[:300]
        wave = np.frombuffer(r.content, "<f4")
        assert wave.shape == (8000,) and np.isfinite(wave).all() and r.headers["X-Seed"] == str(seed)
        assert_json_error(post(url, {"seconds": 0.5}), 422)
        from cluster_helpers import listening

        ports = listening(cli.p.pid)
        assert any(a.endswith(f":{port}") for a, _, _ in ports), ports  # the HTTP proxy, under this tree
        # Ray's GCS, raylet, agents and metrics on loopback; Ray Serve hard-codes [::] for the
        # inter-deployment gRPC server of each replica (not a metrics or control endpoint)
        exposed = [(a, who) for a, lo, who in ports if not lo and not who.startswith("ray::ServeRepli")]
        assert exposed == [], ports
        assert any("Prometheus metrics: off" in x for x in cli.lines), cli.tail()
        cli.p.send_signal(signal.SIGTERM)  # to the CLI alone (its cluster shares its process group)
        assert cli.p.wait(90) == 0, cli.tail()
    finally:
        cli.stop(10)


def test_the_ray_floor_is_a_tested_version_with_token_auth():
    """[serve] must not allow a Ray older than the tested one (2.60: token auth on by default)."""
    import re
    from pathlib import Path

    import ray
    from packaging.requirements import Requirement
    from packaging.version import Version

    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    (spec,) = re.findall(r'^serve = \["(ray\[serve\][^"]*)"', text, re.M)
    ray_req = Requirement(spec)
    floors = [Version(s.version) for s in ray_req.specifier if s.operator == ">="]
    assert floors and min(floors) >= Version("2.60"), ray_req
    assert Version(ray.__version__) in ray_req.specifier, (ray.__version__, ray_req)
