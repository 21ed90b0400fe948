"""Backends that run one call of a contract module: ``backend(inputs: dict[name, ndarray]) -> ndarray``.

All take the contract's named numpy inputs and return the one output as float32 numpy, so the
sampling loop does not know which one it drives. ``OnnxRuntimeBackend`` runs an exported graph (and
``bind()`` keeps a request's buffers on the session's device); TensorRT lives in ``tensorrt_backend``
and the PyTorch reference twin, which needs torch, in ``litefocus.export.torch_backend``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


RUNTIME_BACKENDS = ("auto", "onnxruntime", "tensorrt")  # what Runtime.load / --backend accept


def parse_device(device: str | None) -> tuple[str, int]:
    """ "cpu" | "cuda" | "cuda:N" -> ("cpu", 0) | ("cuda", N); ValueError naming the fix otherwise."""
    text = "cpu" if device is None else str(device)
    kind, _, index = text.partition(":")
    if kind == "cpu" and not index:
        return "cpu", 0
    if kind == "cuda" and (not index or (index.isdigit() and len(index) < 4)):
        return "cuda", int(index or 0)
    raise ValueError(f"device {text!r} is not one of cpu, cuda, cuda:N (N a GPU index such as 0)")


def onnxruntime_providers(
    prefer_cuda: bool = True, device_id: int = 0, precision: str = "fp32", cuda_graph: bool = False
) -> list:
    """CUDA EP (on ``device_id``) when asked for and installed, then the CPU EP. An fp32 graph runs
    in full fp32 on the CUDA EP, whose default is TF32 for matmuls and convolutions (10-bit
    mantissas: ~1e-3 relative, which fails fp32 validation and makes fp32 engines differ from the
    CPU); fp16 graphs are unaffected. ``cuda_graph``: the CUDA EP captures the graph once and
    replays it (every node on the CUDA EP, inputs and outputs at fixed device addresses)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if not (prefer_cuda and "CUDAExecutionProvider" in available):
        return ["CPUExecutionProvider"]
    options = {"device_id": device_id, **({"use_tf32": 0} if precision == "fp32" else {})}
    if cuda_graph:
        options["enable_cuda_graph"] = 1
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


def _provider_names(providers: list) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]


def session_options(providers: list, module: str):
    """ONNX Runtime session options for ``providers`` and a contract's ``module`` (see ``open_session``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False
    if _provider_names(providers) == ["CPUExecutionProvider"]:
        # On the CPU, no buffer-reuse plan and no memory pattern: ONNX Runtime's planner keeps a dead
        # activation's buffer for a later tensor of the same size, so every down-block buffer of the
        # UNet waits, allocated, through the lower levels for its up-block twin, and the pattern's
        # per-run block (planned from those lifetimes) comes on top. The UNet, run once per step,
        # keeps the arena: it then holds what is live at once, in memory it keeps, and a step
        # page-faults nothing. Measured at 80 s (1.43 GB of weights; peak resident set per step,
        # 3 steps): arena 1.92 GB, 18.9-19.5 s; arena + reuse plan 2.60 GB; no arena (malloc: glibc
        # keeps freed 1-32 MB blocks, larger ones are fresh mmaps) 2.9-3.1 GB, 18.1-21.2 s. The
        # decode, run once per request, goes without: its arena grows by doubling and at 320 s
        # held 13.4 GB (bench/README.md, "Long audio"). GPU sessions keep the other defaults.
        options.enable_mem_reuse = False
        options.enable_mem_pattern = False
        options.enable_cpu_mem_arena = module == "unet"
    elif module == "conditioning" and "CUDAExecutionProvider" in _provider_names(providers):
        # ONNX Runtime's extended fusions on the CUDA EP move the text graph's GPT-2 states by
        # 3.5e-4 to 1.7e-3 of their RMS even without TF32 (H200, 2026-12-04: bench/gpu/provider_check.py),
        # above the fp32 tolerance of 1e-4; basic optimizations keep 2.4e-6. It runs once per request.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return options


def disabled_optimizers(providers: list, module: str) -> list[str]:
    """ONNX Runtime graph optimizers turned off for ``providers`` and ``module``.

    On the CPU, constant folding is off for the UNet (the one module exported with Winograd 3x3
    convolutions, export/winograd.py): its graph computes each transform-domain weight U = G w G^T
    per call from the stored weight (about 1 ms a conv), and folding would store every U instead:
    (m+2)^2 / 9 times the weight, +0.5 GB for the 80 s UNet. The exporter folded everything else."""
    cpu_only = _provider_names(providers) == ["CPUExecutionProvider"]
    return ["ConstantFolding"] if cpu_only and module == "unet" else []


def open_session(onnx_path: Path, providers: list, module: str, options=None):
    """A session of ``onnx_path`` with the options of ``providers`` and the contract's ``module``
    (``options``: ``session_options``'s, changed by the caller, e.g. to profile)."""
    import onnxruntime as ort

    return ort.InferenceSession(
        str(onnx_path),
        options if options is not None else session_options(providers, module),
        providers=providers,
        disabled_optimizers=disabled_optimizers(providers, module),
    )


def check_external_data(onnx_path: Path, data_path: Path | None, graph: bytes | None = None) -> None:
    """Refuse a graph with any tensor (initializers, sparse initializers, node attributes, subgraphs,
    functions: ``onnx_refs.model_tensors``) whose data lives anywhere but in ``data_path`` (its own,
    verified file), or past that file's end; before ONNX Runtime opens anything. ``graph``: the graph
    file's bytes as hashed (read here otherwise). ValueError names the tensor and the fix."""
    import onnx

    from litefocus.engine.onnx_refs import check_external_refs

    fix = "re-export with litefocus-export --force"
    try:
        model = (
            onnx.load_model_from_string(graph)
            if graph is not None
            else onnx.load(str(onnx_path), load_external_data=False)
        )
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends: a corrupt file
        raise ValueError(f"{onnx_path} is not a readable ONNX graph ({type(e).__name__}); {fix}") from None
    size = data_path.stat().st_size if data_path is not None else 0
    check_external_refs(model, onnx_path.name, data_path.name if data_path is not None else None, size)


def run_session(module: str, run, *args):
    """``run(*args)`` (a session's ``run`` or ``run_with_iobinding``) with every ONNX Runtime failure
    (its pybind errors: InvalidArgument, Fail, RuntimeException...; std::bad_alloc as MemoryError)
    turned into one RuntimeError line naming ``module`` and the cause."""
    try:
        return run(*args)
    except Exception as e:  # noqa: BLE001 - ORT's exception types are not RuntimeError subclasses
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise RuntimeError(
            f"the {module} graph failed in ONNX Runtime ({type(e).__name__}: {first or 'no message'})"
        ) from None


@dataclass(frozen=True)
class GraphOptions:
    """How one engine graph opens in ONNX Runtime.

    ``device``: "cpu" or "cuda[:N]" (the CUDA EP of onnxruntime-gpu). ``data_path``: the graph's
    external weights file; given it, the graph's external-data references are checked against it
    before ONNX Runtime opens anything (an engine directory is untrusted). ``cuda_graph``: the CUDA
    EP captures the graph once and replays it (ONNX Runtime refuses a graph with nodes outside the
    CUDA EP or Memcpy nodes). ``graph``: the graph file's bytes as hashed (the external-data check
    parses those, not a file that could have changed since)."""

    device: str = "cpu"
    data_path: Path | None = None
    cuda_graph: bool = False
    graph: bytes | None = field(default=None, repr=False)


def load_session(onnx_path: Path, contract, options: GraphOptions | None = None):
    """An ONNX Runtime session of an engine graph, opened as ``options`` say, whose inputs must be the
    contract's. Every failure is one ValueError line naming the fix (a refused CUDA-graph capture:
    ONNX Runtime's refusal is the line)."""
    options = options if options is not None else GraphOptions()
    device, data_path, cuda_graph = options.device, options.data_path, options.cuda_graph
    kind, index = parse_device(device)
    if cuda_graph and kind != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got device {device!r}; use --device cuda")
    onnx_path = Path(onnx_path)
    precision = getattr(contract, "precision", "fp32")
    providers = onnxruntime_providers(
        prefer_cuda=kind == "cuda", device_id=index, precision=precision, cuda_graph=cuda_graph
    )
    if kind == "cuda" and len(providers) == 1:
        raise ValueError(
            f"device {device!r}: this onnxruntime has no CUDA execution provider; install onnxruntime-gpu in "
            "place of onnxruntime (pip uninstall onnxruntime && pip install onnxruntime-gpu), or use --device cpu"
        )
    if data_path is not None:
        check_external_data(onnx_path, Path(data_path), options.graph)
    module = contract.module  # the contract's, outside the try: its absence is a bug, not a bad graph
    try:
        session = open_session(onnx_path, providers, module)
    except Exception as e:  # noqa: BLE001 - ORT raises its own (InvalidProtobuf, Fail, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if cuda_graph:  # the graph loads without capture: what ONNX Runtime refused is the capture
            raise ValueError(
                f"{onnx_path}: ONNX Runtime cannot run this graph as a CUDA graph ({first}); run without --cuda-graph"
            ) from None
        raise ValueError(
            f"{onnx_path}: ONNX Runtime cannot load this graph ({first}); re-export with litefocus-export --force"
        ) from None
    got = [(i.name, tuple(i.shape)) for i in session.get_inputs()]
    want = [(s.name, tuple(s.shape)) for s in contract.inputs]
    if got != want:
        raise ValueError(
            f"{onnx_path}: graph inputs {got} differ from the manifest's contract {want}; "
            "re-export with litefocus-export --force"
        )
    return session


class OnnxRuntimeBackend:
    """An exported graph in ONNX Runtime, opened as ``options`` say (see ``GraphOptions``: device,
    weights file, CUDA-graph capture). Calls are thread-safe."""

    name = "onnxruntime"

    def __init__(self, onnx_path: Path, contract, options: GraphOptions | None = None):
        options = options if options is not None else GraphOptions()
        self.contract = contract
        self.device = parse_device(options.device)
        self.session = load_session(onnx_path, contract, options)
        self.cuda_graph = options.cuda_graph
        self._graph_binding = None  # with CUDA graphs: the one binding every call replays through
        self._graph_lock = threading.Lock()

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if self.session is None:
            raise RuntimeError("OnnxRuntimeBackend is closed")
        if self.cuda_graph:  # a captured graph reads and writes fixed device buffers only
            return self.bind()(inputs)
        feeds = {
            s.name: np.ascontiguousarray(inputs[s.name], dtype=s.numpy_dtype) for s in self.contract.inputs
        }
        (out,) = run_session(self.contract.module, self.session.run, self.contract.output_names, feeds)
        want = tuple(self.contract.outputs[0].shape)
        if out.shape != want:  # ONNX Runtime checks outputs against the graph only: the graph may lie
            raise RuntimeError(
                f"the {self.contract.module} graph returned shape {out.shape[:8]}, its contract says {want}; "
                "re-export with litefocus-export --force"
            )
        return out.astype(np.float32, copy=False)

    @property
    def on_cuda(self) -> bool:
        return self.session is not None and self.session.get_providers()[0] == "CUDAExecutionProvider"

    def bind(self) -> Binding:
        """Buffers for one request, on the session's device (see ``Binding``)."""
        if self.session is None:
            raise RuntimeError("bind() on a closed backend")
        device = ("cuda", self.device[1]) if self.on_cuda else ("cpu", 0)
        if not self.cuda_graph:
            return Binding(self.session, self.contract, device)
        with self._graph_lock:
            if self._graph_binding is None:
                self._graph_binding = Binding(self.session, self.contract, device)
        return SharedBinding(self._graph_binding, self._graph_lock, self.contract)

    def close(self) -> None:
        with self._graph_lock:
            self._graph_binding = None  # it holds the session, its captured graph and device buffers
        self.session = None


def _checked(spec, array: np.ndarray) -> np.ndarray:
    """``array`` as the contract's input ``spec`` (C-contiguous, its dtype), or a ValueError on shape."""
    array = np.ascontiguousarray(array, dtype=spec.numpy_dtype)
    if array.shape != tuple(spec.shape):
        raise ValueError(f"{spec.name}: shape {array.shape}, the contract says {tuple(spec.shape)}")
    return array


class Binding:
    """IO binding of one graph for one request: every input and the output live in ``OrtValue``s on
    the session's device (GPU memory on the CUDA EP, host memory on the CPU EP), allocated once.

    ``set`` copies new values into an input's buffer (once per request for the conditioning, per
    step for the latents); ``run`` runs the graph on the bound buffers and writes the preallocated
    output, which ``output()`` copies to the host as float32. The same code runs on both EPs, so the
    CPU tests exercise what the GPU runs. One Binding per request (not shared between threads).
    """

    def __init__(self, session, contract, device: tuple[str, int]):
        import onnxruntime as ort

        self._session, self._contract = session, contract
        self._binding = session.io_binding()
        self._values = {}
        for spec in (*contract.inputs, *contract.outputs):
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(spec.shape), spec.numpy_dtype, *device)
            self._values[spec.name] = value
        for spec in contract.inputs:
            self._binding.bind_ortvalue_input(spec.name, self._values[spec.name])
        (out,) = contract.outputs
        self._binding.bind_ortvalue_output(out.name, self._values[out.name])
        self._out = out
        self._specs = {s.name: s for s in contract.inputs}
        self.holder: dict[str, tuple] = {}  # input -> (request token, version) in its buffer (SharedBinding)

    def set(self, name: str, array: np.ndarray) -> None:
        self._values[name].update_inplace(_checked(self._specs[name], array))  # host -> the session's device

    def run(self) -> None:
        # returns when the outputs are ready
        run_session(self._contract.module, self._session.run_with_iobinding, self._binding)

    def output(self) -> np.ndarray:
        # a copy: on the CPU EP, OrtValue.numpy() is a view of the buffer the next run overwrites
        return np.array(self._values[self._out.name].numpy(), dtype=np.float32, copy=True)

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Set every given input, run, return the output: the plain-call interface."""
        for name, array in inputs.items():
            self.set(name, array)
        self.run()
        return self.output()


class SharedBinding:
    """One request's view of a CUDA-graph session's single ``Binding``.

    A captured CUDA graph replays against the device addresses it was captured with, so every
    request of the session shares one set of buffers. ``set`` keeps the request's inputs on the host;
    ``run`` (under the session's lock) copies into the shared buffers only the inputs that another
    request, or a newer ``set``, changed since, so a request running alone copies its conditioning
    once and then only its latents and sample indices per step, as with ``Binding``."""

    def __init__(self, shared: Binding, lock: threading.Lock, contract):
        self._shared, self._lock = shared, lock
        self._specs = {s.name: s for s in contract.inputs}
        self._host: dict[str, tuple[int, np.ndarray]] = {}
        self._token = object()  # this request (an id() could be reused by a later one)
        self._out = None

    def set(self, name: str, array: np.ndarray) -> None:
        array = np.array(_checked(self._specs[name], array), copy=True)  # the caller may reuse its array
        version = self._host[name][0] + 1 if name in self._host else 0
        self._host[name] = (version, array)

    def run(self) -> None:
        shared = self._shared
        with self._lock:
            for name, (version, array) in self._host.items():
                held = shared.holder.get(name)
                if held is None or held[0] is not self._token or held[1] != version:
                    shared.set(name, array)
                    shared.holder[name] = (self._token, version)
            shared.run()
            self._out = shared.output()

    def output(self) -> np.ndarray:
        if self._out is None:
            raise RuntimeError("output() before run()")
        return self._out

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        for name, array in inputs.items():
            self.set(name, array)
        self.run()
        return self.output()
