"""The export stage: per bucket, UNet (+ LiteFocus) and decode graphs -> audited, validated engines.

Stages per entry: export -> audit -> validate -> build (TensorRT, when asked and installed), for the
UNet and the decode graph. Each entry is built in a temporary directory and renamed into place,
then the manifest is rewritten atomically: an interrupted or failed export leaves no half-written
entry behind. An entry whose cache key and files match is reused. A model with text encoders also
gets one text-conditioning engine per directory (``text/``, same rules; see ``_export_text``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import litefocus
from litefocus.buckets import Bucket
from litefocus.config import LiteFocusConfig
from litefocus.engine import manifest as mf
from litefocus.engine.contract import (
    ATTENTION_FORMS,
    CONV_FORMS,
    GPT2_TOKENS,
    DecodeContract,
    UNetContract,
)
from litefocus.export import outdir
from litefocus.export.audit import AttentionExpectation, audit_graph
from litefocus.export.fused import fused_attention
from litefocus.export.geglu import split_geglu
from litefocus.export.gpu_form import gpu_form, resolve_gpu_ops
from litefocus.export.group_norm import precise_group_norm
from litefocus.export.onnx_export import OPSET, UNetExportModule, export_onnx, unet_contract_for
from litefocus.export.outdir import check_out as _check_out
from litefocus.export.validate import validate
from litefocus.installer import self_attention_freq_bins
from litefocus.models import random_source, scheduler_config

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "onnx", "tensorrt")
STAGES_PER_MODULE = 4  # export, audit, validate, build (TensorRT, or nothing)
MODULES = ("unet", "decode")


@dataclass(frozen=True)
class ExportOptions:
    seconds: tuple[float, ...]
    out: Path
    model: str | None = "cvssp/audioldm2"  # hub id or local diffusers directory
    random_preset: str | None = None  # build seeded random weights of this preset instead
    weights_seed: int = 0
    backend: str = "onnx"  # resolved: "onnx" or "tensorrt" (see resolve_backend)
    precision: str = "fp32"
    batches: tuple[int, ...] = (2,)  # UNet batch sizes, one entry each (2 = one guided request)
    text_len: int = 128
    litefocus: LiteFocusConfig | None = field(default_factory=LiteFocusConfig)
    force: bool = False
    quiet: bool = False
    device: str = "cpu"  # where the PyTorch modules are traced and run for validation (fp16: cuda)
    text: bool = True  # export the text-conditioning engine (when the model has text encoders)
    attention: str = "auto"  # resolved: "fused" (ONNX Runtime) or "plain" (see resolve_attention)
    decode_window: float | None = None  # seconds: longer buckets decode in windows (time-chunked)
    conv: str = "auto"  # the UNet's 3x3 convolutions, resolved: "winograd" or "direct" (see resolve_conv)
    gpu_ops: tuple[str, ...] | str = "auto"  # the GPU graph form's pieces, resolved (see resolve_gpu_ops)


def resolve_backend(backend: str) -> str:
    """auto -> tensorrt when TensorRT and a CUDA GPU are there, else onnx. tensorrt without it: error."""
    from litefocus.export.tensorrt_build import require_tensorrt, tensorrt_available

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "tensorrt":
        require_tensorrt()
        return "tensorrt"
    if backend == "auto" and tensorrt_available() and torch.cuda.is_available():
        return "tensorrt"
    return "onnx"


def resolve_attention(attention: str, backend: str) -> str:
    """auto -> fused for ONNX Runtime engines, plain for TensorRT (its parser takes no contrib ops)."""
    if attention not in ("auto", *ATTENTION_FORMS):
        raise ValueError(f"attention must be auto, {' or '.join(ATTENTION_FORMS)}, got {attention!r}")
    if attention == "auto":
        return "plain" if backend == "tensorrt" else "fused"
    if attention == "fused" and backend == "tensorrt":
        raise ValueError(
            "--attention fused: the TensorRT parser does not take ONNX Runtime's fused attention op; use "
            "--attention plain (or auto) with --backend tensorrt"
        )
    return attention


def resolve_conv(conv: str, backend: str, device: str, precision: str) -> str:
    """auto -> winograd for fp32 ONNX Runtime engines exported on the CPU (ONNX Runtime's CPU EP
    convolves directly: Winograd is 1.3-2.7x faster per 3x3 conv there), direct otherwise: GPU
    exports and TensorRT (cuDNN and TensorRT choose Winograd kernels themselves) and fp16 (F(4, 3)'s
    transforms lose too much in 10-bit mantissas). Applies to the UNet; the decode stays direct."""
    if conv not in ("auto", *CONV_FORMS):
        raise ValueError(f"conv must be auto, {' or '.join(CONV_FORMS)}, got {conv!r}")
    if conv == "auto":
        cpu_fp32 = device.startswith("cpu") and precision == "fp32"
        return "winograd" if backend != "tensorrt" and cpu_fp32 else "direct"
    return conv


class Components:
    """The model, loaded once on first use and shared by every bucket."""

    def __init__(self, opts: ExportOptions):
        self.opts = opts
        self._models = None
        self.identity = self._identity()

    def _identity(self) -> dict:
        o = self.opts
        if o.random_preset is not None:
            return {"source": random_source(o.random_preset, o.weights_seed), "weights_sha256": None}
        path = Path(str(o.model)).expanduser()
        if path.is_dir():
            # only what the engines are built from: the UNet, VAE and vocoder (not the text encoders)
            roots = [path / c for c in ("unet", "vae", "vocoder") if (path / c).is_dir()] or [path]
            files = sorted(
                p
                for root in roots
                for p in root.rglob("*")
                if p.is_file() and p.suffix in (".safetensors", ".bin", ".json")
            )
            digest = mf.json_sha256([[p.relative_to(path).as_posix(), mf.file_sha256(p)] for p in files])
            return {"source": str(path.resolve()), "weights_sha256": digest}
        return {"source": o.model, "weights_sha256": None}  # hub: filled in by weights_identity()

    def weights_identity(self) -> dict:
        """The identity with a weight hash; a hub model is loaded (and hashed) for it."""
        if self.identity["weights_sha256"] is None and self.opts.random_preset is None:
            unet, _, vae, vocoder = self.models()
            self.identity["weights_sha256"] = mf.json_sha256(
                [state_dict_sha256(m) for m in (unet, vae, vocoder)]
            )
        return self.identity

    def models(self) -> tuple:
        """(unet with LiteFocus installed, handle or None, vae, vocoder) in the export precision."""
        if self._models is None:
            from litefocus.models import load_components

            dtype = torch.float16 if self.opts.precision == "fp16" else torch.float32
            unet, vae, vocoder = load_components(
                self.identity["source"], dtype=dtype, device=self.opts.device
            )
            handle = litefocus.install(unet, self.opts.litefocus) if self.opts.litefocus is not None else None
            self._models = (unet, handle, vae, vocoder)
        return self._models

    def text_parts(self) -> list[str] | None:
        """The model's text-component folders, None when it has none (random weights, a directory
        without them); a hub id is assumed to have them (loading says otherwise)."""
        if self.opts.random_preset is not None:
            return None
        from litefocus.export.conditioning import TEXT_PARTS

        path = Path(str(self.opts.model)).expanduser()
        if not path.is_dir():
            return list(TEXT_PARTS)
        present = [p for p in TEXT_PARTS if (path / p).is_dir()]
        if present and len(present) < len(TEXT_PARTS):
            logger.warning(
                "%s has %s but not %s: no text engine exported",
                path,
                ", ".join(present),
                ", ".join(p for p in TEXT_PARTS if p not in present),
            )
        return present if len(present) == len(TEXT_PARTS) else None

    def text_identity(self) -> dict:
        """What the text engine is built from: the text folders' files (a local model), else the hub id
        with the engines' weight hash (a proxy for the revision)."""
        from litefocus.export.conditioning import TEXT_PARTS

        source = self.identity["source"]
        path = Path(source)
        if path.is_dir():
            files = sorted(p for part in TEXT_PARTS for p in (path / part).rglob("*") if p.is_file())
            digest = mf.json_sha256([[p.relative_to(path).as_posix(), mf.file_sha256(p)] for p in files])
            return {"source": source, "text_sha256": digest}
        return {"source": source, "weights_sha256": self.weights_identity()["weights_sha256"]}

    def chunking_error(self, contract: DecodeContract) -> dict:
        from litefocus.export.decode import chunking_error

        _, _, vae, vocoder = self.models()
        result = chunking_error(vae, vocoder, contract)
        logger.info(
            "%s: time-chunked decode (window %d frames, overlap %d) vs full: max %.2e, RMS %.2e of the RMS",
            contract.bucket.name,
            contract.window_frames,
            contract.overlap_frames,
            result["max_rel_rms_vs_full"],
            result["rms_rel_vs_full"],
        )
        return result

    def decode(self, contract: DecodeContract):
        from litefocus.export.decode import DecodeModule

        _, _, vae, vocoder = self.models()
        return DecodeModule.for_contract(vae, vocoder, contract).eval()


def state_dict_sha256(module: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@functools.cache
def code_sha256() -> str:
    """SHA-256 of litefocus's own Python sources: a changed exporter invalidates cached artifacts."""
    import litefocus
    import litefocus.engine
    import litefocus.export

    roots = [Path(m.__file__).parent for m in (litefocus, litefocus.export, litefocus.engine)]
    files = sorted({p for r in roots for p in r.glob("*.py")})
    return mf.json_sha256([[p.parent.name + "/" + p.name, mf.file_sha256(p)] for p in files])


def unet_contract(bucket: Bucket, opts: ExportOptions, unet, batch: int) -> UNetContract:
    return unet_contract_for(
        unet, bucket, opts.litefocus, batch=batch, text_len=opts.text_len, precision=opts.precision
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


def cache_key(opts: ExportOptions, identity: dict, bucket: Bucket, batch: int) -> str:
    """Hash of everything that shapes an entry's artifacts (the contracts follow from these).

    TensorRT engines are tied to one TensorRT version and GPU: those join the key when built."""
    target = None
    if opts.backend == "tensorrt":
        from litefocus.export.tensorrt_build import current_target

        target = current_target()
    return mf.json_sha256(
        {
            "schema": mf.SCHEMA_VERSION,
            "versions": mf.library_versions(),
            "code": code_sha256(),
            "model": identity,
            "opset": OPSET,
            "litefocus": None if opts.litefocus is None else opts.litefocus.to_dict(),
            "backend": opts.backend,
            "tensorrt_target": target,
            "frames": bucket.frames,
            "batch": batch,
            "text_len": opts.text_len,
            "precision": opts.precision,
            "attention": opts.attention,
            "conv": opts.conv,
            "gpu_ops": list(opts.gpu_ops),
            "decode_window": opts.decode_window,
        }
    )


def decode_contract(bucket: Bucket, opts: ExportOptions) -> DecodeContract:
    """Batch 1 (one request at a time); time-chunked when ``opts.decode_window`` is shorter than the
    bucket: windows of that length overlapping by a quarter of it."""
    window = None if opts.decode_window is None else Bucket.for_seconds(opts.decode_window).frames
    if window is None or window >= bucket.frames:
        return DecodeContract(bucket, batch=1, precision=opts.precision)
    return DecodeContract(
        bucket, batch=1, precision=opts.precision, window_frames=window, overlap_frames=window // 4
    )


def _module_stages(name, label, module, contract, out_dir, entry, attention, opts, bar) -> dict:
    """export -> audit -> validate -> build for one module into ``out_dir`` (renamed to ``entry`` later);
    returns its manifest record. The graph is traced with ``opts.attention``'s form; validation runs
    the module as it is (PyTorch's own attention) against it."""
    backend, form, ops = opts.backend, opts.attention, tuple(opts.gpu_ops)
    conv = opts.conv if name == "unet" else "direct"
    t0 = time.perf_counter()
    bar.set_postfix_str(f"{name}: export")
    device = next(module.parameters()).device
    fused = fused_attention(module) if form == "fused" else contextlib.nullcontext()
    # the GPU form first: the modules it takes are hidden from the swaps after it
    with gpu_form(module, ops=ops), fused, split_geglu(module), precise_group_norm(module):
        graph, data = export_onnx(
            module, contract, out_dir / f"{name}.onnx", device=device, conv=conv, channels_last="nhwc" in ops
        )
    export_s = time.perf_counter() - t0
    bar.update()
    bar.set_postfix_str(f"{name}: audit")
    audit = audit_graph(graph, attention, form, conv, gpu_ops=ops)
    bar.update()
    bar.set_postfix_str(f"{name}: validate")
    t1 = time.perf_counter()
    validation = validate(graph, module, contract, device=device)
    validation["seconds"] = time.perf_counter() - t1
    bar.update()
    files = {"onnx": mf.file_record(graph, entry), "data": mf.file_record(data, entry)}
    record = {
        "contract": contract.to_dict(),
        "attention": form,
        "conv": conv,
        "gpu_ops": list(ops),
        "audit": audit.to_dict(),
        "validation": validation,
        "export_seconds": export_s,
    }
    if backend == "tensorrt":
        from litefocus.export.tensorrt_build import (
            BuildOptions,
            build_engine,
            current_target,
            engine_filename,
        )

        bar.set_postfix_str(f"{name}: build")
        version, cc = current_target()
        plan = out_dir / engine_filename(name, label, contract.precision, version, cc)
        cache = out_dir.parent / f"timing-{version}-sm{cc[0]}{cc[1]}.cache"
        trt = build_engine(graph, contract, plan, BuildOptions.for_contract(contract, timing_cache=cache))
        record["tensorrt"] = trt
        # the builder hashed the engine bytes as it wrote them: no second read of a large file
        files["plan"] = {
            "path": f"{entry}/{plan.name}",
            "sha256": trt["sha256"],
            "bytes": trt["bytes"],
        }
    bar.update()
    record["files"] = files
    return record


def export_engines(opts: ExportOptions) -> tuple[dict, list[dict]]:
    """Export every bucket of ``opts``; returns (manifest, one summary row per entry)."""
    opts = dataclasses.replace(
        opts,
        attention=resolve_attention(opts.attention, opts.backend),
        conv=resolve_conv(opts.conv, opts.backend, opts.device, opts.precision),
    )
    opts = dataclasses.replace(
        opts, gpu_ops=resolve_gpu_ops(opts.gpu_ops, opts.backend, opts.device, opts.conv, opts.attention)
    )
    out = Path(opts.out)
    local = None if opts.random_preset is not None else Path(str(opts.model)).expanduser()
    outdir.check_out_beside_model(out, local)
    components = Components(opts)
    text = opts.text and components.text_parts() is not None
    if text:  # before anything is written
        check_text_positions(language_model_positions(components.identity["source"]), opts.text_len)
    outdir.prepare_out(out)
    config = None if opts.litefocus is None else opts.litefocus.to_dict()
    with outdir.locked(out) as lock:
        _check_out(out)  # again, under the lock: another export may have written meanwhile
        manifest = _open_manifest(lock, components.weights_identity(), config, opts.force)
        schedule = scheduler_config(manifest["model"]["source"])  # the runtime's samplers read it here
        if manifest.get("scheduler") != schedule:
            manifest = {**manifest, "scheduler": schedule}
            lock.write_manifest(manifest)
        if text:
            outdir.refuse_unlisted(out, mf.TEXT_DIR, "text" in manifest)  # before anything heavy
        manifest, rows = _export_buckets(lock, opts, components, manifest)
        if text:
            _export_text(lock, opts, components, manifest)
        return manifest, rows


def language_model_positions(source: str) -> int | None:
    """The language model's (GPT-2's) learned positions, from its config; None when unknown."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, subfolder="language_model")
    except (OSError, ValueError):
        return None  # loading the text parts reports it
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return positions if isinstance(positions, int) else None


def check_text_positions(positions: int | None, text_len: int) -> None:
    """GPT-2 reads [sos, clap, eos, sos1, T5 x text_len, eos1] and its own states as it generates
    them: text_len + 12 positions for the last of the 8. Diffusers runs a model with fewer for short
    prompts; the static graph would index past them: refuse in one line, naming the fix."""
    extra = 5 + GPT2_TOKENS - 1
    if positions is None or text_len + extra <= positions:
        return
    fix = f"pass --text-len {positions - extra} or less, or " if positions > extra else "pass "
    raise ValueError(
        f"--text-len {text_len}: the language model has {positions} positions, fewer than the "
        f"{text_len + extra} that {text_len} T5 tokens + 4 markers + {GPT2_TOKENS} generated states take; "
        f"{fix}--no-text to skip the text engine"
    )


def _check_memory(opts: ExportOptions, components: Components, seconds: list[float]) -> None:
    """Refuse up front (ValueError: exit 2) the buckets to build (``seconds``) whose export would not
    fit in memory here; nothing to build loads nothing."""
    from litefocus.export.memory import check_export_memory

    if not seconds or opts.attention != "fused":  # plain graphs hold quadratic score matrices: not modelled
        return
    unet, _, vae, vocoder = components.models()
    params = sum(p.numel() for m in (unet, vae, vocoder) for p in m.parameters())
    check_export_memory(tuple(seconds), opts.precision, opts.decode_window, opts.device, params)


def _open_manifest(lock: outdir.EngineDirLock, identity: dict, config: dict | None, force: bool) -> dict:
    """The directory's manifest, or a new one (with --force, replacing another model's or a broken
    one). Only the entry folders that the old litefocus manifest lists are ever deleted."""
    out = lock.out
    lock.clean_stale()  # what killed runs left (recorded scratch folders only)
    try:
        manifest = mf.read_manifest(out) if mf.is_engine_dir(out) else None
    except mf.ManifestError:
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
        manifest = mf.new_manifest(identity, config)
        lock.write_manifest(manifest)
    return manifest


def _drop_entries(lock: outdir.EngineDirLock, manifest: dict) -> None:
    """Delete the entry folders (and text engine) a (valid) litefocus manifest lists: nothing else, no symlinks."""
    kept = {k: v for k, v in manifest.items() if k != "text"}
    lock.write_manifest({**kept, "entries": {}})  # first: never list a deleted folder
    out = lock.out
    for name in [*manifest["entries"], *([mf.TEXT_DIR] if "text" in manifest else [])]:
        folder = out / name
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)


def _export_buckets(lock: outdir.EngineDirLock, opts: ExportOptions, components: Components, manifest: dict):
    out = lock.out
    # one entry per latent length: of several requests that share it, keep the longest
    by_frames = {b.frames: b for b in sorted(map(Bucket.for_seconds, opts.seconds), key=lambda b: b.seconds)}
    buckets = [by_frames[f] for f in sorted(by_frames)]
    rows = []
    stages = STAGES_PER_MODULE * len(MODULES)
    plan = []  # (bucket, batch, name, key, cached entry or None)
    for bucket, batch in [(bucket, batch) for bucket in buckets for batch in sorted(set(opts.batches))]:
        name = mf.entry_name(bucket, opts.precision, batch)
        outdir.refuse_unlisted(out, name, name in manifest["entries"])  # before anything heavy
        key = cache_key(opts, components.identity, bucket, batch)
        old = manifest["entries"].get(name)
        fresh = not opts.force and old and old.get("key") == key and not mf.verify_entry(out, old)
        plan.append((bucket, batch, name, key, old if fresh else None))
    _check_memory(opts, components, [bucket.seconds for bucket, *_, cached in plan if cached is None])
    decodes: dict[int, str] = {}  # frames -> an entry of this run whose decode graph the others reuse
    with tqdm(total=stages * len(plan), desc="litefocus-export", disable=opts.quiet, unit="stage") as bar:
        for bucket, batch, name, key, cached in plan:
            if cached is not None:
                logger.info("%s: cached (key %s)", name, key[:12])
                bar.update(stages)
                rows.append({"entry": name, "status": "cached", **_summary(cached)})
            else:
                sibling = decodes.get(bucket.frames)
                entry = _build_entry(lock, name, bucket, batch, key, opts, components, manifest, bar, sibling)
                rows.append({"entry": name, "status": "built", **_summary(entry)})
            decodes.setdefault(bucket.frames, name)
    return manifest, rows


def _build_entry(lock, name, bucket, batch, key, opts, components, manifest, bar, sibling=None) -> dict:
    """Export, audit, validate (and build) one entry's graphs in a temporary folder, then rename it
    into place. ``sibling``: an entry of this run with the same bucket and precision (another batch
    size) whose verified decode graph is copied instead of exported again (decode is batch 1 in
    every entry and does not depend on the UNet's batch or LiteFocus)."""
    t0 = time.perf_counter()
    out = lock.out
    tmp = lock.make_dir(name)
    try:
        bar.set_description(f"{name} load")
        unet, handle, _, _ = components.models()
        contract = unet_contract(bucket, opts, unet, batch)
        layer_bins = handle.freq_bins if handle else list(self_attention_freq_bins(unet).values())
        bar.set_description(f"{name} unet")
        unet_rec = _module_stages(
            "unet",
            bucket.name,
            UNetExportModule(unet, contract, handle),
            contract,
            tmp,
            name,
            attention_expectations(bucket, opts.litefocus, layer_bins),
            opts,
            bar,
        )
        bar.set_description(f"{name} decode")
        decode = decode_contract(bucket, opts)
        if sibling is not None:
            decode_rec = _copy_module(out, manifest["entries"][sibling]["modules"]["decode"], tmp, name)
            bar.update(STAGES_PER_MODULE)
        else:
            decode_rec = _module_stages(
                "decode", bucket.name, components.decode(decode), decode, tmp, name, (), opts, bar
            )
            if decode.window_frames is not None:  # never silently: its error against the full decode
                decode_rec["chunking"] = components.chunking_error(decode)
        entry = {
            "key": key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "bucket": bucket.to_dict(opts.litefocus),
            "precision": opts.precision,
            "opset": OPSET,
            "backend": opts.backend,
            "modules": {"unet": unet_rec, "decode": decode_rec},
            "build_seconds": time.perf_counter() - t0,
            "versions": mf.library_versions(),
        }
        lock.install(tmp, name, listed=name in manifest["entries"])
    except BaseException:
        lock.discard(tmp)
        raise
    manifest["entries"][name] = entry
    manifest["versions"] = mf.library_versions()
    lock.write_manifest(manifest)
    return entry


def _copy_module(out: Path, record: dict, tmp: Path, name: str) -> dict:
    """A verified module of another entry, copied into ``tmp`` with its record (paths -> ``name``)."""
    files = {}
    for kind, f in record["files"].items():
        source = mf.artifact_path(out, f["path"])
        target = tmp / source.name
        shutil.copyfile(source, target)
        files[kind] = mf.file_record(target, name)
        if files[kind]["sha256"] != f["sha256"]:
            raise RuntimeError(f"{f['path']} changed while it was copied; run the export again")
    return {**copy.deepcopy(record), "files": files}


def _summary(entry: dict) -> dict:
    b, mods = entry["bucket"], entry["modules"]
    return {
        "seconds": b["seconds"],
        "exact_seconds": b["exact_seconds"],
        "frames": b["frames"],
        "S": ",".join(str(v) for v in b.get("num_global", {}).values()) or "-",
        "unet_rel_err": mods["unet"]["validation"]["outputs"]["noise_pred"]["max_rel_rms"],
        "decode_rel_err": mods["decode"]["validation"]["outputs"]["waveform"]["max_rel_rms"],
        "mb": sum(f["bytes"] for m in mods.values() for f in m["files"].values()) / 2**20,
        "build_s": entry["build_seconds"],
    }


# ---- the text-conditioning engine: once per engine directory, in text/ -----------------------------
def text_cache_key(opts: ExportOptions, text_identity: dict) -> str:
    """Hash of everything that shapes the text engine's artifacts."""
    return mf.json_sha256(
        {
            "schema": mf.SCHEMA_VERSION,
            "versions": mf.library_versions(),
            "code": code_sha256(),
            "model": text_identity,
            "opset": OPSET,
            "text_len": opts.text_len,
            "module": "conditioning",
        }
    )


def _export_text(
    lock: outdir.EngineDirLock, opts: ExportOptions, components: Components, manifest: dict
) -> dict:
    """The text engine: reused when its key matches and its files verify, else built in a temporary
    folder and renamed to text/ (then the manifest is rewritten)."""
    from litefocus.export.conditioning import conditioning_contract, export_conditioning, load_text_parts

    out = lock.out
    key = text_cache_key(opts, components.text_identity())
    old = manifest.get("text")
    if not opts.force and old and old.get("key") == key and not mf.verify_text(out, manifest):
        logger.info("text engine: cached (key %s)", key[:12])
        return old
    t0 = time.perf_counter()
    source = components.identity["source"]
    try:
        parts = load_text_parts(source)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise ValueError(
            f"could not load the text encoders of {source} ({type(e).__name__}: {first}); pass --no-text to "
            "export without the text engine"
        ) from None
    check_text_positions(
        getattr(parts["language_model"].config, "max_position_embeddings", None), opts.text_len
    )
    contract = conditioning_contract(parts, opts.text_len)
    tmp = lock.make_dir(mf.TEXT_DIR)
    try:
        result = export_conditioning(parts, contract, tmp, device=opts.device)
        record = {
            "key": key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "opset": OPSET,
            "contract": contract.to_dict(),
            "files": {k: mf.file_record(p, mf.TEXT_DIR) for k, p in result["paths"].items()},
            "tokenizers": result["tokenizers"],
            "validation": result["validation"],
            "export_seconds": time.perf_counter() - t0,
            "versions": mf.library_versions(),
        }
        lock.install(tmp, mf.TEXT_DIR, listed="text" in manifest)  # only the folder the manifest lists
    except BaseException:
        lock.discard(tmp)
        raise
    manifest["text"] = record
    manifest["versions"] = mf.library_versions()
    lock.write_manifest(manifest)
    return record
