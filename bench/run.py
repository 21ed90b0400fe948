"""One benchmark run: every (backend, bucket) measured the same way, written as one JSON record.

Each row is measured as ``bench/row.py`` describes, in this process or (``isolate``, the CPU default
of ``litefocus-bench``) in a process of its own (``bench/isolated.py``), so that CPU peaks are per row.
A row that cannot run, fails or runs out of memory is recorded as skipped with its reason; the rest of
the run goes on. ``SIGTERM`` (``Stopped``) and ``time_budget_s`` end a run early, with its record.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tqdm import tqdm

from litefocus.bench.isolated import run_isolated
from litefocus.bench.options import BenchOptions
from litefocus.bench.record import make_record, write_record
from litefocus.bench.row import RunContext, measure_here, skipped_row
from litefocus.bench.targets import TORCH_BACKENDS
from litefocus.buckets import Bucket

logger = logging.getLogger(__name__)


class Stopped(BaseException):
    """Raised by the SIGTERM handler of ``litefocus-bench`` (e.g. ``timeout``): the row in progress and
    the rest are recorded as skipped (status ``budget``) and the record is still written."""


def run_benchmark(opts: BenchOptions, checkpoint: Path | None = None) -> dict:
    """Measure every (backend, bucket) of ``opts``; returns the run record (rows + skipped + context).

    ``checkpoint``: a JSON path rewritten (atomically) after every row, so a run killed halfway (a
    ``timeout`` on a lent GPU) still leaves what it measured. Once ``opts.time_budget_s`` has passed,
    the remaining rows are recorded as skipped with status ``budget``, not started.
    """
    started = time.perf_counter()
    ctx = RunContext.open(opts)
    rows, skipped = [], []
    stopped = None  # set once a Stopped arrives: no further row starts
    buckets = [Bucket.for_seconds(s) for s in opts.seconds]
    pairs = [(backend, b) for backend in opts.backends for b in buckets]
    last_torch = max((i for i, (bk, _) in enumerate(pairs) if bk in TORCH_BACKENDS), default=-1)
    bar = tqdm(pairs, desc="litefocus-bench", unit="row", disable=opts.quiet)
    for i, (backend, bucket) in enumerate(bar):
        bar.set_postfix_str(f"{backend} {bucket.seconds:g} s")
        elapsed = time.perf_counter() - started
        if stopped or (opts.time_budget_s is not None and elapsed > opts.time_budget_s):
            reason = (
                stopped or f"the run's time budget of {opts.time_budget_s:g} s was spent ({elapsed:.0f} s)"
            )
            skipped.append(
                {"backend": backend, "seconds": bucket.seconds, "status": "budget", "reason": reason}
            )
            if checkpoint is not None:
                write_record(make_record(ctx, rows, skipped), checkpoint)
            continue
        try:
            if opts.isolate:
                got, missed = run_isolated(opts, backend, bucket, ctx.spec)
                for row in got:  # against this run's ceiling, as in-process rows are
                    row["ceiling_fraction"] = row["achieved_tflops"] / ctx.ceiling["tflops"]
                rows.extend(got)
                skipped.extend(missed)
                continue  # the child logged its row
            rows.append(measure_here(ctx, backend, bucket))
        except Stopped as e:
            why = str(e) or "SIGTERM"
            reason = f"stopped during this row ({why})"
            skipped.append(
                {"backend": backend, "seconds": bucket.seconds, "status": "budget", "reason": reason}
            )
            logger.warning("%s %g s: %s", backend, bucket.seconds, reason)
            stopped = f"not started: the run was stopped ({why})"
        except Exception as e:  # noqa: BLE001 - one row failing is a result, not the end of the run
            skipped.append(skipped_row(backend, bucket, e))
        finally:
            if i == last_torch:
                ctx.models.drop()  # the engine rows should not carry the PyTorch weights in their memory
            if checkpoint is not None:
                write_record(make_record(ctx, rows, skipped), checkpoint)
    bar.close()
    return make_record(ctx, rows, skipped)
