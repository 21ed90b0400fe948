"""A serialized TensorRT engine as a backend: ``backend(inputs: dict[name, Tensor]) -> Tensor``.

TensorRT 10.x Python API with torch CUDA tensors as the I/O buffers. Every ``tensorrt`` import
happens inside a function (via ``require_tensorrt``): importing this module needs neither TensorRT
nor a GPU. An engine runs only on the TensorRT version and GPU architecture it was built for.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "TensorRT is not installed: run `pip install 'litefocus[gpu]'` (or `pip install tensorrt`); "
    "building and running engines also needs an NVIDIA CUDA GPU"
)


class TensorRTNotInstalled(RuntimeError):
    """The ``tensorrt`` package cannot be imported; the message says how to install it."""


def require_tensorrt():
    """The ``tensorrt`` module, or TensorRTNotInstalled naming the fix."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer is not
        raise TensorRTNotInstalled(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from e
    return trt


def tensorrt_available() -> bool:
    try:
        require_tensorrt()
    except TensorRTNotInstalled:
        return False
    return True


def sm_name(compute_capability: tuple[int, int]) -> str:
    cc = compute_capability
    if (
        not isinstance(cc, tuple)
        or len(cc) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in cc)
        or cc[0] < 1
    ):
        raise ValueError(
            f"compute_capability must be a (major, minor) tuple of ints, e.g. (9, 0); got {cc!r}"
        )
    return f"sm{cc[0]}{cc[1]}"


def current_target(device: int = 0) -> tuple[str, tuple[int, int]]:
    """(TensorRT version, compute capability) of this machine; needs TensorRT and a CUDA GPU."""
    trt = require_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            "building a TensorRT engine needs a CUDA GPU, and torch sees none "
            "(install a CUDA build of torch and check `nvidia-smi`)"
        )
    major, minor = torch.cuda.get_device_capability(device)
    return trt.__version__, (int(major), int(minor))


def trt_logger(trt):
    if log.isEnabledFor(logging.DEBUG):
        return trt.Logger(trt.Logger.VERBOSE)
    return trt.Logger(trt.Logger.INFO if log.isEnabledFor(logging.INFO) else trt.Logger.WARNING)


REEXPORT_HINT = (
    "re-export the engines on this machine with `litefocus-export --force` "
    '(or run with backend="onnxruntime")'
)


def check_engine_target(record: dict, device: int = 0) -> None:
    """Refuse an engine record (build_engine's manifest entry) built for another TensorRT or GPU.

    Raises TensorRTNotInstalled without TensorRT, ValueError on a mismatch or an incomplete record.
    """
    version, cc = current_target(device)
    here = f"TensorRT {version} on {sm_name(cc)}"
    built = (record.get("tensorrt"), record.get("compute_capability"))
    name = f"engine {record['file']}" if record.get("file") else "the engine"
    if None in built:
        raise ValueError(
            f"{name}: its manifest record lacks the TensorRT version or compute capability it was built "
            f"for (this machine has {here}); {REEXPORT_HINT}"
        )
    if built != (version, sm_name(cc)):
        raise ValueError(
            f"{name} was built for TensorRT {built[0]} on {built[1]}, but this machine has {here}; "
            f"a TensorRT engine only runs on the TensorRT version and GPU it was built for: {REEXPORT_HINT}"
        )


def _engine_io(trt, engine) -> dict[str, tuple[str, tuple[int, ...], object]]:
    """Name -> ("input" | "output", shape, numpy dtype or the TensorRT dtype if it has none)."""
    io = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        dtype = engine.get_tensor_dtype(name)
        with contextlib.suppress(TypeError, KeyError, ValueError):  # bf16 / fp8: no numpy type
            dtype = np.dtype(trt.nptype(dtype))
        io[name] = (mode, tuple(int(d) for d in engine.get_tensor_shape(name)), dtype)
    return io


def check_engine_io(trt, engine, contract, where: str = "engine") -> None:
    """The engine's I/O tensors must be exactly the contract's (names, directions, shapes, dtypes)."""
    got = _engine_io(trt, engine)
    want = {s.name: ("input", tuple(s.shape), s.numpy_dtype) for s in contract.inputs}
    want.update({s.name: ("output", tuple(s.shape), s.numpy_dtype) for s in contract.outputs})
    fmt = "{} {} {}".format
    problems = [f"missing {fmt(*w)} {n!r}" for n, w in want.items() if n not in got]
    problems += [f"unexpected {fmt(*g)} {n!r}" for n, g in got.items() if n not in want]
    problems += [
        f"{n!r} is {fmt(*got[n])}, the contract says {fmt(*w)}"
        for n, w in want.items()
        if n in got and got[n] != w
    ]
    if problems:
        raise ValueError(
            f"{where} does not match the manifest's contract:\n  "
            + "\n  ".join(problems)
            + f"\n{REEXPORT_HINT.capitalize()}"
        )


class TensorRTBackend:
    """One deserialized engine with one execution context; calls are serialized with a lock.

    ``device``: the CUDA device the runtime chose ("cuda:N"); "cpu" exists only for tests with a
    fake ``tensorrt`` (no stream then, and the stream handle passed to ``execute_async_v3`` is 0).
    Inputs and output are numpy; the device buffers are preallocated torch CUDA tensors, so this
    backend needs torch (UNVERIFIED on a GPU: TensorRT is not installable where this was written).
    """

    name = "tensorrt"

    def __init__(self, plan_path, contract, record: dict, device: str = "cuda"):
        import torch

        trt = require_tensorrt()
        self._torch = torch
        self.contract = contract
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        if cuda and self.device.index is None:
            self.device = torch.device("cuda", 0)
        if len(contract.outputs) != 1:
            raise ValueError(f"TensorRTBackend needs a one-output contract, got {contract.output_names}")
        check_engine_target(record, self.device.index or 0)
        plan_path = Path(plan_path)
        self._lock = threading.Lock()
        self._logger = trt_logger(trt)
        with torch.cuda.device(self.device) if cuda else contextlib.nullcontext():
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
            if self.engine is None:
                raise RuntimeError(
                    f"TensorRT could not deserialize {plan_path} (see its log above); {REEXPORT_HINT}"
                )
            check_engine_io(trt, self.engine, contract, where=str(plan_path))
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise RuntimeError(f"TensorRT could not create an execution context for {plan_path}")
            self.stream = torch.cuda.Stream(self.device) if cuda else None
            self._buffers = {  # preallocated once: every call copies into them, no per-call allocation
                s.name: torch.empty(s.shape, dtype=s.torch_dtype, device=self.device)
                for s in (*contract.inputs, *contract.outputs)
            }
            for name, buf in self._buffers.items():
                self.context.set_tensor_address(name, buf.data_ptr())

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        with self._lock:
            if self.context is None:
                raise RuntimeError("TensorRTBackend is closed")
            cuda = self.stream is not None
            with torch.cuda.stream(self.stream) if cuda else contextlib.nullcontext():
                for spec in self.contract.inputs:
                    value = np.ascontiguousarray(inputs[spec.name], dtype=spec.numpy_dtype)
                    if value.shape != tuple(spec.shape):
                        raise ValueError(
                            f"input {spec.name!r} has shape {value.shape}, the engine takes {spec.shape}"
                        )
                    self._buffers[spec.name].copy_(torch.from_numpy(value), non_blocking=False)
                ok = self.context.execute_async_v3(self.stream.cuda_stream if cuda else 0)
                if cuda:
                    self.stream.synchronize()
                if not ok:
                    raise RuntimeError("TensorRT execute_async_v3 failed (see its log above)")
                (out,) = self.contract.outputs
                return self._buffers[out.name].cpu().numpy().astype(np.float32)  # a copy: never the buffer

    def close(self) -> None:
        with self._lock:
            self.context = None  # the context before the engine, the engine before the runtime
            self.engine = None
            self._runtime = None
            self._buffers = {}
            self.stream = None
