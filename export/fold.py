"""Fold the tracer's shape arithmetic into constants, so every tensor of a static graph has a static shape.

The TorchScript exporter records ``x.shape`` as Shape -> Gather -> Concat -> Reshape/Expand chains even
when every input shape is fixed. This pass, on plain ONNX (no execution provider, so fp16 graphs
stay exactly as traced), repeats until nothing changes:
  * a ``Shape`` whose input has a fully static inferred shape becomes a ``Constant``;
  * a node whose inputs are all constants, and whose outputs are small, is evaluated with
    ``onnx.reference`` and becomes ``Constant`` nodes.
Weights (large initializers) are never touched.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from litefocus.export.op_sets import RANDOM_OPS

logger = logging.getLogger(__name__)

MAX_FOLDED_ELEMENTS = 1 << 16  # only shape-like / small tensors are folded


def static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Every fully static tensor shape of ``model`` (weights loaded or not), inferred on a weight-free
    copy: initializers above ``MAX_FOLDED_ELEMENTS`` become typed inputs, so a graph of any size stays
    under protobuf's 2 GB limit, and shape constants keep their values for ``data_prop``."""
    small, large = [], []
    for t in model.graph.initializer:
        (small if np.prod(t.dims, dtype=np.int64) <= MAX_FOLDED_ELEMENTS else large).append(t)
    typed = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in large]
    light = helper.make_graph(
        model.graph.node, model.graph.name, [*model.graph.input, *typed], model.graph.output, small
    )
    light_model = helper.make_model(light, opset_imports=model.opset_import, ir_version=model.ir_version)
    inferred = onnx.shape_inference.infer_shapes(light_model, data_prop=True)
    out = {}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            out[vi.name] = [d.dim_value for d in t.shape.dim]
    return out


def _small_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    consts = {}
    for init in graph.initializer:
        if np.prod(init.dims, dtype=np.int64) <= MAX_FOLDED_ELEMENTS and not init.data_location:
            consts[init.name] = numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return consts


def _shape_value(node: onnx.NodeProto, dims: list[int]) -> np.ndarray:
    attrs = {a.name: a.i for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return np.array(dims[start:end], dtype=np.int64)


def _evaluate(node: onnx.NodeProto, consts: dict[str, np.ndarray], opset: int) -> list[np.ndarray] | None:
    from onnx.reference import ReferenceEvaluator

    inputs = [i for i in node.input if i]
    in_vi = [
        helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(consts[i].dtype), consts[i].shape)
        for i in inputs
    ]
    out_vi = [helper.make_empty_tensor_value_info(o) for o in node.output]
    graph = helper.make_graph([node], "fold", in_vi, out_vi)
    try:
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        return ReferenceEvaluator(model).run(None, {i: consts[i] for i in inputs})
    except Exception as e:  # an op the reference runtime cannot evaluate: leave it in the graph
        logger.debug("not folding %s (%s): %s", node.name, node.op_type, e)
        return None


def _constant(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def fold_static_shapes(model: onnx.ModelProto, max_rounds: int = 50) -> onnx.ModelProto:
    """Fold shape computations of a graph with static inputs (in place); returns the model."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    graph = model.graph
    graph_outputs = {o.name for o in graph.output}
    total = 0
    for _ in range(max_rounds):
        shapes, consts = static_shapes(model), _small_constants(graph)
        new_nodes, folded = [], 0
        for node in graph.node:
            replacement = None
            if node.op_type == "If" and node.domain in ("", "ai.onnx") and node.input[0] in consts:
                new_nodes += _inline_branch(node, bool(np.asarray(consts[node.input[0]]).item()))
                folded += 1
                continue
            if node.op_type == "Shape" and node.input[0] in shapes:
                replacement = [_shape_value(node, shapes[node.input[0]])]
            elif (
                node.op_type not in RANDOM_OPS
                and node.op_type != "Constant"
                and node.domain in ("", "ai.onnx")
                and node.input
                and all(i in consts for i in node.input if i)
                and not set(node.output) & graph_outputs
            ):
                replacement = _evaluate(node, consts, opset)
                if replacement is not None and any(
                    np.asarray(r).size > MAX_FOLDED_ELEMENTS for r in replacement
                ):
                    replacement = None
            if replacement is None:
                new_nodes.append(node)
                continue
            folded += 1
            new_nodes += [_constant(o, v) for o, v in zip(node.output, replacement, strict=True) if o]
            for o, v in zip(node.output, replacement, strict=True):
                consts[o] = np.asarray(v)
        if not folded:
            break
        del graph.node[:]
        graph.node.extend(new_nodes)
        total += folded
    drop_unused(graph)
    logger.info("folded %d shape nodes", total)
    return model


def _inline_branch(node: onnx.NodeProto, condition: bool) -> list[onnx.NodeProto]:
    """An ``If`` whose condition is a constant, replaced by the nodes of the branch it takes (the
    tracer emits one for ``squeeze(dim)`` where it lost a shape: past a fused attention node)."""
    attrs = {a.name: a.g for a in node.attribute}
    branch = attrs["then_branch" if condition else "else_branch"]
    nodes = list(branch.node)
    for inner, outer in zip(branch.output, node.output, strict=True):
        nodes.append(helper.make_node("Identity", [inner.name], [outer]))
    return nodes


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If / Loop / Scan bodies) read from the enclosing graph."""
    names = set()
    for attr in node.attribute:
        for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in g.node:
                names.update(i for i in inner.input if i)
                names |= _subgraph_inputs(inner)
    return names


def drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes and initializers nothing consumes (dead shape arithmetic after folding)."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if set(node.output) & needed:
            kept.append(node)
            needed.update(i for i in node.input if i)
            needed |= _subgraph_inputs(node)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
