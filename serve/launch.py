"""Start or join a Ray cluster, check that the application fits it, wait until it runs, tear down.

Every failure is a ``ValueError`` (the user's choice: a flag to change) or a ``RuntimeError`` (what
the cluster did) with one line naming the resource or the address.
"""

from __future__ import annotations

import errno
import logging
import socket
import time

from litefocus.serve import placement
from litefocus.serve.settings import ServeSettings

logger = logging.getLogger("litefocus.serve")


def loopback(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


def check_port(host: str, port: int) -> None:
    """The HTTP proxy's address must be free here before a cluster starts (local clusters only)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise ValueError(f"--host {host!r} does not resolve ({e}); give an address of this machine") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ValueError(f"--port {port} is in use on {host}; choose a free port") from None
            raise ValueError(f"--host {host} --port {port} cannot be bound: {e.strerror or e}") from None


def start_ray(address: str | None, num_cpus: int | None, metrics: bool) -> None:
    """Join ``address``, or start a local cluster (``num_cpus``: default all cores) that exports
    Prometheus metrics only with ``metrics`` (Ray's metrics endpoints are unauthenticated)."""
    import ray

    if address:
        # a cluster on a loopback address (127.0.0.2, say) is on this machine: join as that node,
        # or Ray takes the driver for a node of its own at the machine's outward address
        host = address.rpartition(":")[0] if address.count(":") == 1 else ""
        node_ip = {"_node_ip_address": host} if host and loopback(host) else {}
        ray.init(address=address, logging_level=logging.WARNING, **node_ip)
        return
    # "local": a new cluster, even where an older one left its address behind
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        _system_config={"enable_metrics_collection": bool(metrics)},
    )


def placed(settings: ServeSettings, buckets: int) -> ServeSettings:
    """The settings with CPU shares that fit the cluster; ValueError (one line) when they cannot fit."""
    import ray

    cluster = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    settings = placement.fit_cpus(settings, buckets, float(cluster.get("CPU", 0.0)))
    largest = {k: max(float(n.get(k, 0.0)) for n in nodes) for k in cluster} if nodes else {}
    problem = placement.shortage(settings, buckets, cluster, largest)
    if problem:
        raise ValueError(problem)
    return settings


def wait_ready(settings: ServeSettings, name: str, timeout_s: float) -> None:
    """Until the application and every HTTP proxy run; RuntimeError (one line) past ``timeout_s``."""
    import ray
    from ray import serve

    t0 = time.monotonic()
    while True:
        status = serve.status()
        app = status.applications.get(name)
        proxies = {node: str(s.value if hasattr(s, "value") else s) for node, s in status.proxies.items()}
        if app is not None and str(app.status.value) == "DEPLOY_FAILED":
            line = next((x for x in app.message.splitlines() if x.strip()), "no message")
            raise RuntimeError(f"the application failed to deploy: {line[:300]}")
        running = app is not None and str(app.status.value) == "RUNNING"
        if running and proxies and set(proxies.values()) == {"HEALTHY"}:
            return
        if time.monotonic() - t0 > timeout_s:
            break
        time.sleep(0.5)
    deployments = {} if app is None else app.deployments
    pending = sorted(d for d, s in deployments.items() if str(s.status.value) != "HEALTHY")
    problem = placement.unplaced(settings, pending, ray.available_resources(), timeout_s)
    if problem:
        raise RuntimeError(problem)
    if running:
        raise RuntimeError(
            f"the HTTP proxy is not healthy after {timeout_s:g} s ({', '.join(sorted(set(proxies.values())))}); "
            "is the port free on every node?"
        )
    what = ", ".join(pending) or "the application"
    raise RuntimeError(
        f"{what} not running after {timeout_s:g} s; raise --ready-timeout or read the replica logs"
    )


def teardown(name: str, joined: bool, started: bool) -> None:
    """Remove what this process started: the application ``name`` (``started``) from a ``joined``
    cluster, or Serve and the local cluster."""
    import ray

    if not ray.is_initialized():
        return
    from ray import serve

    try:
        if started:
            serve.delete(name)  # graceful: in-flight requests finish; a local cluster goes next
    except Exception as e:  # noqa: BLE001 - best effort on the way out; the cluster goes next
        logger.warning("shutting down: %s: %s", type(e).__name__, str(e).split("\n")[0])
    ray.shutdown()
