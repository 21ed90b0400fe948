"""Cancel the layout Transposes the GPU form's blocks leave at their edges (``gpu_form.py``).

Each block of the GPU form computes channels-last inside and keeps its NCHW interface with a
Transpose at each edge, so between two blocks the graph reads ``... -> T(0,3,1,2) -> [Add, Concat,
...] -> T(0,2,3,1) -> ...``. This pass, on any graph, repeats until nothing changes:

  * a Transpose of a Transpose becomes one Transpose of their composition, or nothing when that is
    the identity;
  * an op that commutes with a transpose (element-wise ops whose other inputs are scalars or are
    transposed the same way, Concat on the permuted axis) takes the untransposed inputs, and one
    Transpose moves to its output, where the next block's entry Transpose cancels it.

Only the graph's own inputs and outputs then keep a layout Transpose (the UNet reads and writes
NCHW latents), and places a map leaves the layout-free world (a Reshape into tokens).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from litefocus.export.fold import drop_unused

TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]
ELEMENTWISE = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Sigmoid", "Tanh", "Relu", "Erf", "Cast", "Identity", "Neg", "Sqrt"}
)


def _perm(node: onnx.NodeProto) -> list[int]:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    raise AssertionError(f"Transpose {node.name} without perm")


def _scalars(graph: onnx.GraphProto) -> set[str]:
    """Names of constants with one element (they broadcast the same in any layout)."""
    out = {i.name for i in graph.initializer if int(np.prod(i.dims, dtype=np.int64)) == 1}
    for n in graph.node:
        value = n.attribute[0] if n.op_type == "Constant" and n.attribute else None
        if value is not None and value.name == "value" and numpy_helper.to_array(value.t).size == 1:
            out.add(n.output[0])
    return out


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.outputs = {o.name for o in self.graph.output}
        inferred = onnx.shape_inference.infer_shapes(model).graph  # contrib outputs are annotated
        self.shapes = {vi.name: vi for vi in (*inferred.value_info, *inferred.input, *inferred.output)}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.scalars = _scalars(self.graph)
        self.fresh = 0

    def rename_uses(self, old: str, new: str) -> None:
        for n in self.graph.node:
            for i, name in enumerate(n.input):
                if name == old:
                    n.input[i] = new

    def dims(self, name: str) -> list[int] | None:
        vi = self.shapes.get(name)
        if vi is None or not vi.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_value for d in vi.type.tensor_type.shape.dim]

    def new_value(self, like: str, dims: list[int]) -> str:
        self.fresh += 1
        name = f"{like}__layout{self.fresh}"
        vi = helper.make_tensor_value_info(name, self.shapes[like].type.tensor_type.elem_type, dims)
        self.graph.value_info.append(vi)
        self.shapes[name] = vi
        return name


def _is_layout(node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == "Transpose" and _perm(node) in (TO_NHWC, TO_NCHW)


def _fold_pair(g: _Graph, node: onnx.NodeProto) -> bool:
    """A layout Transpose of a layout Transpose: none (they are inverse) or one."""
    inner = g.producer.get(node.input[0])
    if not (_is_layout(node) and _is_layout(inner)) or node.output[0] in g.outputs:
        return False
    p, q = _perm(inner), _perm(node)
    composed = [p[i] for i in q]
    if composed == list(range(len(composed))):
        g.rename_uses(node.output[0], inner.input[0])
        g.graph.node.remove(node)
        return True
    node.input[0] = inner.input[0]
    del node.attribute[:]
    node.attribute.append(helper.make_attribute("perm", composed))
    return True


def _push(g: _Graph, node: onnx.NodeProto) -> bool:
    """An element-wise op or Concat whose map inputs all come out of the same layout Transpose runs
    before it (the rest of the graph keeps its transposes as traced)."""
    if node.op_type not in ELEMENTWISE and node.op_type != "Concat":
        return False
    if node.output[0] in g.outputs or len(node.output) != 1:
        return False
    perm, sources = None, []
    for name in node.input:
        if name in g.scalars and node.op_type != "Concat":
            sources.append(name)
            continue
        t = g.producer.get(name)
        if not _is_layout(t):
            return False
        if perm is None:
            perm = _perm(t)
        elif _perm(t) != perm:
            return False
        sources.append(t.input[0])
    out_dims = g.dims(node.output[0])
    if perm is None or out_dims is None or len(out_dims) != len(perm):
        return False
    inner_dims = [0] * len(perm)
    for i, p in enumerate(perm):
        inner_dims[p] = out_dims[i]
    inner = g.new_value(node.output[0], inner_dims)
    del node.input[:]
    node.input.extend(sources)
    if node.op_type == "Concat":
        axis = next(a for a in node.attribute if a.name == "axis")
        axis.i = perm[axis.i % len(perm)]
    original = node.output[0]
    node.output[0] = inner
    g.producer[inner] = node
    moved = helper.make_node("Transpose", [inner], [original], perm=perm, name=f"{inner}__T")
    g.graph.node.insert(list(g.graph.node).index(node) + 1, moved)
    g.producer[original] = moved
    return True


def cancel_transposes(model: onnx.ModelProto, max_rounds: int = 10_000) -> int:
    """Cancel and sink Transposes in ``model`` (in place, weight-free is fine); returns the Transpose
    nodes removed."""
    before = sum(n.op_type == "Transpose" for n in model.graph.node)
    g = _Graph(model)
    for _ in range(max_rounds):
        changed = False
        for node in list(g.graph.node):
            if node.op_type == "Transpose" and _fold_pair(g, node):
                changed = True
                break
            if _push(g, node):
                changed = True
                break
        if not changed:
            break
    drop_unused(g.graph)
    produced = {o for n in g.graph.node for o in n.output}
    infos = [vi for vi in g.graph.value_info if vi.name in produced]
    del g.graph.value_info[:]  # the removed Transposes' outputs
    g.graph.value_info.extend(infos)
    return before - sum(n.op_type == "Transpose" for n in g.graph.node)


NHWC_OPS = frozenset({"NhwcConv", "GroupNorm", "SkipGroupNorm"})


def layout_transposes(graph: onnx.GraphProto) -> int:
    """Transposes between NCHW and NHWC next to a channels-last contrib op (the audit counts them in
    the GPU form; attention's own transposes, whatever their perm, are not layout changes)."""
    producer = {o: n for n in graph.node for o in n.output}
    nhwc_inputs = {i for n in graph.node if n.op_type in NHWC_OPS for i in n.input}
    return sum(
        _is_layout(n)
        and (getattr(producer.get(n.input[0]), "op_type", None) in NHWC_OPS or n.output[0] in nhwc_inputs)
        for n in graph.node
    )


def transpose_pairs(graph: onnx.GraphProto) -> int:
    """Layout Transposes whose input another layout Transpose produced (the pass leaves none)."""
    producer = {o: n for n in graph.node for o in n.output}
    return sum(_is_layout(n) and _is_layout(producer.get(n.input[0])) for n in graph.node)
