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


class OnnxRuntimeBackend:
    """An exported graph in ONNX Runtime (CUDA EP when installed, else CPU). ``run`` is thread-safe."""

    name = "onnxruntime"

    def __init__(self, onnx_path: Path, contract, providers: list[str] | None = None):
        from litefocus.export.validate import open_session

        self.contract = contract
        self.session = open_session(Path(onnx_path), providers)
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

    def bind(self, inputs: dict[str, torch.Tensor], device: torch.device | str = "cuda"):
        """A zero-argument call of the graph on ``inputs`` kept on the GPU (CUDA EP, IO binding).

        Inputs are copied to ``device`` once; every call then runs on those buffers and writes the
        output into one preallocated GPU tensor, which it returns (no host copies, no numpy). The call
        returns when ONNX Runtime has finished (its outputs are synchronized).
        """
        if not self.on_cuda:
            raise RuntimeError("bind() needs a session on ONNX Runtime's CUDAExecutionProvider")
        device = torch.device(device)
        device_id = device.index if device.index is not None else torch.cuda.current_device()
        binding = self.session.io_binding()
        keep = []  # the bound buffers must outlive every call

        def buffer(spec, tensor):
            # t: [spec.shape] on the GPU, in the graph's dtype, contiguous
            t = tensor.to(device=device, dtype=spec.torch_dtype).contiguous()
            if tuple(t.shape) != tuple(spec.shape):
                raise ValueError(f"{spec.name}: shape {tuple(t.shape)}, the contract says {spec.shape}")
            keep.append(t)
            return dict(
                device_type="cuda",
                device_id=device_id,
                element_type=spec.numpy_dtype.type,  # np.float16, np.int32, ... as ORT expects
                shape=tuple(spec.shape),
                buffer_ptr=t.data_ptr(),
            )

        for spec in self.contract.inputs:
            binding.bind_input(name=spec.name, **buffer(spec, inputs[spec.name]))
        (out_spec,) = self.contract.outputs
        out = torch.empty(out_spec.shape, dtype=out_spec.torch_dtype, device=device)
        binding.bind_output(name=out_spec.name, **buffer(out_spec, out))
        out = keep[-1]
        torch.cuda.synchronize(device)  # ONNX Runtime runs on its own stream: inputs must be ready
        session = self.session

        def call() -> torch.Tensor:
            session.run_with_iobinding(binding)
            return out

        return call

    def close(self) -> None:
        self.session = None
