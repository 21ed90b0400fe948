"""ONNX Runtime contrib ops (``com.microsoft``), emitted directly while a graph is traced.

Each op here is a ``torch.autograd.Function``: its ``forward`` is the eager computation (the
reference the exported graph is validated against), its ``symbolic`` writes the one contrib node.
ONNX shape inference has no schema for contrib ops, so each output of such a node is followed by a
typed pass-through (Cast -> Reshape to the static shape) that lets inference go on; once the graph
is folded, ``finish_contrib_graph`` annotates the node's own outputs with those types and drops the
pass-throughs. The CUDA-only ops (GroupNorm, SkipGroupNorm, NhwcConv, BiasSplitGelu) make up the
GPU graph form (``export/gpu_form.py``); MultiHeadAttention (``export/fused.py``) runs on both EPs.

Layouts: GroupNorm, SkipGroupNorm and NhwcConv take channels-last maps, x: [B, H, W, C]; NhwcConv's
weight is [M, kH, kW, C / group]. GroupNorm's gamma and beta are float32 whatever x's precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import torch
import torch.nn.functional as F
from onnx import helper

from litefocus.engine.contract import CONTRIB_DOMAIN

ONNX_DTYPES = {
    torch.float32: onnx.TensorProto.FLOAT,
    torch.float16: onnx.TensorProto.FLOAT16,
    torch.bfloat16: onnx.TensorProto.BFLOAT16,
}


def onnx_dtype(x: torch.Tensor) -> int:
    if x.dtype not in ONNX_DTYPES:
        raise ValueError(f"contrib ops: {x.dtype} is not exportable; use float32, float16 or bfloat16")
    return ONNX_DTYPES[x.dtype]


def static_shape(x: torch.Tensor) -> tuple[int, ...]:
    """``x``'s shape as Python ints (static: the graph's shapes are constants)."""
    return tuple(int(d) for d in x.shape)


def emit(g, op: str, inputs: list, shapes: list[tuple[int, ...]], dtype: int, **attrs):
    """One ``com.microsoft::op`` node with ``len(shapes)`` outputs, each behind a typed pass-through."""
    outs = g.op(f"{CONTRIB_DOMAIN}::{op}", *inputs, outputs=len(shapes), **attrs)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    typed = []
    for out, shape in zip(outs, shapes, strict=True):
        out.setType(inputs[0].type().with_sizes(list(shape)))  # the data input's dtype, for the exporter
        cast = g.op("Cast", out, to_i=dtype)
        typed.append(g.op("Reshape", cast, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64))))
    return typed[0] if len(typed) == 1 else tuple(typed)


# --------------------------------------------------------------------------- GroupNorm (NHWC)


def group_norm_nhwc_eager(x, gamma, beta, groups: int, eps: float, silu: bool) -> torch.Tensor:
    """x: [B, H, W, C] -> GroupNorm over (H, W, C / groups), then SiLU if ``silu``; stats in fp32."""
    b, h, w, c = x.shape
    xf = x.float().reshape(b, h * w, groups, c // groups)
    mean = xf.mean(dim=(1, 3), keepdim=True)
    var = (xf - mean).square().mean(dim=(1, 3), keepdim=True)
    y = ((xf - mean) * torch.rsqrt(var + eps)).reshape(b, h, w, c) * gamma.float() + beta.float()
    return (F.silu(y) if silu else y).to(x.dtype)


@dataclass(frozen=True)
class GroupNormSpec:
    """The non-tensor part of a (Skip)GroupNorm node: the norm's ``groups`` and ``eps``, SiLU after it
    or not, and the output's static shape and ONNX dtype. It travels through ``apply`` as one object
    (the exporter hands it to ``symbolic`` as it is)."""

    groups: int
    eps: float
    silu: bool
    shape: tuple[int, ...]
    dtype: int

    @classmethod
    def of(cls, x: torch.Tensor, norm: torch.nn.GroupNorm, silu: bool) -> GroupNormSpec:
        return cls(int(norm.num_groups), float(norm.eps), bool(silu), static_shape(x), onnx_dtype(x))

    def attributes(self) -> dict:
        """The node's attributes (ONNX Runtime's GroupNorm / SkipGroupNorm schema)."""
        return {
            "activation_i": int(self.silu),
            "channels_last_i": 1,
            "epsilon_f": self.eps,
            "groups_i": self.groups,
        }


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, spec: GroupNormSpec):
        return group_norm_nhwc_eager(x, gamma, beta, spec.groups, spec.eps, spec.silu)

    @staticmethod
    def symbolic(g, x, gamma, beta, spec: GroupNormSpec):
        return emit(g, "GroupNorm", [x, gamma, beta], [spec.shape], spec.dtype, **spec.attributes())


def group_norm_nhwc(x, norm: torch.nn.GroupNorm, silu: bool = False) -> torch.Tensor:
    """``norm`` (then SiLU) on a channels-last map x: [B, H, W, C], as one contrib GroupNorm node."""
    gamma, beta = norm.weight.float(), norm.bias.float()
    return _GroupNorm.apply(x, gamma, beta, GroupNormSpec.of(x, norm, silu))


# --------------------------------------------------------------------------- SkipGroupNorm (NHWC)


class _SkipGroupNorm(torch.autograd.Function):
    """y = GroupNorm(x + skip + bias) (+ SiLU).

    ``inputs`` are the node's five tensors in its schema's order: x, gamma, beta, skip ([B, H, W, C]
    or [B, 1, 1, C]) and bias [C]; one varargs parameter keeps ``ctx`` / ``g``, the spec and the
    five within the six-parameter rule without changing what the node receives."""

    @staticmethod
    def forward(ctx, spec: GroupNormSpec, *inputs):
        x, gamma, beta, skip, bias = inputs
        s = x + skip + bias.to(x.dtype)
        return group_norm_nhwc_eager(s, gamma, beta, spec.groups, spec.eps, spec.silu)

    @staticmethod
    def symbolic(g, spec: GroupNormSpec, *inputs):
        return emit(g, "SkipGroupNorm", list(inputs), [spec.shape], spec.dtype, **spec.attributes())


def skip_group_norm_nhwc(x, skip, bias, norm: torch.nn.GroupNorm, silu: bool = False) -> torch.Tensor:
    """``norm(x + skip + bias)`` (then SiLU) as one contrib SkipGroupNorm node; x: [B, H, W, C]."""
    gamma, beta = norm.weight.float(), norm.bias.float()
    return _SkipGroupNorm.apply(GroupNormSpec.of(x, norm, silu), x, gamma, beta, skip, bias)


# --------------------------------------------------------------------------- NhwcConv


@dataclass(frozen=True)
class ConvSpec:
    """The non-tensor part of an NhwcConv node: the conv's geometry (stride, padding, dilation per
    spatial axis, groups, kernel [kH, kW]) and the output's static shape [B, H', W', M] and ONNX dtype."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    kernel: tuple[int, int]
    shape: tuple[int, ...]
    dtype: int


class _NhwcConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, spec: ConvSpec):
        # x: [B, H, W, C], weight: [M, kH, kW, C/g] -> [B, H', W', M]
        y = F.conv2d(
            x.permute(0, 3, 1, 2),
            weight.permute(0, 3, 1, 2),
            bias,
            spec.stride,
            spec.padding,
            spec.dilation,
            spec.groups,
        )
        return y.permute(0, 2, 3, 1).contiguous()

    @staticmethod
    def symbolic(g, x, weight, bias, spec: ConvSpec):
        inputs = [x, weight] if bias is None or bias.node().mustBeNone() else [x, weight, bias]
        (ph, pw) = spec.padding
        return emit(
            g, "NhwcConv", inputs, [spec.shape], spec.dtype,
            dilations_i=list(spec.dilation), group_i=spec.groups, kernel_shape_i=list(spec.kernel),
            pads_i=[ph, pw, ph, pw], strides_i=list(spec.stride),
        )  # fmt: skip


def nhwc_conv(x, conv: torch.nn.Conv2d, bias: bool = True) -> torch.Tensor:
    """``conv`` on a channels-last map x: [B, H, W, C] as one NhwcConv node (weight [M, kH, kW, C/g]);
    ``bias=False`` leaves the conv's bias out (a later node adds it)."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"nhwc_conv: only explicit zero padding is exported, got {conv.padding!r}")
    weight = conv.weight.permute(0, 2, 3, 1)  # folded into one initializer by the export
    stride, padding, dilation = tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation)
    b, h, w, _ = static_shape(x)
    m, kh, kw, _ = static_shape(weight)
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    spec = ConvSpec(stride, padding, dilation, int(conv.groups), (kh, kw), (b, ho, wo, m), onnx_dtype(x))
    return _NhwcConv.apply(x, weight, conv.bias if bias else None, spec)


# --------------------------------------------------------------------------- BiasSplitGelu


class _BiasSplitGelu(torch.autograd.Function):
    """x: [B, N, 2D], bias [2D] -> [B, N, D]: (x + bias)[..., :D] * gelu((x + bias)[..., D:]) (erf)."""

    @staticmethod
    def forward(ctx, x, bias, shape: tuple, dtype: int):
        h, gate = (x + bias).chunk(2, dim=-1)
        return h * F.gelu(gate)

    @staticmethod
    def symbolic(g, x, bias, shape: tuple, dtype: int):
        return emit(g, "BiasSplitGelu", [x, bias], [shape], dtype)


def bias_split_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x: [B, N, 2D], bias: [2D] -> [B, N, D] as one BiasSplitGelu node."""
    b, n, c = static_shape(x)
    return _BiasSplitGelu.apply(x, bias, (b, n, c // 2), onnx_dtype(x))


# --------------------------------------------------------------------------- graph finishing


def contrib_nodes(graph: onnx.GraphProto, op: str | None = None) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.domain == CONTRIB_DOMAIN and (op is None or n.op_type == op)]


def finish_contrib_graph(model: onnx.ModelProto) -> int:
    """Annotate each contrib node's outputs with their static types and shapes (those of the typed
    pass-throughs ``emit`` added) and drop the pass-throughs (in place). Returns the node count."""
    graph = model.graph
    nodes = contrib_nodes(graph)
    if not nodes:
        return 0
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    typed = {vi.name: vi for vi in (*inferred.graph.value_info, *inferred.graph.output)}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    rename, dropped, annotated = {}, set(), set()
    for node in nodes:
        for out in node.output:
            if not out:
                continue
            (cast,) = consumers[out]
            (reshape,) = consumers[cast.output[0]]
            assert cast.op_type == "Cast" and reshape.op_type == "Reshape", (cast.op_type, reshape.op_type)
            if reshape.output[0] in outputs:  # the graph's own output keeps its name (and pass-through)
                continue
            shaped = typed[reshape.output[0]].type.tensor_type
            dims = [d.dim_value for d in shaped.shape.dim]
            graph.value_info.append(helper.make_tensor_value_info(out, shaped.elem_type, dims))
            rename[reshape.output[0]] = out
            dropped.update((id(cast), id(reshape)))
            annotated.add(out)
    kept = [n for n in graph.node if id(n) not in dropped]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(kept)
    infos = [vi for vi in graph.value_info if vi.name not in annotated or vi.type.tensor_type.shape.dim]
    del graph.value_info[:]  # the exporter's untyped entries for the contrib outputs
    graph.value_info.extend(infos)
    return len(nodes)
