"""Attention-only benchmark: full SDPA vs static LiteFocus at the real shapes of the patched level.

    python -m litefocus.bench.attention --seconds 10 20 40 80 160

Shapes: B=2 (classifier-free guidance), H=8, D=32, F=8 (AudioLDM2's 256-channel level), N = T x 8
with T the level's time frames for that audio length, S = floor(0.1 N). Times the attention call
alone (q, k, v given), with warm-up, repeats and medians (CUDA events on a GPU), and writes JSON rows
to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from litefocus import FocusSpec, LiteFocusConfig, litefocus_attention
from litefocus.bench.measure import device_name, quantile, time_ms, write_json
from litefocus.geometry import latent_frames, level_frames

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class AttentionCase:
    """One timed attention call: the patched level's shapes at ``seconds`` of audio."""

    seconds: float
    dtype: torch.dtype
    device: torch.device
    warmup: int
    repeats: int
    batch: int = 2  # classifier-free guidance
    heads: int = 8
    head_dim: int = 32
    freq_bins: int = 8  # AudioLDM2's 256-channel level
    ratio: float = 0.1  # LiteFocus's sparse ratio: S = floor(ratio N)
    seed: int = 0


def bench_one(case: AttentionCase) -> list[dict]:
    """Full SDPA and static LiteFocus on the same random q, k, v: one row each."""
    seconds, batch, heads, head_dim = case.seconds, case.batch, case.heads, case.head_dim
    freq_bins, dtype, device = case.freq_bins, case.dtype, case.device
    t_level = level_frames(latent_frames(seconds), 1)
    n = t_level * freq_bins
    s = LiteFocusConfig(sparse_ratio=case.ratio).num_global(n)
    g = torch.Generator().manual_seed(case.seed)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g).to(device, dtype) for _ in range(3))
    idx = torch.randperm(n, generator=g)[:s].to(device)
    methods = {
        "full_sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "litefocus": lambda: litefocus_attention(q, k, v, FocusSpec(freq_bins), idx),
    }
    rows = []
    with torch.inference_mode():
        for method, fn in methods.items():
            times = time_ms(fn, device, case.warmup, case.repeats)
            rows.append(
                {
                    "method": method,
                    "seconds": seconds,
                    "T": t_level,
                    "F": freq_bins,
                    "N": n,
                    "S": s,
                    "B": batch,
                    "H": heads,
                    "D": head_dim,
                    "dtype": str(dtype).removeprefix("torch."),
                    "ms_p50": statistics.median(times),
                    "ms_p10": quantile(times, 0.1),
                    "ms_p90": quantile(times, 0.9),
                    "repeats": case.repeats,
                    "warmup": case.warmup,
                    # attention FLOPs (QK^T and PV, 2 flops per MAC): N x keys-per-query x D x 4 per head
                    "gflop": 4
                    * batch
                    * heads
                    * n
                    * (n if method == "full_sdpa" else t_level + s)
                    * head_dim
                    / 1e9,
                }
            )
    rows[1]["speedup_vs_full"] = rows[0]["ms_p50"] / rows[1]["ms_p50"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, nargs="+", default=[10, 20, 40, 80, 160])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON file")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    for s in args.seconds:
        if not s > 0 or s > 600:
            p.error(f"--seconds values must be in (0, 600], got {s}")
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    rows = []
    for seconds in tqdm(args.seconds, desc="attention bench", disable=args.quiet):
        case = AttentionCase(seconds, dtype, device, warmup=args.warmup, repeats=args.repeats)
        rows += bench_one(case)
        logger.info(
            "%6.1f s  N=%5d  full %8.1f ms  litefocus %7.1f ms  %.2fx",
            seconds,
            rows[-1]["N"],
            rows[-2]["ms_p50"],
            rows[-1]["ms_p50"],
            rows[-1]["speedup_vs_full"],
        )
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    record = {
        "benchmark": "attention",
        "created": stamp,
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
        "rows": [{"device": device_name(device), **r} for r in rows],
    }
    write_json(args.out, f"attention-{device.type}-{stamp}.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
