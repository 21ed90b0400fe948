"""Fused attention in the exported ONNX Runtime graphs: ``com.microsoft.MultiHeadAttention``.

ONNX Runtime's CPU kernel for this contrib op is a tiled (flash) attention: it never holds the
[Lq, Lk] score matrix, where the MatMul -> Softmax -> MatMul a plain export gives materializes all
of it (the VAE's 32,000-token attention at 80 s alone is a 4.1 GB matrix); its CUDA kernels are
flash / memory-efficient attention. Measured on this CPU at the 80 s LiteFocus level (B 2, 64 heads,
1000 x 1800, D 32): 190 ms and +74 MB against 224 ms and +912 MB plain; the standard ``Attention``
op (opset 23) runs unfused in ONNX Runtime 1.32 (194 ms, +896 MB). The TensorRT parser does not take
contrib ops: TensorRT graphs stay plain (TensorRT fuses MatMul-Softmax-MatMul itself).

``fused_attention(*models)`` swaps every self-attention processor of the models for the packed form
through ``multi_head_attention`` while a graph is traced, then puts the originals back.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import onnx
import torch

from litefocus.attention import packed_sdpa
from litefocus.engine.contract import FUSED_ATTENTION_DOMAIN, FUSED_ATTENTION_OP
from litefocus.export.contrib import contrib_nodes, emit, onnx_dtype
from litefocus.installer import is_self_attention
from litefocus.processor import LiteFocusAttnProcessor, PackedSelfAttnProcessor

CONTRIB_DOMAIN, FUSED_OP = FUSED_ATTENTION_DOMAIN, FUSED_ATTENTION_OP


@dataclass(frozen=True)
class AttentionSpec:
    """The non-tensor part of a MultiHeadAttention node: its heads and scale (static Python numbers,
    so they become attributes, not graph values) and the output's static shape and ONNX dtype."""

    heads: int
    scale: float
    shape: tuple[int, ...]
    dtype: int

    def attributes(self) -> dict:
        return {"num_heads_i": self.heads, "scale_f": self.scale}


class _MultiHeadAttention(torch.autograd.Function):
    """Eager: ``packed_sdpa``. Traced to ONNX: one com.microsoft.MultiHeadAttention node."""

    @staticmethod
    def forward(ctx, q, k, v, spec: AttentionSpec):
        return packed_sdpa(q, k, v, spec.heads, spec.scale)  # q: [B, Lq, M*D], k, v: [B, Lk, M*D]

    @staticmethod
    def symbolic(g, q, k, v, spec: AttentionSpec):
        return emit(g, FUSED_OP, [q, k, v], [spec.shape], spec.dtype, **spec.attributes())


def multi_head_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float | None = None
) -> torch.Tensor:
    """A ``PackedAttend`` that exports as one fused node (scale defaults to D ** -0.5)."""
    if q.shape[-1] != k.shape[-1] or k.shape != v.shape:
        raise ValueError(
            f"multi_head_attention: q [B, Lq, M*D] and k, v [B, Lk, M*D] must share M*D, got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    # static Python numbers: a traced shape would turn the scale into a graph value, not an attribute
    scale = (int(q.shape[-1]) // int(heads)) ** -0.5 if scale is None else float(scale)
    shape = tuple(int(x) for x in q.shape)  # static: a constant of the graph
    return _MultiHeadAttention.apply(q, k, v, AttentionSpec(int(heads), scale, shape, onnx_dtype(q)))


@contextlib.contextmanager
def fused_attention(*models: torch.nn.Module):
    """Inside: every self-attention module of ``models`` attends through the fused op (LiteFocus
    layers in their packed form, dense ones through ``PackedSelfAttnProcessor``); restored after."""
    saved = []
    try:
        for model in models:
            for name, module in model.named_modules():
                if not is_self_attention(module):
                    continue
                old = module.processor
                if getattr(old, "fused", False):  # already an export form of its own (gpu_attention.py)
                    continue
                if isinstance(old, LiteFocusAttnProcessor):
                    new = old.with_attend(multi_head_attention)
                else:
                    new = PackedSelfAttnProcessor(multi_head_attention, name)
                saved.append((module, old))
                module.set_processor(new)
        yield
    finally:
        for module, old in reversed(saved):
            module.set_processor(old)


def fused_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return contrib_nodes(graph, FUSED_OP)
