"""One benchmark row measured in this process, and the context every row of a run shares.

A run's context is opened once: the git state of the code that runs, the UNet's analytic FLOPs per
bucket (``bench/flops.py``), the device's dense matmul ceiling and the PyTorch models the torch rows
share. A row, in this order:
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
Achieved TFLOP/s = step FLOPs / median step time. ``bench/run.py`` runs the rows (here, or each in a
process of its own through ``bench/isolated.py``, which measures its one row with this module).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from litefocus.bench.flops import unet_step_flops
from litefocus.bench.measure import (
    PeakMemory,
    device_name,
    matmul_ceiling_tflops,
    summarize_ms,
    time_ms,
    wall_s,
)
from litefocus.bench.options import BenchOptions
from litefocus.bench.stages import generate, measure_decode
from litefocus.bench.targets import Target, TargetSpec, TorchModels, Unavailable, open_target, uses_litefocus
from litefocus.buckets import Bucket

logger = logging.getLogger(__name__)

REPO = Path(os.environ.get("LITEFOCUS_SOURCE_DIR") or Path(__file__).resolve().parent.parent)


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


@dataclass(frozen=True)
class RunContext:
    """What every row of one run shares; ``models`` drops its weights once the torch rows are done."""

    opts: BenchOptions
    spec: TargetSpec
    flops: dict  # (frames, uses LiteFocus) -> unet_step_flops
    ceiling: dict  # matmul_ceiling_tflops
    models: TorchModels
    git: dict
    created: dt.datetime

    @property
    def device(self) -> torch.device:
        return self.spec.device

    @classmethod
    def open(cls, opts: BenchOptions) -> RunContext:
        from litefocus.models import unet_structure

        created = dt.datetime.now(dt.timezone.utc)
        spec = TargetSpec(
            source=opts.source,
            device=torch.device(opts.device),
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
        lf = opts.litefocus
        flops = {
            (b.frames, on): unet_step_flops(
                structure, b, batch=spec.batch, text_len=opts.text_len, litefocus=lf if on else None
            )
            for b in (Bucket.for_seconds(s) for s in opts.seconds)
            for on in (False, True)
        }
        ceiling = matmul_ceiling_tflops(spec.device, spec.dtype)
        logger.info(
            "dense matmul ceiling: %.2f TFLOP/s (%s, n=%d)", ceiling["tflops"], ceiling["dtype"], ceiling["n"]
        )
        return cls(opts, spec, flops, ceiling, TorchModels(spec), git, created)


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


def failure(exc: BaseException) -> tuple[str, str]:
    """(status, reason) of a row that raised ``exc``: unavailable, oom or failed."""
    if isinstance(exc, Unavailable):
        return "unavailable", str(exc)
    text = f"{type(exc).__name__}: {exc}".strip()
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) or "out of memory" in text.lower():
        return "oom", text.splitlines()[0][:500]
    return "failed", text.splitlines()[0][:500] if text else type(exc).__name__


def skipped_row(backend: str, bucket: Bucket, exc: Exception) -> dict:
    """The skipped entry (and its log line) of a row that raised ``exc``."""
    status, reason = failure(exc)
    log = logger.info if status == "unavailable" else logger.warning
    log("%s %g s: %s (%s)", backend, bucket.seconds, status, reason)
    logger.debug("row failure", exc_info=True)
    return {"backend": backend, "seconds": bucket.seconds, "status": status, "reason": reason}


def measure_here(ctx: RunContext, backend: str, bucket: Bucket) -> dict:
    """One (``backend``, ``bucket``) row measured in this process; raises what opening or measuring
    raised (the target is closed either way)."""
    t0 = time.perf_counter()
    target = open_target(backend, bucket, ctx.spec, ctx.models)
    try:
        setup_s = time.perf_counter() - t0
        flops = ctx.flops[bucket.frames, uses_litefocus(backend)]
        row = measure_row(target, ctx.opts, ctx.device, flops, ctx.ceiling, setup_s)
        logger.info(
            "%-18s %6.2f s: step %9.1f ms (p10 %.1f, p90 %.1f), %.3f TFLOP/s",
            backend,
            bucket.seconds,
            row["step_ms_p50"],
            row["step_ms_p10"],
            row["step_ms_p90"],
            row["achieved_tflops"],
        )
        return row
    finally:
        target.close()
