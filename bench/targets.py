"""The benchmarked backends: each opens one bucket as a ``Target`` with the same three stages.

    target.step_fn(inputs)  -> a zero-argument callable: one UNet call on device-resident inputs
    target.unet(inputs)     -> noise_pred on CPU, for the sampling loop (the runtime's backend API)
    target.decode(inputs)   -> waveform, VAE decoder + vocoder

``diffusers``: the stock UNet with its default attention processors, eager. ``litefocus``: the same
UNet with LiteFocus installed (per-step global sample as an input, as the engines take it).
``*-compile``: the same module under ``torch.compile`` (static shapes, one graph per bucket; decode
stays eager). ``onnxruntime`` / ``tensorrt``: the exported engine of the bucket, through the runtime.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

import litefocus
from litefocus.buckets import Bucket
from litefocus.config import LiteFocusConfig
from litefocus.engine.contract import DecodeContract, UNetContract

logger = logging.getLogger(__name__)

TORCH_BACKENDS = ("diffusers", "diffusers-compile", "litefocus", "litefocus-compile")
# onnxruntime-cudagraph: the same ONNX Runtime engine, its UNet session captured once as a CUDA graph
ENGINE_BACKENDS = ("onnxruntime", "onnxruntime-cudagraph", "tensorrt")
BACKENDS = TORCH_BACKENDS + ENGINE_BACKENDS
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


ONNXRUNTIME_GPU_HINT = (
    "ONNX Runtime's CUDA EP is not available: install onnxruntime-gpu alone "
    "(pip uninstall onnxruntime, then pip install --force-reinstall onnxruntime-gpu)"
)


class Unavailable(RuntimeError):
    """This backend cannot run on this machine (the reason is recorded in the results, not raised)."""


@dataclass(frozen=True)
class TargetSpec:
    """What every backend of one run shares."""

    source: str  # random:<preset>:<seed>, a hub id or a local diffusers directory
    device: torch.device
    precision: str  # fp32 | fp16
    litefocus: LiteFocusConfig
    text_len: int = 128
    batch: int = 2
    engines: Path = Path("engines")
    compile_mode: str = "default"
    quiet: bool = False
    gpu_ops: tuple[str, ...] | str = "auto"  # the engines' GPU graph form (litefocus-export --gpu-ops)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]


def uses_litefocus(backend: str) -> bool:
    return not backend.startswith("diffusers")


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run here (None: it can)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "tensorrt":
        from litefocus.engine.tensorrt_backend import INSTALL_HINT, tensorrt_available

        if not tensorrt_available():
            return INSTALL_HINT
        if device.type != "cuda":
            return "TensorRT needs a CUDA GPU (--device cuda)"
    if backend == "onnxruntime-cudagraph" and device.type != "cuda":
        return "CUDA graphs need a CUDA GPU (--device cuda)"
    if backend.startswith("onnxruntime") and device.type == "cuda":  # known before any export is spent on it
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return ONNXRUNTIME_GPU_HINT
    return None


class TorchModels:
    """The model of a run (UNet, VAE, vocoder), loaded once and shared by the PyTorch backends."""

    def __init__(self, spec: TargetSpec):
        self.spec = spec
        self._models = None

    def get(self) -> tuple:
        if self._models is None:
            from litefocus.models import load_components

            self._models = load_components(self.spec.source, dtype=self.spec.dtype, device=self.spec.device)
        return self._models

    def drop(self) -> None:
        self._models = None


@dataclass
class Target:
    backend: str
    contract: UNetContract
    decode_contract: DecodeContract
    unet: object  # contract inputs (CPU) -> noise_pred (CPU): the runtime's backend API
    decode: object
    module: torch.nn.Module | None = None  # PyTorch backends: called directly for step timing
    compiled: bool = False
    provider: str | None = None
    extra: dict = field(default_factory=dict)  # recorded in the row as is (e.g. an engine's validation)
    _cleanup: list = field(default_factory=list)

    def step_fn(self, inputs: dict[str, torch.Tensor]):
        """One UNet call on ``inputs`` placed on the device once (the timed unit). Engine backends:
        the runtime's per-step path (IO binding on ONNX Runtime: conditioning bound once, the
        latents copied in and the noise prediction copied out every call)."""
        if self.module is None:
            from litefocus.runtime.options import Conditioning
            from litefocus.runtime.sampling import UNetCall

            feeds = {k: v.numpy() for k, v in inputs.items()}
            cond = Conditioning(
                *(feeds[k] for k in ("encoder_hidden_states", "encoder_hidden_states_1")),
                feeds["encoder_attention_mask_1"],
            )
            call = UNetCall(self.unet, cond)  # exactly the runtime's step: IO binding where there is one
            indices = {k: v for k, v in feeds.items() if k.startswith("litefocus_indices")}
            t = int(feeds["timestep"][0])
            return lambda: torch.from_numpy(call(feeds["sample"], t, indices))
        device = next(self.module.parameters()).device
        args = [inputs[name].to(device) for name in self.contract.input_names]

        def call():
            with torch.inference_mode():
                return self.module(*args)

        return call

    def eager_reference(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """A compiled target's eager twin on the same inputs (None for the others)."""
        if not self.compiled:
            return None
        eager = self.module._orig_mod
        device = next(eager.parameters()).device
        with torch.inference_mode():
            return eager(*[inputs[name].to(device) for name in self.contract.input_names])

    def close(self) -> None:
        for fn in reversed(self._cleanup):
            fn()
        self._cleanup.clear()
        self.unet = self.decode = self.module = None


def open_target(backend: str, bucket: Bucket, spec: TargetSpec, models: TorchModels) -> Target:
    """Open ``backend`` for ``bucket`` (raises Unavailable with the reason when it cannot run here)."""
    reason = unavailable_reason(backend, spec.device)
    if reason:
        raise Unavailable(reason)
    if backend in TORCH_BACKENDS:
        return _torch_target(backend, bucket, spec, models)
    return _engine_target(backend, bucket, spec)


def _torch_target(backend: str, bucket: Bucket, spec: TargetSpec, models: TorchModels) -> Target:
    from litefocus.export.decode import DecodeModule
    from litefocus.export.onnx_export import UNetExportModule, unet_contract_for
    from litefocus.export.torch_backend import TorchBackend

    unet, vae, vocoder = models.get()
    config = spec.litefocus if uses_litefocus(backend) else None
    contract = unet_contract_for(
        unet, bucket, config, batch=spec.batch, text_len=spec.text_len, precision=spec.precision
    )
    decode_contract = DecodeContract(bucket, precision=spec.precision)
    handle = litefocus.install(unet, config) if config is not None else None
    try:
        module = UNetExportModule(unet, contract, handle).eval()
        compiled = backend.endswith("-compile")
        if compiled:
            module = torch.compile(module, mode=spec.compile_mode, dynamic=False)
        decode = DecodeModule.for_contract(vae, vocoder, decode_contract)
        target = Target(
            backend,
            contract,
            decode_contract,
            unet=TorchBackend(module, contract, str(spec.device)),
            decode=TorchBackend(decode, decode_contract, str(spec.device)),
            module=module,
            compiled=compiled,
        )
    except BaseException:
        if handle is not None:
            handle.uninstall()  # later diffusers rows must see diffusers' own processors
        raise
    if compiled:
        target._cleanup.append(torch._dynamo.reset)  # each compiled target compiles afresh
    if handle is not None:
        target._cleanup.append(handle.uninstall)  # restores diffusers' own processors exactly
    return target


def prepare_engines(backend: str, bucket: Bucket, spec: TargetSpec) -> None:
    """Export (or reuse, by cache key) the bucket's engine in ``spec.engines``."""
    from litefocus.export.build import export_engines
    from litefocus.export.plan import ExportOptions
    from litefocus.models import parse_random_source

    random_preset, weights_seed, model = None, 0, spec.source
    if spec.source.startswith("random:"):
        (random_preset, weights_seed), model = parse_random_source(spec.source), None
    opts = ExportOptions(
        seconds=(bucket.seconds,),
        out=spec.engines,
        model=model,
        random_preset=random_preset,
        weights_seed=weights_seed,
        backend="tensorrt" if backend == "tensorrt" else "onnxruntime",
        precision=spec.precision,
        batches=(spec.batch,),
        text_len=spec.text_len,
        litefocus=spec.litefocus,
        quiet=spec.quiet,
        device=str(spec.device),
        gpu_ops=spec.gpu_ops,
    )
    export_engines(opts)


def _engine_target(backend: str, bucket: Bucket, spec: TargetSpec) -> Target:
    """Export (or reuse, by cache key) the bucket's engine in ``spec.engines``, then open it."""
    from litefocus.engine.manifest import entry_name
    from litefocus.runtime import Runtime

    prepare_engines(backend, bucket, spec)
    cuda_graph = backend == "onnxruntime-cudagraph"
    engine = "onnxruntime" if cuda_graph else backend
    runtime = Runtime.load(spec.engines, backend=engine, device=str(spec.device), cuda_graph=cuda_graph)
    name = entry_name(bucket, spec.precision, spec.batch)  # exactly this bucket, precision and batch
    try:
        unet, decode, contract, decode_contract = runtime.open_entry(name)
        got = (contract.bucket.frames, contract.precision, contract.batch, contract.text_len)
        want = (bucket.frames, spec.precision, spec.batch, spec.text_len)
        if got != want:
            raise RuntimeError(
                f"{spec.engines}/{name} holds (frames, precision, batch, text_len) = {got}, not {want}"
            )
        if unet.name != engine:  # e.g. the runtime fell back to PyTorch: that is not this row
            raise RuntimeError(f"{spec.engines}: the runtime opened {unet.name}, not {engine}, for {name}")
        session = getattr(unet, "session", None)
        provider = session.get_providers()[0] if session is not None else backend
        if session is not None and (provider == "CUDAExecutionProvider") != (spec.device.type == "cuda"):
            raise Unavailable(
                f"ONNX Runtime runs on {provider}, not on {spec.device}: {ONNXRUNTIME_GPU_HINT}"
            )
    except BaseException:
        runtime.close()
        raise
    modules = runtime.entries[name].modules
    extra = {
        "gpu_ops": {m: list(modules[m].gpu_ops) for m in ("unet", "decode")},
        "cuda_graph": cuda_graph,
        # the export's own check of these graphs against PyTorch (max error / output RMS)
        "validation": {
            m: {
                "provider": modules[m].raw["validation"]["provider"],
                **modules[m].raw["validation"]["outputs"],
            }
            for m in ("unet", "decode")
        },
    }
    target = Target(
        backend, contract, decode_contract, unet=unet, decode=decode, provider=provider, extra=extra
    )
    target._cleanup.append(runtime.close)
    return target
