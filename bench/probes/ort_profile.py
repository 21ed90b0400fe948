"""Where one ONNX Runtime CPU call spends its time, by operator type, from ONNX Runtime's profiler.

    python -m litefocus.bench.probes.ort_profile ENGINES/80s-fp32/unet.onnx --setup unet \\
        --prefix /unet/down_blocks.0/ /unet/down_blocks.1/resnets.0/

One session (``--setup`` as in ``litefocus.bench.probes.ab``), random inputs (indices zero, masks one),
``--warmup`` untimed calls, then one profiled call. Per operator type: nodes, kernel seconds, and
for the ops that carry the FLOPs (Conv, Gemm, MatMul, FusedMatMul, MultiHeadAttention) GFLOP and
GFLOP/s from the shapes the profiler records; the same per (operator, input shapes), the slowest
``--shapes`` of them, to tell which layer shapes run below the machine's rate. ``--prefix``: kernel
seconds of the nodes whose names start with each prefix. The JSON goes to
``bench/results/ort-profile-cpu-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
from collections import defaultdict
from pathlib import Path

from litefocus.bench.measure import cpu_ort_record, write_json
from litefocus.bench.probes.ab import SETUPS, open_setup
from litefocus.bench.probes.ort_memory import random_feeds

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results"


def node_flops(op: str, inputs: list[list[int]], output: list[int]) -> int:
    """Multiply-adds x 2 of one node from its recorded shapes (0 for ops not counted)."""
    if op in ("MatMul", "FusedMatMul"):  # a constant weight is not among the recorded inputs
        return 2 * math.prod(output) * inputs[0][-1]
    if op == "Gemm":
        return 2 * math.prod(output) * inputs[0][1]  # litefocus exports A untransposed
    if op == "Conv":
        return 2 * math.prod(output) * math.prod(inputs[1][1:])  # weight [Cout, Cin/groups, kh, kw]
    if op == "MultiHeadAttention":  # q [B, Sq, H*D], k [B, Sk, H*D]: QK^T and PV
        (b, sq, hd), sk = inputs[0], inputs[1][1]
        return 4 * b * sq * sk * hd
    return 0


def _rows(groups: dict, total: float, key: str) -> list[dict]:
    rows = []
    for name, row in sorted(groups.items(), key=lambda kv: -kv[1]["seconds"]):
        out = {key: name, "nodes": row["nodes"], "seconds": round(row["seconds"], 6)}
        out["share"] = round(row["seconds"] / total, 4) if total else 0.0
        if row["gflop"]:
            out["gflop"] = round(row["gflop"], 6)
            out["gflop_per_s"] = round(row["gflop"] / row["seconds"], 3) if row["seconds"] else None
        rows.append(out)
    return rows


def summarize(events: list[dict], prefixes: tuple[str, ...] = (), keep_shapes: int = 0) -> dict:
    """Profiler events of one or more runs -> per-op-type totals of the LAST run (and per op and
    input shapes, the ``keep_shapes`` slowest)."""
    start = max(e["ts"] for e in events if e.get("name") == "model_run")
    ops: dict[str, dict] = defaultdict(lambda: {"nodes": 0, "seconds": 0.0, "gflop": 0.0})
    by_shape: dict[str, dict] = defaultdict(lambda: {"nodes": 0, "seconds": 0.0, "gflop": 0.0})
    by_prefix = dict.fromkeys(prefixes, 0.0)
    total = 0.0
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < start:
            continue
        op = e["args"]["op_name"]
        shapes = [next(iter(d.values())) for d in e["args"].get("input_type_shape", [])]
        output = next(iter(e["args"]["output_type_shape"][0].values()))
        seconds = e["dur"] / 1e6
        gflop = node_flops(op, shapes, output) / 1e9
        for row in (ops[op], by_shape[f"{op} {' x '.join(map(str, shapes))}"]):
            row["nodes"] += 1
            row["seconds"] += seconds
            row["gflop"] += gflop
        total += seconds
        for p in prefixes:
            if e["name"].startswith(p):
                by_prefix[p] += seconds
    return {
        "kernel_seconds": round(total, 6),
        "ops": _rows(ops, total, "op"),
        "shapes": _rows(by_shape, total, "shape")[:keep_shapes],
        "prefix_seconds": {p: round(s, 6) for p, s in by_prefix.items()},
    }


def profile(path: Path, setup: str, warmup: int, prefixes: tuple[str, ...], keep_shapes: int = 0) -> dict:
    with tempfile.TemporaryDirectory(prefix="litefocus-profile-") as tmp:
        session = open_setup(path, setup, profile_prefix=str(Path(tmp) / "ort"))
        feeds = random_feeds(session)
        for _ in range(warmup):
            session.run(None, feeds)
        session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    return summarize(events, prefixes, keep_shapes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("graph", type=Path, help="an .onnx graph (its external data beside it)")
    p.add_argument(
        "--setup", choices=SETUPS, default="unet", help="session options (see litefocus.bench.probes.ab)"
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before the profiled one")
    p.add_argument("--prefix", nargs="*", default=[], help="node-name prefixes to total separately")
    p.add_argument("--shapes", type=int, default=40, help="how many (operator, input shapes) groups to keep")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON file")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    if not args.graph.is_file():
        p.error(f"{args.graph} is not a file: give an .onnx graph, e.g. engines/80s-fp32/unet.onnx")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.shapes < 0:
        p.error(f"--shapes must be >= 0, got {args.shapes}")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        result = profile(args.graph, args.setup, args.warmup, tuple(args.prefix), args.shapes)
    except ValueError as e:  # not a graph ONNX Runtime loads
        p.error(str(e))
    for row in result["ops"][:12]:
        logger.info(
            "%-22s %4d nodes %7.2f s %5.1f %%%s",
            row["op"],
            row["nodes"],
            row["seconds"],
            100 * row["share"],
            f"  {row['gflop']:8.1f} GFLOP {row['gflop_per_s']:6.1f} GFLOP/s" if "gflop" in row else "",
        )
    record = {
        **cpu_ort_record("ort-profile", "litefocus.bench.probes.ort_profile", argv),
        "graph": str(args.graph),
        "setup": args.setup,
        **result,
    }
    write_json(args.out, f"ort-profile-cpu-{record['created']}.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
