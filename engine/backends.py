"""Backends that run one call of a contract module: ``backend(inputs: dict[name, Tensor]) -> Tensor``.

All take the contract's named inputs, so the sampling loop does not know which one it drives.
``TorchBackend`` is the reference (and the fallback); ``OnnxRuntimeBackend`` runs an exported graph.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)


class TorchBackend:
    """A PyTorch module that takes the contract's inputs positionally (UNetExportModule, DecodeModule).

    Calls are serialized with ``lock``: the LiteFocus handle routes indices through state shared by
    every module built on the same UNet, so pass those modules one shared lock.
    """

    name = "torch"

    def __init__(self, module: torch.nn.Module, contract, device: torch.device | str = "cpu", lock=None):
        self.module = module.eval()
        self.contract = contract
        self.device = torch.device(device)
        self._lock = lock or threading.Lock()

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        args = [inputs[name].to(self.device) for name in self.contract.input_names]
        with self._lock, torch.inference_mode():
            return self.module(*args).float().cpu()

    def close(self) -> None:
        self.module = None


def _graph_tensors(graph):
    """Every TensorProto of a graph: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graph_tensors(sub)


def check_external_data(onnx_path: Path, data_path: Path | None) -> None:
    """Refuse a graph whose weights live anywhere but in ``data_path`` (its own, verified file), or
    past that file's end; before ONNX Runtime opens anything. ValueError names the tensor and the fix."""
    import onnx

    fix = "re-export with litefocus-export --force"
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends: a corrupt file
        raise ValueError(f"{onnx_path} is not a readable ONNX graph ({type(e).__name__}); {fix}") from None
    size = data_path.stat().st_size if data_path is not None else 0
    for t in _graph_tensors(model.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        if data_path is None or location != data_path.name:
            raise ValueError(
                f"{onnx_path.name}: tensor {t.name[:80]!r} reads its weights from {location[:80]!r}, not from "
                f"the entry's own {data_path.name if data_path else 'weights file'}; {fix}"
            )
        try:
            offset, length = int(info.get("offset", 0)), int(info["length"])
        except (KeyError, ValueError):
            raise ValueError(
                f"{onnx_path.name}: tensor {t.name[:80]!r} has no valid external length; {fix}"
            ) from None
        if offset < 0 or length < 0 or offset + length > size:
            raise ValueError(
                f"{onnx_path.name}: tensor {t.name[:80]!r} needs bytes {offset}..{offset + length} of "
                f"{data_path.name}, which has {size} (truncated?); {fix}"
            )


class OnnxRuntimeBackend:
    """An exported graph in ONNX Runtime (CUDA EP when installed, else CPU). ``run`` is thread-safe.

    ``data_path``: the graph's external weights file. Given it, the graph's external-data references
    are checked against it before ONNX Runtime opens anything (an engine directory is untrusted)."""

    name = "onnxruntime"

    def __init__(
        self, onnx_path: Path, contract, providers: list[str] | None = None, data_path: Path | None = None
    ):
        from litefocus.export.validate import open_session

        self.contract = contract
        onnx_path = Path(onnx_path)
        if data_path is not None:
            check_external_data(onnx_path, Path(data_path))
        try:
            self.session = open_session(onnx_path, providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own (InvalidProtobuf, Fail, ...)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ValueError(
                f"{onnx_path}: ONNX Runtime cannot load this graph ({first}); re-export with litefocus-export --force"
            ) from None
        got = [(i.name, tuple(i.shape)) for i in self.session.get_inputs()]
        want = [(s.name, tuple(s.shape)) for s in contract.inputs]
        if got != want:
            raise ValueError(
                f"{onnx_path}: graph inputs {got} differ from the manifest's contract {want}; re-export"
            )

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = {
            s.name: np.ascontiguousarray(inputs[s.name].cpu().numpy().astype(s.numpy_dtype, copy=False))
            for s in self.contract.inputs
        }
        (out,) = self.session.run(self.contract.output_names, feeds)
        return torch.from_numpy(out).float()

    @property
    def on_cuda(self) -> bool:
        return self.session is not None and self.session.get_providers()[0] == "CUDAExecutionProvider"

    def bind(self, inputs: dict[str, torch.Tensor]):
        """A zero-argument call of the graph on ``inputs`` kept where the session runs (IO binding).

        Inputs are placed once (GPU memory on the CUDA EP, host memory on the CPU EP); every call
        then runs on those buffers and writes into one preallocated output tensor, which it returns:
        no per-call copies and no numpy. The same code runs on both EPs, so CPU tests exercise it.
        The call returns when ONNX Runtime has finished (its outputs are synchronized).
        """
        if self.session is None:
            raise RuntimeError("bind() on a closed backend")
        device = torch.device("cuda", torch.cuda.current_device()) if self.on_cuda else torch.device("cpu")
        binding = self.session.io_binding()
        keep = []  # the bound buffers must outlive every call

        def buffer(spec, tensor):
            # t: [spec.shape] on the session's device, in the graph's dtype, contiguous
            t = tensor.to(device=device, dtype=spec.torch_dtype).contiguous()
            if tuple(t.shape) != tuple(spec.shape):
                raise ValueError(f"{spec.name}: shape {tuple(t.shape)}, the contract says {spec.shape}")
            keep.append(t)
            return dict(
                device_type=device.type,
                device_id=device.index or 0,
                element_type=spec.numpy_dtype.type,  # np.float16, np.int32, ... as ORT expects
                shape=tuple(spec.shape),
                buffer_ptr=t.data_ptr(),
            )

        for spec in self.contract.inputs:
            binding.bind_input(name=spec.name, **buffer(spec, inputs[spec.name]))
        (out_spec,) = self.contract.outputs
        binding.bind_output(name=out_spec.name, **buffer(out_spec, torch.empty(out_spec.shape)))
        out = keep[-1]
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # ONNX Runtime runs on its own stream: inputs must be ready
        session = self.session

        def call() -> torch.Tensor:
            session.run_with_iobinding(binding)
            return out

        return call

    def close(self) -> None:
        self.session = None
