"""TensorRTBackend: target and I/O checks and the call path against a fake ``tensorrt``.

The fake engine works like a real one: it sees only tensor addresses, reads its inputs and writes
its output through them (ctypes), so the tests check what the backend hands TensorRT. The CUDA path
runs against a fake cuda-python ``cudart`` (FakeCudart) whose "device memory" is host memory: it
records every call, so the tests check the allocations, copies, launches and frees. No test here
runs on a GPU except the last one, which needs TensorRT and a GPU.
"""

from __future__ import annotations

import ctypes
import enum
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch

from litefocus.buckets import Bucket
from litefocus.engine.contract import DecodeContract, UNetContract
from litefocus.engine.cuda_runtime import CudaNotAvailable
from litefocus.engine.tensorrt_backend import TensorRTBackend, check_engine_target, current_target
from litefocus.export.tensorrt_build import TensorRTNotInstalled

TINY_BUCKET = Bucket(seconds=0.32, frames=8)  # latent (1, 8, 8, 16) -> 5120 samples
UNET = UNetContract(bucket=TINY_BUCKET, text_len=3, gpt2_dim=4, t5_dim=5, precision="fp16")
RECORD = {"file": "unet-x-fp16-trt10.8.0-sm90.plan", "tensorrt": "10.8.0", "compute_capability": "sm90"}


def at(ptr: int, shape, dtype) -> np.ndarray:
    """A writable numpy view of ``shape``/``dtype`` at address ``ptr`` (what TensorRT sees)."""
    dtype = np.dtype(dtype)
    raw = (ctypes.c_uint8 * (int(np.prod(shape)) * dtype.itemsize)).from_address(ptr)
    return np.ctypeslib.as_array(raw).view(dtype).reshape(shape)


class FakeTRT(types.SimpleNamespace):
    """Just enough of ``tensorrt`` for TensorRTBackend; ``io``: (name, mode, shape, dtype) rows.

    Its engine computes noise_pred = 2 * sample + timestep and records every call in ``calls``
    (a FakeCudart records its calls there too, so the order of both is checked).
    """

    def __init__(self, io, execute_ok=True):
        fake = self
        self.calls: list[tuple] = []
        self.seen: dict[str, np.ndarray] = {}
        self.running = False
        self.capture: list | None = None  # set by a FakeCudart while it captures a CUDA graph
        rows = {name: (mode, shape, dtype) for name, mode, shape, dtype in io}

        class Context:
            def __init__(self):
                self.addresses = {}

            def set_tensor_address(self, name, ptr):
                fake.calls.append(("set_tensor_address", name))
                self.addresses[name] = ptr
                return True

            def execute_async_v3(self, stream_handle):
                fake.calls.append(("execute_async_v3", stream_handle))
                if fake.capture is not None:  # a CUDA graph capture records the work, runs nothing
                    fake.capture.append(self.run)
                    return True
                self.run()
                return execute_ok

            def run(self):
                assert not fake.running, "one execution context used by two threads at once"
                fake.running = True
                time.sleep(0.001)
                views = {n: at(p, rows[n][1], rows[n][2]) for n, p in self.addresses.items()}
                fake.seen = {n: v.copy() for n, v in views.items() if rows[n][0] == "INPUT"}
                if "noise_pred" in views:
                    views["noise_pred"][...] = 2 * views["sample"] + views["timestep"][0]
                fake.running = False

        class Engine:
            num_io_tensors = len(io)

            def get_tensor_name(self, i):
                return io[i][0]

            def get_tensor_mode(self, name):
                return rows[name][0]

            def get_tensor_shape(self, name):
                return list(rows[name][1])  # Dims-like

            def get_tensor_dtype(self, name):
                return rows[name][2]

            def create_execution_context(self):
                fake.calls.append(("create_execution_context",))
                return Context()

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, blob):
                fake.calls.append(("deserialize_cuda_engine", bytes(blob)))
                return None if blob == b"corrupt" else Engine()

        def nptype(dtype):
            if dtype == "bfloat16":
                raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
            return np.dtype(dtype).type

        class Logger:
            VERBOSE, INFO, WARNING, ERROR = "VERBOSE", "INFO", "WARNING", "ERROR"

            def __init__(self, severity):
                self.severity = severity

        super().__init__(
            __version__="10.8.0",
            Logger=Logger,
            Runtime=Runtime,
            TensorIOMode=types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT", NONE="NONE"),
            nptype=nptype,
        )

    def named(self, name):
        return [c for c in self.calls if c[0] == name]


def contract_io(contract):
    return [(s.name, "INPUT", s.shape, s.dtype) for s in contract.inputs] + [
        (s.name, "OUTPUT", s.shape, s.dtype) for s in contract.outputs
    ]


def install_fake(monkeypatch, io=None, cc=(9, 0), **kwargs) -> FakeTRT:
    fake = FakeTRT(contract_io(UNET) if io is None else io, **kwargs)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    return fake


@pytest.fixture
def plan(tmp_path):
    path = tmp_path / RECORD["file"]
    path.write_bytes(b"fake plan")
    return path


# ---------------------------------------------------------------- target


def test_check_engine_target_accepts_this_machine(monkeypatch):
    install_fake(monkeypatch)
    check_engine_target(RECORD)
    check_engine_target({**RECORD, "file": None})


@pytest.mark.parametrize(
    ("change", "built"),
    [
        ({"tensorrt": "10.7.0"}, "TensorRT 10.7.0 on sm90"),
        ({"compute_capability": "sm89"}, "TensorRT 10.8.0 on sm89"),
        ({"tensorrt": "10.8.0.43", "compute_capability": "sm120"}, "TensorRT 10.8.0.43 on sm120"),
    ],
)
def test_check_engine_target_refuses_another_tensorrt_or_gpu(monkeypatch, change, built):
    install_fake(monkeypatch)
    with pytest.raises(ValueError) as e:
        check_engine_target({**RECORD, **change})
    msg = str(e.value)
    assert f"{RECORD['file']} was built for {built}" in msg
    assert "this machine has TensorRT 10.8.0 on sm90" in msg
    assert "`litefocus-export --force`" in msg and 'backend="onnxruntime"' in msg


def test_check_engine_target_refuses_an_incomplete_record(monkeypatch):
    install_fake(monkeypatch, cc=(8, 9))
    with pytest.raises(ValueError, match=r"lacks .*this machine has TensorRT 10.8.0 on sm89\).*--force"):
        check_engine_target({"file": "a.plan", "tensorrt": "10.8.0"})


def test_missing_tensorrt_names_the_fix(monkeypatch, plan):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(TensorRTNotInstalled, match=r"pip install 'litefocus\[gpu\]'"):
        check_engine_target(RECORD)
    with pytest.raises(TensorRTNotInstalled, match="pip install tensorrt"):  # before the file is read
        TensorRTBackend(plan.parent / "missing.plan", UNET, RECORD, device="cpu")


def test_backend_checks_the_target_before_reading_the_plan(monkeypatch, plan):
    fake = install_fake(monkeypatch, cc=(8, 6))
    with pytest.raises(ValueError, match="this machine has TensorRT 10.8.0 on sm86"):
        TensorRTBackend(plan, UNET, RECORD, device="cpu")
    assert fake.calls == []


# ---------------------------------------------------------------- engine I/O


def _mutate(rows, name, **change):
    fields = ("name", "mode", "shape", "dtype")
    return [
        tuple(change.get(f, v) for f, v in zip(fields, r, strict=True)) if r[0] == name else r for r in rows
    ]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda io: io[1:], "missing input (2, 8, 8, 16) float16 'sample'"),
        (lambda io: [*io, ("extra", "OUTPUT", (1,), "float32")], "unexpected output (1,) float32 'extra'"),
        (lambda io: _mutate(io, "sample", shape=(1, 8, 8, 16)), "'sample' is input (1, 8, 8, 16) float16"),
        (lambda io: _mutate(io, "sample", shape=(-1, 8, 8, 16)), "'sample' is input (-1, 8, 8, 16)"),
        (lambda io: _mutate(io, "encoder_attention_mask_1", dtype="int64"), "is input (2, 3) int64"),
        (
            lambda io: _mutate(io, "noise_pred", dtype="bfloat16"),
            "'noise_pred' is output (2, 8, 8, 16) bfloat16",
        ),
        (lambda io: _mutate(io, "timestep", mode="OUTPUT"), "'timestep' is output (2,) float32"),
    ],
)
def test_engine_io_must_match_the_contract(monkeypatch, plan, mutate, match):
    fake = install_fake(monkeypatch, io=mutate(contract_io(UNET)))
    with pytest.raises(ValueError) as e:
        TensorRTBackend(plan, UNET, RECORD, device="cpu")
    msg = str(e.value)
    assert match in msg, msg
    assert str(plan) in msg and "litefocus-export --force" in msg
    assert fake.named("create_execution_context") == []


def test_undeserializable_plan(monkeypatch, plan):
    install_fake(monkeypatch)
    plan.write_bytes(b"corrupt")
    with pytest.raises(RuntimeError, match="could not deserialize"):
        TensorRTBackend(plan, UNET, RECORD, device="cpu")


# ---------------------------------------------------------------- calls


def caller_inputs(seed=0) -> dict[str, np.ndarray]:
    """Valid numpy inputs in the caller's dtypes (fp32 / int64 / non-contiguous), not the engine's."""
    inputs = {k: v.float().numpy() for k, v in UNET.sample_inputs(seed).items()}
    inputs["encoder_attention_mask_1"] = inputs["encoder_attention_mask_1"].astype(np.int64)
    s = inputs["sample"]
    inputs["sample"] = np.swapaxes(np.ascontiguousarray(np.swapaxes(s, -1, -2)), -1, -2)
    assert not inputs["sample"].flags.c_contiguous
    return inputs


def test_call_routes_cast_inputs_and_returns_the_output_as_float32(monkeypatch, plan):
    fake = install_fake(monkeypatch)
    backend = TensorRTBackend(plan, UNET, RECORD, device="cpu")
    assert backend.name == "tensorrt"
    assert fake.named("deserialize_cuda_engine") == [("deserialize_cuda_engine", b"fake plan")]
    assert len(fake.named("create_execution_context")) == 1

    inputs = caller_inputs(0)
    out = backend(inputs)
    order = [c[1] for c in fake.named("set_tensor_address")]
    assert order == UNET.input_names + UNET.output_names
    assert fake.named("execute_async_v3") == [("execute_async_v3", 0)]  # cpu: no stream
    for spec in UNET.inputs:
        want = inputs[spec.name].astype(spec.numpy_dtype)
        np.testing.assert_array_equal(fake.seen[spec.name], want)
    half, timestep = inputs["sample"].astype(np.float16), inputs["timestep"][0]
    expected = (2 * half + timestep).astype(np.float16).astype(np.float32)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == UNET.outputs[0].shape
    np.testing.assert_array_equal(out, expected)

    first = out.copy()
    out2 = backend(caller_inputs(1))  # the next call must not overwrite the first result
    np.testing.assert_array_equal(out, first)
    assert not np.array_equal(out, out2)
    assert len(fake.named("create_execution_context")) == 1  # one context for all calls


def test_call_rejects_a_wrong_shape_and_a_closed_backend(monkeypatch, plan):
    fake = install_fake(monkeypatch)
    backend = TensorRTBackend(plan, UNET, RECORD, device="cpu")
    inputs = caller_inputs()
    inputs["timestep"] = np.ones(1)  # would broadcast in a copy_: must be refused
    with pytest.raises(ValueError, match=r"'timestep' has shape \(1,\), the engine takes \(2,\)"):
        backend(inputs)
    assert fake.named("execute_async_v3") == []
    backend.close()
    assert backend.engine is None and backend.context is None
    with pytest.raises(RuntimeError, match="closed"):
        backend(caller_inputs())


def test_failed_execution_raises(monkeypatch, plan):
    install_fake(monkeypatch, execute_ok=False)
    with pytest.raises(RuntimeError, match="execute_async_v3 failed"):
        TensorRTBackend(plan, UNET, RECORD, device="cpu")(caller_inputs())


def test_calls_from_threads_are_serialized(monkeypatch, plan):
    fake = install_fake(monkeypatch)
    backend = TensorRTBackend(plan, UNET, RECORD, device="cpu")
    inputs, errors = caller_inputs(), []

    def work():
        try:
            for _ in range(3):
                backend(inputs)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(fake.named("execute_async_v3")) == 9


# ---------------------------------------------------------------- CUDA path (fake cudart)


class FakeCudart(types.ModuleType):
    """Just enough of cuda-python's ``cudart`` for cuda_runtime; records its calls in ``trt.calls``.

    "Device memory" is host memory (``memory``: pointer -> the numpy array that owns it), so the fake
    engine reads and writes it through the same addresses. ``fail_on=(name, n)``: the n-th call of
    ``name`` returns ``error`` instead of success. A graph capture records the engine's work
    (FakeTRT.capture) and a launch replays it.
    """

    STREAM = 0x5EED

    def __init__(self, trt: FakeTRT, cc=(9, 0), fail_on=None, error="cudaErrorMemoryAllocation"):
        super().__init__("cuda.bindings.runtime")
        self.cudaError_t = enum.IntEnum(
            "cudaError_t",
            {
                "cudaSuccess": 0,
                "cudaErrorInvalidValue": 1,
                "cudaErrorMemoryAllocation": 2,
                "cudaErrorNoDevice": 100,
            },
        )
        self.cudaMemcpyKind = enum.IntEnum(
            "cudaMemcpyKind", {"cudaMemcpyHostToDevice": 1, "cudaMemcpyDeviceToHost": 2}
        )
        self.cudaStreamCaptureMode = enum.IntEnum("cudaStreamCaptureMode", {"cudaStreamCaptureModeGlobal": 0})
        self.trt, self.cc, self.fail_on, self.error = trt, cc, fail_on, error
        self.memory: dict[int, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.streams: set[int] = set()

    def _result(self, name, *args, values=()):
        self.trt.calls.append((name, *args))
        self.counts[name] = self.counts.get(name, 0) + 1
        if self.fail_on == (name, self.counts[name]):
            return (self.cudaError_t[self.error], *(None for _ in values))
        return (self.cudaError_t.cudaSuccess, *values)

    def cudaSetDevice(self, index):
        return self._result("cudaSetDevice", index)

    def cudaGetDeviceProperties(self, index):
        props = types.SimpleNamespace(major=self.cc[0], minor=self.cc[1])
        return self._result("cudaGetDeviceProperties", index, values=(props,))

    def cudaMalloc(self, nbytes):
        owner = np.zeros(nbytes, np.uint8)
        result = self._result("cudaMalloc", nbytes, values=(owner.ctypes.data,))
        if result[0] == 0:
            self.memory[owner.ctypes.data] = owner
        return result

    def cudaFree(self, ptr):
        assert ptr in self.memory, "cudaFree of memory that is not allocated"
        result = self._result("cudaFree", ptr)
        del self.memory[ptr]
        return result

    def cudaStreamCreate(self):
        class Stream:  # like cudaStream_t: int() is the handle
            def __int__(self):
                return FakeCudart.STREAM

        self.streams.add(self.STREAM)
        return self._result("cudaStreamCreate", values=(Stream(),))

    def _stream(self, stream):
        assert int(stream) in self.streams, "a stream that was never created (or is destroyed)"
        return int(stream)

    def cudaStreamSynchronize(self, stream):
        return self._result("cudaStreamSynchronize", self._stream(stream))

    def cudaStreamDestroy(self, stream):
        self.streams.discard(self._stream(stream))
        return self._result("cudaStreamDestroy", int(stream))

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        device = dst if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else src
        assert self.memory[device].nbytes == nbytes, "a copy of another size than the device buffer"
        result = self._result(
            "cudaMemcpyAsync", kind.name[len("cudaMemcpy") :], device, nbytes, self._stream(stream)
        )
        if result[0] == 0:
            ctypes.memmove(dst, src, nbytes)
        return result

    def cudaStreamBeginCapture(self, stream, mode):
        assert mode == self.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        self.trt.capture = []
        return self._result("cudaStreamBeginCapture", self._stream(stream))

    def cudaStreamEndCapture(self, stream):
        work, self.trt.capture = self.trt.capture, None
        return self._result("cudaStreamEndCapture", self._stream(stream), values=(("graph", tuple(work)),))

    def cudaGraphInstantiate(self, graph, flags):
        return self._result("cudaGraphInstantiate", flags, values=(("exec", graph[1]),))

    def cudaGraphLaunch(self, graph_exec, stream):
        result = self._result("cudaGraphLaunch", self._stream(stream))
        for work in graph_exec[1]:
            work()
        return result

    def cudaGraphExecDestroy(self, graph_exec):
        return self._result("cudaGraphExecDestroy")

    def cudaGraphDestroy(self, graph):
        return self._result("cudaGraphDestroy")


def install_cuda(monkeypatch, trt: FakeTRT, **kwargs) -> FakeCudart:
    """FakeCudart as ``cuda.bindings.runtime``."""
    rt = FakeCudart(trt, **kwargs)
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, rt
    for name, module in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", rt)):
        monkeypatch.setitem(sys.modules, name, module)
    return rt


def nbytes(spec) -> int:
    return int(np.prod(spec.shape)) * spec.numpy_dtype.itemsize


def expected_output(inputs) -> np.ndarray:
    half, timestep = inputs["sample"].astype(np.float16), inputs["timestep"][0]
    return (2 * half + timestep).astype(np.float16).astype(np.float32)


def open_cuda(monkeypatch, plan, cuda_graph=False, block_torch=False, **kwargs):
    fake = install_fake(monkeypatch, cc=(8, 6))  # torch would say sm86: the record passes via cudart
    rt = install_cuda(monkeypatch, fake, **kwargs)
    if block_torch:  # `import torch` fails from here on: the CUDA path must not need it
        monkeypatch.setitem(sys.modules, "torch", None)
    backend = TensorRTBackend(plan, UNET, RECORD, device="cuda:1", cuda_graph=cuda_graph)
    rt.ptrs = dict(zip([s.name for s in (*UNET.inputs, *UNET.outputs)], rt.memory, strict=True))
    return fake, rt, backend


def call_sequence(rt: FakeCudart, launch: list[tuple]) -> list[tuple]:
    """What one call must do: set the device, copy each input in, launch, copy the output out, sync."""
    s = rt.STREAM
    out = rt.ptrs[UNET.outputs[0].name]
    ins = [("cudaMemcpyAsync", "HostToDevice", rt.ptrs[spec.name], nbytes(spec), s) for spec in UNET.inputs]
    d2h = ("cudaMemcpyAsync", "DeviceToHost", out, nbytes(UNET.outputs[0]), s)
    return [("cudaSetDevice", 1), *ins, *launch, d2h, ("cudaStreamSynchronize", s)]


def test_cuda_backend_allocates_once_and_binds_the_buffers(monkeypatch, plan):
    fake, rt, backend = open_cuda(monkeypatch, plan, block_torch=True)
    specs = [*UNET.inputs, *UNET.outputs]
    assert [c[0] for c in fake.calls[:2]] == ["cudaGetDeviceProperties", "cudaSetDevice"]
    assert fake.calls[:2] == [("cudaGetDeviceProperties", 1), ("cudaSetDevice", 1)]  # cudart, not torch
    assert fake.named("cudaMalloc") == [("cudaMalloc", nbytes(s)) for s in specs]
    assert len(fake.named("cudaStreamCreate")) == 1
    addresses = {c[1]: p for c, p in zip(fake.named("set_tensor_address"), rt.memory, strict=True)}
    assert list(addresses) == [s.name for s in specs]
    assert {n: rt.memory[p].nbytes for n, p in addresses.items()} == {s.name: nbytes(s) for s in specs}
    assert backend.device == "cuda:1"


def test_cuda_call_copies_in_runs_once_copies_out_and_syncs(monkeypatch, plan):
    calls = [caller_inputs(seed) for seed in (0, 1, 2)]  # sample_inputs needs torch; the backend not
    fake, rt, backend = open_cuda(monkeypatch, plan, block_torch=True)
    outs = []
    for inputs in calls:
        before = len(fake.calls)
        outs.append(backend(inputs))
        assert fake.calls[before:] == call_sequence(rt, [("execute_async_v3", rt.STREAM)])
        for spec in UNET.inputs:
            np.testing.assert_array_equal(fake.seen[spec.name], inputs[spec.name].astype(spec.numpy_dtype))
        assert outs[-1].dtype == np.float32 and outs[-1].shape == UNET.outputs[0].shape
    for out, inputs in zip(outs, calls, strict=True):  # each result is its own copy
        np.testing.assert_array_equal(out, expected_output(inputs))
    assert len(fake.named("cudaMalloc")) == len(UNET.inputs) + 1  # no allocation per call
    assert len(fake.named("cudaStreamCreate")) == 1


def test_cuda_graph_is_captured_once_then_replayed(monkeypatch, plan):
    fake, rt, backend = open_cuda(monkeypatch, plan, cuda_graph=True)
    s = rt.STREAM
    before, inputs = len(fake.calls), caller_inputs(0)
    np.testing.assert_array_equal(backend(inputs), expected_output(inputs))
    capture = [
        ("execute_async_v3", s),  # the warm run, then the capture (which runs nothing)
        ("cudaStreamBeginCapture", s),
        ("execute_async_v3", s),
        ("cudaStreamEndCapture", s),
        ("cudaGraphInstantiate", 0),
    ]
    assert fake.calls[before:] == call_sequence(rt, capture)
    for seed in (1, 2):  # the graph reads the new inputs from the same buffers
        before, inputs = len(fake.calls), caller_inputs(seed)
        np.testing.assert_array_equal(backend(inputs), expected_output(inputs))
        assert fake.calls[before:] == call_sequence(rt, [("cudaGraphLaunch", s)])
    assert len(fake.named("execute_async_v3")) == 2 and len(fake.named("cudaGraphInstantiate")) == 1


def test_cuda_close_frees_everything_once(monkeypatch, plan):
    fake, rt, backend = open_cuda(monkeypatch, plan, cuda_graph=True)
    backend(caller_inputs())
    allocated = list(rt.memory)
    before = len(fake.calls)
    backend.close()
    names = [c[0] for c in fake.calls[before:]]
    assert names == [
        "cudaSetDevice",
        "cudaStreamSynchronize",
        "cudaGraphExecDestroy",
        "cudaGraphDestroy",
        *["cudaFree"] * len(allocated),
        "cudaStreamDestroy",
    ]
    assert [c[1] for c in fake.named("cudaFree")] == allocated
    assert rt.memory == {} and rt.streams == set()
    assert backend.context is None and backend.engine is None
    before = len(fake.calls)
    backend.close()  # a second close frees nothing twice
    assert fake.calls[before:] == []
    with pytest.raises(RuntimeError, match="closed"):
        backend(caller_inputs())


def test_a_cuda_error_names_the_call_and_a_failed_open_frees_what_it_took(monkeypatch, plan):
    fake = install_fake(monkeypatch)
    rt = install_cuda(monkeypatch, fake, fail_on=("cudaMalloc", 3))
    with pytest.raises(RuntimeError, match=r"CUDA call cudaMalloc failed: cudaErrorMemoryAllocation \(2\)"):
        TensorRTBackend(plan, UNET, RECORD, device="cuda:0")
    assert len(fake.named("cudaFree")) == 2 and rt.memory == {} and rt.streams == set()

    fake, rt, backend = open_cuda(
        monkeypatch, plan, fail_on=("cudaMemcpyAsync", 2), error="cudaErrorInvalidValue"
    )
    with pytest.raises(RuntimeError, match="CUDA call cudaMemcpyAsync failed: cudaErrorInvalidValue"):
        backend(caller_inputs())
    assert fake.named("execute_async_v3") == []


def test_cuda_failed_execution_raises(monkeypatch, plan):
    fake = install_fake(monkeypatch, execute_ok=False)
    install_cuda(monkeypatch, fake)
    backend = TensorRTBackend(plan, UNET, RECORD, device="cuda")
    with pytest.raises(RuntimeError, match="execute_async_v3 failed"):
        backend(caller_inputs())
    assert fake.calls[-1] == ("cudaStreamSynchronize", FakeCudart.STREAM)  # nothing left in flight


def test_missing_cuda_python_is_a_one_line_install_hint(monkeypatch, plan):
    fake = install_fake(monkeypatch)
    monkeypatch.setitem(sys.modules, "cuda", None)  # neither cuda.bindings nor cuda.cudart imports
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(CudaNotAvailable) as e:
        TensorRTBackend(plan.parent / "missing.plan", UNET, RECORD, device="cuda:0")
    msg = str(e.value)
    assert "pip install cuda-python" in msg and "\n" not in msg
    assert isinstance(e.value, TensorRTNotInstalled)  # the CLI prints it as one line
    assert fake.calls == []
    TensorRTBackend(plan, UNET, RECORD, device="cpu")  # the fake-TensorRT path needs no cuda-python


def test_current_target_prefers_cudart_and_falls_back_to_torch(monkeypatch):
    fake = install_fake(monkeypatch, cc=(8, 6))
    rt = install_cuda(monkeypatch, fake, cc=(12, 0))
    assert current_target(2) == ("10.8.0", (12, 0)) and fake.calls == [("cudaGetDeviceProperties", 2)]
    rt.fail_on = ("cudaGetDeviceProperties", 2)  # e.g. no device visible to cudart
    assert current_target(2) == ("10.8.0", (8, 6))


def test_device_and_cuda_graph_arguments(monkeypatch, plan):
    install_fake(monkeypatch)
    for bad in ("gpu", "cuda:x", "cuda:-1", "cuda:²"):
        with pytest.raises(ValueError, match="device must be"):
            TensorRTBackend(plan, UNET, RECORD, device=bad)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        TensorRTBackend(plan, UNET, RECORD, device="cpu", cuda_graph=True)


# ---------------------------------------------------------------- real TensorRT (never runs on CPU)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_engine_matches_onnxruntime(tmp_path):
    from litefocus.engine.backends import OnnxRuntimeBackend
    from litefocus.export.tensorrt_build import BuildOptions, build_engine, current_target, engine_filename
    from tiny_models import tiny_decode_onnx

    contract = DecodeContract(bucket=TINY_BUCKET)
    onnx_path = tmp_path / "decode.onnx"
    tiny_decode_onnx(onnx_path, contract)
    out = tmp_path / engine_filename("decode", TINY_BUCKET.name, "fp32", *current_target())
    record = build_engine(onnx_path, contract, out, BuildOptions(optimization_level=0, workspace_gb=1))

    trt_backend = TensorRTBackend(out, contract, record)
    ort_backend = OnnxRuntimeBackend(onnx_path, contract)
    try:
        for seed in (0, 1):
            inputs = contract.numpy_inputs(seed)
            got = trt_backend(inputs)
            assert isinstance(got, np.ndarray) and got.dtype == np.float32
            np.testing.assert_array_equal(got, ort_backend(inputs))
            np.testing.assert_allclose(got, np.tile(inputs["latent"].reshape(1, -1), (1, 5)), rtol=1e-6)
    finally:
        trt_backend.close()
        ort_backend.close()
