"""What to export: the user's request (``ExportOptions``) and, resolved once from it, the plan (``ExportPlan``).

Every "auto" is decided here and nowhere else: the build backend (TensorRT where it is installed and
a CUDA GPU exists, else ONNX Runtime), the attention form, the convolution form and the GPU graph
form's pieces. The plan also holds the buckets (one per latent length) and the sorted batch sizes,
so the stages after it only read decisions, never make them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from litefocus.buckets import Bucket
from litefocus.config import LiteFocusConfig
from litefocus.engine.contract import ATTENTION_FORMS, CONV_FORMS

BUILD_BACKENDS = ("auto", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class ExportOptions:
    """The user's request, as given (``litefocus-export``'s flags, or a caller's arguments)."""

    seconds: tuple[float, ...]
    out: Path
    model: str | None = "cvssp/audioldm2"  # hub id or local diffusers directory
    random_preset: str | None = None  # build seeded random weights of this preset instead
    weights_seed: int = 0
    backend: str = "onnxruntime"  # "auto", "onnxruntime" or "tensorrt" (see choose_build_backend)
    precision: str = "fp32"
    batches: tuple[int, ...] = (2,)  # UNet batch sizes, one entry each (2 = one guided request)
    text_len: int = 128
    litefocus: LiteFocusConfig | None = field(default_factory=LiteFocusConfig)
    force: bool = False
    quiet: bool = False
    device: str = "cpu"  # where the PyTorch modules are traced and run for validation (fp16: cuda)
    text: bool = True  # export the text-conditioning engine (when the model has text encoders)
    attention: str = "auto"  # "fused" (ONNX Runtime) or "plain" (see resolve_attention)
    decode_window: float | None = None  # seconds: longer buckets decode in windows (time-chunked)
    conv: str = "auto"  # the UNet's 3x3 convolutions: "winograd" or "direct" (see resolve_conv)
    gpu_ops: tuple[str, ...] | str = "auto"  # the GPU graph form's pieces (see gpu_form.resolve_gpu_ops)


@dataclass(frozen=True)
class ExportPlan:
    """The request with every choice made: what the stages build, read-only."""

    request: ExportOptions  # as given: the model to load (source.ModelSource reads it)
    out: Path
    buckets: tuple[Bucket, ...]  # one per latent length (of several requests that share it, the longest)
    batches: tuple[int, ...]  # sorted, each once
    backend: str  # "onnxruntime" or "tensorrt"
    attention: str  # "fused" or "plain"
    conv: str  # "winograd" or "direct" (the UNet's; the decode is always direct)
    gpu_ops: tuple[str, ...]
    precision: str
    device: str
    text_len: int
    litefocus: LiteFocusConfig | None
    decode_window: float | None
    text: bool
    force: bool
    quiet: bool

    @property
    def model_dir(self) -> Path | None:
        """The local model directory (None for random weights; a hub id is no directory)."""
        if self.request.random_preset is not None:
            return None
        return Path(str(self.request.model)).expanduser()


def choose_build_backend(backend: str) -> str:
    """auto -> tensorrt when TensorRT and a CUDA GPU are there, else onnxruntime. tensorrt without
    TensorRT: TensorRTNotInstalled (naming the install)."""
    import torch

    from litefocus.export.tensorrt_build import require_tensorrt, tensorrt_available

    if backend not in BUILD_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BUILD_BACKENDS)}, got {backend!r}")
    if backend == "tensorrt":
        require_tensorrt()
        return "tensorrt"
    if backend == "auto" and tensorrt_available() and torch.cuda.is_available():
        return "tensorrt"
    return "onnxruntime"


def resolve_attention(attention: str, backend: str) -> str:
    """auto -> fused for ONNX Runtime engines, plain for TensorRT (its parser takes no contrib ops)."""
    if attention not in ("auto", *ATTENTION_FORMS):
        raise ValueError(f"attention must be auto, {' or '.join(ATTENTION_FORMS)}, got {attention!r}")
    if attention == "auto":
        return "plain" if backend == "tensorrt" else "fused"
    if attention == "fused" and backend == "tensorrt":
        raise ValueError(
            "--attention fused: the TensorRT parser does not take ONNX Runtime's fused attention op; use "
            "--attention plain (or auto) with --backend tensorrt"
        )
    return attention


def resolve_conv(conv: str, backend: str, device: str, precision: str) -> str:
    """auto -> winograd for fp32 ONNX Runtime engines exported on the CPU (ONNX Runtime's CPU EP
    convolves directly: Winograd is 1.3-2.7x faster per 3x3 conv there), direct otherwise: GPU
    exports and TensorRT (cuDNN and TensorRT choose Winograd kernels themselves) and fp16 (F(4, 3)'s
    transforms lose too much in 10-bit mantissas). Applies to the UNet; the decode stays direct."""
    if conv not in ("auto", *CONV_FORMS):
        raise ValueError(f"conv must be auto, {' or '.join(CONV_FORMS)}, got {conv!r}")
    if conv == "auto":
        cpu_fp32 = device.startswith("cpu") and precision == "fp32"
        return "winograd" if backend != "tensorrt" and cpu_fp32 else "direct"
    return conv


def plan_buckets(seconds: tuple[float, ...]) -> tuple[Bucket, ...]:
    """One bucket per latent length, shortest first: of several requests that share one, the longest."""
    by_frames = {b.frames: b for b in sorted(map(Bucket.for_seconds, seconds), key=lambda b: b.seconds)}
    return tuple(by_frames[f] for f in sorted(by_frames))


def resolve_plan(opts: ExportOptions) -> ExportPlan:
    """Decide every choice of ``opts`` once (ValueError / TensorRTNotInstalled for a bad one)."""
    from litefocus.export.gpu_form import resolve_gpu_ops

    backend = choose_build_backend(opts.backend)
    attention = resolve_attention(opts.attention, backend)
    conv = resolve_conv(opts.conv, backend, opts.device, opts.precision)
    return ExportPlan(
        request=opts,
        out=Path(opts.out),
        buckets=plan_buckets(opts.seconds),
        batches=tuple(sorted(set(opts.batches))),
        backend=backend,
        attention=attention,
        conv=conv,
        gpu_ops=tuple(resolve_gpu_ops(opts.gpu_ops, backend, opts.device, conv, attention)),
        precision=opts.precision,
        device=opts.device,
        text_len=opts.text_len,
        litefocus=opts.litefocus,
        decode_window=opts.decode_window,
        text=opts.text,
        force=opts.force,
        quiet=opts.quiet,
    )
