"""Measurement primitives shared by the benchmarks: timing, percentiles, peak memory, matmul ceiling.

Timing: warm-up calls first, then one wall time per call; on a GPU each call is bracketed by CUDA
events (device time, no host-side jitter). Peak memory: on a GPU ``torch.cuda.max_memory_allocated``
(reset per measurement); on CPU the process's peak resident set (Linux ``VmHWM``, reset per
measurement through ``/proc/self/clear_refs``), which includes weights, activations and libraries;
``PeakMemory.resident_mb`` reads what is resident at a point (VmRSS / ``memory_allocated``), so a
peak minus the baseline taken right after the reset is a stage's own working memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Per-call times in ms of ``repeats`` calls after ``warmup`` untimed ones (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def wall_s(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(seconds, result) of one call, device work included."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method) of a non-empty list."""
    if not xs:
        raise ValueError("quantile of an empty list")
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize_ms(times: list[float]) -> dict[str, float]:
    return {
        "p50": statistics.median(times),
        "p10": quantile(times, 0.1),
        "p90": quantile(times, 0.9),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _read_status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def rss_mb() -> float | None:
    """This process's resident set now (Linux ``VmRSS``), in MiB; None where it cannot be read."""
    kb = _read_status_kb("VmRSS")
    return None if kb is None else kb / 1024


def release_memory(device: torch.device) -> None:
    """Free what the previous measurement left: Python garbage, the CUDA cache, glibc's free lists."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory of everything done between ``reset()`` and ``peak_mb()``.

    ``kind``: ``cuda_max_allocated`` (PyTorch's allocator on the GPU; memory that ONNX Runtime or
    TensorRT allocate themselves is not in it, so their GPU rows report ``cuda_in_use_at_end``: device
    memory in use from ``torch.cuda.mem_get_info`` at the end, not a peak) or ``rss`` (process peak
    resident set on CPU).
    """

    def __init__(self, device: torch.device, torch_allocator: bool = True):
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_allocated" if torch_allocator else "cuda_in_use_at_end"
        else:
            self.kind = "rss"
        self._can_reset = True

    def reset(self) -> None:
        release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            if self._can_reset:
                logger.warning("cannot reset the peak RSS here: CPU peaks include earlier measurements")
            self._can_reset = False

    def peak_mb(self) -> float | None:
        if self.kind == "cuda_max_allocated":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.kind == "cuda_in_use_at_end":  # not a peak: device memory in use (all processes)
            free, total = torch.cuda.mem_get_info(self.device)
            return (total - free) / 2**20
        kb = _read_status_kb("VmHWM")
        return None if kb is None else kb / 1024

    def resident_mb(self) -> float | None:
        """What is resident now, in the units of ``peak_mb`` (a baseline to subtract from the peak):
        ``torch.cuda.memory_allocated`` or VmRSS; None for ``cuda_in_use_at_end`` (no peak to compare)."""
        if self.kind == "cuda_max_allocated":
            return torch.cuda.memory_allocated(self.device) / 2**20
        if self.kind == "cuda_in_use_at_end":
            return None
        return rss_mb()


def matmul_ceiling_tflops(
    device: torch.device, dtype: torch.dtype, n: int | None = None, warmup: int = 3, repeats: int = 10
) -> dict:
    """The measured dense-matmul throughput of this device: the physical ceiling rows are compared to.

    An ``n x n @ n x n`` matmul (8192 on a GPU, 2048 on CPU) in ``dtype``; TFLOP/s of the median call.
    """
    n = n or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    with torch.inference_mode():
        times = time_ms(lambda: a @ b, device, warmup, repeats)
    ms = statistics.median(times)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "ms": ms, "tflops": 2 * n**3 / ms / 1e9}


def cpu_ort_record(benchmark: str, module: str, argv: list[str] | None) -> dict:
    """The identity every CPU ONNX Runtime record starts with: what ran (``python -m module argv``),
    when (``created``, a UTC stamp the file name reuses), on what machine and versions."""
    import datetime as dt
    import os
    import sys

    import onnxruntime

    return {
        "benchmark": benchmark,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
        "device": f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} threads",
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "command": " ".join([f"python -m {module}", *(argv if argv is not None else sys.argv[1:])]),
    }


def write_json(out_dir: Path, name: str, record: dict) -> Path:
    """``record`` as indented JSON at ``out_dir/name`` (atomic; the folder is created); returns the path."""
    from litefocus.engine.fileio import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode())
    logger.info("wrote %s", path)
    return path
