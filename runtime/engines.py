"""Opening one engine-directory entry: its contracts (rebuilt from the manifest and compared) and
its UNet and decode backends (ONNX Runtime, or TensorRT where it has engines for this machine)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np

from litefocus.engine import manifest as mf
from litefocus.engine.backends import OnnxRuntimeBackend
from litefocus.engine.chunking import decode_chunked
from litefocus.engine.contract import (
    LATENT_CHANNELS,
    LATENT_FREQ_BINS,
    Bucket,
    DecodeContract,
    LiteFocusConfig,
    UNetContract,
    index_input_name,
)
from litefocus.engine.pinned import pin_files

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


def contracts(entry: dict, config: LiteFocusConfig | None) -> tuple[UNetContract, DecodeContract]:
    """Rebuild the entry's contracts and check them against what the manifest recorded."""
    try:
        return _rebuild_contracts(entry, config)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        if isinstance(e, mf.ManifestError):
            raise
        raise mf.ManifestError(
            f"the manifest's contracts are not this litefocus version's ({type(e).__name__}: {str(e)[:120]}); "
            "re-export with litefocus-export --force"
        ) from None


def _rebuild_contracts(entry: dict, config: LiteFocusConfig | None) -> tuple[UNetContract, DecodeContract]:
    b = entry["bucket"]
    bucket = Bucket(seconds=b["seconds"], frames=b["frames"])
    u = entry["modules"]["unet"]["contract"]
    shapes = {s["name"]: s["shape"] for s in u["inputs"]}
    levels = tuple(
        (f, shapes[index_input_name(f)][1])
        for f in (config.freq_bins if config else ())
        if index_input_name(f) in shapes
    )
    unet = UNetContract(
        bucket,
        batch=u["batch"],
        text_len=u["text_len"],
        gpt2_dim=shapes["encoder_hidden_states"][2],
        t5_dim=shapes["encoder_hidden_states_1"][2],
        precision=u["precision"],
        litefocus=config,
        index_levels=levels,
    )
    d = entry["modules"]["decode"]["contract"]
    decode = DecodeContract(
        bucket,
        batch=d["batch"],
        precision=d["precision"],
        window_frames=d.get("window_frames"),
        overlap_frames=d.get("overlap_frames", 0),
    )
    if unet.to_dict() != u or decode.to_dict() != d:
        raise mf.ManifestError(
            "the manifest's contracts do not match this litefocus version's; re-export with litefocus-export --force"
        )
    return unet, decode


def resolve_backend(requested: str, name: str, entry: dict, device: tuple[str, int]) -> str:
    """auto: TensorRT where this entry has engines built for this machine's GPU, else ONNX Runtime.
    tensorrt: TensorRT (refusing engines of another TensorRT / GPU, saying why); an entry without
    TensorRT engines runs in ONNX Runtime, with a warning."""
    if requested == "onnxruntime":
        return requested
    from litefocus.engine.cuda_runtime import cuda_python_available
    from litefocus.engine.tensorrt_backend import check_engine_target, tensorrt_available

    has_plans = all("plan" in entry["modules"][m]["files"] for m in ("unet", "decode"))
    runnable = (
        requested == "tensorrt" or cuda_python_available()
    )  # tensorrt: TensorRTBackend names what is missing
    if has_plans and device[0] == "cuda" and runnable and tensorrt_available():
        if requested == "tensorrt":
            return "tensorrt"
        try:
            check_engine_target(entry["modules"]["unet"]["tensorrt"], device[1])
            return "tensorrt"
        except (ValueError, RuntimeError) as e:
            logger.warning("%s: %s; using ONNX Runtime", name, e)
    if requested == "tensorrt":
        logger.warning("%s has no TensorRT engine for this machine: running it in ONNX Runtime", name)
    return "onnxruntime"


MODULES = ("unet", "decode")


def open_entry(
    engine_dir: Path,
    name: str,
    entry: dict,
    config,
    requested: str,
    device: tuple[str, int],
    modules=MODULES,
    cuda_graph: bool = False,
):
    """Verify the entry's files (hashes), rebuild its contracts and open the backends of ``modules``
    (both by default; a denoiser needs only the UNet, a decoder only the decode graph). ``cuda_graph``:
    the ONNX Runtime UNet session replays one captured CUDA graph (the decode runs once a request).

    The files are pinned (``engine.pinned``): opened once, size-checked, hashed through the open
    descriptor, and checked unchanged after the backends have loaded them."""
    records = entry["modules"]
    files = {f"{m}/{k}": rec for m in MODULES for k, rec in records[m]["files"].items()}
    kinds = {key: key.partition("/")[2] for key in files}
    with pin_files(engine_dir, files, f"engine {name}", kinds) as pinned:
        opened = _open_backends(name, entry, config, requested, device, modules, cuda_graph, pinned)
        try:
            pinned.recheck()
        except BaseException:
            _close(opened)
            raise
    return opened


def _close(opened: OpenEntry) -> None:
    for backend in (opened.unet, opened.decode):
        if backend is not None:
            backend.close()


def _open_backends(name, entry, config, requested, device, modules, cuda_graph, pinned) -> OpenEntry:
    unet_c, decode_c = contracts(entry, config)
    wanted = set(modules)
    if not wanted or wanted - set(MODULES):
        raise ValueError(f"modules must name some of {', '.join(MODULES)}, got {modules!r}")
    records = entry["modules"]
    device_text = f"{device[0]}:{device[1]}" if device[0] == "cuda" else "cpu"
    opened = []
    try:
        if resolve_backend(requested, name, entry, device) == "tensorrt":
            from litefocus.engine.tensorrt_backend import TensorRTBackend

            if cuda_graph:
                raise ValueError(
                    f"engine {name} runs on TensorRT here; --cuda-graph is for ONNX Runtime engines "
                    "(use --backend onnxruntime, or drop --cuda-graph)"
                )

            for m, c in (("unet", unet_c), ("decode", decode_c)):
                if m not in wanted:
                    opened.append(None)
                    continue
                path = pinned.path(f"{m}/plan")
                opened.append(TensorRTBackend(path, c, records[m]["tensorrt"], device=device_text))
        else:
            for m, c in (("unet", unet_c), ("decode", decode_c)):
                if m not in wanted:
                    opened.append(None)
                    continue
                check_gpu_form(name, m, records[m], device)
                opened.append(
                    OnnxRuntimeBackend(
                        pinned.path(f"{m}/onnx"),
                        c,
                        device=device_text,
                        data_path=pinned.path(f"{m}/data"),
                        cuda_graph=cuda_graph and m == "unet",
                        graph=pinned.data(f"{m}/onnx"),
                    )
                )
    except BaseException:
        for backend in opened:
            if backend is not None:
                backend.close()
        raise
    decode = opened[1]
    if decode is not None and decode_c.window_frames is not None:
        decode = ChunkedDecode(decode, decode_c)
    return OpenEntry(opened[0], decode, unet_c, decode_c)


# Packed MultiHeadAttention with a key padding mask (the GPU form's cross-attention) has an unfused
# CUDA fallback only in newer ONNX Runtime; older builds return NOT_IMPLEMENTED at the first run.
GPU_FORM_MIN_ONNXRUNTIME = (1, 20)


def check_gpu_form(name: str, module: str, record: dict, device: tuple[str, int]) -> None:
    """A graph of the GPU form (ONNX Runtime CUDA contrib ops) opens only on a CUDA device, in an
    ONNX Runtime whose kernels take it."""
    ops = record.get("gpu_ops") or []
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
