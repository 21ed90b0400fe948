"""``litefocus-serve``: deploy the engines of a directory on Ray Serve, or write the Serve config.

litefocus-serve --engines engines                            # local Ray cluster, http://127.0.0.1:8000
litefocus-serve --engines /shared/engines --address auto --device cuda --autoscale denoiser=1:4:8
litefocus-serve --engines /shared/engines --write-config serve.yaml && serve deploy serve.yaml
litefocus-serve --engines /shared/engines --address auto --resources denoiser=gpu_node:1  # pinned

A local cluster gets every core; replicas without --cpus share them (at most 1 CPU each), and the
command says "serving" only once every deployment runs: a cluster too small for the replicas is
refused in one line before deploying (exit 1), as is one that cannot place them in --ready-timeout.
Its Ray servers listen on loopback when --host does; Prometheus metrics only with --metrics.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from litefocus.serve.launch import check_port, loopback, placed, start_ray, teardown, wait_ready
from litefocus.serve.settings import BACKENDS, DEVICES, KINDS, ServeSettings

logger = logging.getLogger("litefocus.serve")
IMPORT_PATH = "litefocus.serve.app:build_app"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="litefocus-serve", description="Serve a litefocus engine directory over HTTP on Ray Serve."
    )
    p.add_argument("--engines", type=Path, required=True, help="engine directory (readable on every node)")
    p.add_argument(
        "--address", help="join this Ray cluster (e.g. auto, or ray://host:10001); default: start one"
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--name", default="litefocus", help="Serve application name (default litefocus)")
    p.add_argument("--route-prefix", default="/", help="URL prefix of the application (default /)")
    p.add_argument(
        "--proxy-location",
        choices=("EveryNode", "HeadOnly"),
        default="EveryNode",
        help="HTTP proxies on every node (default) or on the head node only",
    )
    p.add_argument(
        "--device", choices=DEVICES, default="cpu", help="the denoisers' device (cuda: a GPU each)"
    )
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--no-batching", action="store_true", help="one request per UNet call (a baseline)")
    p.add_argument("--queue-size", type=int, default=64, help="waiting requests per denoiser replica (64)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request before 504 (600)")
    p.add_argument("--max-steps", type=int, default=1000, help="largest steps a request may ask for (1000)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger bodies get 413 (1 MiB)")
    p.add_argument("--docs", action="store_true", help="serve /docs, /redoc and /openapi.json (default off)")
    p.add_argument(
        "--replicas",
        nargs="+",
        default=[],
        metavar="KIND=N",
        help=f"fixed replicas; KIND: {', '.join(KINDS)}",
    )
    p.add_argument(
        "--autoscale",
        nargs="+",
        default=[],
        metavar="KIND=MIN:MAX[:TARGET]",
        help="autoscale between MIN and MAX replicas at TARGET ongoing requests each",
    )
    p.add_argument(
        "--cpus",
        nargs="+",
        default=[],
        metavar="KIND=X",
        help="CPUs reserved per replica (default: the cluster's CPUs shared out, at most 1 each)",
    )
    p.add_argument(
        "--resources",
        nargs="+",
        default=[],
        metavar="KIND=NAME:AMOUNT",
        help="Ray custom resources per replica: pins KIND to the nodes started with them "
        "(e.g. denoiser=denoiser_node:1 and ray start --resources '{\"denoiser_node\": 1}')",
    )
    p.add_argument(
        "--denoiser-gpus", type=float, help="GPUs per denoiser replica (default 1 with --device cuda)"
    )
    p.add_argument(
        "--decoder-gpus", type=float, default=0.0, help="GPUs per decoder replica (default 0: CPU)"
    )
    p.add_argument("--num-cpus", type=int, help="CPUs of the local cluster started here (default: all)")
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for every deployment to run before giving up with exit 1 (300)",
    )
    p.add_argument(
        "--metrics",
        action="store_true",
        help="export Prometheus metrics from the local cluster started here (off by default: unauthenticated)",
    )
    p.add_argument("--write-config", type=Path, metavar="FILE", help="write a `serve deploy` YAML and exit")
    p.add_argument(
        "--detach", action="store_true", help="deploy and exit, leaving it running (with --address)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def _pairs(flag: str, values: list[str]) -> list[tuple[str, str]]:
    out = []
    for v in values:
        kind, sep, rest = v.partition("=")
        if not sep or kind not in KINDS or not rest:
            raise ValueError(f"{flag} {v!r}: write KIND=VALUE with KIND one of {', '.join(KINDS)}")
        out.append((kind, rest))
    return out


def settings_from_args(args) -> ServeSettings:
    scaling: dict = {}
    for kind, n in _pairs("--replicas", args.replicas):
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--replicas {kind}={n}: the count must be an integer >= 1")
        scaling[kind] = {"replicas": int(n)}
    for kind, spec in _pairs("--autoscale", args.autoscale):
        parts = spec.split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            low, high = int(parts[0]), int(parts[1])
            target = float(parts[2]) if len(parts) == 3 else None
        except ValueError:
            raise ValueError(
                f"--autoscale {kind}={spec}: write MIN:MAX or MIN:MAX:TARGET, e.g. 1:4:8"
            ) from None
        if kind in scaling:
            raise ValueError(f"{kind} has both --replicas and --autoscale; give one")
        scaling[kind] = {"min_replicas": low, "max_replicas": high}
        if target is not None:
            scaling[kind]["target_ongoing_requests"] = target
    cpus = {}
    for kind, x in _pairs("--cpus", args.cpus):
        try:
            cpus[kind] = float(x)
        except ValueError:
            raise ValueError(f"--cpus {kind}={x}: the CPUs must be a number") from None
    resources: dict = {}
    for kind, spec in _pairs("--resources", args.resources):
        name, sep, amount = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            resources.setdefault(kind, {})[name] = float(amount)
        except ValueError:
            raise ValueError(
                f"--resources {kind}={spec}: write KIND=NAME:AMOUNT, e.g. denoiser=denoiser_node:1"
            ) from None
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is not a TCP port; use 1-65535")
    if not args.route_prefix.startswith("/"):
        raise ValueError(f"--route-prefix {args.route_prefix!r} must start with /")
    if args.num_cpus is not None and (args.address or args.num_cpus < 1):
        raise ValueError("--num-cpus sizes a local cluster: give an integer >= 1, and no --address")
    if args.detach and not args.address:
        raise ValueError("--detach needs --address: a local cluster ends with this process")
    if not 0 < args.ready_timeout < float("inf"):
        raise ValueError(f"--ready-timeout {args.ready_timeout}: give a number of seconds > 0")
    if args.metrics and args.address:
        raise ValueError(
            "--metrics configures a local cluster; a joined cluster exports what it was started with"
        )
    return ServeSettings(
        engines=str(args.engines.resolve()),
        backend=args.backend,
        device=args.device,
        batching=not args.no_batching,
        queue_size=args.queue_size,
        timeout_s=args.timeout,
        max_steps=args.max_steps,
        max_body_bytes=args.max_body_bytes,
        docs=args.docs,
        denoiser_gpus=args.denoiser_gpus,
        decoder_gpus=args.decoder_gpus,
        scaling=scaling,
        cpus=cpus,
        resources=resources,
    )


def serve_config(
    settings: ServeSettings,
    *,
    name: str,
    route_prefix: str,
    host: str,
    port: int,
    proxy_location: str = "EveryNode",
) -> dict:
    """A ``serve deploy`` config (checked against Ray Serve's schema) running ``build_app``."""
    from ray.serve.schema import ServeDeploySchema

    config = {
        "proxy_location": proxy_location,
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": name,
                "route_prefix": route_prefix,
                "import_path": IMPORT_PATH,
                "args": settings.to_args(),
            }
        ],
    }
    try:
        ServeDeploySchema.model_validate(config)
    except ValueError as e:  # pydantic's ValidationError
        raise ValueError(f"the Serve config does not validate: {str(e).splitlines()[0]}") from None
    return config


def write_config(path: Path, config: dict) -> None:
    import yaml

    from litefocus.engine.fileio import atomic_write_bytes

    where = f"--write-config {path}"
    header = "# written by litefocus-serve --write-config; deploy with: serve deploy " + path.name + "\n"
    try:
        if path.is_dir():
            raise ValueError(f"{where} is a directory; give a file name, e.g. {path / 'serve.yaml'}")
        if path.exists() and not path.is_file():
            raise ValueError(f"{where} is not a regular file; give a new or existing .yaml file")
        if not path.parent.is_dir():
            raise ValueError(f"{where}: directory {path.parent} does not exist")
        atomic_write_bytes(path, (header + yaml.safe_dump(config, sort_keys=False)).encode())
    except OSError as e:  # too long a name, no permission, a full disk, ...
        raise ValueError(f"{where} cannot be written: {e.strerror or e}") from None


def deploy(settings: ServeSettings, args, buckets: int, started: list) -> ServeSettings:
    """Start or join the cluster, start Serve's HTTP proxy, run the application and wait until it runs."""
    if not args.address:
        check_port(args.host, args.port)
        if loopback(args.host):
            # Ray binds its own servers (GCS, raylets, metrics) to the node's IP; this makes that IP
            # the loopback address. Ray reads it when first imported: before app.py imports ray.
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray import serve

    from litefocus.serve.app import build_app
    from litefocus.serve.proxy import CALLBACK, CALLBACK_ENV

    os.environ.setdefault(CALLBACK_ENV, CALLBACK)  # the proxy's own errors in JSON (a cluster started here)
    build_app(settings.to_args())  # checks the engine directory before a cluster starts
    start_ray(args.address, args.num_cpus, args.metrics)
    _raise_on_signals()
    settings = placed(settings, buckets)
    started.append(args.name)
    serve.start(proxy_location=args.proxy_location, http_options={"host": args.host, "port": args.port})
    serve.run(build_app(settings.to_args()), name=args.name, route_prefix=args.route_prefix, blocking=False)
    wait_ready(settings, args.name, args.ready_timeout)
    return settings


class _Stop(Exception):
    pass


def _raise_on_signals() -> None:
    """SIGINT and SIGTERM raise ``_Stop`` (no lock is taken inside a handler), so that the cluster is
    torn down; installed after ``ray.init``, which installs handlers of its own."""

    def stop(signum, frame):
        raise _Stop(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)


def _wait_for_signal() -> None:
    try:
        while True:
            time.sleep(3600)
    except (_Stop, KeyboardInterrupt):
        pass


def _one_line(e: BaseException) -> str:
    text = str(e).strip().split("\n")[0]
    return text if isinstance(e, (ValueError, RuntimeError)) else f"{type(e).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        settings = settings_from_args(args)
        from litefocus.runtime import Runtime

        buckets = Runtime.load(settings.engines, backend=settings.backend).buckets()
        if args.write_config is not None:
            config = serve_config(
                settings,
                name=args.name,
                route_prefix=args.route_prefix,
                host=args.host,
                port=args.port,
                proxy_location=args.proxy_location,
            )
            write_config(args.write_config, config)
            logger.info("wrote %s; deploy it with: serve deploy %s", args.write_config, args.write_config)
            return 0
    except (ValueError, OSError) as e:
        p.error(_one_line(e))
    started: list = []  # deploy appends once it has run the application
    try:
        settings = deploy(settings, args, len(buckets), started)
    except (_Stop, KeyboardInterrupt):
        teardown(args.name, bool(args.address), bool(started))
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's edge: one line, never a traceback
        logger.debug("deploy failed", exc_info=True)
        print(f"litefocus-serve: {_one_line(e)}", file=sys.stderr)
        teardown(args.name, bool(args.address), bool(started))
        return 1
    url = f"http://{args.host}:{args.port}{args.route_prefix.rstrip('/')}"
    names = ", ".join(f"{b['name']} ({b['seconds']:g} s, batch {b['batch_sizes']})" for b in buckets)
    cpus = ", ".join(f"{k} {v:g}" for k, v in settings.cpus.items())
    logger.info(
        "serving %s at %s/v1/generate; buckets: %s; CPUs per replica: %s", settings.engines, url, names, cpus
    )
    import ray

    ports = sorted(
        {(n["NodeManagerAddress"], n.get("MetricsExportPort")) for n in ray.nodes() if n.get("Alive")}
    )
    metrics = ", ".join(f"http://{host}:{port}/metrics" for host, port in ports if port and port > 0)
    if metrics and not loopback(args.host):
        logger.warning("Prometheus metrics listen on every interface, unauthenticated: %s", metrics)
    elif metrics:
        logger.info(
            "Prometheus metrics (Ray's and litefocus_*): %s; GET /v1/stats sums the denoisers", metrics
        )
    else:
        logger.info("Prometheus metrics: off (--metrics turns them on); GET /v1/stats sums the denoisers")
    if args.detach:
        return 0
    try:
        _wait_for_signal()
    finally:
        logger.info("shutting down")
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # a second signal does not cut the teardown short
        teardown(args.name, bool(args.address), started=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
