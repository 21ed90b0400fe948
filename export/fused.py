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

import onnx
import torch
from onnx import helper

from litefocus.attention import packed_sdpa
from litefocus.engine.contract import FUSED_ATTENTION_DOMAIN, FUSED_ATTENTION_OP
from litefocus.installer import is_self_attention
from litefocus.processor import LiteFocusAttnProcessor, PackedSelfAttnProcessor

CONTRIB_DOMAIN, FUSED_OP = FUSED_ATTENTION_DOMAIN, FUSED_ATTENTION_OP


_ONNX_DTYPES = {
    torch.float32: onnx.TensorProto.FLOAT,
    torch.float16: onnx.TensorProto.FLOAT16,
    torch.bfloat16: onnx.TensorProto.BFLOAT16,
}


class _MultiHeadAttention(torch.autograd.Function):
    """Eager: ``packed_sdpa``. Traced to ONNX: one com.microsoft.MultiHeadAttention node."""

    @staticmethod
    def forward(ctx, q, k, v, heads: int, scale: float, shape: tuple, dtype: int):
        return packed_sdpa(q, k, v, heads, scale)  # q: [B, Lq, M*D], k, v: [B, Lk, M*D]

    @staticmethod
    def symbolic(g, q, k, v, heads: int, scale: float, shape: tuple, dtype: int):
        out = g.op(f"{CONTRIB_DOMAIN}::{FUSED_OP}", q, k, v, num_heads_i=heads, scale_f=scale)
        # ONNX shape inference has no schema for contrib ops: a pass-through that states the output's
        # type and static shape (the query's) lets it go on past this node. finish_fused_graph
        # removes it once the node's own output is annotated.
        out.setType(q.type().with_sizes(list(shape)))  # for the exporter's own inference
        out = g.op("Cast", out, to_i=dtype)
        return g.op("Reshape", out, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64)))


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
    if q.dtype not in _ONNX_DTYPES:
        raise ValueError(f"multi_head_attention: {q.dtype} is not exportable; use float32, float16 or bfloat16")
    shape = tuple(int(x) for x in q.shape)  # static: a constant of the graph
    return _MultiHeadAttention.apply(q, k, v, int(heads), scale, shape, _ONNX_DTYPES[q.dtype])


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
    return [n for n in graph.node if n.domain == CONTRIB_DOMAIN and n.op_type == FUSED_OP]


def finish_fused_graph(model: onnx.ModelProto) -> int:
    """Annotate each fused node's output with its static type and shape (those of the pass-through
    its symbolic added) and drop the pass-through (in place). Returns the number of fused nodes."""
    graph = model.graph
    nodes = fused_nodes(graph)
    if not nodes:
        return 0
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    typed = {vi.name: vi for vi in (*inferred.graph.value_info, *inferred.graph.output)}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    rename, dropped = {}, set()
    for node in nodes:
        (cast,) = consumers[node.output[0]]
        (reshape,) = consumers[cast.output[0]]
        assert cast.op_type == "Cast" and reshape.op_type == "Reshape", (cast.op_type, reshape.op_type)
        if reshape.output[0] in outputs:  # the graph's own output keeps its name (and pass-through)
            continue
        shaped = typed[reshape.output[0]].type.tensor_type
        dims = [d.dim_value for d in shaped.shape.dim]
        graph.value_info.append(helper.make_tensor_value_info(node.output[0], shaped.elem_type, dims))
        rename[reshape.output[0]] = node.output[0]
        dropped.update((id(cast), id(reshape)))
    kept = [n for n in graph.node if id(n) not in dropped]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(kept)
    annotated = {n.output[0] for n in nodes}
    infos = [vi for vi in graph.value_info if vi.name not in annotated or vi.type.tensor_type.shape.dim]
    del graph.value_info[:]  # the exporter's untyped entries for the fused outputs
    graph.value_info.extend(infos)
    return len(nodes)
