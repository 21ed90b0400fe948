"""Graph audit: what a static, TensorRT-ready LiteFocus engine must satisfy.

After ``onnx.checker`` and shape inference the audit fails the export if
  * any tensor dimension is symbolic or unknown (engines are one static shape per bucket),
  * any op is random or has a data-dependent output shape,
  * any op is outside the TensorRT ONNX parser's supported-operator list (a graph of the fused
    form may also hold ONNX Runtime's com.microsoft.MultiHeadAttention: it is not for TensorRT),
  * a graph of the GPU form (``gpu_ops``) holds a contrib op other than the pieces it was exported
    with, a contrib node outside its CUDA kernel's limits (``gpu_form.py``; the CPU cannot run
    them, so nothing else would catch it before a GPU does), a 2-D Conv left in a channels-last
    (``nhwc``) graph, or a pair of layout Transposes that ``layout.py`` should have cancelled (the
    layout Transposes left are counted in the report),
  * the attention at the LiteFocus level is not sparse: each attention there (a softmax of the
    plain form, a fused node's query and key lengths) must have key length T_level + S, and none
    may have the full N x N shape.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import helper

from litefocus.engine.contract import ATTENTION_FORMS as FORMS
from litefocus.engine.contract import CONV_FORMS, GPU_CONTRIB_OPS
from litefocus.engine.contract import FUSED_ATTENTION_DOMAIN as CONTRIB_DOMAIN
from litefocus.engine.contract import FUSED_ATTENTION_OP as FUSED_OP
from litefocus.export.op_sets import DATA_DEPENDENT_OPS, RANDOM_OPS, TRT_OPS_SOURCE, TRT_SUPPORTED_OPS

logger = logging.getLogger(__name__)


class AuditError(RuntimeError):
    pass


@dataclass(frozen=True)
class AttentionExpectation:
    """``layers`` attention softmaxes of shape [.., query_len, key_len] at one UNet level.

    ``forbid_len``: N of a LiteFocus level; no N x N (full) attention may remain there.
    """

    query_len: int
    key_len: int
    layers: int
    forbid_len: int | None = None


@dataclass
class AuditReport:
    ops: dict[str, int] = field(default_factory=dict)
    nodes: int = 0
    attention_shapes: dict[str, int] = field(default_factory=dict)  # "q x k" -> count of attentions
    attention_form: str = "plain"
    conv_form: str = "direct"
    direct_3x3_convs: int = (
        0  # 3x3 convolutions the Winograd form takes (is_winograd_conv) left as Conv nodes
    )
    gpu_ops: tuple[str, ...] = ()
    layout_transposes: int = 0  # NCHW <-> NHWC transposes next to a channels-last op (GPU form)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "gpu_ops": list(self.gpu_ops),
            "layout_transposes": self.layout_transposes,
            "nodes": self.nodes,
            "ops": self.ops,
            "attention_form": self.attention_form,
            "attention_shapes": self.attention_shapes,
            "conv_form": self.conv_form,
            "direct_3x3_convs": self.direct_3x3_convs,
            "trt_ops_source": TRT_OPS_SOURCE,
        }


def _static_dims(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    """The tensor's dims if all static, else None."""
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = []
    for d in t.shape.dim:
        if not d.HasField("dim_value") or d.dim_value <= 0:
            return None
        dims.append(d.dim_value)
    return tuple(dims)


def inspect_graph(onnx_path: Path) -> tuple[onnx.ModelProto, AuditReport]:
    """checker + shape inference (with data propagation); the inferred graph (no weights) and a report."""
    onnx_path = Path(onnx_path)
    try:
        onnx.checker.check_model(str(onnx_path), full_check=False)
    except onnx.checker.ValidationError as e:
        raise AuditError(f"{onnx_path.name}: onnx.checker failed: {str(e).splitlines()[0]}") from None
    model = onnx.load(str(onnx_path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    report = AuditReport(nodes=len(inferred.graph.node))
    report.ops = dict(sorted(Counter(_op_name(n) for n in inferred.graph.node).items()))
    return inferred, report


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# Below this many input or output channels the Winograd transforms cost more than they save: the UNet's
# conv_in (8 -> 128) and conv_out (128 -> 8) at 80 s took 2.4x the direct conv's time (bench/probes/winograd.py).
MIN_WINOGRAD_CHANNELS = 32


def is_winograd_conv(
    node: onnx.NodeProto, weight_shape: tuple[int, ...] | None, min_channels: int = MIN_WINOGRAD_CHANNELS
) -> bool:
    """A plain 3x3 convolution worth the Winograd form: stride 1, dilation 1, padding 1 on every
    side, one group, 2-D, at least ``min_channels`` in and out."""
    if node.op_type != "Conv" or weight_shape is None or len(weight_shape) != 4:
        return False
    a = _attrs(node)
    return (
        tuple(weight_shape[2:]) == (3, 3)
        and min(weight_shape[:2]) >= min_channels
        and tuple(a.get("strides", (1, 1))) == (1, 1)
        and tuple(a.get("dilations", (1, 1))) == (1, 1)
        and a.get("group", 1) == 1
        and tuple(a.get("pads", (0, 0, 0, 0))) == (1, 1, 1, 1)
        and a.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
    )


def _audit_layout(graph: onnx.GraphProto, weight_dims: dict, report: AuditReport) -> None:
    """A channels-last graph: every 2-D convolution an NhwcConv, no layout Transpose pairs left."""
    from litefocus.export.layout import layout_transposes, transpose_pairs

    convs_2d = sum(n.op_type == "Conv" and len(weight_dims.get(n.input[1], ())) == 4 for n in graph.node)
    if convs_2d:
        report.problems.append(f"{convs_2d} NCHW 2-D Conv node(s) in a channels-last (nhwc) graph")
    pairs = transpose_pairs(graph)
    if pairs:
        report.problems.append(f"{pairs} pair(s) of layout Transposes left in a channels-last graph")
    report.layout_transposes = layout_transposes(graph)


def _audit_kernel_limits(graph: onnx.GraphProto, known: dict, report: AuditReport) -> None:
    """What ONNX Runtime's CUDA kernels of the GPU form take (``gpu_form.py``), checked on the graph:
    the CPU cannot run them, so a graph outside these limits would fail only on a GPU."""
    from litefocus.export import gpu_form

    constants = {i.name: i.data_type for i in graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t.data_type for n in graph.node if n.op_type == "Constant"})
    bad = Counter()
    for node in graph.node:
        if node.domain != CONTRIB_DOMAIN:
            continue
        dims = _static_dims(known[node.input[0]]) if node.input[0] in known else None
        if node.op_type == "NhwcConv" and node.input[1] not in constants:
            bad["NhwcConv weight computed in the graph (the kernel takes a constant [M, kH, kW, C])"] += 1
        elif node.op_type in ("GroupNorm", "SkipGroupNorm"):
            if any(constants.get(name) != onnx.TensorProto.FLOAT for name in node.input[1:3]):
                bad[f"{node.op_type} gamma/beta not float32 constants"] += 1
            groups = _attrs(node)["groups"]
            if dims is None or not gpu_form.group_norm_kernel_takes(dims[-1], groups):
                bad[f"{node.op_type} channels per group odd or above {gpu_form.MAX_CHANNELS_PER_GROUP}"] += 1
        elif node.op_type == "BiasSplitGelu" and (
            dims is None or dims[-1] not in gpu_form.BIAS_SPLIT_GELU_WIDTHS
        ):
            bad[f"BiasSplitGelu input width not in {gpu_form.BIAS_SPLIT_GELU_WIDTHS}"] += 1
    report.problems += [f"{count} node(s): {what}" for what, count in sorted(bad.items())]


def _op_name(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


ENCODER_INPUT = "encoder_hidden_states"  # the UNet's conditioning inputs (GPT-2 and T5 states) start so
# Ops a key goes through between its projection and the attention (views, the LiteFocus gather and
# concat, scalings): the key's source is found by walking back through them.
KEY_PATH_OPS = frozenset(
    {"Reshape", "Transpose", "Cast", "Unsqueeze", "Squeeze", "Expand", "Concat", "Gather", "GatherElements",
     "Slice", "Mul", "Div", "Identity"}
)  # fmt: skip


def _projected_from_encoder(name: str, producer: dict, weights: set) -> bool:
    """Whether the key tensor ``name`` is a projection (MatMul/Gemm with a constant weight) of the
    encoder states, i.e. belongs to a cross-attention."""
    for _ in range(64):
        node = producer.get(name)
        if node is None:
            return False
        if node.op_type in ("MatMul", "Gemm") and node.input[1] in weights:
            source = node.input[0]
            while source in producer and producer[source].op_type in ("Cast", "Reshape", "Unsqueeze"):
                source = producer[source].input[0]
            return source not in producer and source.startswith(ENCODER_INPUT)
        if node.op_type not in KEY_PATH_OPS:
            return False
        name = next((i for i in node.input if i and i not in weights), node.input[0])
    return False


def attention_shapes(graph: onnx.GraphProto, known: dict) -> Counter:
    """(query_len, key_len) -> count, over the self-attentions: plain attention softmaxes and fused
    attention nodes whose keys are not projected from the encoder states (cross-attention, told apart
    by the key's source, not its length: a T5 length can equal a level's token count)."""
    producer = {o: n for n in graph.node for o in n.output}
    weights = {i.name for i in graph.initializer} | {
        n.output[0] for n in graph.node if n.op_type == "Constant"
    }
    shapes = Counter()
    for node in graph.node:
        if node.op_type == "Softmax" and node.domain in ("", "ai.onnx") and node.input[0] in known:
            dims = _static_dims(known[node.input[0]])
            scores = producer.get(node.input[0])
            while scores is not None and scores.op_type in ("Add", "Mul", "Div", "Cast", "Where"):
                scores = producer.get(scores.input[0])
            keys = scores.input[1] if scores is not None and scores.op_type == "MatMul" else None
            if dims and len(dims) >= 2 and not (keys and _projected_from_encoder(keys, producer, weights)):
                shapes[dims[-2:]] += 1
        elif (node.domain, node.op_type) == (CONTRIB_DOMAIN, FUSED_OP):
            q, k = (known.get(name) for name in (*node.input, "")[:2])
            q_dims, k_dims = (None if vi is None else _static_dims(vi) for vi in (q, k))
            if q_dims and len(q_dims) == 5:  # a packed QKV query [B, L, M, 3, D]: self-attention
                k_dims = q_dims
            elif _projected_from_encoder(node.input[1], producer, weights):
                continue
            if q_dims and k_dims:  # q: [B, Lq, M*D], k: [B, Lk, M*D] or a packed KV [B, Lk, M, 2, D]
                shapes[q_dims[1], k_dims[1]] += 1
    return shapes


def audit_graph(
    onnx_path: Path,
    attention: tuple[AttentionExpectation, ...] = (),
    form: str = "plain",
    conv: str = "direct",
    gpu_ops: tuple[str, ...] = (),
) -> AuditReport:
    """Run every check; raise AuditError listing all problems, or return the report.

    ``form``: "plain" (MatMul-Softmax-MatMul, TensorRT-ready) or "fused" (ONNX Runtime's fused op).
    ``conv``: "direct" or "winograd" (then no plain 3x3 convolution may be left as a Conv node).
    ``gpu_ops``: the GPU form's pieces the graph was exported with (``engine.contract.GPU_OPS``)."""
    if form not in FORMS:
        raise ValueError(f"attention form must be one of {', '.join(FORMS)}, got {form!r}")
    if conv not in CONV_FORMS:
        raise ValueError(f"conv form must be one of {', '.join(CONV_FORMS)}, got {conv!r}")
    unknown = sorted(set(gpu_ops) - set(GPU_CONTRIB_OPS))
    if unknown:
        raise ValueError(f"gpu ops must be among {', '.join(GPU_CONTRIB_OPS)}, got {unknown}")
    model, report = inspect_graph(onnx_path)
    report.attention_form, report.conv_form, report.gpu_ops = form, conv, tuple(gpu_ops)
    allowed = TRT_SUPPORTED_OPS | ({f"{CONTRIB_DOMAIN}.{FUSED_OP}"} if form == "fused" else set())
    allowed |= {f"{CONTRIB_DOMAIN}.{op}" for piece in gpu_ops for op in GPU_CONTRIB_OPS[piece]}
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    values = [*graph.input, *graph.output, *graph.value_info]
    known = {vi.name: vi for vi in values}
    dynamic = [vi.name for vi in values if vi.name not in initializers and _static_dims(vi) is None]
    # every node output must have a static shape, including those inference could not type at all
    untyped = [o for n in graph.node for o in n.output if o and o not in known and o not in initializers]
    if dynamic or untyped:
        names = (dynamic + untyped)[:5]
        report.problems.append(
            f"{len(dynamic) + len(untyped)} tensor(s) without a static shape, e.g. {names}"
        )
    for op in sorted(set(report.ops) & RANDOM_OPS):
        report.problems.append(f"random op {op} in the graph (engines must be deterministic)")
    for op in sorted(set(report.ops) & DATA_DEPENDENT_OPS):
        report.problems.append(f"op {op} has data-dependent shapes or control flow")
    for op in sorted(set(report.ops) - allowed - RANDOM_OPS - DATA_DEPENDENT_OPS):
        report.problems.append(f"op {op} is not supported by the {TRT_OPS_SOURCE}")
    fused = report.ops.get(f"{CONTRIB_DOMAIN}.{FUSED_OP}", 0)
    if form == "plain" and fused:
        report.problems.append(f"{fused} fused attention node(s) in a graph of the plain form")

    weight_dims = {i.name: tuple(i.dims) for i in graph.initializer}
    report.direct_3x3_convs = sum(
        is_winograd_conv(n, weight_dims.get(n.input[1])) for n in graph.node if n.op_type == "Conv"
    )
    if conv == "winograd" and report.direct_3x3_convs:
        report.problems.append(
            f"{report.direct_3x3_convs} direct 3x3 convolution(s) in a graph of the winograd form"
        )

    if gpu_ops:
        _audit_kernel_limits(graph, known, report)
    if "nhwc" in gpu_ops:
        _audit_layout(graph, weight_dims, report)

    shapes = attention_shapes(graph, known)
    report.attention_shapes = {f"{q}x{k}": c for (q, k), c in sorted(shapes.items())}
    for exp in attention:
        qk = (exp.query_len, exp.key_len)
        if shapes[qk] != exp.layers:
            report.problems.append(
                f"expected {exp.layers} attentions of shape {qk[0]}x{qk[1]}, found {shapes[qk]} "
                f"(attention shapes in the graph: {report.attention_shapes})"
            )
        full = (exp.forbid_len, exp.forbid_len)
        if exp.forbid_len and shapes[full]:
            report.problems.append(
                f"{shapes[full]} full-length {full[0]}x{full[1]} attention(s) at the LiteFocus level: "
                "the sparse rewrite is not in the graph"
            )
    if report.problems:
        raise AuditError(f"{Path(onnx_path).name} failed the audit:\n  - " + "\n  - ".join(report.problems))
    logger.info("audit passed: %d nodes, attention %s", report.nodes, report.attention_shapes)
    return report
