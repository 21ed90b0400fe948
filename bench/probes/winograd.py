"""Each 3x3 convolution shape of a UNet graph, direct against Winograd, alone in ONNX Runtime's CPU EP.

    python -m litefocus.bench.probes.winograd ENGINES/80s-fp32/unet.onnx     # a graph exported --conv direct

For every distinct (input shape, output channels) of the graph's plain 3x3 convolutions: a one-conv
graph with random weights, as exported (one Conv node) and as ``export/winograd.py`` rewrites it
(chunked as in the engines), each in the runtime's UNet session (``open_session``); ``--warmup``
untimed calls, then the two alternate for ``--repeats`` timed calls each. Per shape: the medians, the
ratio, GFLOP/s of the direct conv and max |winograd - direct| / rms(direct). JSON to
``bench/results/winograd-cpu-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from litefocus.bench.measure import cpu_ort_record, write_json
from litefocus.engine.backends import open_session
from litefocus.export.audit import is_winograd_conv
from litefocus.export.fold import static_shapes
from litefocus.export.winograd import rewrite_convs, tile_for

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results"


def conv_shapes(path: Path) -> Counter:
    """(input shape, output channels) -> how many plain 3x3 convolutions of that shape ``path`` has."""
    model = onnx.load(str(path), load_external_data=False)
    shapes, dims = static_shapes(model), {t.name: tuple(t.dims) for t in model.graph.initializer}
    return Counter(
        (tuple(shapes[n.input[0]]), dims[n.input[1]][0])
        for n in model.graph.node
        if n.op_type == "Conv" and is_winograd_conv(n, dims.get(n.input[1])) and n.input[0] in shapes
    )


def one_conv(shape: tuple[int, ...], co: int, seed: int = 0) -> onnx.ModelProto:
    """A graph of one 3x3 convolution (pad 1, bias) of ``shape`` into ``co`` channels, random weights."""
    b, c, h, w = shape
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((co, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    inits = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(rng.standard_normal(co).astype(np.float32), "b"),
    ]
    node = helper.make_node(
        "Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
    )
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, co, h, w])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def measure(shape: tuple[int, ...], co: int, warmup: int, repeats: int, tmp: Path) -> dict:
    direct = one_conv(shape, co)
    winograd = one_conv(shape, co)
    rewrite_convs(winograd)
    sessions = {}
    for label, model in (("direct", direct), ("winograd", winograd)):
        onnx.save(model, str(tmp / f"{label}.onnx"))
        sessions[label] = open_session(tmp / f"{label}.onnx", ["CPUExecutionProvider"], "unet")
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    outs = {k: s.run(None, {"x": x})[0] for k, s in sessions.items()}
    for _ in range(warmup - 1):
        for s in sessions.values():
            s.run(None, {"x": x})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"x": x})
            times[k].append(time.perf_counter() - t)
    ref = outs["direct"].astype(np.float64)
    d_ms, w_ms = (1e3 * float(np.median(times[k])) for k in ("direct", "winograd"))
    gflop = 2 * np.prod(shape) * co * 9 / 1e9
    return {
        "shape": list(shape),
        "out_channels": co,
        "tile": tile_for(shape[3]),
        "chunks": sum(n.op_type == "ConvTranspose" for n in winograd.graph.node),
        "direct_ms": round(d_ms, 3),
        "winograd_ms": round(w_ms, 3),
        "speedup": round(d_ms / w_ms, 3),
        "direct_gflop_per_s": round(gflop / d_ms * 1e3, 1),
        "max_err_rel_rms": float(np.abs(outs["winograd"] - ref).max() / np.sqrt(np.mean(ref**2))),
        "direct_ms_all": [round(1e3 * t, 3) for t in times["direct"]],
        "winograd_ms_all": [round(1e3 * t, 3) for t in times["winograd"]],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "graph", type=Path, help="a UNet .onnx exported with --conv direct (shapes are read from it)"
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each form first (>= 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each form, alternating")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON file")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    if not args.graph.is_file():
        p.error(f"{args.graph} is not a file: give an .onnx graph, e.g. engines/80s-fp32/unet.onnx")
    if args.warmup < 1 or args.repeats < 1:
        p.error(f"--warmup and --repeats must be >= 1, got {args.warmup} and {args.repeats}")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        shapes = conv_shapes(args.graph)
    except Exception as e:  # noqa: BLE001 - protobuf / shape inference on a file that is not a graph
        p.error(f"{args.graph}: not a readable ONNX graph ({type(e).__name__}); give an exported unet.onnx")
    if not shapes:
        p.error(f"{args.graph} has no plain 3x3 convolution: give a graph exported with --conv direct")
    rows = []
    with tempfile.TemporaryDirectory(prefix="litefocus-winograd-") as tmp:
        for (shape, co), count in sorted(shapes.items(), key=lambda kv: -np.prod(kv[0][0]) * kv[0][1]):
            row = {**measure(shape, co, args.warmup, args.repeats, Path(tmp)), "convs": count}
            rows.append(row)
            logger.info(
                "%-22s -> %4d  x%d  direct %7.1f ms  winograd %7.1f ms  %.2fx  err %.1e",
                str(list(shape)), co, count, row["direct_ms"], row["winograd_ms"], row["speedup"],
                row["max_err_rel_rms"],
            )  # fmt: skip
    total = {k: sum(r[k] * r["convs"] for r in rows) for k in ("direct_ms", "winograd_ms")}
    logger.info("all %d convs: direct %.0f ms, winograd %.0f ms", sum(shapes.values()), *total.values())
    record = {
        **cpu_ort_record("winograd", "litefocus.bench.probes.winograd", argv),
        "graph": str(args.graph),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "total_ms": {k: round(v, 3) for k, v in total.items()},
        "rows": rows,
    }
    write_json(args.out, f"winograd-cpu-{record['created']}.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
