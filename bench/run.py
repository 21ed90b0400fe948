"""One benchmark run: every (backend, bucket) measured the same way, written as one JSON record.

Per row, in this order:
  1. open the target (setup: model + LiteFocus install, compile wrapper, or engine export/reuse + load);
  2. one first call (for ``*-compile`` this is where compilation happens);
  3. reset the peak-memory counter, then ``warmup`` untimed and ``repeats`` timed UNet steps
     (batch 2: classifier-free guidance), CUDA events on a GPU; ``peak_mem_mb`` is read right after
     them, so it covers the UNet steps only (setup, compilation, decode and generation excluded);
  4. the decode alone (``bench/stages.py``): reset the peak again, note what is resident, then
     ``decode_warmup`` untimed + ``decode_repeats`` timed calls of the row's decode stage on a seeded
     random latent: ``decode_ms_p50``, ``decode_peak_mem_mb`` and ``decode_mem_delta_mb`` (peak minus
     the resident baseline: the decode's own working memory);
  5. a full generation: ``steps`` DDIM steps through the runtime's sampling loop + decode (timed only).
FLOPs are analytic (``bench/flops.py``); achieved TFLOP/s = step FLOPs / median step time.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from litefocus.bench.flops import unet_step_flops
from litefocus.bench.isolated import run_isolated
from litefocus.bench.measure import (
    PeakMemory,
    device_name,
    matmul_ceiling_tflops,
    summarize_ms,
    time_ms,
    wall_s,
)
from litefocus.bench.stages import generate, measure_decode
from litefocus.bench.targets import (
    BACKENDS,
    TORCH_BACKENDS,
    Target,
    TargetSpec,
    TorchModels,
    Unavailable,
    open_target,
    uses_litefocus,
)
from litefocus.buckets import Bucket
from litefocus.config import LiteFocusConfig
from litefocus.engine.fileio import atomic_write_bytes
from litefocus.engine.manifest import library_versions
from litefocus.runtime.sampling import SCHEDULERS

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ROW_FIELDS = (  # every measured row has these (None where a value does not apply)
    "device",
    "backend",
    "seconds",
    "precision",
    "step_ms_p50",
    "step_ms_p10",
    "step_ms_p90",
    "generate_s",
    "peak_mem_mb",
    "step_gflop",
    "achieved_tflops",
)  # later additions are optional, so older records still load: decode_* (stages.measure_decode)
REPO = Path(os.environ.get("LITEFOCUS_SOURCE_DIR") or Path(__file__).resolve().parent.parent)
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class BenchOptions:
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


def git_commit() -> dict:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(  # rstrip only: porcelain lines start with a status column
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True, timeout=10
            ).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return None

    if os.environ.get("LITEFOCUS_GIT_COMMIT"):  # a copied tree (GPU machine): its .git may be stale or absent
        return {"commit": os.environ["LITEFOCUS_GIT_COMMIT"], "dirty": None, "changed": None}
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    changed = [line[3:] for line in status.splitlines()] if status else []
    return {"commit": commit, "dirty": bool(changed) if status is not None else None, "changed": changed}


def measure_row(
    target: Target, opts: BenchOptions, device: torch.device, flops: dict, ceiling: dict, setup_s: float
) -> dict:
    c = target.contract
    inputs = c.sample_inputs(opts.seed)
    step = target.step_fn(inputs)
    first_s, out = wall_s(step, device)
    ref = target.eager_reference(inputs)
    max_abs_vs_eager = None if ref is None else float((out.float() - ref.float()).abs().max())
    mem = PeakMemory(device, torch_allocator=target.module is not None)
    mem.reset()
    times = time_ms(step, device, opts.warmup, opts.repeats)
    peak_mem_mb = mem.peak_mb()  # the UNet steps only
    stats = summarize_ms(times)
    decode = measure_decode(target, device, opts.decode_warmup, opts.decode_repeats, opts.seed)
    gen = {"generate_s": None, "denoise_s": None, "decode_s": None}
    if opts.generates(c.bucket.seconds):
        gen = generate(target, opts.source, opts.steps, opts.seed, not opts.quiet, opts.scheduler)
    gflop = flops["total"] / 1e9
    achieved = gflop / stats["p50"]  # GFLOP per ms = TFLOP/s
    return {
        "device": device_name(device),
        "backend": target.backend,
        "seconds": c.bucket.seconds,
        "precision": opts.precision,
        "step_ms_p50": stats["p50"],
        "step_ms_p10": stats["p10"],
        "step_ms_p90": stats["p90"],
        "generate_s": gen["generate_s"],
        "peak_mem_mb": peak_mem_mb,
        "step_gflop": gflop,
        "achieved_tflops": achieved,
        "ceiling_fraction": achieved / ceiling["tflops"],
        # context
        "bucket_seconds": c.bucket.exact_seconds,
        "frames": c.bucket.frames,
        "batch": c.batch,
        "text_len": c.text_len,
        "litefocus": c.litefocus is not None,
        "provider": target.provider,
        "compiled": target.compiled,
        "setup_s": setup_s,
        "first_call_s": first_s,
        # compilation = the first call minus one warm step
        "compile_s": max(0.0, first_s - stats["p50"] / 1e3) if target.compiled else None,
        "max_abs_vs_eager": max_abs_vs_eager,  # compiled targets: first output vs the eager module
        "steps": opts.steps if gen["generate_s"] is not None else 0,
        "scheduler": opts.scheduler if gen["generate_s"] is not None else None,
        "compile_mode": opts.compile_mode if target.compiled else None,
        "denoise_s": gen["denoise_s"],
        "decode_s": gen["decode_s"],
        "warmup": opts.warmup,
        "repeats": opts.repeats,
        "step_ms_all": times,
        "mem_kind": mem.kind,
        **decode,
        "self_attention_gflop": flops["self_attention"] / 1e9,
        **target.extra,
    }


class Stopped(BaseException):
    """Raised by the SIGTERM handler of ``litefocus-bench`` (e.g. ``timeout``): the row in progress and
    the rest are recorded as skipped (status ``budget``) and the record is still written."""


def _failure(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, Unavailable):
        return "unavailable", str(exc)
    text = f"{type(exc).__name__}: {exc}".strip()
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) or "out of memory" in text.lower():
        return "oom", text.splitlines()[0][:500]
    return "failed", text.splitlines()[0][:500] if text else type(exc).__name__


def run_benchmark(opts: BenchOptions, checkpoint: Path | None = None) -> dict:
    """Measure every (backend, bucket) of ``opts``; returns the run record (rows + skipped + context).

    ``checkpoint``: a JSON path rewritten (atomically) after every row, so a run killed halfway (a
    ``timeout`` on a lent GPU) still leaves what it measured. Once ``opts.time_budget_s`` has passed,
    the remaining rows are recorded as skipped with status ``budget``, not started.
    """
    from litefocus.models import unet_structure

    started = time.perf_counter()
    created = dt.datetime.now(dt.timezone.utc)
    device = torch.device(opts.device)
    spec = TargetSpec(
        source=opts.source,
        device=device,
        precision=opts.precision,
        litefocus=opts.litefocus,
        text_len=opts.text_len,
        engines=opts.engines,
        compile_mode=opts.compile_mode,
        quiet=opts.quiet,
        gpu_ops=opts.gpu_ops,
    )
    git = git_commit()  # the code that runs, before anything can change the tree
    structure = unet_structure(opts.source)
    buckets = [Bucket.for_seconds(s) for s in opts.seconds]
    flops = {
        (b.frames, lf): unet_step_flops(
            structure, b, batch=spec.batch, text_len=opts.text_len, litefocus=opts.litefocus if lf else None
        )
        for b in buckets
        for lf in (False, True)
    }
    ceiling = matmul_ceiling_tflops(device, spec.dtype)
    logger.info(
        "dense matmul ceiling: %.2f TFLOP/s (%s, n=%d)", ceiling["tflops"], ceiling["dtype"], ceiling["n"]
    )
    models = TorchModels(spec)
    rows, skipped = [], []
    stopped = None  # set once a Stopped arrives: no further row starts
    pairs = [(backend, b) for backend in opts.backends for b in buckets]
    last_torch = max((i for i, (bk, _) in enumerate(pairs) if bk in TORCH_BACKENDS), default=-1)
    bar = tqdm(pairs, desc="litefocus-bench", unit="row", disable=opts.quiet)
    for i, (backend, bucket) in enumerate(bar):
        bar.set_postfix_str(f"{backend} {bucket.seconds:g} s")
        target = None
        elapsed = time.perf_counter() - started
        if stopped or (opts.time_budget_s is not None and elapsed > opts.time_budget_s):
            reason = (
                stopped or f"the run's time budget of {opts.time_budget_s:g} s was spent ({elapsed:.0f} s)"
            )
            skipped.append(
                {"backend": backend, "seconds": bucket.seconds, "status": "budget", "reason": reason}
            )
            if checkpoint is not None:
                write_record(make_record(opts, device, ceiling, rows, skipped, git, created), checkpoint)
            continue
        try:
            if opts.isolate:
                got, missed = run_isolated(opts, backend, bucket, spec)
                for row in got:  # against this run's ceiling, as in-process rows are
                    row["ceiling_fraction"] = row["achieved_tflops"] / ceiling["tflops"]
                rows.extend(got)
                skipped.extend(missed)
                continue  # the child logged its row
            t0 = time.perf_counter()
            target = open_target(backend, bucket, spec, models)
            setup_s = time.perf_counter() - t0
            row = measure_row(
                target, opts, device, flops[bucket.frames, uses_litefocus(backend)], ceiling, setup_s
            )
            rows.append(row)
            logger.info(
                "%-18s %6.2f s: step %9.1f ms (p10 %.1f, p90 %.1f), %.3f TFLOP/s",
                backend,
                bucket.seconds,
                row["step_ms_p50"],
                row["step_ms_p10"],
                row["step_ms_p90"],
                row["achieved_tflops"],
            )
        except Stopped as e:
            why = str(e) or "SIGTERM"
            reason = f"stopped during this row ({why})"
            skipped.append(
                {"backend": backend, "seconds": bucket.seconds, "status": "budget", "reason": reason}
            )
            logger.warning("%s %g s: %s", backend, bucket.seconds, reason)
            stopped = f"not started: the run was stopped ({why})"
        except Exception as e:  # noqa: BLE001 - one row failing is a result, not the end of the run
            status, reason = _failure(e)
            log = logger.info if status == "unavailable" else logger.warning
            log("%s %g s: %s (%s)", backend, bucket.seconds, status, reason)
            logger.debug("row failure", exc_info=True)
            skipped.append(
                {"backend": backend, "seconds": bucket.seconds, "status": status, "reason": reason}
            )
        finally:
            if target is not None:
                target.close()
            if i == last_torch:
                models.drop()  # the engine rows should not carry the PyTorch weights in their memory
            if checkpoint is not None:
                write_record(make_record(opts, device, ceiling, rows, skipped, git, created), checkpoint)
    bar.close()
    return make_record(opts, device, ceiling, rows, skipped, git, created)


def make_record(
    opts: BenchOptions,
    device: torch.device,
    ceiling: dict,
    rows: list,
    skipped: list,
    git: dict,
    created: dt.datetime | None = None,
) -> dict:
    created = created or dt.datetime.now(dt.timezone.utc)
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "litefocus-bench",
        "created": created.strftime("%Y%m%dT%H%M%SZ"),
        "device": device_name(device),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": library_versions(),
        "git": git,
        "command": opts.command or " ".join(sys.argv),
        "options": opts.to_dict(),
        "matmul_ceiling": ceiling,
        "rows": rows,
        "skipped": skipped,
    }


def record_path(out: Path, device_type: str, created: str) -> Path:
    return out / f"unet-{device_type}-{created}.json"


def write_record(record: dict, out: Path) -> Path:
    """The record as JSON (atomic) at ``out``: a ``.json`` path, or a directory that gets
    ``unet-<device type>-<created>.json``; returns its path."""
    path = out if out.suffix == ".json" else record_path(out, record["device_type"], record["created"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode())
    return path
