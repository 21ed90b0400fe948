"""Validate an exported graph against its PyTorch module (the Optimum pattern).

Both run on the same fresh random inputs (the same LiteFocus indices included); for each output we
report the max absolute error and that error relative to the reference output's RMS, and fail above
the tolerance of the precision.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import numpy as np
import torch

from litefocus.engine.backends import onnxruntime_providers, open_session

logger = logging.getLogger(__name__)


class ValidationError(RuntimeError):
    pass


_ORT_TYPES = {"float32": "float", "float16": "float16", "int32": "int32", "int64": "int64"}


RESOLUTION_ULPS = 4  # an error this many units in the last place of the output's largest value always passes


def resolution(want: np.ndarray, dtype) -> float:
    """The smallest error ``dtype`` can resolve at the output's scale: RESOLUTION_ULPS spacings of
    max |want| in that dtype (subnormals included, so never 0 for a finite output)."""
    top = float(np.abs(want).max()) if want.size else 0.0
    if not math.isfinite(top):
        return 0.0
    return RESOLUTION_ULPS * float(np.spacing(np.asarray(top, dtype=dtype)))


def compare(got: np.ndarray, want: np.ndarray, dtype=np.float32) -> dict[str, float]:
    """Max abs error, that error relative to the reference RMS, and the resolution floor of
    ``dtype`` (the graph's output precision) at the reference's scale."""
    want64 = want.astype(np.float64)
    err = np.abs(got.astype(np.float64) - want64)
    rms = float(np.sqrt(np.mean(want64**2)))
    max_abs = float(err.max()) if err.size else 0.0
    finite = bool(np.isfinite(got).all())
    return {
        "max_abs": max_abs if finite else math.inf,
        "max_rel_rms": (max_abs / rms if rms > 0 else max_abs) if finite else math.inf,
        "ref_rms": rms,
        "resolution_abs": resolution(want, dtype),
    }


def within_tolerance(result: dict[str, float], tol: float) -> bool:
    """Relative error within ``tol``, or an absolute error the precision cannot resolve anyway.

    The second arm matters for outputs far below 1 in fp16 (e.g. a random-weights vocoder's
    ~1e-6 waveform, in fp16's subnormal range): there one unit in the last place is already
    several percent of the RMS, so a relative tolerance alone would reject a bit-level difference.
    """
    return result["max_rel_rms"] <= tol or result["max_abs"] <= result.get("resolution_abs", 0.0)


@contextlib.contextmanager
def full_fp32(on: bool):
    """PyTorch's reference in full fp32 on a GPU: cuDNN convolutions default to TF32 there."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if on:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def validate(
    onnx_path: Path,
    module: torch.nn.Module,
    contract,
    *,
    seed: int = 1,
    device="cpu",
    ort_device=None,
) -> dict:
    """Run graph and module on ``contract.sample_inputs(seed)``; raise ValidationError above tolerance.

    The module runs on ``device``; ONNX Runtime on ``ort_device`` (default: the same).
    Returns {"provider", "seed", "tolerance", "outputs": {name: {max_abs, max_rel_rms, ref_rms}}}.
    """
    inputs = contract.sample_inputs(seed)
    ort_device = torch.device(ort_device if ort_device is not None else device)
    providers = onnxruntime_providers(
        prefer_cuda=ort_device.type == "cuda", device_id=ort_device.index or 0, precision=contract.precision
    )
    session = open_session(onnx_path, providers, contract.module)
    graph_outputs = [(o.name, list(o.shape), o.type) for o in session.get_outputs()]
    want_outputs = [(s.name, list(s.shape), f"tensor({_ORT_TYPES[s.dtype]})") for s in contract.outputs]
    if graph_outputs != want_outputs:
        raise ValidationError(
            f"{Path(onnx_path).name}: graph outputs {graph_outputs} differ from the contract's {want_outputs}"
        )
    feeds = {name: inputs[name].numpy() for name in contract.input_names}
    # copies: ONNX Runtime's outputs are views that keep its tensors (and a UNet session's arena) alive
    got = [np.array(g, copy=True) for g in session.run(contract.output_names, feeds)]
    provider = session.get_providers()[0]
    del session  # its arena keeps the run's peak: free it before PyTorch's reference runs
    with torch.no_grad(), full_fp32(contract.precision == "fp32"):
        want = module(*(inputs[name].to(device) for name in contract.input_names))
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    want = [w.float().cpu() for w in want]
    for spec, w in zip(contract.outputs, want, strict=False):
        if tuple(w.shape) != tuple(spec.shape):
            raise ValidationError(
                f"{Path(onnx_path).name}: PyTorch's {spec.name} has shape {tuple(w.shape)}, the contract says {spec.shape}"
            )
    if len(want) != len(contract.outputs):
        raise ValidationError(
            f"{Path(onnx_path).name}: PyTorch returned {len(want)} outputs, the contract has {len(contract.outputs)}"
        )
    tol = contract.tolerance
    report = {"provider": provider, "seed": seed, "tolerance": tol, "outputs": {}}
    for spec, g, w in zip(contract.outputs, got, want, strict=True):
        report["outputs"][spec.name] = compare(g, w.float().numpy(), spec.numpy_dtype)
    bad = {k: v for k, v in report["outputs"].items() if not within_tolerance(v, tol)}
    if bad:
        raise ValidationError(
            f"{Path(onnx_path).name}: ONNX Runtime differs from PyTorch above the {contract.precision} tolerance "
            f"{tol:g} (max error relative to the output RMS): "
            + ", ".join(
                f"{k}: {v['max_rel_rms']:.3g} (max abs {v['max_abs']:.3g}, above the {v['resolution_abs']:.3g} "
                f"that {contract.precision} resolves at this output's scale)"
                for k, v in bad.items()
            )
        )
    for k, v in report["outputs"].items():
        logger.info(
            "validated %s/%s: max abs %.3g, rel %.3g", Path(onnx_path).name, k, v["max_abs"], v["max_rel_rms"]
        )
    return report
