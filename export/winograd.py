"""Winograd 3x3 convolutions in the ONNX Runtime CPU graphs: F(m x m, 3 x 3) out of plain ONNX ops.

ONNX Runtime's CPU kernels convolve directly (NCHWc, ~200 GFLOP/s on this project's 2-core
machine), and 3x3 convolutions are about a quarter of the 80 s UNet step. Winograd's minimal
filtering computes each m x m output tile from an (m+2) x (m+2) input tile with (m+2)^2 channel
mixes instead of 9 m^2: 4x fewer multiplies for F(4x4, 3x3), 2.25x for F(2x2, 3x3). Per conv,
with a = m + 2 and P = tiles per image (shape comments for one conv, x: [B, C, H, W]):

    x  -> Reshape [B*C, 1, H, W] -> Conv(a^2 fixed filters a x a, stride m)   V: [B*C, a^2, th, tw]
       -> Reshape [B, C, a^2, P] -> Transpose(0, 2, 1, 3)                      V: [B, a^2, C, P]
       -> MatMul(U [a^2, Co, C], V)                                            M: [B, a^2, Co, P]
       -> Transpose(0, 2, 1, 3) -> Reshape [B, Co*a^2, th, tw]
       -> ConvTranspose(group Co, fixed m x m filters, stride m, the conv's bias)  y: [B, Co, H', W']

The transposes swap two axes above a contiguous block of P floats (block copies, not element
gathers). U = G w G^T is the weight in the transform domain: it is computed per call from the
original weight (permuted to [9, Co*C]) by one small MatMul (about 1 ms), so the engine holds no more
weight memory than the plain graph; ONNX Runtime's constant folding is off for UNet sessions
(``engine.backends.disabled_optimizers``), since folding would store every U ((m+2)^2 / 9 times the
weight: +0.5 GB at 80 s).

A conv whose V would exceed ``CHUNK_BYTES`` runs this in row chunks (each a Slice of its input rows
with a 1-row halo; the outputs concatenated), so the step's peak memory stays the direct graph's.
Convs with fewer than ``MIN_WINOGRAD_CHANNELS`` in or out (the UNet's conv_in, conv_out) stay direct.

Only ONNX Runtime's CPU EP gains (cuDNN and TensorRT pick Winograd kernels themselves): the form is
chosen per export and recorded in the manifest. The error against the direct convolution, max over a
256-channel conv's outputs relative to their RMS in fp32: ~2e-5 for F(4, 3), ~4e-6 for F(2, 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from litefocus.export.audit import MIN_WINOGRAD_CHANNELS, is_winograd_conv
from litefocus.export.fold import static_shapes

# The transform-domain input V of one conv is (m+2)^2 / m^2 times its input (2.25x for F(4, 3)), and
# with its copies (ONNX Runtime's NCHWc reorder, the transpose) it is live about three times over:
# a conv whose V would exceed this is computed in row chunks. Measured on the 80 s UNet step (peak
# resident set; direct graph 1920 MB): unchunked 2484 MB, 64 MB chunks 1968 MB, 24 MB chunks 1894 MB,
# and the chunks cost no measurable time (paired A/B, bench/README.md).
CHUNK_BYTES = 24 << 20

# The finite interpolation points of F(m, 3) (the last point is infinity). For F(4, 3) the usual
# 0, +-1, +-2 give a max error of 4.3e-5 of the output's RMS per 256-channel conv in fp32;
# 0, +-1, 2, -1/2 give 1.8e-5 (Barabasz et al., "Error analysis and improving the accuracy of
# Winograd convolution for deep neural networks", 2020).
POINTS = {2: (0.0, 1.0, -1.0), 4: (0.0, 1.0, -1.0, 2.0, -0.5)}


def winograd_matrices(m: int, r: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B^T [a, a], G [a, r], A^T [m, a]) of F(m, r) by Toom-Cook on ``POINTS[m]``, float64, a = m + r - 1.

    A^T and G are Vandermonde rows of the points (G's scaled by 1 / prod(p_i - p_j)); B^T is the
    unique solution of the identity sum_x A^T[k, x] G[x, j] B^T[x, i] = [i == k + j] (correlation)."""
    if m not in POINTS:
        raise ValueError(f"Winograd tile {m}: only F({', '.join(map(str, POINTS))}, {r}) are implemented")
    pts = POINTS[m]
    a = m + r - 1
    at, g = np.zeros((m, a)), np.zeros((a, r))
    for i, p in enumerate(pts):
        at[:, i] = [p**k for k in range(m)]
        g[i] = [p**k for k in range(r)]
        g[i] /= np.prod([p - q for q in pts if q != p])
    at[m - 1, a - 1] = g[a - 1, r - 1] = 1.0  # the point at infinity
    eqs = np.zeros((m, r, a, a, a))  # equation [k, j, i] x unknowns B^T[x, i']
    rhs = np.zeros((m, r, a))
    for k in range(m):
        for j in range(r):
            rhs[k, j, k + j] = 1.0
            for i in range(a):
                eqs[k, j, i, :, i] = at[k] * g[:, j]
    sol = np.linalg.lstsq(eqs.reshape(-1, a * a), rhs.ravel(), rcond=None)[0]
    assert np.abs(eqs.reshape(-1, a * a) @ sol - rhs.ravel()).max() < 1e-9, "Toom-Cook system is singular"
    return sol.reshape(a, a), g, at


def tile_for(width: int) -> int:
    """F(4, 3) where the feature map is at least 4 wide, F(2, 3) below (no half-empty tiles)."""
    return 4 if width >= 4 else 2


@dataclass(frozen=True, eq=False)
class WinogradConv:
    """One 3x3 convolution (pad 1) to compute by F(m, 3): ``y = Conv(x, weight, bias)``.

    ``name`` prefixes the new nodes and initializers; ``x``, ``y`` and ``bias`` (None: no bias) are
    the graph's tensor names; ``shape`` is x's static shape [B, C, H, W]; ``weight`` the conv's
    [Co, C, 3, 3] array; ``m`` the output tile size (``tile_for``)."""

    name: str
    x: str
    y: str
    bias: str | None
    shape: tuple[int, ...]
    weight: np.ndarray
    m: int


def conv_nodes(
    conv: WinogradConv, shared: dict[str, onnx.TensorProto], chunk_bytes: int = 1 << 62
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers that compute ``conv`` by F(m, 3).

    The fixed transform filters are the same for every conv of one tile size (and output width):
    they go to ``shared`` once, under ``winograd/...`` names, not to the returned initializers."""
    name, x, y, bias, weight, m = conv.name, conv.x, conv.y, conv.bias, conv.weight, conv.m
    b, c, h, w = conv.shape
    co = weight.shape[0]
    bt, g, at = winograd_matrices(m)
    a = m + 2
    th, tw = -(-h // m), -(-w // m)
    dtype = weight.dtype

    def name_of(s: str) -> str:
        return f"{name}/winograd/{s}"

    def const(s: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name_of(s)))
        return name_of(s)

    def shared_const(s: str, make) -> str:
        key = f"winograd/F{m}/{s}"
        if key not in shared:
            shared[key] = numpy_helper.from_array(np.asarray(make()).astype(dtype), key)
        return key

    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def op(kind: str, inputs: list[str], s: str, **attrs) -> str:
        nodes.append(helper.make_node(kind, inputs, [name_of(s)], name=name_of(s), **attrs))
        return name_of(s)

    # V = B^T d B per tile, as a conv with a^2 fixed filters: filter (x, y) is the outer product of rows
    w_in = shared_const("w_in", lambda: np.einsum("xi,yj->xyij", bt, bt).reshape(a * a, 1, a, a))
    # y = A^T M A per tile, as a transposed conv over the a^2 transform-domain values of each channel
    w_out = shared_const(
        f"w_out_{co}",
        lambda: np.broadcast_to(np.einsum("px,qy->xypq", at, at), (co, a, a, m, m)).reshape(
            co * a * a, 1, m, m
        ),
    )

    # U = G w G^T per call from the weight (stored as [9, Co*C], the same bytes): [a^2, 9] x [9, Co*C]
    k = shared_const("k", lambda: np.einsum("xi,yj->xyij", g, g).reshape(a * a, 9))
    w_perm = weight.transpose(2, 3, 0, 1).reshape(9, co * c)
    u_flat = op("MatMul", [k, const("weight", w_perm)], "u_flat")
    u = op("Reshape", [u_flat, const("u_shape", np.array([a * a, co, c], np.int64))], "u")  # [a^2, Co, C]
    # tiles cover the padded map (extra rows/cols are zeros); in row chunks when the transform-domain
    # input V would exceed chunk_bytes (it is (m+2)^2 / m^2 times the input: 2.25x for F(4, 3))
    pads = [1, 1, th * m + 1 - h, tw * m + 1 - w]
    tile_row_bytes = b * c * a * a * tw * weight.itemsize
    n_chunks = min(th, max(1, -(-th * tile_row_bytes // chunk_bytes)))
    bounds = [th * i // n_chunks for i in range(n_chunks + 1)]
    pieces = [(x, th, [b * c, 1, h, w], pads)]
    if n_chunks > 1:  # each chunk's input rows with their 1-row halo (the conv pads the map's own edges)
        pieces = []
        for i, (t0, t1) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            r0, r1 = max(t0 * m - 1, 0), min(t1 * m + 1, h)  # padded rows t0*m .. t1*m+2, unpadded
            top, bottom = r0 - (t0 * m - 1), (t1 * m + 1) - r1
            rows = op(
                "Slice",
                [x, const(f"r0_{i}", np.array([r0], np.int64)), const(f"r1_{i}", np.array([r1], np.int64)),
                 const(f"ax_{i}", np.array([2], np.int64))],
                f"x_rows{i}",
            )  # fmt: skip
            planes = [b * c, 1, r1 - r0, w]
            pieces.append((rows, t1 - t0, planes, [top, pads[1], bottom, pads[3]]))
    tiles = []
    for i, (src, n, planes, conv_pads) in enumerate(pieces):
        p = n * tw
        x1 = op("Reshape", [src, const(f"s_in{i}", np.array(planes, np.int64))], f"x_planes{i}")
        v0 = op("Conv", [x1, w_in], f"v{i}", kernel_shape=[a, a], strides=[m, m], pads=conv_pads)
        v1 = op("Reshape", [v0, const(f"s_v{i}", np.array([b, c, a * a, p], np.int64))], f"v_flat{i}")
        v2 = op("Transpose", [v1], f"v_t{i}", perm=[0, 2, 1, 3])  # [B, a^2, C, P]
        m0 = op("MatMul", [u, v2], f"m{i}")  # [B, a^2, Co, P]
        m1 = op("Transpose", [m0], f"m_t{i}", perm=[0, 2, 1, 3])  # [B, Co, a^2, P]
        m2 = op("Reshape", [m1, const(f"s_m{i}", np.array([b, co * a * a, n, tw], np.int64))], f"m_tiles{i}")
        inputs = [m2, w_out] + ([bias] if bias else [])  # -> [B, Co, n*m, tw*m]
        tiles.append(op("ConvTranspose", inputs, f"y{i}", kernel_shape=[m, m], strides=[m, m], group=co))
    full = tiles[0] if len(tiles) == 1 else op("Concat", tiles, "y_rows", axis=2)
    if (th * m, tw * m) == (h, w):
        nodes.append(helper.make_node("Identity", [full], [y], name=name_of("y")))
    else:
        starts, ends = const("starts", np.array([0, 0], np.int64)), const("ends", np.array([h, w], np.int64))
        axes = const("axes", np.array([2, 3], np.int64))
        nodes.append(helper.make_node("Slice", [full, starts, ends, axes], [y], name=name_of("y")))
    return nodes, inits


def rewrite_convs(
    model: onnx.ModelProto, chunk_bytes: int = CHUNK_BYTES, min_channels: int = MIN_WINOGRAD_CHANNELS
) -> int:
    """Replace, in place, every 3x3 convolution of ``model`` (weights loaded) that ``is_winograd_conv``
    takes and whose input shape is static by its F(m, 3) form (``tile_for`` its width), in row chunks
    of at most ``chunk_bytes`` of transform-domain input. Returns how many were replaced."""
    shapes = static_shapes(model)
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    new_nodes, dropped, count, shared = [], set(), 0, {}
    for node in graph.node:
        wt = weights.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        shape = shapes.get(node.input[0]) if wt is not None else None
        if (
            wt is None
            or shape is None
            or len(shape) != 4
            or not is_winograd_conv(node, tuple(wt.dims), min_channels)
        ):
            new_nodes.append(node)
            continue
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        conv = WinogradConv(
            node.name or node.output[0],
            node.input[0],
            node.output[0],
            bias,
            tuple(shape),
            numpy_helper.to_array(wt),
            tile_for(shape[3]),
        )
        nodes, inits = conv_nodes(conv, shared, chunk_bytes)
        new_nodes.extend(nodes)
        graph.initializer.extend(inits)
        if uses[wt.name] == 1:
            dropped.add(wt.name)
        count += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    keep = [t for t in graph.initializer if t.name not in dropped] + list(shared.values())
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return count
