"""Opening one engine-directory entry: its files pinned and verified, then its UNet and decode
backends (ONNX Runtime, or TensorRT where the entry has engines for this machine).

The entry's contracts were rebuilt and checked when the manifest was read (``engine.entries``);
here they only size the backends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from litefocus.engine.backends import GraphOptions, OnnxRuntimeBackend
from litefocus.engine.chunking import decode_chunked
from litefocus.engine.contract import (
    LATENT_CHANNELS,
    LATENT_FREQ_BINS,
    MODULES,
    DecodeContract,
    UNetContract,
)
from litefocus.engine.entries import Entry, Manifest, ModuleRecord
from litefocus.engine.pinned import Pinned, pin_files

logger = logging.getLogger(__name__)


class OpenEntry(NamedTuple):
    """One bucket's engines, opened once per Runtime: (unet, decode, unet contract, decode contract)."""

    unet: object  # backend: inputs -> noise_pred (None when only the decode was opened)
    decode: object  # backend: {"latent": ...} -> waveform (None when only the UNet was opened)
    unet_contract: UNetContract
    decode_contract: DecodeContract

    def close(self) -> None:
        for backend in (self.unet, self.decode):
            if backend is not None:
                backend.close()


@dataclass(frozen=True)
class BackendOptions:
    """How a runtime opens its entries: the ``backend`` asked for ("auto", "onnxruntime",
    "tensorrt"), the ``device`` (("cpu", 0) or ("cuda", N)) and whether each ONNX Runtime UNet
    session replays one captured CUDA graph (``cuda_graph``; the decode runs once a request)."""

    backend: str = "auto"
    device: tuple[str, int] = ("cpu", 0)
    cuda_graph: bool = False

    @property
    def device_text(self) -> str:
        return f"{self.device[0]}:{self.device[1]}" if self.device[0] == "cuda" else "cpu"


def choose_run_backend(requested: str, entry: Entry, device: tuple[str, int]) -> str:
    """The backend that runs ``entry`` here. auto: TensorRT where this entry has engines built for
    this machine's GPU, else ONNX Runtime. tensorrt: TensorRT (refusing engines of another TensorRT /
    GPU, saying why); an entry without TensorRT engines runs in ONNX Runtime, with a warning."""
    if requested == "onnxruntime":
        return requested
    from litefocus.engine.cuda_runtime import cuda_python_available
    from litefocus.engine.tensorrt_backend import check_engine_target, tensorrt_available

    has_plans = all("plan" in entry.modules[m].files for m in MODULES)
    runnable = (
        requested == "tensorrt" or cuda_python_available()
    )  # tensorrt: TensorRTBackend names what is missing
    if has_plans and device[0] == "cuda" and runnable and tensorrt_available():
        if requested == "tensorrt":
            return "tensorrt"
        try:
            check_engine_target(entry.unet.tensorrt, device[1])
            return "tensorrt"
        except (ValueError, RuntimeError) as e:
            logger.warning("%s: %s; using ONNX Runtime", entry.name, e)
    if requested == "tensorrt":
        logger.warning("%s has no TensorRT engine for this machine: running it in ONNX Runtime", entry.name)
    return "onnxruntime"


def open_entry(
    engine_dir: Path, name: str, manifest: Manifest, options: BackendOptions, modules=MODULES
) -> OpenEntry:
    """Verify entry ``name``'s files (hashes) and open the backends of ``modules`` (both by default;
    a denoiser needs only the UNet, a decoder only the decode graph).

    The files are pinned (``engine.pinned``): opened once, size-checked, hashed through the open
    descriptor, and checked unchanged after the backends have loaded them."""
    entry = manifest.entries[name]
    wanted = set(modules)
    if not wanted or wanted - set(MODULES):
        raise ValueError(f"modules must name some of {', '.join(MODULES)}, got {modules!r}")
    files = {f"{m}/{k}": rec for m in MODULES for k, rec in entry.modules[m].raw["files"].items()}
    kinds = {key: key.partition("/")[2] for key in files}
    with pin_files(engine_dir, files, f"engine {name}", kinds) as pinned:
        opened = _open_backends(entry, options, wanted, pinned)
        try:
            pinned.recheck()
        except BaseException:
            opened.close()
            raise
    return opened


def _open_backends(entry: Entry, options: BackendOptions, wanted: set[str], pinned: Pinned) -> OpenEntry:
    opened = []
    try:
        if choose_run_backend(options.backend, entry, options.device) == "tensorrt":
            from litefocus.engine.tensorrt_backend import TensorRTBackend

            if options.cuda_graph:
                raise ValueError(
                    f"engine {entry.name} runs on TensorRT here; --cuda-graph is for ONNX Runtime engines "
                    "(use --backend onnxruntime, or drop --cuda-graph)"
                )
            for m in MODULES:
                if m not in wanted:
                    opened.append(None)
                    continue
                record = entry.modules[m]
                path = pinned.path(f"{m}/plan")
                opened.append(
                    TensorRTBackend(path, record.contract, record.tensorrt, device=options.device_text)
                )
        else:
            for m in MODULES:
                opened.append(
                    _onnxruntime(entry.name, entry.modules[m], options, pinned) if m in wanted else None
                )
    except BaseException:
        for backend in opened:
            if backend is not None:
                backend.close()
        raise
    unet, decode = opened
    decode_c = entry.decode.contract
    if decode is not None and decode_c.window_frames is not None:
        decode = ChunkedDecode(decode, decode_c)
    return OpenEntry(unet, decode, entry.unet.contract, decode_c)


def _onnxruntime(
    name: str, record: ModuleRecord, options: BackendOptions, pinned: Pinned
) -> OnnxRuntimeBackend:
    """One module's graph in ONNX Runtime, from its pinned files (the graph parsed from the hashed bytes)."""
    m = record.name
    check_gpu_form(name, record, options.device)
    graph = GraphOptions(
        device=options.device_text,
        data_path=pinned.path(f"{m}/data"),
        cuda_graph=options.cuda_graph and m == "unet",
        graph=pinned.data(f"{m}/onnx"),
    )
    return OnnxRuntimeBackend(pinned.path(f"{m}/onnx"), record.contract, graph)


# Packed MultiHeadAttention with a key padding mask (the GPU form's cross-attention) has an unfused
# CUDA fallback only in newer ONNX Runtime; older builds return NOT_IMPLEMENTED at the first run.
GPU_FORM_MIN_ONNXRUNTIME = (1, 20)


def check_gpu_form(name: str, record: ModuleRecord, device: tuple[str, int]) -> None:
    """A graph of the GPU form (ONNX Runtime CUDA contrib ops) opens only on a CUDA device, in an
    ONNX Runtime whose kernels take it."""
    ops, module = record.gpu_ops, record.name
    if not ops:
        return
    if device[0] != "cuda":
        raise ValueError(
            f"engine {name}: its {module} graph was exported in the GPU form ({', '.join(ops)}: ONNX Runtime "
            "CUDA contrib ops) and runs only with --device cuda; for the CPU, export with --device cpu"
        )
    import onnxruntime as ort

    version = tuple(int(x) for x in ort.__version__.split(".")[:2] if x.isdigit())
    if version < GPU_FORM_MIN_ONNXRUNTIME:
        need = ".".join(map(str, GPU_FORM_MIN_ONNXRUNTIME))
        raise ValueError(
            f"engine {name}: its {module} graph (GPU form) needs onnxruntime-gpu >= {need}, this is "
            f"{ort.__version__}; upgrade it (pip install -U onnxruntime-gpu)"
        )


class ChunkedDecode:
    """A window-sized decode backend run over a whole bucket's latent (``engine.chunking``): takes
    {"latent": [1, C, T, F]} and returns [1, T * samples per frame], like a full decode graph."""

    def __init__(self, inner, contract: DecodeContract):
        self.inner = inner
        self.contract = contract
        self.name = inner.name

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        c = self.contract
        latent = inputs["latent"]
        want = (c.batch, LATENT_CHANNELS, c.bucket.frames, LATENT_FREQ_BINS)
        if tuple(latent.shape) != want:
            raise ValueError(f"latent has shape {tuple(latent.shape)}, the chunked decode takes {want}")
        return decode_chunked(
            lambda x: self.inner({"latent": x}),
            latent,
            c.window_frames,
            c.overlap_frames,
            c.samples_per_frame,
        )

    def close(self) -> None:
        self.inner.close()
