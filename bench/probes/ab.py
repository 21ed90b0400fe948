"""Interleaved A/B of ONNX Runtime CPU sessions in one process: graph against graph, or one graph
under two session setups, on a machine whose speed drifts.

    python -m litefocus.bench.probes.ab before=OLD/80s-fp32/unet.onnx@defaults \\
        after=NEW/80s-fp32/unet.onnx@unet --rounds 8

This 2-core VM's throughput drifts by several percent from one minute to the next (one session, one
graph: 18.5 then 20.2 s a step, one minute apart), so two runs taken minutes apart cannot resolve a
3 % difference. Here every round runs each session once, in turn: a round's drift is shared, and the
paired differences (each setup's time minus the first setup's, in the same round) cancel it.

Each argument is LABEL=GRAPH.onnx@SETUP. SETUP ``unet`` or ``decode``: the session litefocus opens
for that module (``engine.backends.session_options``); ``defaults``: ONNX Runtime's own defaults
(arena, buffer-reuse plan, memory pattern), which litefocus used before it chose per module. All
graphs must take the same inputs (names, shapes, types): one set of random inputs (indices zero,
masks one) feeds every session; the first warm-up run of each is compared to the first setup's
output. Rounds alternate the order (forward, then reverse), so no setup always follows the same one. Sessions stay loaded together, so the process's memory says nothing about any one of
them (``litefocus-bench`` and ``ort_memory`` measure memory). The JSON goes to
``bench/results/ab-cpu-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

from litefocus.bench.measure import cpu_ort_record, write_json
from litefocus.bench.probes.ort_memory import random_feeds
from litefocus.engine.manifest import file_sha256

logger = logging.getLogger(__name__)

SETUPS = ("unet", "decode", "defaults")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results"


def parse_setup(arg: str) -> tuple[str, Path, str]:
    """``LABEL=GRAPH.onnx@SETUP`` -> (label, path, setup); ValueError naming the fix."""
    label, sep, rest = arg.partition("=")
    path, at, setup = rest.rpartition("@")
    if not sep or not at or not label or not path:
        raise ValueError(
            f"{arg!r}: expected LABEL=GRAPH.onnx@SETUP, e.g. after=engines/80s-fp32/unet.onnx@unet"
        )
    if setup not in SETUPS:
        raise ValueError(f"{arg!r}: setup {setup!r} is not one of {', '.join(SETUPS)}")
    if not Path(path).is_file():
        raise ValueError(f"{arg!r}: {path} is not a file")
    return label, Path(path), setup


def open_setup(path: Path, setup: str, profile_prefix: str | None = None):
    """A CPU session of ``path`` with ``setup``'s options (ONNX Runtime's profiler on, writing to
    ``profile_prefix``*, when given)."""
    import onnxruntime as ort

    from litefocus.engine.backends import open_session, session_options

    providers = ["CPUExecutionProvider"]
    if setup == "defaults":
        options = ort.SessionOptions()
        options.log_severity_level = 3
    else:
        options = session_options(providers, setup)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    try:
        if setup == "defaults":
            return ort.InferenceSession(str(path), options, providers=providers)
        return open_session(path, providers, setup, options)
    except Exception as e:  # noqa: BLE001 - ORT raises its own (InvalidProtobuf, Fail, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(
            f"{path}: ONNX Runtime cannot load it ({first}); give an exported .onnx graph"
        ) from None


def run_ab(setups: list[tuple[str, Path, str]], rounds: int, warmup: int = 1) -> dict:
    import numpy as np

    sessions = {label: open_setup(path, setup) for label, path, setup in setups}
    signatures = {
        label: [(i.name, tuple(i.shape), i.type) for i in s.get_inputs()] for label, s in sessions.items()
    }
    first = setups[0][0]
    for label, sig in signatures.items():
        if sig != signatures[first]:
            raise ValueError(
                f"{label} takes {sig}, {first} takes {signatures[first]}: A/B needs the same inputs"
            )
    feeds = random_feeds(sessions[first])
    # the first warm-up, and a check that the setups compute the same thing
    outputs = {label: s.run(None, feeds)[0].astype(np.float64) for label, s in sessions.items()}
    max_abs_diff = {label: float(np.abs(out - outputs[first]).max()) for label, out in outputs.items()}
    del outputs
    for _ in range(warmup - 1):  # more untimed runs, interleaved like the timed ones
        for s in sessions.values():
            s.run(None, feeds)
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for r in range(rounds):
        order = list(sessions.items())
        if r % 2:  # every other round in reverse, so no setup always runs right after the same one
            order.reverse()
        for label, s in order:
            t = time.perf_counter()
            s.run(None, feeds)
            times[label].append(time.perf_counter() - t)
        logger.info("round %d: %s", r + 1, "  ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    rows = []
    for label, path, setup in setups:
        diffs = [a - b for a, b in zip(times[label], times[first], strict=True)]
        rows.append(
            {
                "label": label,
                "graph": str(path),
                "graph_sha256": file_sha256(path),
                "setup": setup,
                "times_s": [round(t, 6) for t in times[label]],
                "median_s": round(statistics.median(times[label]), 6),
                f"paired_diff_vs_{first}_s": [round(d, 6) for d in diffs],
                f"paired_diff_vs_{first}_median_s": round(statistics.median(diffs), 6),
                f"max_abs_diff_vs_{first}": max_abs_diff[label],
            }
        )
    return {
        "rounds": rounds,
        "warmup": warmup,
        "inputs": "random floats, indices zero, masks one",
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("setups", nargs="+", metavar="LABEL=GRAPH.onnx@SETUP", help=f"SETUP: {', '.join(SETUPS)}")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (each runs every setup once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each setup first (>= 1)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON file")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 1:
        p.error(f"--rounds and --warmup must be >= 1, got {args.rounds} and {args.warmup}")
    if len(args.setups) < 2:
        p.error("give at least two setups to compare")
    try:
        setups = [parse_setup(a) for a in args.setups]
    except ValueError as e:
        p.error(str(e))
    if len({s[0] for s in setups}) != len(setups):
        p.error("labels must differ")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        result = run_ab(setups, args.rounds, args.warmup)
    except ValueError as e:  # a graph that does not load, or graphs that take different inputs
        p.error(str(e))
    record = {**cpu_ort_record("ab", "litefocus.bench.probes.ab", argv), **result}
    for row in record["rows"]:
        logger.info(
            "%-10s median %.2f s  paired diff vs %s %+.2f s",
            row["label"],
            row["median_s"],
            setups[0][0],
            row[f"paired_diff_vs_{setups[0][0]}_median_s"],
        )
    write_json(args.out, f"ab-cpu-{record['created']}.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
