"""What one ``litefocus-bench`` run measures: backends, buckets, repeats, model source and output.

Frozen and JSON round-trippable (``to_dict`` / ``from_dict``), so a row run in a process of its own
(``bench/isolated.py``) gets exactly its parent's options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from litefocus.bench.targets import BACKENDS
from litefocus.buckets import Bucket
from litefocus.config import LiteFocusConfig
from litefocus.runtime.options import SCHEDULERS

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class BenchOptions:
    """One run's options; validated and normalized (seconds to their buckets' lengths) on creation."""

    seconds: tuple[float, ...]
    backends: tuple[str, ...] = BACKENDS
    source: str = "random:audioldm2:0"
    device: str = "cpu"
    precision: str = "fp32"
    steps: int = 25  # of the full generation; 0 skips it
    warmup: int = 2
    repeats: int = 5
    decode_warmup: int = 1  # untimed decode calls before the timed ones
    decode_repeats: int = 1  # timed decode calls; 0 skips the decode measurement
    text_len: int = 128
    engines: Path = Path("engines")
    out: Path = DEFAULT_OUT
    compile_mode: str = "default"
    gpu_ops: tuple[str, ...] | str = "auto"  # the engines' GPU graph form (litefocus-export --gpu-ops)
    litefocus: LiteFocusConfig = field(default_factory=LiteFocusConfig)
    seed: int = 0
    scheduler: str = "ddim"  # of the full generation
    generate_at: tuple[float, ...] | None = None  # buckets that run the full generation (None: all)
    time_budget_s: float | None = None  # no row starts after this many seconds of the run
    isolate: bool = False  # each row in a fresh process (bench/isolated.py): CPU peaks per row
    quiet: bool = False
    command: str = ""

    def __post_init__(self) -> None:
        for b in self.backends:
            if b not in BACKENDS:
                raise ValueError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
        if not self.backends or not self.seconds:
            raise ValueError("give at least one backend and one --seconds value")
        lows = {"steps": 0, "warmup": 0, "repeats": 1, "decode_warmup": 0, "decode_repeats": 0}
        for name, low in {**lows, "text_len": 1, "seed": 0}.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        if self.precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be fp32 or fp16, got {self.precision!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time budget must be > 0 seconds, got {self.time_budget_s!r}")
        object.__setattr__(self, "seconds", tuple(Bucket.for_seconds(s).seconds for s in self.seconds))
        if self.generate_at is not None:
            at = tuple(Bucket.for_seconds(s).seconds for s in self.generate_at)
            missing = [s for s in at if s not in self.seconds]
            if missing:
                raise ValueError(
                    f"generate_at {missing} are not among the measured seconds {list(self.seconds)}"
                )
            object.__setattr__(self, "generate_at", at)

    def generates(self, seconds: float) -> bool:
        """Whether the bucket of ``seconds`` runs the full generation."""
        return bool(self.steps) and (self.generate_at is None or seconds in self.generate_at)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("litefocus", "quiet")}
        d.update(seconds=list(self.seconds), backends=list(self.backends), engines=str(self.engines))
        d.update(generate_at=None if self.generate_at is None else list(self.generate_at))
        d.update(out=str(self.out), litefocus=self.litefocus.to_dict())
        return d

    @classmethod
    def from_dict(cls, d: dict, quiet: bool = False) -> BenchOptions:
        """The inverse of ``to_dict`` (which leaves ``quiet`` out)."""
        at = d.get("generate_at")
        fields = {
            **d,
            **{k: tuple(d[k]) for k in ("seconds", "backends")},
            **{k: Path(d[k]) for k in ("engines", "out")},
            "generate_at": None if at is None else tuple(at),
            "gpu_ops": g if isinstance(g := d.get("gpu_ops", "auto"), str) else tuple(g),  # JSON: a list
            "litefocus": LiteFocusConfig.from_dict(d["litefocus"]),
            "quiet": quiet,
        }
        return cls(**fields)
