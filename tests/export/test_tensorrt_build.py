"""TensorRT engine building: everything around TensorRT on CPU, the API calls against a fake module."""

from __future__ import annotations

import hashlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from litefocus.buckets import Bucket
from litefocus.engine import fileio
from litefocus.engine.contract import DecodeContract, UNetContract
from litefocus.export import tensorrt_build as tb
from litefocus.export.tensorrt_build import (
    BuildOptions,
    TensorRTNotInstalled,
    build_engine,
    engine_filename,
    profile_shapes,
    require_tensorrt,
)
from tiny_models import tiny_decode_onnx

UNET = UNetContract(bucket=Bucket.for_seconds(10), index_levels=((8, 20),))
TINY_BUCKET = Bucket(seconds=0.32, frames=8)  # latent (1, 8, 8, 16) -> 5120 samples


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError


# ---------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    "contract", [UNET, DecodeContract(bucket=Bucket.for_seconds(10))], ids=["unet", "decode"]
)
def test_profile_shapes_are_the_static_contract_shapes(contract):
    profiles = profile_shapes(contract)
    assert list(profiles) == contract.input_names
    shapes = contract.shapes()
    for name, (lo, opt, hi) in profiles.items():
        assert lo == opt == hi == shapes[name]
        assert all(isinstance(d, int) for d in lo)
    assert profiles["litefocus_indices_f8" if contract is UNET else "latent"][0][:2] == (
        (2, 20) if contract is UNET else (1, 8)
    )


def test_engine_filename():
    assert engine_filename("unet", "80s", "fp16", "10.8.0", (9, 0)) == "unet-80s-fp16-trt10.8.0-sm90.plan"
    assert engine_filename("decode", UNET.bucket.name, "fp32", "10.13.0.35", (12, 0)) == (
        "decode-10p24s-fp32-trt10.13.0.35-sm120.plan"
    )


@pytest.mark.parametrize(
    "args",
    [
        ("", "80s", "fp16", "10.8.0", (9, 0)),
        ("un-et", "80s", "fp16", "10.8.0", (9, 0)),
        ("unet", "../80s", "fp16", "10.8.0", (9, 0)),
        ("unet", "80s", "bf16", "10.8.0", (9, 0)),
        ("unet", "80s", "fp16", "v10", (9, 0)),
        ("unet", "80s", "fp16", "", (9, 0)),
        ("unet", "80s", "fp16", "10.8.0", (9,)),
        ("unet", "80s", "fp16", "10.8.0", [9, 0]),
        ("unet", "80s", "fp16", "10.8.0", (9.0, 0)),
        ("unet", "80s", "fp16", "10.8.0", (0, 0)),
        ("unet", "80s", "fp16", "10.8.0", (True, 0)),
    ],
)
def test_engine_filename_rejects_bad_parts(args):
    with pytest.raises(ValueError):
        engine_filename(*args)


def test_build_options_defaults_and_validation(tmp_path):
    o = BuildOptions()
    assert (o.precision, o.strongly_typed, o.optimization_level, o.workspace_gb, o.timing_cache) == (
        "fp32",
        False,
        3,
        None,
        None,
    )
    assert BuildOptions(precision="fp16").strongly_typed is True  # an fp16 ONNX keeps its own dtypes
    assert BuildOptions(precision="fp16", strongly_typed=False).strongly_typed is False
    assert BuildOptions.for_contract(UNetContract(bucket=UNET.bucket, precision="fp16")).strongly_typed
    assert BuildOptions(timing_cache=str(tmp_path / "c")).timing_cache == tmp_path / "c"
    assert BuildOptions(optimization_level=0, workspace_gb=1).workspace_gb == 1
    for bad in (
        {"precision": "int8"},
        {"optimization_level": 6},
        {"optimization_level": -1},
        {"optimization_level": 3.0},
        {"optimization_level": True},
        {"workspace_gb": 0},
        {"workspace_gb": -2.0},
        {"workspace_gb": float("nan")},
        {"strongly_typed": "yes"},
    ):
        with pytest.raises(ValueError):
            BuildOptions(**bad)
    with pytest.raises(AttributeError):
        o.precision = "fp16"  # frozen


def test_require_tensorrt_names_the_fix(no_tensorrt):
    with pytest.raises(TensorRTNotInstalled) as e:
        require_tensorrt()
    assert "pip install 'litefocus[gpu]'" in str(e.value)
    assert "pip install tensorrt" in str(e.value) and "GPU" in str(e.value)
    assert isinstance(e.value, RuntimeError)
    assert tb.tensorrt_available() is False
    with pytest.raises(TensorRTNotInstalled):
        tb.current_target()


def test_build_engine_without_tensorrt_touches_no_file(no_tensorrt, tmp_path):
    out = tmp_path / "engines" / "unet.plan"
    options = BuildOptions(timing_cache=tmp_path / "cache" / "timing.cache")
    with pytest.raises(TensorRTNotInstalled):  # not FileNotFoundError: the ONNX is not even looked at
        build_engine(tmp_path / "missing.onnx", UNET, out, options)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- fake TensorRT


class FakeTRT(types.SimpleNamespace):
    """Just enough of the ``tensorrt`` module for build_engine; records every call in ``calls``."""

    def __init__(
        self, network_inputs, outputs, engine=b"fake-engine-\x00\x01", parse_errors=(), build_ok=True
    ):
        fake = self
        self.calls: list[tuple] = []

        class Logger:
            VERBOSE, INFO, WARNING, ERROR = "VERBOSE", "INFO", "WARNING", "ERROR"

            def __init__(self, severity):
                fake.calls.append(("Logger", severity))

        class Tensor:
            def __init__(self, name, shape, dtype):
                self.name, self.shape, self.dtype = name, shape, dtype

        class Network:
            def __init__(self):
                self.inputs, self.outputs = [], []

            num_inputs = property(lambda s: len(s.inputs))
            num_outputs = property(lambda s: len(s.outputs))

            def get_input(self, i):
                return self.inputs[i]

            def get_output(self, i):
                return self.outputs[i]

        class ParserError:
            def __init__(self, desc):
                self._desc = desc

            def desc(self):
                return self._desc

            def node_name(self):
                return "node_7"

        class OnnxParser:
            def __init__(self, network, logger):
                self.network = network
                self.errors = [ParserError(d) for d in parse_errors]

            num_errors = property(lambda s: len(s.errors))

            def get_error(self, i):
                return self.errors[i]

            def parse_from_file(self, path):
                fake.calls.append(("parse_from_file", path))
                if self.errors:
                    return False
                self.network.inputs = [Tensor(n, list(s), d) for n, s, d in network_inputs]  # Dims-like
                self.network.outputs = [Tensor(n, None, None) for n in outputs]
                return True

        class TimingCache:
            def __init__(self, blob):
                self.blob = bytes(blob)

            def serialize(self):
                return self.blob + b"+timings"

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                fake.calls.append(("set_shape", name, tuple(lo), tuple(opt), tuple(hi)))

        class Config:
            def __init__(self):
                self.builder_optimization_level = None
                self.cache = None

            def add_optimization_profile(self, profile):
                fake.calls.append(("add_optimization_profile",))

            def set_flag(self, flag):
                fake.calls.append(("set_flag", flag))

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("set_memory_pool_limit", pool, size))

            def create_timing_cache(self, blob):
                fake.calls.append(("create_timing_cache", bytes(blob)))
                return TimingCache(blob)

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls.append(("create_network", flags))
                return Network()

            def create_builder_config(self):
                fake.config = Config()
                return fake.config

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build", config.builder_optimization_level))
                return engine if build_ok else None

        super().__init__(
            __version__="10.8.0",
            Logger=Logger,
            Builder=Builder,
            OnnxParser=OnnxParser,
            BuilderFlag=types.SimpleNamespace(FP16="FP16", TF32="TF32"),
            MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
            NetworkDefinitionCreationFlag=types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1),
            nptype=lambda dtype: np.dtype(dtype).type,
            calls=self.calls,
        )

    def named(self, name):
        return [c for c in self.calls if c[0] == name]


def install_fake(monkeypatch, contract, **kwargs) -> FakeTRT:
    inputs = kwargs.pop("inputs", [(s.name, s.shape, s.dtype) for s in contract.inputs])
    fake = FakeTRT(inputs, kwargs.pop("outputs", contract.output_names), **kwargs)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    return fake


@pytest.fixture
def onnx_file(tmp_path) -> Path:
    path = tmp_path / "unet.onnx"
    path.write_bytes(b"not parsed by the fake")
    return path


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_fake_build_fp32(monkeypatch, tmp_path, onnx_file):
    fake = install_fake(monkeypatch, UNET)
    out = tmp_path / "engines" / engine_filename("unet", UNET.bucket.name, "fp32", *tb.current_target())
    entry = build_engine(onnx_file, UNET, out, BuildOptions(workspace_gb=2, optimization_level=5))

    assert fake.named("create_network") == [("create_network", 0)]  # weakly typed
    assert fake.named("parse_from_file") == [("parse_from_file", str(onnx_file))]
    shapes = {name: (lo, opt, hi) for _, name, lo, opt, hi in fake.named("set_shape")}
    assert shapes == {s.name: (s.shape,) * 3 for s in UNET.inputs}
    assert shapes["litefocus_indices_f8"][0] == (2, 20, UNET.bucket.num_global(UNET.litefocus, 8))
    assert len(fake.named("add_optimization_profile")) == 1
    assert fake.named("set_flag") == []  # fp32: no FP16
    assert fake.named("set_memory_pool_limit") == [("set_memory_pool_limit", "WORKSPACE", 2 << 30)]
    assert fake.named("build") == [("build", 5)]
    assert fake.named("create_timing_cache") == []  # no cache asked for

    data = b"fake-engine-\x00\x01"
    assert out.read_bytes() == data and out.name == "unet-10p24s-fp32-trt10.8.0-sm90.plan"
    assert leftovers(out.parent) == []
    assert entry == {
        "file": out.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "tensorrt": "10.8.0",
        "compute_capability": "sm90",
        "precision": "fp32",
        "optimization_level": 5,
        "strongly_typed": False,
        "build_seconds": entry["build_seconds"],
    }
    assert entry["build_seconds"] >= 0


@pytest.mark.parametrize(
    ("contract_precision", "options", "flags", "fp16_flag"),
    [
        ("fp32", BuildOptions(precision="fp16"), 0, False),  # strongly typed by default...
        ("fp32", BuildOptions(precision="fp16", strongly_typed=False), 0, True),
        ("fp16", BuildOptions(precision="fp16"), 1 << 1, False),
        ("fp16", BuildOptions(precision="fp16", strongly_typed=False), 0, True),
    ],
)
def test_fake_build_fp16_flag_only_when_weakly_typed(
    monkeypatch, tmp_path, onnx_file, contract_precision, options, flags, fp16_flag
):
    contract = UNetContract(bucket=TINY_BUCKET, precision=contract_precision)
    fake = install_fake(monkeypatch, contract)
    out = tmp_path / "e.plan"
    if contract_precision == "fp32" and options.strongly_typed:  # ...which an fp32 graph cannot honour
        with pytest.raises(ValueError, match="strongly typed"):
            build_engine(onnx_file, contract, out, options)
        assert fake.calls == [] and not out.exists()
        return
    entry = build_engine(onnx_file, contract, out, options)
    assert fake.named("create_network") == [("create_network", flags)]
    assert fake.named("set_flag") == ([("set_flag", "FP16")] if fp16_flag else [])
    assert entry["precision"] == "fp16" and entry["strongly_typed"] is options.strongly_typed
    assert fake.named("set_memory_pool_limit") == []  # workspace_gb=None: TensorRT's default


def test_fake_build_rejects_fp32_engine_from_fp16_graph(monkeypatch, tmp_path, onnx_file):
    contract = UNetContract(bucket=TINY_BUCKET, precision="fp16")
    install_fake(monkeypatch, contract)
    with pytest.raises(ValueError, match="fp16 ONNX graph cannot give a fp32 engine"):
        build_engine(onnx_file, contract, tmp_path / "e.plan", BuildOptions(precision="fp32"))


def test_fake_build_reuses_and_writes_timing_cache(monkeypatch, tmp_path, onnx_file):
    cache = tmp_path / "cache" / "timing.cache"
    options = BuildOptions(timing_cache=cache)
    contracts = [UNetContract(bucket=Bucket.for_seconds(s)) for s in (10, 20)]
    fake = install_fake(monkeypatch, contracts[0])
    build_engine(onnx_file, contracts[0], tmp_path / "a.plan", options)
    assert fake.named("create_timing_cache") == [("create_timing_cache", b"")]  # none yet: empty
    assert cache.read_bytes() == b"+timings"

    fake = install_fake(monkeypatch, contracts[1])  # the next bucket starts from the saved cache
    build_engine(onnx_file, contracts[1], tmp_path / "b.plan", options)
    assert fake.named("create_timing_cache") == [("create_timing_cache", b"+timings")]
    assert cache.read_bytes() == b"+timings+timings"
    assert leftovers(cache.parent) == [] and leftovers(tmp_path) == []


def test_fake_build_failure_keeps_old_engine_and_cache(monkeypatch, tmp_path, onnx_file):
    out, cache = tmp_path / "e.plan", tmp_path / "timing.cache"
    out.write_bytes(b"old engine")
    cache.write_bytes(b"old cache")
    install_fake(monkeypatch, UNET, build_ok=False)
    with pytest.raises(RuntimeError, match="returned None"):
        build_engine(onnx_file, UNET, out, BuildOptions(timing_cache=cache))
    assert out.read_bytes() == b"old engine" and cache.read_bytes() == b"old cache"
    assert leftovers(tmp_path) == []


def test_fake_build_overwrites_atomically(monkeypatch, tmp_path, onnx_file):
    out = tmp_path / "e.plan"
    out.write_bytes(b"old engine")
    install_fake(monkeypatch, UNET, engine=b"new")
    replaced = []
    real_replace = fileio.os.replace  # engines are written through litefocus.engine.fileio
    monkeypatch.setattr(
        fileio.os, "replace", lambda src, dst: (replaced.append((src, dst)), real_replace(src, dst))
    )
    entry = build_engine(onnx_file, UNET, out, None)
    assert out.read_bytes() == b"new" and entry["sha256"] == hashlib.sha256(b"new").hexdigest()
    assert out.stat().st_mode & 0o777 == 0o644
    ((src, dst),) = replaced
    assert Path(dst) == out and Path(src).parent == out.parent and Path(src).name.endswith(".tmp")


def test_fake_build_reports_every_parser_error(monkeypatch, tmp_path, onnx_file):
    install_fake(
        monkeypatch, UNET, parse_errors=["Unsupported op FooBar", "Weights file unet.onnx.data missing"]
    )
    with pytest.raises(RuntimeError) as e:
        build_engine(onnx_file, UNET, tmp_path / "e.plan")
    msg = str(e.value)
    assert "2 error(s)" in msg and "Unsupported op FooBar" in msg and "unet.onnx.data missing" in msg
    assert "node_7" in msg and not (tmp_path / "e.plan").exists()


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda ins: ins[:-1], "missing input 'litefocus_indices_f8'"),
        (lambda ins: [*ins, ("extra", (1,), "float32")], "unexpected input 'extra'"),
        (lambda ins: [("sample", (2, 8, 128, 16), "float32"), *ins[1:]], "input 'sample' is"),
        (lambda ins: [*ins[:4], ("encoder_attention_mask_1", (2, 128), "int64"), *ins[5:]], "int64"),
    ],
)
def test_fake_build_rejects_network_that_breaks_the_contract(monkeypatch, tmp_path, onnx_file, mutate, match):
    inputs = mutate([(s.name, s.shape, s.dtype) for s in UNET.inputs])
    fake = install_fake(monkeypatch, UNET, inputs=inputs)
    with pytest.raises(ValueError, match=match):
        build_engine(onnx_file, UNET, tmp_path / "e.plan")
    assert fake.named("build") == [] and not (tmp_path / "e.plan").exists()


def test_fake_build_checks_outputs_gpu_and_onnx_file(monkeypatch, tmp_path, onnx_file):
    install_fake(monkeypatch, UNET, outputs=["out"])
    with pytest.raises(ValueError, match="outputs are"):
        build_engine(onnx_file, UNET, tmp_path / "e.plan")
    with pytest.raises(FileNotFoundError):
        build_engine(tmp_path / "missing.onnx", UNET, tmp_path / "e.plan")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        build_engine(onnx_file, UNET, tmp_path / "e.plan")


# ---------------------------------------------------------------- real TensorRT (never runs on CPU)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_build_of_a_tiny_graph(tmp_path):
    trt = require_tensorrt()
    contract = DecodeContract(bucket=TINY_BUCKET)
    onnx_path = tmp_path / "decode.onnx"
    tiny_decode_onnx(onnx_path, contract)
    version, cc = tb.current_target()
    out = tmp_path / engine_filename("decode", TINY_BUCKET.name, "fp32", version, cc)
    options = BuildOptions(optimization_level=0, workspace_gb=1, timing_cache=tmp_path / "timing.cache")
    entry = build_engine(onnx_path, contract, out, options)
    assert entry["bytes"] == out.stat().st_size and (tmp_path / "timing.cache").stat().st_size > 0
    assert entry["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(out.read_bytes())
    assert engine is not None
    shapes = {
        engine.get_tensor_name(i): tuple(engine.get_tensor_shape(engine.get_tensor_name(i)))
        for i in range(engine.num_io_tensors)
    }
    assert shapes == contract.shapes()
