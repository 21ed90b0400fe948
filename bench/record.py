"""A ``litefocus-bench`` run's JSON record: its layout, its file name and its (atomic) write.

One record per run: the rows measured, the rows skipped (with status and reason), and the context a
reader needs to trust them (device, library versions, git state, command, options, matmul ceiling).
``bench/report.py`` renders it; ``ROW_FIELDS`` and ``SCHEMA_VERSION`` are what it checks on load.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from litefocus.bench.measure import device_name
from litefocus.engine.fileio import atomic_write_bytes
from litefocus.engine.manifest import library_versions

if TYPE_CHECKING:
    from litefocus.bench.row import RunContext

SCHEMA_VERSION = 1
ROW_FIELDS = (  # every measured row has these (None where a value does not apply)
    "device",
    "backend",
    "seconds",
    "precision",
    "step_ms_p50",
    "step_ms_p10",
    "step_ms_p90",
    "generate_s",
    "peak_mem_mb",
    "step_gflop",
    "achieved_tflops",
)  # later additions are optional, so older records still load: decode_* (stages.measure_decode)


def make_record(ctx: RunContext, rows: list, skipped: list) -> dict:
    """The run record of ``ctx``'s run with the rows measured and skipped so far."""
    opts, device = ctx.opts, ctx.device
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "litefocus-bench",
        "created": ctx.created.strftime("%Y%m%dT%H%M%SZ"),
        "device": device_name(device),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": library_versions(),
        "git": ctx.git,
        "command": opts.command or " ".join(sys.argv),
        "options": opts.to_dict(),
        "matmul_ceiling": ctx.ceiling,
        "rows": rows,
        "skipped": skipped,
    }


def record_path(out: Path, device_type: str, created: str) -> Path:
    return out / f"unet-{device_type}-{created}.json"


def write_record(record: dict, out: Path) -> Path:
    """The record as JSON (atomic) at ``out``: a ``.json`` path, or a directory that gets
    ``unet-<device type>-<created>.json``; returns its path."""
    path = out if out.suffix == ".json" else record_path(out, record["device_type"], record["created"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode())
    return path
