"""The few CUDA runtime calls TensorRTBackend needs, on cuda-python's ``cudart``: no torch.

Device buffers (cudaMalloc/cudaFree), one stream, async host<->device copies from/to numpy arrays,
the current device, and CUDA graphs (capture a stream's work once, then replay it). cuda-python is
imported inside the functions: importing this module needs neither it nor a GPU. Every cudart call
returns a tuple whose first element is a ``cudaError_t``; ``call`` turns a failure into CudaError
naming the call. UNVERIFIED on a GPU (written where no GPU exists); tested against a fake ``cudart``.
"""

from __future__ import annotations

import numpy as np

from litefocus.engine.gpu_errors import TensorRTNotInstalled

CUDA_HINT = (
    "cuda-python is not installed: run `pip install cuda-python` "
    "(the TensorRT backend uses it for GPU memory and streams)"
)


class CudaNotAvailable(TensorRTNotInstalled):
    """cuda-python (``cuda.bindings.runtime`` or the older ``cuda.cudart``) cannot be imported."""


class CudaError(RuntimeError):
    """A CUDA runtime call returned an error; the message names the call."""


def cudart():
    """cuda-python's CUDA runtime module, or CudaNotAvailable naming the fix (one line)."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6 (cuda-bindings)
    except (ImportError, OSError):
        try:
            from cuda import cudart as runtime  # older cuda-python
        except (ImportError, OSError) as e:
            raise CudaNotAvailable(f"{CUDA_HINT} ({type(e).__name__}: {e})") from None
    return runtime


def cuda_python_available() -> bool:
    try:
        cudart()
    except CudaNotAvailable:
        return False
    return True


def check(result, what: str):
    """The value(s) after the ``cudaError_t`` of a cudart result; CudaError naming ``what`` if it failed."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart().cudaError_t.cudaSuccess:
        raise CudaError(f"CUDA call {what} failed: {getattr(err, 'name', err)} ({int(err)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def call(name: str, *args):
    """``cudart.<name>(*args)``, checked."""
    return check(getattr(cudart(), name)(*args), name)


def set_device(index: int) -> None:
    call("cudaSetDevice", int(index))


def compute_capability(index: int = 0) -> tuple[int, int]:
    props = call("cudaGetDeviceProperties", int(index))
    return int(props.major), int(props.minor)


class DeviceBuffer:
    """``nbytes`` of device memory on the current device, freed by ``free()`` (once)."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.ptr = int(call("cudaMalloc", self.nbytes))

    def free(self) -> None:
        ptr, self.ptr = self.ptr, 0
        if ptr:
            call("cudaFree", ptr)


class Stream:
    """A CUDA stream; ``handle`` is the integer TensorRT's ``execute_async_v3`` takes."""

    def __init__(self):
        self.raw = call("cudaStreamCreate")
        self.handle = int(self.raw)

    def synchronize(self) -> None:
        call("cudaStreamSynchronize", self.raw)

    def destroy(self) -> None:
        raw, self.raw = self.raw, None
        if raw is not None:
            call("cudaStreamDestroy", raw)


def _host(array: np.ndarray, nbytes: int, writable: bool) -> int:
    if not array.flags.c_contiguous or array.nbytes != nbytes or (writable and not array.flags.writeable):
        raise ValueError(
            f"a host array for a {nbytes}-byte device buffer must be C-contiguous"
            f"{' and writable' if writable else ''} with {nbytes} bytes; got {array.nbytes} bytes"
        )
    return array.ctypes.data


def copy_to_device(dst: DeviceBuffer, src: np.ndarray, stream: Stream) -> None:
    """Enqueue ``src`` -> ``dst``; keep ``src`` alive until the stream is synchronized."""
    kind = cudart().cudaMemcpyKind.cudaMemcpyHostToDevice
    call("cudaMemcpyAsync", dst.ptr, _host(src, dst.nbytes, False), dst.nbytes, kind, stream.raw)


def copy_to_host(dst: np.ndarray, src: DeviceBuffer, stream: Stream) -> None:
    """Enqueue ``src`` -> ``dst``; ``dst`` holds the data once the stream is synchronized."""
    kind = cudart().cudaMemcpyKind.cudaMemcpyDeviceToHost
    call("cudaMemcpyAsync", _host(dst, src.nbytes, True), src.ptr, src.nbytes, kind, stream.raw)


class Graph:
    """The work ``enqueue()`` puts on ``stream``, captured once (not run) and replayed by ``launch``."""

    def __init__(self, stream: Stream, enqueue):
        rt = cudart()
        call("cudaStreamBeginCapture", stream.raw, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal)
        try:
            enqueue()
        except BaseException:
            rt.cudaStreamEndCapture(stream.raw)  # leave capture mode; this error is the one to report
            raise
        self._graph = call("cudaStreamEndCapture", stream.raw)
        self._exec = None
        try:
            self._exec = call("cudaGraphInstantiate", self._graph, 0)  # CUDA >= 12 signature
        except BaseException:
            self.destroy()
            raise

    def launch(self, stream: Stream) -> None:
        call("cudaGraphLaunch", self._exec, stream.raw)

    def destroy(self) -> None:
        graph_exec, graph, self._exec, self._graph = self._exec, self._graph, None, None
        if graph_exec is not None:
            call("cudaGraphExecDestroy", graph_exec)
        if graph is not None:
            call("cudaGraphDestroy", graph)
