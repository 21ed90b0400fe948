"""What a served application is: one settings object, from CLI flags or a Serve config's ``args``.

``ServeSettings.from_args(args)`` checks an ``args`` dict (the ``args:`` of an application in a
``serve deploy`` YAML, or what ``litefocus-serve`` builds from its flags) and raises ``ValueError``
with one line naming the key and the fix; ``to_args()`` writes it back (YAML/JSON-safe).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

KINDS = ("ingress", "text", "denoiser", "decoder")  # deployments whose replicas can be set
DEVICES = ("cpu", "cuda")
BACKENDS = ("auto", "onnxruntime", "tensorrt")
DEFAULT_CPUS = {"ingress": 0.0, "text": 1.0, "denoiser": 1.0, "decoder": 1.0}


@dataclass(frozen=True)
class Scaling:
    """A fixed replica count, or autoscaling between ``min_replicas`` and ``max_replicas`` aiming at
    ``target_ongoing_requests`` per replica (Ray Serve's autoscaling_config)."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    def options(self) -> dict:
        """Ray Serve deployment options: the same numbers as ``to_dict``, under Serve's names."""
        config = self.to_dict()
        return {"autoscaling_config": config} if self.autoscaling else {"num_replicas": config["replicas"]}

    def to_dict(self) -> dict:
        if not self.autoscaling:
            return {"replicas": self.replicas}
        out = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas}
        if self.target_ongoing_requests is not None:
            out["target_ongoing_requests"] = self.target_ongoing_requests
        return out

    @classmethod
    def from_dict(cls, kind: str, value) -> Scaling:
        where = f"scaling.{kind}"
        if isinstance(value, (bool, int)):
            return cls(replicas=_int(f"{where}", value, 1))
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a replica count or a mapping, got {value!r}")
        unknown = sorted(set(value) - {"replicas", "min_replicas", "max_replicas", "target_ongoing_requests"})
        if unknown:
            raise ValueError(
                f"{where} has unknown key(s) {', '.join(unknown)}; use replicas, or min_replicas, "
                "max_replicas and target_ongoing_requests"
            )
        if "max_replicas" not in value:
            if set(value) - {"replicas"}:
                raise ValueError(f"{where}: autoscaling needs max_replicas (and min_replicas)")
            return cls(replicas=_int(f"{where}.replicas", value.get("replicas", 1), 1))
        if "replicas" in value:
            raise ValueError(f"{where}: give replicas (fixed) or min/max_replicas (autoscaling), not both")
        low = _int(f"{where}.min_replicas", value.get("min_replicas", 1), 0)
        high = _int(f"{where}.max_replicas", value["max_replicas"], 1)
        if high < low:
            raise ValueError(f"{where}: max_replicas {high} is below min_replicas {low}; raise it")
        target = value.get("target_ongoing_requests")
        if target is not None:
            target = _number(f"{where}.target_ongoing_requests", target, above=0)
        return cls(min_replicas=low, max_replicas=high, target_ongoing_requests=target)


@dataclass(frozen=True)
class ServeSettings:
    engines: str  # the engine directory (a path every node of the cluster can read)
    backend: str = "auto"
    device: str = "cpu"  # the denoisers' device; the text encoder runs on CPU
    batching: bool = True  # step-level batching (False: one request per UNet call)
    queue_size: int = 64  # waiting requests per denoiser replica (then 503 + Retry-After)
    timeout_s: float = 600.0  # per request, conditioning to waveform (then 504)
    max_steps: int = 1000
    max_body_bytes: int = 1 << 20  # larger bodies get 413
    # ---- the ingress protects itself (per ingress replica; see README "Serve at scale") ----
    body_timeout_s: float = 10.0  # a request body must arrive within this (then 408)
    max_body_readers: int = 64  # bodies read at once; a new request evicts the slowest, else 503
    max_inflight: int = 256  # generate requests past their body at once (then 503 + Retry-After)
    ingress_reserve: int = 64  # ingress slots kept for /healthz, /v1/stats, /v1/engines
    docs: bool = False  # serve /docs, /redoc and /openapi.json
    denoiser_gpus: float | None = None  # per denoiser replica (default: 1 with device cuda, else 0)
    decoder_gpus: float = 0.0  # > 0: the decoder runs on the GPU too (share it: e.g. 0.5 + 0.5)
    scaling: dict = field(default_factory=dict)  # kind -> Scaling
    cpus: dict = field(default_factory=dict)  # kind -> CPUs reserved per replica
    # kind -> {Ray custom resource: amount per replica}: pins a kind to the nodes that offer it
    # (e.g. ray start --resources '{"denoiser_node": 1}' and {"denoiser": {"denoiser_node": 1}})
    resources: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.engines, str) or not self.engines:
            raise ValueError(f"engines must be the engine directory's path, got {self.engines!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} is unknown; choose cpu or cuda (one GPU per replica)")
        if not isinstance(self.batching, bool):
            raise ValueError(f"batching must be true or false, got {self.batching!r}")
        _int("queue_size", self.queue_size, 1)
        _int("max_steps", self.max_steps, 1)
        _int("max_body_bytes", self.max_body_bytes, 1024)
        object.__setattr__(self, "body_timeout_s", _number("body_timeout_s", self.body_timeout_s, above=0))
        for name in ("max_body_readers", "max_inflight", "ingress_reserve"):
            _int(name, getattr(self, name), 1)
        if not isinstance(self.docs, bool):
            raise ValueError(f"docs must be true or false, got {self.docs!r}")
        object.__setattr__(self, "timeout_s", _number("timeout_s", self.timeout_s, above=0))
        gpus = self.denoiser_gpus
        if gpus is None:
            gpus = 1.0 if self.device == "cuda" else 0.0
        object.__setattr__(self, "denoiser_gpus", _number("denoiser_gpus", gpus, low=0))
        object.__setattr__(self, "decoder_gpus", _number("decoder_gpus", self.decoder_gpus, low=0))
        if self.device == "cuda" and self.denoiser_gpus == 0:
            raise ValueError("denoiser_gpus is 0 with device cuda; give the denoisers a GPU (e.g. 1)")
        if self.decoder_gpus > 0 and self.device != "cuda":
            raise ValueError("decoder_gpus > 0 needs device cuda")
        scaling = {}
        for kind, value in (self.scaling or {}).items():
            _kind("scaling", kind)
            scaling[kind] = value if isinstance(value, Scaling) else Scaling.from_dict(kind, value)
        object.__setattr__(self, "scaling", scaling)
        cpus = {}
        for kind, value in (self.cpus or {}).items():
            _kind("cpus", kind)
            cpus[kind] = _number(f"cpus.{kind}", value, low=0)
        object.__setattr__(self, "cpus", cpus)
        resources = {}
        for kind, value in (self.resources or {}).items():
            _kind("resources", kind)
            resources[kind] = _resources(f"resources.{kind}", value)
        object.__setattr__(self, "resources", resources)

    def scaling_of(self, kind: str) -> Scaling:
        return self.scaling.get(kind, Scaling())

    def cpus_of(self, kind: str) -> float:
        return self.cpus.get(kind, DEFAULT_CPUS[kind])

    def resources_of(self, kind: str) -> dict:
        """Ray custom resources per replica of ``kind`` (``ray_actor_options["resources"]``)."""
        return dict(self.resources.get(kind, {}))

    @classmethod
    def from_args(cls, args: dict) -> ServeSettings:
        if not isinstance(args, dict):
            raise ValueError(f"args must be a mapping of settings, got {type(args).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(args) - set(names))
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; the settings are {', '.join(names)}")
        if "engines" not in args:
            raise ValueError("args need engines: the engine directory litefocus-export wrote")
        return cls(**args)

    def to_args(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "scaling":
                value = {k: v.to_dict() for k, v in value.items()}
            out[f.name] = value
        return out


def _kind(what: str, kind) -> None:
    if kind not in KINDS:
        raise ValueError(f"{what}: unknown deployment {kind!r}; choose from {', '.join(KINDS)}")


RAY_BUILTIN = ("CPU", "GPU", "memory", "object_store_memory")  # set by cpus / gpus, not resources


def _resources(where: str, value) -> dict:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{where} must map resource names to amounts, e.g. {{'denoiser_node': 1}}")
    out = {}
    for name, amount in value.items():
        if not isinstance(name, str) or not name.strip() or name in RAY_BUILTIN:
            raise ValueError(
                f"{where}: {name!r} is not a custom resource name; CPUs and GPUs are set by cpus and *_gpus"
            )
        amount = _number(f"{where}.{name}", amount, above=0)
        if amount > 1 and not amount.is_integer():
            raise ValueError(f"{where}.{name} = {amount:g}: Ray takes amounts above 1 as whole numbers")
        out[name] = amount
    return out


def _int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _number(name: str, value, low: float | None = None, above: float | None = None) -> float:
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if ok and low is not None:
        ok = value >= low
    if ok and above is not None:
        ok = value > above
    if not ok:
        bound = f">= {low:g}" if low is not None else f"> {above:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)
