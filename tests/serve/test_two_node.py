"""Two Ray nodes on this machine (`ray start` on 127.0.0.2, own ports and temp dir): the denoiser
pinned to the second node by a custom resource (--resources denoiser=denoiser_node:1). Requests
succeed; killing that node's process group gives one-line JSON 503s at once, never a hang; requests
succeed again once a node with the resource returns."""

from __future__ import annotations

import shutil
import socket
import tempfile
import time

import numpy as np
import pytest
import requests
from cluster_helpers import conditioning_body, env, post, ray_node, serve_cli, tiny_engines
from serve_helpers import assert_json_error, free_port

# another loopback address: Ray keeps it (it replaces only 127.0.0.1/localhost), so no byte of the
# cluster leaves the loopback range
NODE_IP = "127.0.0.2"  # the head node (and the CLI that joins it)
WORKER_IP = "127.0.0.3"  # the denoiser's node: an address of its own, as on a real cluster
QUICK_S = 10.0  # a request while the denoiser's node is gone: answered within this, never hung


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    return tiny_engines(tmp_path_factory)


def _wait_port(port: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex((NODE_IP, port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on {NODE_IP}:{port} after {timeout:g} s")


def _node_args(temp: str, ip: str = NODE_IP) -> list[str]:
    ports = ["--node-manager-port", "--object-manager-port", "--metrics-export-port"]
    ports += ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
    out = [f"--node-ip-address={ip}", f"--temp-dir={temp}"]
    return out + [f"{flag}={free_port()}" for flag in ports]


def _worker(gcs: int, temp: str, environ: dict):
    return ray_node(
        f"--address={NODE_IP}:{gcs}",
        "--num-cpus=1",
        '--resources={"denoiser_node": 1}',
        *_node_args(temp, WORKER_IP),
        environ=environ,
    )


def test_a_denoiser_pinned_to_a_second_node_fails_fast_and_recovers(engines):
    # a short temp dir: Ray's Unix sockets live under it (108-byte limit), away from other clusters'
    temp = tempfile.mkdtemp(prefix="lf2n-", dir="/tmp")
    environ = env(RAY_health_check_period_ms=1000, RAY_health_check_timeout_ms=1000)
    # Ray's loopback-only switch is for one node (`ray start --address` refuses to join with it), and
    # without it Ray swaps 127.0.0.1 for the machine's outward address: the nodes take NODE_IP
    del environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]
    environ["RAY_health_check_failure_threshold"] = "3"
    gcs, http = free_port(), free_port()
    head = ray_node(
        "--head",
        f"--port={gcs}",
        "--num-cpus=2",
        "--include-dashboard=false",
        '--resources={"head_node": 1}',
        f"--ray-client-server-port={free_port()}",
        *_node_args(temp),
        environ=environ,
    )
    procs = [head]
    try:
        _wait_port(gcs, 120)
        worker = _worker(gcs, temp, environ)
        procs.append(worker)
        worker.wait_for("Ray runtime started", timeout=120)  # registered with the head
        cli = serve_cli(
            *("--engines", engines, "--address", f"{NODE_IP}:{gcs}", "--port", http),
            *("--proxy-location", "HeadOnly", "--resources", "denoiser=denoiser_node:1"),
            *("ingress=head_node:0.1", "text=head_node:0.1", "decoder=head_node:0.1"),  # the rest: head
            *(
                "--cpus",
                "text=0.2",
                "decoder=0.2",
                "denoiser=0.5",
                "--timeout",
                "60",
                "--ready-timeout",
                "240",
            ),
            environ=environ,
        )
        procs.append(cli)
        cli.wait_for(r"INFO serving ", timeout=300)
        url = f"http://127.0.0.1:{http}"
        seed = int(np.random.default_rng().integers(1 << 30))
        r = post(url, conditioning_body(engines, seed), timeout=60)
        assert r.status_code == 200, r.text[:300]
        assert np.frombuffer(r.content, "<f4").shape == (8000,)

        worker.signal(9)  # SIGKILL to the node's process group: its raylet, agents and workers
        worker.p.wait(30)
        statuses = []
        end = time.monotonic() + 30
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                r = post(url, conditioning_body(engines, seed), timeout=QUICK_S)
            except requests.Timeout:
                try:
                    h = requests.get(url + "/healthz", timeout=5)
                    hz = f"{h.status_code} {h.text[:200]}"
                except requests.RequestException as e:
                    hz = repr(e)
                raise AssertionError(
                    f"a request hung past {QUICK_S:g} s with the node gone (statuses {statuses}; "
                    f"healthz {hz}); the CLI said:\n{cli.tail(30)}"
                ) from None
            assert time.monotonic() - t0 < QUICK_S
            statuses.append(r.status_code)
            if r.status_code != 200:
                assert_json_error(r, 503)
                assert int(r.headers["Retry-After"]) >= 1
            if statuses[-3:] == [503] * 3:
                break
            time.sleep(0.5)
        assert statuses[-3:] == [503] * 3, statuses

        procs.append(_worker(gcs, temp, environ))  # the node returns
        procs[-1].wait_for("Ray runtime started", timeout=120)
        end = time.monotonic() + 180
        while True:
            r = post(url, conditioning_body(engines, seed + 1), timeout=QUICK_S * 3)
            if r.status_code == 200 or time.monotonic() > end:
                break
            assert_json_error(r, 503)
            time.sleep(1)
        assert r.status_code == 200, r.text[:300]
        assert cli.stop(60) == 0, cli.tail()
    finally:
        for p in reversed(procs):
            p.stop(30)
        shutil.rmtree(temp, ignore_errors=True)
