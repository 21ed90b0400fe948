"""Where the replicas go: CPU shares that fit the cluster, what the replicas need, and one line naming
the short resource (needed vs what the cluster has) when they cannot be placed.

Pure functions of a ``ServeSettings``, the bucket count and Ray's resource dicts
(``ray.cluster_resources()``, ``ray.available_resources()``, a node's ``Resources``): no Ray import.
A CPU reserved here is a Ray scheduling unit, not a thread: ONNX Runtime sizes its own thread pools.
"""

from __future__ import annotations

import dataclasses
import math

from litefocus.serve.settings import DEFAULT_CPUS, KINDS, ServeSettings

EPS = 1e-9
DEPLOYMENT_KINDS = {"Ingress": "ingress", "TextConditioner": "text", "Decoder": "decoder"}
HINTS = {
    "CPU": "lower --cpus (e.g. --cpus denoiser=0.5), raise --num-cpus or add nodes",
    "GPU": "add GPU nodes, or lower --denoiser-gpus / --decoder-gpus (fractions share a GPU)",
}


def kind_of(deployment: str) -> str | None:
    """The settings kind of a deployment name (``Denoiser-<bucket>`` is ``denoiser``); None: StatsBoard."""
    if deployment.startswith("Denoiser"):
        return "denoiser"
    return DEPLOYMENT_KINDS.get(deployment)


def replica_range(settings: ServeSettings, kind: str) -> tuple[int, int]:
    """(fewest, most) replicas of one deployment of ``kind``."""
    s = settings.scaling_of(kind)
    return (s.min_replicas, s.max_replicas) if s.autoscaling else (s.replicas, s.replicas)


def copies(kind: str, buckets: int) -> int:
    """Deployments of ``kind``: one denoiser per bucket, one of everything else."""
    return buckets if kind == "denoiser" else 1


def per_replica(settings: ServeSettings, kind: str) -> dict[str, float]:
    """What one replica of ``kind`` reserves, under Ray's resource names (zero amounts left out)."""
    gpus = {"denoiser": settings.denoiser_gpus, "decoder": settings.decoder_gpus}.get(kind, 0.0)
    out = {"CPU": settings.cpus_of(kind), "GPU": gpus, **settings.resources_of(kind)}
    return {name: amount for name, amount in out.items() if amount > 0}


def fit_cpus(settings: ServeSettings, buckets: int, cluster_cpus: float) -> ServeSettings:
    """Settings whose kinds without explicit CPUs share what the cluster has left, equally per replica
    (at the most replicas autoscaling may reach), at most their default (1) and at least 0.01."""
    auto = [k for k in KINDS if k not in settings.cpus and DEFAULT_CPUS[k] > 0]
    count = sum(replica_range(settings, k)[1] * copies(k, buckets) for k in auto)
    if not count:
        return settings
    taken = sum(x * replica_range(settings, k)[1] * copies(k, buckets) for k, x in settings.cpus.items())
    share = math.floor(100 * max(cluster_cpus - taken, 0.0) / count) / 100
    cpus = {**settings.cpus, **{k: min(DEFAULT_CPUS[k], max(share, 0.01)) for k in auto}}
    return dataclasses.replace(settings, cpus=cpus)


def need(settings: ServeSettings, buckets: int) -> dict[str, list[tuple[str, float, int]]]:
    """Resource name -> [(kind, amount per replica, replicas)] at the fewest replicas (what running takes)."""
    out: dict[str, list[tuple[str, float, int]]] = {}
    for kind in KINDS:
        n = replica_range(settings, kind)[0] * copies(kind, buckets)
        for name, amount in per_replica(settings, kind).items():
            if n:
                out.setdefault(name, []).append((kind, amount, n))
    return out


def _hint(name: str, kind: str) -> str:
    return HINTS.get(
        name, f"start a node with ray start --resources '{{\"{name}\": N}}' or change --resources {kind}=..."
    )


def shortage(settings: ServeSettings, buckets: int, cluster: dict, largest_node: dict) -> str | None:
    """One line naming a resource the replicas need more of than the cluster has in all (or than its
    largest node has, for one replica); None when everything fits on paper."""
    for name, parts in need(settings, buckets).items():
        total = sum(amount * n for _, amount, n in parts)
        have = float(cluster.get(name, 0.0))
        if total > have + EPS:
            detail = ", ".join(f"{kind} {amount:g} x {n}" for kind, amount, n in parts)
            return (
                f"cannot place the application: its replicas need {name} {total:g} ({detail}) but the "
                f"cluster has {have:g}; {_hint(name, parts[0][0])}"
            )
        for kind, amount, _ in parts:
            biggest = float(largest_node.get(name, 0.0))
            if amount > biggest + EPS:
                return (
                    f"cannot place the application: one {kind} replica needs {name} {amount:g} but the "
                    f"largest node has {biggest:g}; {_hint(name, kind)}"
                )
    return None


def unplaced(settings: ServeSettings, deployments: list[str], available: dict, waited_s: float) -> str | None:
    """One line for deployments still not running after ``waited_s``: the first resource a replica of
    one of them needs more of than the cluster has free; None when none is short (slow, not stuck)."""
    for deployment in deployments:
        kind = kind_of(deployment)
        if kind is None:
            continue
        for name, amount in per_replica(settings, kind).items():
            free = float(available.get(name, 0.0))
            if amount > free + EPS:
                return (
                    f"deployment {deployment} could not be placed within {waited_s:g} s: a replica needs "
                    f"{name} {amount:g} and the cluster has {free:g} free; {_hint(name, kind)}"
                )
    return None
