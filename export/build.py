"""The build: a resolved plan -> audited, validated engines in one engine directory.

Per bucket and batch size an entry (the UNet, with LiteFocus, and the decode graph) is built by the
stages (``stages.py``) in a scratch folder and renamed into place, then the manifest is rewritten
atomically: an interrupted or failed export leaves no half-written entry behind. An entry whose
cache key and files match is reused. A model with text encoders also gets one text-conditioning
engine per directory (``text_engine.py``, same rules). Every manifest change is made here, as data,
and handed to the engine directory's one writer (``engine/writer.py``).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass

from tqdm import tqdm

from litefocus.buckets import Bucket
from litefocus.engine.contract import MODULES
from litefocus.engine.manifest import (
    TEXT_DIR,
    ManifestError,
    entry_name,
    is_engine_dir,
    read_manifest,
    verify_entry,
)
from litefocus.engine.writer import (
    EngineDirLock,
    check_out,
    check_out_beside_model,
    entry_bytes,
    locked,
    module_record,
    new_manifest,
    prepare_out,
    refuse_unlisted,
    with_entry,
    with_scheduler,
    with_text,
    without_engines,
)
from litefocus.export.plan import ExportOptions, ExportPlan, resolve_plan
from litefocus.export.source import ModelSource, cache_key
from litefocus.export.stages import STAGES_PER_MODULE, EntryJob, Progress, build_entry
from litefocus.export.text_engine import TextJob, check_text_positions, export_text, language_model_positions
from litefocus.models import scheduler_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Planned:
    """One entry of the plan: built anew, or reused (``cached``: its manifest record)."""

    name: str
    bucket: Bucket
    batch: int
    key: str
    cached: dict | None


def export_engines(opts: ExportOptions) -> tuple[dict, list[dict]]:
    """Export every bucket of ``opts``; returns (manifest, one summary row per entry)."""
    return build_engines(resolve_plan(opts))


def build_engines(plan: ExportPlan) -> tuple[dict, list[dict]]:
    """Build (or reuse) every entry of ``plan`` and the text engine; returns (manifest, one summary row
    per entry). Refusals (ValueError) come before anything heavy is done."""
    out = plan.out
    check_out_beside_model(out, plan.model_dir)
    source = ModelSource(plan.request)
    text = plan.text and source.text_parts() is not None
    if text:  # before anything is written
        check_text_positions(language_model_positions(source.identity["source"]), plan.text_len)
    prepare_out(out)
    config = None if plan.litefocus is None else plan.litefocus.to_dict()
    with locked(out) as lock:
        check_out(out)  # again, under the lock: another export may have written meanwhile
        manifest = _open_manifest(lock, source.weights_identity(), config, plan.force)
        schedule = scheduler_config(manifest["model"]["source"])  # the runtime's samplers read it here
        if manifest.get("scheduler") != schedule:
            manifest = with_scheduler(manifest, schedule)
            lock.write_manifest(manifest)
        if text:
            refuse_unlisted(out, TEXT_DIR, "text" in manifest)  # before anything heavy
        manifest, rows = _build_entries(lock, plan, source, manifest)
        if text:
            record = export_text(TextJob(plan, source, lock, manifest), _logged)
            if record is not None:
                manifest = with_text(manifest, record)
                lock.write_manifest(manifest)
        return manifest, rows


def _logged(step: str, done: int) -> None:
    """The text engine's progress callback: its steps at debug level (it has no bar)."""
    logger.debug("%s", step)


def _open_manifest(lock: EngineDirLock, identity: dict, config: dict | None, force: bool) -> dict:
    """The directory's manifest, or a new one (with --force, replacing another model's or a broken
    one). Only the entry folders that the old litefocus manifest lists are ever deleted."""
    out = lock.out
    lock.clean_stale()  # what killed runs left (recorded scratch folders only)
    try:
        manifest = read_manifest(out) if is_engine_dir(out) else None
    except ManifestError:
        if not force:
            raise
        manifest = None
    if manifest is not None and (manifest["model"] != identity or manifest["litefocus"] != config):
        if not force:
            raise ValueError(
                f"--out {out} holds engines of model {manifest['model']['source']} (weights "
                f"{str(manifest['model']['weights_sha256'])[:12]}) with LiteFocus {manifest['litefocus']}; pass "
                "another --out, or --force to replace them"
            )
        _drop_entries(lock, manifest)
        manifest = None
    if manifest is None:
        manifest = new_manifest(identity, config)
        lock.write_manifest(manifest)
    return manifest


def _drop_entries(lock: EngineDirLock, manifest: dict) -> None:
    """Delete the entry folders (and text engine) a (valid) litefocus manifest lists: nothing else, no symlinks."""
    lock.write_manifest(without_engines(manifest))  # first: never list a deleted folder
    for name in [*manifest["entries"], *([TEXT_DIR] if "text" in manifest else [])]:
        folder = lock.out / name
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)


def _plan_entries(
    lock: EngineDirLock, plan: ExportPlan, source: ModelSource, manifest: dict
) -> list[_Planned]:
    """Every entry of ``plan``, each with its cache key and, when it matches and verifies, its record."""
    planned = []
    for bucket, batch in [(bucket, batch) for bucket in plan.buckets for batch in plan.batches]:
        name = entry_name(bucket, plan.precision, batch)
        refuse_unlisted(lock.out, name, name in manifest["entries"])  # before anything heavy
        key = cache_key(plan, source.identity, bucket, batch)
        old = manifest["entries"].get(name)
        fresh = not plan.force and old and old.get("key") == key and not verify_entry(lock.out, old)
        planned.append(_Planned(name, bucket, batch, key, old if fresh else None))
    return planned


def _check_memory(plan: ExportPlan, source: ModelSource, seconds: list[float]) -> None:
    """Refuse up front (ValueError: exit 2) the buckets to build (``seconds``) whose export would not
    fit in memory here; nothing to build loads nothing."""
    from litefocus.export.memory import check_export_memory

    if not seconds or plan.attention != "fused":  # plain graphs hold quadratic score matrices: not modelled
        return
    check_export_memory(
        tuple(seconds), plan.precision, plan.decode_window, plan.device, source.parameter_count()
    )


def _build_entries(lock: EngineDirLock, plan: ExportPlan, source: ModelSource, manifest: dict):
    """Build or reuse every planned entry; the manifest is rewritten after each one built."""
    planned = _plan_entries(lock, plan, source, manifest)
    _check_memory(plan, source, [p.bucket.seconds for p in planned if p.cached is None])
    stages = STAGES_PER_MODULE * len(MODULES)
    rows = []
    decodes: dict[int, str] = {}  # frames -> an entry of this run whose decode graph the others reuse
    with tqdm(total=stages * len(planned), desc="litefocus-export", disable=plan.quiet, unit="stage") as bar:
        progress = _bar_progress(bar)
        for p in planned:
            if p.cached is not None:
                logger.info("%s: cached (key %s)", p.name, p.key[:12])
                progress(f"{p.name}: cached", stages)
                rows.append({"entry": p.name, "status": "cached", **_summary(p.cached)})
            else:
                sibling = decodes.get(p.bucket.frames)
                decode = None if sibling is None else module_record(manifest["entries"][sibling], "decode")
                listed = p.name in manifest["entries"]
                job = EntryJob(p.name, p.bucket, p.batch, p.key, plan, source, lock, listed, decode)
                entry = build_entry(job, progress)
                manifest = with_entry(manifest, p.name, entry)
                lock.write_manifest(manifest)
                rows.append({"entry": p.name, "status": "built", **_summary(entry)})
            decodes.setdefault(p.bucket.frames, p.name)
    return manifest, rows


def _bar_progress(bar: tqdm) -> Progress:
    """The stages' progress callback, shown on a tqdm bar."""

    def progress(step: str, done: int) -> None:
        bar.set_postfix_str(step)
        if done:
            bar.update(done)

    return progress


def _summary(entry: dict) -> dict:
    """One row of litefocus-export's table: the bucket, LiteFocus's S, the validation errors, size, time."""
    b = entry["bucket"]
    unet, decode = module_record(entry, "unet"), module_record(entry, "decode")
    return {
        "seconds": b["seconds"],
        "exact_seconds": b["exact_seconds"],
        "frames": b["frames"],
        "S": ",".join(str(v) for v in b.get("num_global", {}).values()) or "-",
        "unet_rel_err": unet["validation"]["outputs"]["noise_pred"]["max_rel_rms"],
        "decode_rel_err": decode["validation"]["outputs"]["waveform"]["max_rel_rms"],
        "mb": entry_bytes(entry) / 2**20,
        "build_s": entry["build_seconds"],
    }
