"""Up-front memory check of an export: a bucket whose export would not fit this machine is refused
before anything heavy starts (exit 2, naming the memory it needs and the option that fits), never
killed for memory halfway.

The estimate is linear in the bucket's length above a floor (loading the model and opening the
sessions), fitted to export peaks measured on the reference machine (``memory_model.json``: the
data, its source and the fit; no graph holds a quadratic tensor any more once attention is fused). A time-chunked decode (``--decode-window``) bounds the
decode's part by the window's length. Plain attention (TensorRT graphs) is not modelled.
"""

from __future__ import annotations

import json
import logging
import math
from functools import cache
from pathlib import Path

from litefocus.buckets import Bucket

logger = logging.getLogger(__name__)

GIB = 2**30
HEADROOM = 0.9  # of the available memory an export may plan to use
WINDOWS = (40.0, 20.0, 10.0)  # --decode-window values offered, longest first


@cache
def memory_model() -> dict:
    return json.loads((Path(__file__).parent / "memory_model.json").read_text())


def estimate_gib(
    seconds: float, precision: str = "fp32", decode_window: float | None = None, parameters: int | None = None
) -> float:
    """Peak resident memory (GiB) of exporting one bucket of ``seconds``: base + UNet part + decode
    part, scaled by the model's size against the measured one (``parameters``: UNet + VAE + vocoder)."""
    m = memory_model()
    size = 1.0 if parameters is None else parameters / m["reference_parameters"]
    decode_s = seconds if decode_window is None else min(seconds, Bucket.for_seconds(decode_window).seconds)
    scale = 0.5 if precision == "fp16" else 1.0  # halves activations and weights; conservative otherwise
    grows = m["base_gib"] + scale * (m["unet_gib_per_s"] * seconds + m["decode_gib_per_s"] * decode_s)
    return size * max(m["floor_gib"], grows)


def available_gib() -> float:
    """Memory this process can still take: MemAvailable, capped by a cgroup limit if there is one."""
    avail = math.inf
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024 / GIB
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, (int(limit) - used) / GIB)
    except (OSError, ValueError):
        pass
    return avail


def check_export_memory(
    seconds: tuple[float, ...],
    precision: str,
    decode_window: float | None,
    device: str = "cpu",
    parameters: int | None = None,
) -> None:
    """Raise ValueError (one line: what it needs, what there is, what fits) for a bucket whose export
    would not fit in this machine's available memory. GPU exports are not checked (device memory)."""
    if device != "cpu":
        return
    avail = available_gib()
    if not math.isfinite(avail):
        return
    budget = HEADROOM * avail
    for s in sorted(seconds, reverse=True):
        need = estimate_gib(s, precision, decode_window, parameters)
        if need <= budget:
            continue
        fits = [w for w in WINDOWS if w < s and estimate_gib(s, precision, w, parameters) <= budget]
        if fits:
            w = fits[0]
            fix = (
                f"pass --decode-window {w:g} (time-chunked decode: about "
                f"{estimate_gib(s, precision, w, parameters):.1f} GiB; its error against the full decode is measured "
                "and recorded), or export on a machine with more memory"
            )
        else:
            fix = f"export on a machine with at least {need / HEADROOM:.0f} GiB, or choose a shorter --seconds"
        raise ValueError(
            f"--seconds {s:g} needs about {need:.1f} GiB to export (fitted to {memory_model()['source']}); "
            f"this machine has {avail:.1f} GiB available: {fix}"
        )
