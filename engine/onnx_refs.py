"""Every place an ONNX model can keep a tensor, and the external-data references among them.

An engine directory is untrusted: a tensor with ``data_location = EXTERNAL`` makes ONNX Runtime read
``location`` (relative to the graph, or a special in-memory address) at ``offset`` / ``length``. Tensors
live in more places than the main graph's initializers: sparse initializers (values and indices),
node attributes (``t``, ``tensors``, ``sparse_tensor``, ``sparse_tensors``), subgraphs of If / Loop /
Scan (``g``, ``graphs``) at any depth, ONNX functions (their nodes and default attributes), and the
training-info graphs. ``model_tensors`` walks all of them; ``check_external_refs`` refuses any
external reference but a range of the one weights file the manifest records.
"""

from __future__ import annotations

from collections.abc import Iterator

FIX = "re-export with litefocus-export --force"


def _sparse(sparse) -> Iterator:
    yield sparse.values
    yield sparse.indices


def _attribute_tensors(attr) -> Iterator:
    if attr.HasField("t"):
        yield attr.t
    yield from attr.tensors
    if attr.HasField("sparse_tensor"):
        yield from _sparse(attr.sparse_tensor)
    for sparse in attr.sparse_tensors:
        yield from _sparse(sparse)
    for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
        yield from graph_tensors(sub)


def _node_tensors(nodes) -> Iterator:
    for node in nodes:
        for attr in node.attribute:
            yield from _attribute_tensors(attr)


def graph_tensors(graph) -> Iterator:
    """Every TensorProto of ``graph``: initializers, sparse initializers and node attributes, with
    subgraphs at any depth."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from _sparse(sparse)
    yield from _node_tensors(graph.node)


def model_tensors(model) -> Iterator:
    """Every TensorProto of ``model``: its graph, its functions and its training-info graphs."""
    yield from graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)
        for attr in function.attribute_proto:  # default values of the function's attributes
            yield from _attribute_tensors(attr)
    for info in model.training_info:
        for graph in (info.initialization, info.algorithm):
            yield from graph_tensors(graph)


def _is_external(tensor) -> bool:
    from onnx import TensorProto

    return tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data) > 0


def check_external_refs(model, graph_name: str, data_name: str | None, data_size: int) -> int:
    """Refuse (ValueError, one line) any tensor of ``model`` whose data lives anywhere but in bytes
    0..``data_size`` of ``data_name`` (the entry's own weights file, beside the graph); returns how
    many tensors are external."""
    count = 0
    for t in model_tensors(model):
        if not _is_external(t):
            continue
        count += 1
        name = repr(t.name[:80])
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        if data_name is None or location != data_name:
            raise ValueError(
                f"{graph_name}: tensor {name} reads its data from {location[:80]!r}, not from the "
                f"entry's own {data_name or 'weights file'}; {FIX}"
            )
        try:
            offset, length = int(info.get("offset", 0)), int(info["length"])
        except (KeyError, ValueError):
            raise ValueError(f"{graph_name}: tensor {name} has no valid external length; {FIX}") from None
        if offset < 0 or length < 0 or offset + length > data_size:
            raise ValueError(
                f"{graph_name}: tensor {name} needs bytes {offset}..{offset + length} of {data_name}, "
                f"which has {data_size} (truncated?); {FIX}"
            )
    return count


def data_extent(graph: bytes) -> int | None:
    """How many bytes of its weights file the serialized ONNX ``graph`` reads (the largest offset +
    length of its external tensors, 0 when none); None when it does not parse or a reference has no
    valid range (``check_external_refs`` refuses those when the graph loads)."""
    import onnx

    try:
        model = onnx.load_model_from_string(graph)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
        return None
    extent = 0
    for t in model_tensors(model):
        if _is_external(t):
            info = {e.key: e.value for e in t.external_data}
            try:
                extent = max(extent, int(info.get("offset", 0)) + int(info["length"]))
            except (KeyError, ValueError):
                return None
    return extent
