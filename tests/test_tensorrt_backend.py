"""TensorRTBackend: target and I/O checks and the call path against a fake ``tensorrt`` on CPU.

The fake engine works like a real one: it sees only tensor addresses, reads its inputs and writes
its output through them (ctypes), so the tests check what the backend hands TensorRT.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch

from litefocus.buckets import Bucket
from litefocus.engine.contract import DecodeContract, UNetContract
from litefocus.engine.tensorrt_backend import TensorRTBackend, check_engine_target
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

    Its engine computes noise_pred = 2 * sample + timestep and records every call in ``calls``.
    """

    def __init__(self, io, execute_ok=True):
        fake = self
        self.calls: list[tuple] = []
        self.seen: dict[str, np.ndarray] = {}
        self.running = False
        rows = {name: (mode, shape, dtype) for name, mode, shape, dtype in io}

        class Context:
            def __init__(self):
                self.addresses = {}

            def set_tensor_address(self, name, ptr):
                fake.calls.append(("set_tensor_address", name))
                self.addresses[name] = ptr
                return True

            def execute_async_v3(self, stream_handle):
                assert not fake.running, "one execution context used by two threads at once"
                fake.running = True
                time.sleep(0.001)
                fake.calls.append(("execute_async_v3", stream_handle))
                views = {n: at(p, rows[n][1], rows[n][2]) for n, p in self.addresses.items()}
                fake.seen = {n: v.copy() for n, v in views.items() if rows[n][0] == "INPUT"}
                if "noise_pred" in views:
                    views["noise_pred"][...] = 2 * views["sample"] + views["timestep"][0]
                fake.running = False
                return execute_ok

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
        (lambda io: _mutate(io, "timestep", mode="OUTPUT"), "'timestep' is output (1,) float32"),
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
    inputs["timestep"] = np.ones(2)  # would broadcast in a copy_: must be refused
    with pytest.raises(ValueError, match=r"'timestep' has shape \(2,\), the engine takes \(1,\)"):
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


# ---------------------------------------------------------------- real TensorRT (never runs on CPU)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_engine_matches_onnxruntime(tmp_path):
    from test_tensorrt_build import tiny_decode_onnx

    from litefocus.engine.backends import OnnxRuntimeBackend
    from litefocus.export.tensorrt_build import BuildOptions, build_engine, current_target, engine_filename

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
