"""TensorRT engines from the static per-bucket ONNX graphs (TensorRT 10.x Python API).

Every ``tensorrt`` import happens inside a function: importing this module, naming engines and
computing profiles need neither TensorRT nor a GPU; building needs both.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from litefocus.engine.contract import PRECISIONS
from litefocus.engine.fileio import atomic_write_bytes
from litefocus.engine.tensorrt_backend import (  # noqa: F401 - re-exported: the build API
    INSTALL_HINT,
    TensorRTNotInstalled,
    current_target,
    require_tensorrt,
    sm_name,
    tensorrt_available,
    trt_logger,
)

log = logging.getLogger(__name__)

OPTIMIZATION_LEVELS = range(6)  # TensorRT's builder_optimization_level accepts 0..5
_NAME_PART = re.compile(r"[A-Za-z0-9_]+")  # no "-" (the filename separator), "/" or "."
_VERSION = re.compile(r"\d+(\.\d+)*")


def profile_shapes(contract) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Input name -> (min, opt, max) of the one optimization profile; static, so all three agree."""
    return {spec.name: (tuple(spec.shape),) * 3 for spec in contract.inputs}


def engine_filename(
    module: str, bucket_name: str, precision: str, trt_version: str, compute_capability: tuple[int, int]
) -> str:
    """``unet-80s-fp16-trt10.8.0-sm90.plan``: an engine only runs on the TensorRT and GPU it was built for."""
    for what, value in (("module", module), ("bucket_name", bucket_name)):
        if not isinstance(value, str) or not _NAME_PART.fullmatch(value):
            raise ValueError(f"{what} must be a non-empty string of letters, digits and '_', got {value!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not isinstance(trt_version, str) or not _VERSION.fullmatch(trt_version):
        raise ValueError(f"trt_version must look like '10.8.0', got {trt_version!r}")
    return f"{module}-{bucket_name}-{precision}-trt{trt_version}-{sm_name(compute_capability)}.plan"


@dataclass(frozen=True)
class BuildOptions:
    """How to build one engine. ``strongly_typed=None`` means: strongly typed iff the ONNX is fp16.

    Strongly typed: TensorRT keeps the ONNX graph's own dtypes (an fp16 export stays fp16, with its
    fp32 islands). Weakly typed fp16: an fp32 graph with the FP16 builder flag (TensorRT picks).
    """

    precision: str = "fp32"
    strongly_typed: bool | None = None
    optimization_level: int = 3
    workspace_gb: float | None = None
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"BuildOptions.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.strongly_typed is None:
            object.__setattr__(self, "strongly_typed", self.precision == "fp16")
        elif not isinstance(self.strongly_typed, bool):
            raise ValueError(f"BuildOptions.strongly_typed must be a bool, got {self.strongly_typed!r}")
        level = self.optimization_level
        if isinstance(level, bool) or not isinstance(level, int) or level not in OPTIMIZATION_LEVELS:
            raise ValueError(f"BuildOptions.optimization_level must be an int in 0..5, got {level!r}")
        gb = self.workspace_gb
        if gb is not None and (
            isinstance(gb, bool) or not isinstance(gb, (int, float)) or not math.isfinite(gb) or gb <= 0
        ):
            raise ValueError(f"BuildOptions.workspace_gb must be a positive number or None, got {gb!r}")
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))

    @classmethod
    def for_contract(cls, contract, **kwargs) -> BuildOptions:
        """Options whose precision is the contract's (the ONNX graph's)."""
        return cls(precision=contract.precision, **kwargs)


def _check_precision(contract, options: BuildOptions) -> None:
    if options.precision == contract.precision:
        return
    if options.strongly_typed or contract.precision == "fp16":
        raise ValueError(
            f"an {contract.precision} ONNX graph cannot give a {options.precision} engine"
            + (" when strongly typed (the graph's dtypes decide)" if options.strongly_typed else "")
            + f"; export the graph in {options.precision} or build with precision={contract.precision!r}"
        )  # fp32 graph + weakly typed fp16 (FP16 builder flag) is the one mix allowed


def _parse(trt, parser, onnx_path: Path) -> None:
    # parse_from_file resolves external data (the .data file) relative to the graph's directory
    if parser.parse_from_file(str(onnx_path)):
        return
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = [f"{k}={getattr(err, k)()}" for k in ("node_name", "node_operator") if hasattr(err, k)]
        errors.append(f"  [{i}] {err.desc()}" + (f" ({', '.join(where)})" if where else ""))
    raise RuntimeError(
        f"TensorRT's ONNX parser rejected {onnx_path} ({len(errors)} error(s)):\n"
        + "\n".join(errors or ["  (none reported)"])
    )


def _check_network(trt, network, contract) -> None:
    """The parsed network's inputs and outputs must be exactly the contract's (names, shapes, dtypes)."""
    got = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        got[t.name] = (tuple(t.shape), np.dtype(trt.nptype(t.dtype)))
    want = {s.name: (tuple(s.shape), s.numpy_dtype) for s in contract.inputs}
    problems = [f"missing input {n!r} {w[0]} {w[1]}" for n, w in want.items() if n not in got]
    problems += [f"unexpected input {n!r} {g[0]} {g[1]}" for n, g in got.items() if n not in want]
    problems += [
        f"input {n!r} is {got[n][0]} {got[n][1]}, the contract says {w[0]} {w[1]}"
        for n, w in want.items()
        if n in got and got[n] != w
    ]
    outputs = sorted(network.get_output(i).name for i in range(network.num_outputs))
    if outputs != sorted(contract.output_names):
        problems.append(f"outputs are {outputs}, the contract says {sorted(contract.output_names)}")
    if problems:
        raise ValueError("the ONNX graph does not match its export contract:\n  " + "\n  ".join(problems))


def _load_timing_cache(config, path: Path | None):
    if path is None:
        return None
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is None or not config.set_timing_cache(cache, False):
        log.warning("timing cache %s is unusable (other TensorRT or GPU?); starting an empty one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    else:
        log.info("timing cache %s: %s", path, f"loaded {len(blob)} bytes" if blob else "new")
    return cache


def build_engine(onnx_path, contract, out_path, options: BuildOptions | None = None) -> dict:
    """Build ``onnx_path`` (which must match ``contract``) into a serialized engine at ``out_path``.

    Returns the manifest entry: file, sha256, bytes, tensorrt, compute_capability, precision,
    optimization_level, strongly_typed, build_seconds.
    """
    trt = require_tensorrt()  # first: nothing is read or written without TensorRT
    options = options or BuildOptions.for_contract(contract)
    _check_precision(contract, options)
    version, cc = current_target()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX graph at {onnx_path}")

    start = time.perf_counter()
    logger_ = trt_logger(trt)
    builder = trt.Builder(logger_)
    flags = 0
    if options.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)  # TensorRT 10 networks are always explicit batch
    parser = trt.OnnxParser(network, logger_)  # owns the weights: keep it alive through the build
    _parse(trt, parser, onnx_path)
    _check_network(trt, network, contract)

    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(contract).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if options.precision == "fp16" and not options.strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    config.builder_optimization_level = options.optimization_level
    if options.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    cache = _load_timing_cache(config, options.timing_cache)

    log.info(
        "building %s -> %s (%s, %s, opt level %d, %s sm%d%d)",
        onnx_path.name,
        out_path.name,
        options.precision,
        "strongly typed" if options.strongly_typed else "weakly typed",
        options.optimization_level,
        f"TensorRT {version}",
        *cc,
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(
            f"TensorRT failed to build an engine from {onnx_path} (build_serialized_network returned None); "
            "see the TensorRT log above (raise logging to INFO/DEBUG for more)"
        )
    seconds = time.perf_counter() - start

    if cache is not None:
        options.timing_cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(options.timing_cache, memoryview(config.get_timing_cache().serialize()))
    data = memoryview(serialized)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, data)
    entry = {
        "file": out_path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": data.nbytes,
        "tensorrt": version,
        "compute_capability": sm_name(cc),
        "precision": options.precision,
        "optimization_level": options.optimization_level,
        "strongly_typed": options.strongly_typed,
        "build_seconds": round(seconds, 3),
    }
    log.info("wrote %s (%d bytes, %.1f s)", out_path, entry["bytes"], seconds)
    return entry
