"""A serialized TensorRT engine as a backend: ``backend(inputs: dict[name, ndarray]) -> ndarray``.

TensorRT 10.x Python API; no torch. On a GPU the I/O lives in device buffers allocated once through
cuda-python's CUDA runtime (``engine/cuda_runtime.py``): each call copies the inputs in on one CUDA
stream, runs ``execute_async_v3`` there (or replays a CUDA graph of it), copies the output back and
synchronizes -- the pattern of TensorRT's demo/Diffusion. Every ``tensorrt`` / ``cuda`` import
happens inside a function: importing this module needs neither TensorRT nor cuda-python nor a GPU.
An engine runs only on the TensorRT version and GPU architecture it was built for.

UNVERIFIED ON A GPU: TensorRT cannot be installed where this was written. What is tested is the
call sequence against fakes -- a fake ``tensorrt`` whose engine reads and writes through the tensor
addresses it is given, and a fake ``cudart`` (host memory standing in for device memory) that
records every call (tests/test_tensorrt_backend.py). ``device="cpu"`` exists only for those tests.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import numpy as np

from litefocus.engine.gpu_errors import TensorRTNotInstalled

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "TensorRT is not installed: run `pip install 'litefocus[gpu]'` (or `pip install tensorrt`); "
    "building and running engines also needs an NVIDIA CUDA GPU"
)


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
    """(TensorRT version, compute capability) of this machine; needs TensorRT and a CUDA GPU.

    The compute capability comes from cuda-python's cudaGetDeviceProperties; torch is only a
    fallback, for machines without cuda-python or where that call fails.
    """
    trt = require_tensorrt()
    from litefocus.engine import cuda_runtime

    try:
        return trt.__version__, cuda_runtime.compute_capability(device)
    except RuntimeError as e:  # CudaNotAvailable / CudaError: ask torch instead, if it is there
        cuda_problem = e
    try:
        import torch
    except ImportError:
        raise RuntimeError(
            f"TensorRT engines need a CUDA GPU and cuda-python to reach it: {cuda_problem}"
        ) from None
    if not torch.cuda.is_available():
        raise RuntimeError(
            "building a TensorRT engine needs a CUDA GPU, and torch sees none "
            f"(install a CUDA build of torch and check `nvidia-smi`; cuda-python: {cuda_problem})"
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


def parse_device(device: str) -> int | None:
    """Device text -> CUDA index: "cuda" -> 0, "cuda:N" -> N, "cpu" -> None."""
    text = str(device)
    if text == "cpu":
        return None
    kind, _, index = text.partition(":")
    if kind == "cuda" and (not index or (index.isdigit() and index.isascii())):
        return int(index or 0)
    raise ValueError(f'device must be "cuda", "cuda:N" or (fake TensorRT only) "cpu"; got {device!r}')


class TensorRTBackend:
    """One deserialized engine with one execution context; calls are serialized with a lock.

    ``device``: the CUDA device the runtime chose ("cuda:N"). One device buffer per I/O tensor is
    allocated at init and bound with ``set_tensor_address`` once; a call copies the inputs in on this
    backend's stream, runs the engine, copies the output into a preallocated host array and
    synchronizes. ``cuda_graph=True``: the first call runs the engine once and then captures that
    launch as a CUDA graph; later calls replay the graph (static shapes, fixed addresses: both hold).
    ``device="cpu"`` exists only for tests with a fake ``tensorrt``: host numpy buffers, numpy copies,
    stream handle 0, no cuda-python. UNVERIFIED on a GPU (see the module docstring).
    """

    name = "tensorrt"

    def __init__(self, plan_path, contract, record: dict, device: str = "cuda", cuda_graph: bool = False):
        trt = require_tensorrt()
        self.contract = contract
        self.device_index = parse_device(device)
        self.device = "cpu" if self.device_index is None else f"cuda:{self.device_index}"
        if len(contract.outputs) != 1:
            raise ValueError(f"TensorRTBackend needs a one-output contract, got {contract.output_names}")
        if cuda_graph and self.device_index is None:
            raise ValueError('cuda_graph=True needs a CUDA device, not "cpu"')
        self.cuda_graph = bool(cuda_graph)
        cr = None
        if self.device_index is not None:
            from litefocus.engine import cuda_runtime as cr

            cr.cudart()  # CudaNotAvailable (how to install cuda-python) before anything is opened
        check_engine_target(record, self.device_index or 0)
        plan_path = Path(plan_path)
        self._cr = cr
        self._lock = threading.Lock()
        self._logger = trt_logger(trt)
        self._runtime = self.engine = self.context = None
        self._stream = self._graph = None
        self._buffers: dict = {}  # name -> DeviceBuffer (cuda) or numpy array (cpu)
        specs = (*contract.inputs, *contract.outputs)
        (out,) = contract.outputs
        try:
            if cr is not None:
                cr.set_device(self.device_index)
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
            if cr is not None:
                self._stream = cr.Stream()
                for s in specs:  # preallocated once: every call copies into them
                    self._buffers[s.name] = cr.DeviceBuffer(int(np.prod(s.shape)) * s.numpy_dtype.itemsize)
                addresses = {name: buf.ptr for name, buf in self._buffers.items()}
                self._host_out = np.empty(out.shape, out.numpy_dtype)
            else:
                self._buffers = {s.name: np.zeros(s.shape, s.numpy_dtype) for s in specs}
                addresses = {name: buf.ctypes.data for name, buf in self._buffers.items()}
                self._host_out = self._buffers[out.name]
            for name, ptr in addresses.items():
                if self.context.set_tensor_address(name, ptr) is False:
                    raise RuntimeError(f"TensorRT refused the address of tensor {name!r} ({plan_path})")
        except BaseException:
            try:
                self._release()
            except RuntimeError as e:  # the first error is the one to report
                log.warning("TensorRTBackend: cleaning up after a failed open: %s", e)
            raise

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        with self._lock:
            if self.context is None:
                raise RuntimeError("TensorRTBackend is closed")
            values = {}
            for spec in self.contract.inputs:
                value = np.ascontiguousarray(inputs[spec.name], dtype=spec.numpy_dtype)
                if value.shape != tuple(spec.shape):
                    raise ValueError(
                        f"input {spec.name!r} has shape {value.shape}, the engine takes {spec.shape}"
                    )
                values[spec.name] = value  # kept alive until the stream is synchronized
            if self._cr is None:
                for name, value in values.items():
                    np.copyto(self._buffers[name], value)
                if not self.context.execute_async_v3(0):
                    raise RuntimeError("TensorRT execute_async_v3 failed (see its log above)")
            else:
                self._run_on_gpu(values)
            return self._host_out.astype(np.float32)  # always a copy: never the preallocated array

    def _run_on_gpu(self, values: dict[str, np.ndarray]) -> None:
        cr, stream = self._cr, self._stream
        cr.set_device(self.device_index)  # the current device is per host thread
        for name, value in values.items():
            cr.copy_to_device(self._buffers[name], value, stream)
        if self._graph is not None:
            self._graph.launch(stream)
        else:
            if not self.context.execute_async_v3(stream.handle):
                stream.synchronize()
                raise RuntimeError("TensorRT execute_async_v3 failed (see its log above)")
            if self.cuda_graph:  # after one real run, as TensorRT asks; this capture does not run
                self._graph = cr.Graph(stream, self._enqueue_for_capture)
        (out,) = self.contract.outputs
        cr.copy_to_host(self._host_out, self._buffers[out.name], stream)
        stream.synchronize()

    def _enqueue_for_capture(self) -> None:
        if not self.context.execute_async_v3(self._stream.handle):
            raise RuntimeError(
                "TensorRT execute_async_v3 failed while capturing a CUDA graph; "
                "open the backend with cuda_graph=False"
            )

    def _release(self) -> None:
        """Free everything once, in order: graph, context, engine, runtime, buffers, stream."""
        cr, problems = self._cr, []
        if cr is not None and (self._graph is not None or self._buffers or self._stream is not None):
            try:
                cr.set_device(self.device_index)
                if self._stream is not None:
                    self._stream.synchronize()
            except RuntimeError as e:
                problems.append(e)
        graph, self._graph = self._graph, None
        self.context = None  # the context before the engine, the engine before the runtime
        self.engine = None
        self._runtime = None
        buffers, self._buffers = self._buffers, {}
        stream, self._stream = self._stream, None
        steps = [graph.destroy] if graph is not None else []
        if cr is not None:
            steps += [buf.free for buf in buffers.values()]
            steps += [stream.destroy] if stream is not None else []
        for step in steps:  # keep freeing after a failure; report the first
            try:
                step()
            except RuntimeError as e:
                problems.append(e)
        if problems:
            raise problems[0]

    def close(self) -> None:
        with self._lock:
            self._release()
