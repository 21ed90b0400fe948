"""The PyTorch reference backend: the exportable modules run eagerly behind the engine backend interface.

``TorchBackend(module, contract)`` is called like ``OnnxRuntimeBackend`` (the contract's named numpy
inputs in, the one output as float32 numpy out), so the runtime's sampling loop and the benchmark
drive the exported graphs' PyTorch twin (UNetExportModule, DecodeModule) with the same code: the
reference that ONNX Runtime's and TensorRT's results are compared with. It needs torch, which the
torch-free serving path (``litefocus.engine``, ``litefocus.runtime``) never imports.
"""

from __future__ import annotations

import threading

import numpy as np
import torch


class TorchBackend:
    """The PyTorch reference: a module that takes the contract's inputs positionally
    (UNetExportModule, DecodeModule).

    Calls are serialized with ``lock``: the LiteFocus handle routes indices through state shared by
    every module built on the same UNet, so pass those modules one shared lock.
    """

    name = "torch"

    def __init__(self, module, contract, device: str = "cpu", lock=None):
        self.module = module.eval()
        self.contract = contract
        self.device = device
        self._lock = lock or threading.Lock()

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        args = [
            torch.from_numpy(np.ascontiguousarray(inputs[s.name], dtype=s.numpy_dtype)).to(self.device)
            for s in self.contract.inputs
        ]
        with self._lock, torch.inference_mode():
            return self.module(*args).float().cpu().numpy()

    def close(self) -> None:
        self.module = None
