"""The per-entry stages: export -> audit -> validate -> build (TensorRT, when planned), per module.

Each stage takes one job (``ModuleJob``, ``EntryJob``: what to build, where, under which plan) and a
progress callback, and returns its manifest record as data; the caller hands the changed manifest
to the engine directory's writer. An entry is built in a scratch folder that is renamed into place
only when every stage passed (``EngineDirLock.building``).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from litefocus.buckets import Bucket
from litefocus.config import LiteFocusConfig
from litefocus.engine.contract import DecodeContract, UNetContract
from litefocus.engine.manifest import artifact_path, library_versions
from litefocus.engine.writer import MANIFEST_BACKEND, EngineDirLock, file_record
from litefocus.export.audit import AttentionExpectation, audit_graph
from litefocus.export.fused import fused_attention
from litefocus.export.geglu import split_geglu
from litefocus.export.gpu_form import gpu_form
from litefocus.export.group_norm import precise_group_norm
from litefocus.export.onnx_export import OPSET, UNetExportModule, export_onnx, unet_contract_for
from litefocus.export.plan import ExportPlan
from litefocus.export.source import ModelSource
from litefocus.export.validate import validate
from litefocus.installer import self_attention_freq_bins

STAGES_PER_MODULE = 4  # export, audit, validate, build (TensorRT, or nothing)

Progress = Callable[[str, int], None]
"""``progress(step, done)``: ``step`` is what runs now, ``done`` the stages finished since the last call."""


def no_progress(step: str, done: int) -> None:
    """A progress callback that shows nothing."""


@dataclass(frozen=True)
class ModuleJob:
    """One module of an entry to export, audit, validate (and build) into ``out_dir``."""

    name: str  # "unet" or "decode"
    label: str  # the bucket's name (TensorRT plan files carry it)
    module: torch.nn.Module  # traced with the plan's attention form; validated as it is
    contract: UNetContract | DecodeContract
    out_dir: Path  # the entry's scratch folder
    entry: str  # the entry's final name: file records name the final place
    expectations: tuple[AttentionExpectation, ...]  # what the audit must find
    plan: ExportPlan


@dataclass(frozen=True)
class EntryJob:
    """One entry (a bucket at one UNet batch size) to build and install in the engine directory."""

    name: str
    bucket: Bucket
    batch: int
    key: str  # the cache key, recorded in the entry
    plan: ExportPlan
    source: ModelSource
    lock: EngineDirLock
    listed: bool  # the manifest lists an older build of it: the only folder it may replace
    sibling_decode: dict | None = None  # a verified decode record of this run to copy (same bucket)


def unet_contract(bucket: Bucket, plan: ExportPlan, unet, batch: int) -> UNetContract:
    """The UNet's contract for ``bucket`` at ``batch`` rows under ``plan``."""
    return unet_contract_for(
        unet, bucket, plan.litefocus, batch=batch, text_len=plan.text_len, precision=plan.precision
    )


def decode_contract(bucket: Bucket, plan: ExportPlan) -> DecodeContract:
    """Batch 1 (one request at a time); time-chunked when ``plan.decode_window`` is shorter than the
    bucket: windows of that length overlapping by a quarter of it."""
    window = None if plan.decode_window is None else Bucket.for_seconds(plan.decode_window).frames
    if window is None or window >= bucket.frames:
        return DecodeContract(bucket, batch=1, precision=plan.precision)
    return DecodeContract(
        bucket, batch=1, precision=plan.precision, window_frames=window, overlap_frames=window // 4
    )


def attention_expectations(bucket: Bucket, config: LiteFocusConfig | None, layer_bins) -> tuple:
    """What the audit must find at the LiteFocus level(s); full N x N attention at F = 8 without it."""
    if config is None:
        n = bucket.tokens(8)
        return (AttentionExpectation(n, n, sum(1 for b in layer_bins if b == 8)),)
    out = []
    for f in config.freq_bins:
        t, n, s = bucket.grid(f)[0], bucket.tokens(f), bucket.num_global(config, f)
        q, k = (t, t + s) if config.same_frequency else (n, s)
        out.append(AttentionExpectation(q, k, sum(1 for b in layer_bins if b == f), forbid_len=n))
    return tuple(out)


def export_module(job: ModuleJob, progress: Progress) -> dict:
    """export -> audit -> validate -> build for one module into ``job.out_dir``; returns its manifest
    record. The graph is traced with the plan's attention form; validation runs the module as it is
    (PyTorch's own attention) against it."""
    plan, name = job.plan, job.name
    form, ops = plan.attention, plan.gpu_ops
    conv = plan.conv if name == "unet" else "direct"
    t0 = time.perf_counter()
    progress(f"{job.entry} {name}: export", 0)
    fused = fused_attention(job.module) if form == "fused" else contextlib.nullcontext()
    # the GPU form first: the modules it takes are hidden from the swaps after it
    with gpu_form(job.module, ops=ops), fused, split_geglu(job.module), precise_group_norm(job.module):
        graph, data = export_onnx(
            job.module, job.contract, job.out_dir / f"{name}.onnx", conv=conv, channels_last="nhwc" in ops
        )
    export_s = time.perf_counter() - t0
    progress(f"{job.entry} {name}: audit", 1)
    audit = audit_graph(graph, job.expectations, form, conv, gpu_ops=ops)
    progress(f"{job.entry} {name}: validate", 1)
    t1 = time.perf_counter()
    validation = validate(graph, job.module, job.contract, device=next(job.module.parameters()).device)
    validation["seconds"] = time.perf_counter() - t1
    progress(f"{job.entry} {name}: build", 1)
    record = {
        "contract": job.contract.to_dict(),
        "attention": form,
        "conv": conv,
        "gpu_ops": list(ops),
        "audit": audit.to_dict(),
        "validation": validation,
        "export_seconds": export_s,
    }
    files = {"onnx": file_record(graph, job.entry), "data": file_record(data, job.entry)}
    if plan.backend == "tensorrt":
        record["tensorrt"], files["plan"] = _build_tensorrt(job, graph)
    progress(f"{job.entry} {name}: done", 1)
    return {**record, "files": files}


def _build_tensorrt(job: ModuleJob, graph: Path) -> tuple[dict, dict]:
    """The TensorRT plan of ``graph``: (its build record, its file record)."""
    from litefocus.export.tensorrt_build import BuildOptions, build_engine, current_target, engine_filename

    version, cc = current_target()
    plan = job.out_dir / engine_filename(job.name, job.label, job.contract.precision, version, cc)
    cache = job.out_dir.parent / f"timing-{version}-sm{cc[0]}{cc[1]}.cache"
    trt = build_engine(graph, job.contract, plan, BuildOptions.for_contract(job.contract, timing_cache=cache))
    # the builder hashed the engine bytes as it wrote them: no second read of a large file
    return trt, {"path": f"{job.entry}/{plan.name}", "sha256": trt["sha256"], "bytes": trt["bytes"]}


def build_entry(job: EntryJob, progress: Progress) -> dict:
    """Export, audit, validate (and build) one entry's graphs in a scratch folder, then rename it into
    place; returns the entry's record. With ``job.sibling_decode`` (an entry of this run with the
    same bucket and precision at another batch size) its verified decode graph is copied instead of
    exported again (decode is batch 1 in every entry and depends on neither the UNet's batch nor
    LiteFocus)."""
    t0 = time.perf_counter()
    plan, bucket, name = job.plan, job.bucket, job.name
    with job.lock.building(name, listed=job.listed) as tmp:
        progress(f"{name} load", 0)
        unet, handle, _, _ = job.source.models()
        contract = unet_contract(bucket, plan, unet, job.batch)
        layer_bins = handle.freq_bins if handle else list(self_attention_freq_bins(unet).values())
        module = UNetExportModule(unet, contract, handle)
        expect = attention_expectations(bucket, plan.litefocus, layer_bins)
        unet_rec = export_module(
            ModuleJob("unet", bucket.name, module, contract, tmp, name, expect, plan), progress
        )
        decode = decode_contract(bucket, plan)
        if job.sibling_decode is not None:
            decode_rec = copy_module(job.lock.out, job.sibling_decode, tmp, name)
            progress(f"{name} decode: copied", STAGES_PER_MODULE)
        else:
            decode_job = ModuleJob(
                "decode", bucket.name, job.source.decode(decode), decode, tmp, name, (), plan
            )
            decode_rec = export_module(decode_job, progress)
            if decode.window_frames is not None:  # never silently: its error against the full decode
                decode_rec["chunking"] = job.source.chunking_error(decode)
        entry = {
            "key": job.key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "bucket": bucket.to_dict(plan.litefocus),
            "precision": plan.precision,
            "opset": OPSET,
            "backend": MANIFEST_BACKEND[plan.backend],
            "modules": {"unet": unet_rec, "decode": decode_rec},
            "build_seconds": time.perf_counter() - t0,
            "versions": library_versions(),
        }
    return entry


def copy_module(out: Path, record: dict, tmp: Path, name: str) -> dict:
    """A verified module of another entry, copied into ``tmp`` with its record (paths -> ``name``)."""
    import shutil

    files = {}
    for kind, f in record["files"].items():
        source = artifact_path(out, f["path"])
        target = tmp / source.name
        shutil.copyfile(source, target)
        files[kind] = file_record(target, name)
        if files[kind]["sha256"] != f["sha256"]:
            raise RuntimeError(f"{f['path']} changed while it was copied; run the export again")
    return {**copy.deepcopy(record), "files": files}
