"""How ONNX Runtime runs attention, per graph form, at the real shapes of the exported graphs.

    python -m litefocus.bench.probes.attention_forms --seconds 10 80

One single-op graph per (form, site), run on the CPU EP in its own process (so each peak resident
set is its own), timed with warm-up, repeats and medians, and checked against PyTorch's SDPA:
  * plain:   MatMul(q, k^T) -> Mul(scale) -> Softmax -> MatMul(v), [B, M, L, D] (what a plain export holds);
  * fused:   com.microsoft.MultiHeadAttention on [B, L, M*D] (what ``--attention fused`` exports);
  * attn23:  the standard ONNX ``Attention`` op (opset 23) on [B, M, L, D].
Sites: the LiteFocus level (M = 8 heads x 8 bins, queries T, keys T + S, D 32), the dense 384-channel
level (M 8, N x N, D 48) and the VAE's mid-block (one head, N = 16 T, D 512), batch 2 for the UNet
(guidance) and 1 for the VAE. Rows go to ``bench/results/attention-forms-<device>-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from litefocus.bench.measure import cpu_ort_record, write_json
from litefocus.buckets import Bucket
from litefocus.config import LiteFocusConfig

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results"
FORMS = ("plain", "fused", "attn23")


def sites(seconds: float) -> list[dict]:
    """(site, B, heads M, query len, key len, D) of the three attention kinds at ``seconds``."""
    b = Bucket.for_seconds(seconds)
    t8, _ = b.grid(8)
    s = b.num_global(LiteFocusConfig(), 8)
    return [
        {"site": "litefocus-f8", "B": 2, "M": 64, "Lq": t8, "Lk": t8 + s, "D": 32},
        {"site": "dense-f4", "B": 2, "M": 8, "Lq": b.tokens(4), "Lk": b.tokens(4), "D": 48},
        {"site": "vae-mid", "B": 1, "M": 1, "Lq": b.frames * 16, "Lk": b.frames * 16, "D": 512},
    ]


def _graph(form: str, B: int, M: int, Lq: int, Lk: int, D: int):
    from onnx import TensorProto, helper

    scale = D**-0.5
    if form == "fused":
        shapes = {"q": [B, Lq, M * D], "k": [B, Lk, M * D], "v": [B, Lk, M * D], "o": [B, Lq, M * D]}
        nodes = [
            helper.make_node(
                "MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=M, scale=scale
            )
        ]
        opsets, inits = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)], []
    else:
        shapes = {"q": [B, M, Lq, D], "k": [B, M, Lk, D], "v": [B, M, Lk, D], "o": [B, M, Lq, D]}
        if form == "plain":
            nodes = [
                helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
                helper.make_node("MatMul", ["q", "kt"], ["s"]),
                helper.make_node("Mul", ["s", "scale"], ["s2"]),
                helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
                helper.make_node("MatMul", ["p", "v"], ["o"]),
            ]
            opsets, inits = (
                [helper.make_opsetid("", 18)],
                [helper.make_tensor("scale", TensorProto.FLOAT, [], [scale])],
            )
        else:
            nodes = [helper.make_node("Attention", ["q", "k", "v"], ["o"], scale=scale)]
            opsets, inits = [helper.make_opsetid("", 23)], []
    io = {n: helper.make_tensor_value_info(n, TensorProto.FLOAT, shp) for n, shp in shapes.items()}
    graph = helper.make_graph(nodes, form, [io["q"], io["k"], io["v"]], [io["o"]], inits)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model, shapes


@dataclass(frozen=True)
class FormCase:
    """One (graph form, attention shape) to time: batch B, heads M, query and key lengths, head dim D."""

    form: str
    B: int
    M: int
    Lq: int
    Lk: int
    D: int
    warmup: int
    repeats: int


def run_one(case: FormCase) -> dict:
    """Time and peak-memory of one (form, shape) in this process; error against PyTorch's SDPA."""
    import time

    import onnxruntime as ort
    import torch

    form, B, M, Lq, Lk, D = case.form, case.B, case.M, case.Lq, case.Lk, case.D
    model, shapes = _graph(form, B, M, Lq, Lk, D)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(shapes[n], dtype=np.float32) for n in "qkv"}
    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(case.warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(case.repeats):
        t0 = time.perf_counter()
        out = sess.run(None, feeds)[0]
        times.append((time.perf_counter() - t0) * 1e3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    q, k, v = (torch.from_numpy(feeds[n]) for n in "qkv")
    if form == "fused":  # [B, L, M*D] -> [B, M, L, D]
        q, k, v = (x.view(B, x.shape[1], M, D).transpose(1, 2) for x in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v).numpy()
    if form == "fused":
        ref = ref.transpose(0, 2, 1, 3).reshape(B, Lq, M * D)
    return {
        "form": form,
        "ms_p50": statistics.median(times),
        "ms_all": times,
        "peak_delta_mb": (peak - base) / 1024,  # ru_maxrss is in KiB on Linux
        "inputs_mb": sum(f.nbytes for f in feeds.values()) / 2**20,
        "score_matrix_mb": B * M * Lq * Lk * 4 / 2**20,
        "max_abs_vs_torch": float(np.abs(out - ref).max()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, nargs="+", default=[10, 80])
    p.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON file")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: JSON of one case, run in a child process
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.one:
        case = json.loads(args.one)
        print(json.dumps(run_one(FormCase(**case))))
        return 0
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    rows = []
    for seconds in args.seconds:
        for site in sites(seconds):
            shape = {k: site[k] for k in ("B", "M", "Lq", "Lk", "D")}
            for form in args.forms:
                case = {"form": form, **shape, "warmup": args.warmup, "repeats": args.repeats}
                cmd = [
                    sys.executable,
                    "-m",
                    "litefocus.bench.probes.attention_forms",
                    "--one",
                    json.dumps(case),
                ]
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    tail = (done.stderr.strip().splitlines() or ["killed"])[-1][:300]
                    row = {"form": form, "failed": f"exit {done.returncode}: {tail}"}
                else:
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append({"seconds": Bucket.for_seconds(seconds).seconds, **site, **row})
                logger.info(
                    "%5g s %-13s %-6s %9s ms  +%7s MB",
                    seconds,
                    site["site"],
                    form,
                    f"{row['ms_p50']:.1f}" if "ms_p50" in row else "-",
                    f"{row['peak_delta_mb']:.0f}" if "peak_delta_mb" in row else "-",
                )
    record = {
        **cpu_ort_record("attention-forms", "litefocus.bench.probes.attention_forms", argv),
        "rows": rows,
    }
    write_json(args.out, f"attention-forms-cpu-{record['created']}.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
