"""One benchmark row in a process of its own (``litefocus-bench`` on CPU, unless ``--no-isolate``).

A CPU row's ``peak_mem_mb`` is its process's peak resident set. Measured in the run's own process, an
engine row would carry what earlier rows and the engine export left resident (freed heap that glibc
keeps, PyTorch's weights); in a fresh process every row starts from the same interpreter with the same
libraries imported, so the peaks compare weights plus activations, backend against backend. The parent
exports (or reuses) the engine first, so the child only opens it.

    python -m litefocus.bench.isolated OPTIONS.json RECORD.json

measures the one (backend, bucket) of OPTIONS.json (written by ``run_isolated``) as ``bench/row.py``
does in the parent's own process, and writes its record (the row, or why it was skipped) to RECORD.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from litefocus.bench.options import BenchOptions
from litefocus.bench.record import make_record, write_record
from litefocus.bench.row import RunContext, measure_here, skipped_row
from litefocus.bench.targets import (
    ENGINE_BACKENDS,
    TargetSpec,
    Unavailable,
    prepare_engines,
    unavailable_reason,
)
from litefocus.buckets import Bucket


def row_options(opts: BenchOptions, backend: str, seconds: float) -> BenchOptions:
    """``opts`` narrowed to one row, run in-process by the child."""
    at = opts.generate_at
    return dataclasses.replace(
        opts,
        backends=(backend,),
        seconds=(seconds,),
        generate_at=None if at is None else tuple(s for s in at if s == seconds),
        time_budget_s=None,
        isolate=False,
    )


def run_isolated(
    opts: BenchOptions, backend: str, bucket: Bucket, spec: TargetSpec
) -> tuple[list[dict], list[dict]]:
    """Measure (``backend``, ``bucket``) in a child process; returns its (rows, skipped).

    Raises ``Unavailable`` (as ``open_target`` does) before anything starts when the backend cannot
    run here; an engine is exported or reused here, in the parent."""
    reason = unavailable_reason(backend, spec.device)
    if reason:
        raise Unavailable(reason)
    if backend in ENGINE_BACKENDS:
        prepare_engines(backend, bucket, spec)
    child = row_options(opts, backend, bucket.seconds)
    with tempfile.TemporaryDirectory(prefix="litefocus-bench-row-") as tmp:
        options, record = Path(tmp) / "options.json", Path(tmp) / "record.json"
        options.write_text(json.dumps({"options": child.to_dict(), "quiet": child.quiet}, indent=1) + "\n")
        cmd = [sys.executable, "-P", "-m", "litefocus.bench.isolated", str(options), str(record)]
        # -P: the working directory does not shadow installed modules
        done = subprocess.run(cmd, check=False)  # a Stopped in the parent kills the child
        if record.is_file():
            data = json.loads(record.read_text())
            return data["rows"], data["skipped"]
    how = (
        f"signal {signal.Signals(-done.returncode).name}"
        if done.returncode < 0
        else f"exit {done.returncode}"
    )
    status = "oom" if done.returncode == -signal.SIGKILL else "failed"
    reason = f"the row's process ended ({how}) without a record"
    return [], [{"backend": backend, "seconds": bucket.seconds, "status": status, "reason": reason}]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit("usage: python -m litefocus.bench.isolated OPTIONS.json RECORD.json")
    data = json.loads(Path(argv[0]).read_text())
    opts = BenchOptions.from_dict(data["options"], quiet=data["quiet"])
    logging.basicConfig(level=logging.WARNING if opts.quiet else logging.INFO, format="%(message)s")
    ctx = RunContext.open(opts)
    rows, skipped = [], []
    for backend in opts.backends:  # one, with one bucket (row_options)
        for bucket in (Bucket.for_seconds(s) for s in opts.seconds):
            try:
                rows.append(measure_here(ctx, backend, bucket))
            except Exception as e:  # noqa: BLE001 - recorded as skipped, as in the parent
                skipped.append(skipped_row(backend, bucket, e))
    write_record(make_record(ctx, rows, skipped), Path(argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
