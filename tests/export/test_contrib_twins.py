"""The numpy twins of the contrib ops (export/reference_ops.py) against the plain subgraphs they replace.

Each case builds two ONNX models over the same weights: the single ``com.microsoft`` node, evaluated
by ``reference_session``, and the standard-op subgraph it stands for, run by ONNX Runtime's CPU EP.
They must agree to float32 precision. Each family also has a negative case: one detail of the plain
subgraph changed (groups, epsilon, kernel layout, bias, gate half, scale), which must give a large error.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from litefocus.engine.contract import CONTRIB_DOMAIN
from litefocus.export.reference_ops import reference_session

TOL, LARGE = 1e-5, 1e-2  # max |twin - plain| / RMS(plain): agreement, and what a wrong subgraph must exceed


def node(op, ins, outs, contrib=False, **attrs):
    return helper.make_node(op, ins, outs, domain=CONTRIB_DOMAIN if contrib else "", **attrs)


def make_model(nodes, feeds, outputs, inits=None):
    """One graph: ``feeds`` (name -> array) are its inputs, ``inits`` (name -> array) its initializers."""
    dtype = helper.np_dtype_to_tensor_dtype
    ins = [helper.make_tensor_value_info(k, dtype(v.dtype), v.shape) for k, v in feeds.items()]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    weights = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    opsets = [helper.make_opsetid("", 18)]
    if any(n.domain == CONTRIB_DOMAIN for n in nodes):
        opsets.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    graph = helper.make_graph(nodes, "g", ins, outs, weights)
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def rel_err(got, want) -> float:
    want = want.astype(np.float64)
    return float(np.abs(got.astype(np.float64) - want).max() / np.sqrt(np.mean(want**2)))


def ort_run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def twin_vs_plain(case) -> float:
    """Worst output's max |twin - plain| / RMS(plain); shapes and dtypes must match exactly."""
    contrib, plain, feeds = case
    twin, ref = reference_session(contrib).run(None, feeds), ort_run(plain, feeds)
    assert [(t.shape, t.dtype) for t in twin] == [(r.shape, r.dtype) for r in ref]
    return max(rel_err(t, r) for t, r in zip(twin, ref, strict=True))


def feature_map(rng, *shape):
    """float32, scaled and offset per channel (last axis), so that normalization has work to do."""
    return (2.5 * rng.standard_normal(shape) + 1.5 + 2.0 * rng.standard_normal(shape[-1])).astype(np.float32)


def affine(rng, c):  # gamma, beta: float32 [C]
    return (1.0 + 0.5 * rng.standard_normal(c)).astype(np.float32), rng.standard_normal(c).astype(np.float32)


def group_norm_plain(x, y, shape, groups, eps, silu, gamma, beta):
    """x: [B, H, W, C] -> NCHW -> [B, G, -1] -> InstanceNormalization -> NCHW -> affine (-> SiLU) -> NHWC."""
    b, h, w, c = shape
    nodes = [
        node("Transpose", [x], ["gn_nchw"], perm=[0, 3, 1, 2]),  # [B, C, H, W]
        node("Reshape", ["gn_nchw", "gn_gshape"], ["gn_g"]),  # [B, G, C / G * H * W]
        node("InstanceNormalization", ["gn_g", "gn_ones", "gn_zeros"], ["gn_n"], epsilon=eps),
        node("Reshape", ["gn_n", "gn_shape"], ["gn_r"]),  # [B, C, H, W]
        node("Mul", ["gn_r", "gn_gamma"], ["gn_m"]),
        node("Add", ["gn_m", "gn_beta"], ["gn_a"]),
    ]
    if silu:
        nodes += [node("Sigmoid", ["gn_a"], ["gn_sig"]), node("Mul", ["gn_a", "gn_sig"], ["gn_silu"])]
    nodes.append(node("Transpose", ["gn_silu" if silu else "gn_a"], [y], perm=[0, 2, 3, 1]))  # [B, H, W, C]
    inits = {
        "gn_gshape": np.array([b, groups, -1], np.int64),
        "gn_ones": np.ones(groups, np.float32),
        "gn_zeros": np.zeros(groups, np.float32),
        "gn_shape": np.array([b, c, h, w], np.int64),
        "gn_gamma": gamma.reshape(c, 1, 1),
        "gn_beta": beta.reshape(c, 1, 1),
    }
    return nodes, inits


def group_norm_case(shape, groups, silu, eps=1e-5, wrong_groups=None, wrong_eps=None):
    rng = np.random.default_rng(0)
    feeds = {"x": feature_map(rng, *shape)}  # x: [B, H, W, C]
    gamma, beta = affine(rng, shape[-1])
    attrs = {"activation": int(silu), "channels_last": 1, "epsilon": eps, "groups": groups}
    op = node("GroupNorm", ["x", "gamma", "beta"], ["y"], contrib=True, **attrs)
    contrib = make_model([op], feeds, ["y"], {"gamma": gamma, "beta": beta})
    plain_groups, plain_eps = wrong_groups or groups, wrong_eps or eps
    nodes, inits = group_norm_plain("x", "y", shape, plain_groups, plain_eps, silu, gamma, beta)
    return contrib, make_model(nodes, feeds, ["y"], inits), feeds


def skip_group_norm_case(shape, groups, silu, skip_full, with_bias, drop_bias=False):
    rng = np.random.default_rng(1)
    b, _, _, c = shape
    feeds = {"x": feature_map(rng, *shape), "skip": feature_map(rng, *(shape if skip_full else (b, 1, 1, c)))}
    gamma, beta = affine(rng, c)
    bias = (2.0 * rng.standard_normal(c)).astype(np.float32)  # [C]
    weights = {"gamma": gamma, "beta": beta} | ({"bias": bias} if with_bias else {})
    attrs = {"activation": int(silu), "channels_last": 1, "epsilon": 1e-5, "groups": groups}
    ins = ["x", "gamma", "beta", "skip"] + ["bias"] * with_bias
    contrib = make_model([node("SkipGroupNorm", ins, ["y", "s"], True, **attrs)], feeds, ["y", "s"], weights)
    keep_bias = with_bias and not drop_bias
    add_bias = node("Add", ["xs", "bias"], ["s"]) if keep_bias else node("Identity", ["xs"], ["s"])
    nodes, inits = group_norm_plain("s", "y", shape, groups, 1e-5, silu, gamma, beta)
    nodes = [node("Add", ["x", "skip"], ["xs"]), add_bias, *nodes]  # s = x + skip (+ bias)
    return contrib, make_model(nodes, feeds, ["y", "s"], inits | ({"bias": bias} if keep_bias else {})), feeds


def nhwc_conv_case(hw, c, m, k, stride, pad, with_bias, group=1, wrong_perm=None):
    rng = np.random.default_rng(2)
    feeds = {"x": feature_map(rng, 2, *hw, c)}  # x: [B, H, W, C]
    w = (rng.standard_normal((m, k, k, c // group)) / k).astype(np.float32)  # [M, kH, kW, C / group]
    bias = rng.standard_normal(m).astype(np.float32)  # [M]
    attrs = dict(kernel_shape=[k, k], pads=[pad] * 4, strides=[stride] * 2, dilations=[1, 1], group=group)
    b_in, b_init = (["b"], {"b": bias}) if with_bias else ([], {})
    op = node("NhwcConv", ["x", "w", *b_in], ["y"], True, **attrs)
    contrib = make_model([op], feeds, ["y"], {"w": w} | b_init)
    nodes = [
        node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]),  # [B, C, H, W]
        node("Conv", ["x_nchw", "w_nchw", *b_in], ["y_nchw"], **attrs),  # [B, M, H', W']
        node("Transpose", ["y_nchw"], ["y"], perm=[0, 2, 3, 1]),  # [B, H', W', M]
    ]
    w_nchw = w.transpose(wrong_perm or (0, 3, 1, 2))  # [M, C / group, kH, kW]
    return contrib, make_model(nodes, feeds, ["y"], {"w_nchw": w_nchw} | b_init), feeds


def bias_split_gelu_case(b, n, d, gate_first=False):
    rng = np.random.default_rng(3)
    feeds = {"x": (2.0 * rng.standard_normal((b, n, 2 * d)) + 0.5).astype(np.float32)}  # x: [B, N, 2D]
    bias = rng.standard_normal(2 * d).astype(np.float32)  # [2D]
    contrib = make_model([node("BiasSplitGelu", ["x", "bias"], ["y"], True)], feeds, ["y"], {"bias": bias})
    h, g = ("g", "h") if gate_first else ("h", "g")  # [B, N, D] each
    nodes = [
        node("Add", ["x", "bias"], ["s"]),
        node("Split", ["s"], [h, g], axis=-1, num_outputs=2),
        node("Div", ["g", "sqrt2"], ["g_scaled"]),
        node("Erf", ["g_scaled"], ["erf"]),
        node("Add", ["erf", "one"], ["erf1"]),
        node("Mul", ["g", "erf1"], ["g_erf1"]),
        node("Mul", ["g_erf1", "half"], ["gelu"]),  # erf GELU of the second half
        node("Mul", ["h", "gelu"], ["y"]),
    ]
    consts = {"sqrt2": np.float32(np.sqrt(2.0)), "one": np.float32(1.0), "half": np.float32(0.5)}
    return contrib, make_model(nodes, feeds, ["y"], {"bias": bias} | consts), feeds


def mha_case(lq, lk, heads, d, scale=None, wrong_scale=None):
    rng = np.random.default_rng(4)
    q = (1.5 * rng.standard_normal((2, lq, heads * d))).astype(np.float32)  # q: [B, Lq, M*D]
    k, v = (rng.standard_normal((2, 2, lk, heads * d)) + 0.3).astype(np.float32)  # k, v: [B, Lk, M*D]
    feeds = {"q": q, "k": k, "v": v}
    attrs = {"num_heads": heads} | ({} if scale is None else {"scale": scale})
    contrib = make_model([node("MultiHeadAttention", ["q", "k", "v"], ["y"], True, **attrs)], feeds, ["y"])
    nodes = [
        node("Reshape", ["q", "split_heads"], ["q4"]),
        node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),  # [B, M, Lq, D]
        node("Reshape", ["k", "split_heads"], ["k4"]),
        node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),  # [B, M, D, Lk]
        node("Reshape", ["v", "split_heads"], ["v4"]),
        node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),  # [B, M, Lk, D]
        node("MatMul", ["qh", "kt"], ["logits"]),  # [B, M, Lq, Lk]
        node("Mul", ["logits", "scale"], ["scaled"]),
        node("Softmax", ["scaled"], ["p"], axis=-1),
        node("MatMul", ["p", "vh"], ["o"]),  # [B, M, Lq, D]
        node("Transpose", ["o"], ["o2"], perm=[0, 2, 1, 3]),  # [B, Lq, M, D]
        node("Reshape", ["o2", "merge_heads"], ["y"]),  # [B, Lq, M*D]
    ]
    shapes = {"split_heads": np.array([2, -1, heads, d]), "merge_heads": np.array([2, lq, heads * d])}
    inits = shapes | {"scale": np.float32(wrong_scale or scale or d**-0.5)}
    return contrib, make_model(nodes, feeds, ["y"], inits), feeds


def mha_packed_case(packed, lq, lk, heads, d, mask=False, wrong_fill=None):
    """Packed QKV ([B, L, M, 3, D] as the query) or a packed KV ([B, Lk, M, 2, D] as the key),
    optionally with a key padding mask [B, Lk]; the plain subgraph unpacks with Gathers."""
    rng = np.random.default_rng(5)
    if packed == "qkv":
        feeds = {"qkv": (1.3 * rng.standard_normal((2, lq, heads, 3, d))).astype(np.float32)}
        ins, unpack = ["qkv"], [node("Gather", ["qkv", f"i{i}"], [x], axis=3) for i, x in enumerate("qkv")]
    else:
        feeds = {
            "q": (1.3 * rng.standard_normal((2, lq, heads * d))).astype(np.float32),  # q: [B, Lq, M*D]
            "kv": (rng.standard_normal((2, lk, heads, 2, d)) + 0.3).astype(
                np.float32
            ),  # kv: [B, Lk, M, 2, D]
        }
        ins = ["q", "kv"]
        unpack = [node("Reshape", ["q", "split_heads"], ["q_"]), node("Identity", ["q_"], ["q4"])]
        unpack += [node("Gather", ["kv", f"i{i}"], [x], axis=3) for i, x in enumerate("kv")]
    attrs = {"num_heads": heads}
    if mask:
        keep = np.ones((2, lk), np.int32)
        keep[0, lk // 2 :] = 0  # one padded row
        feeds["mask"] = keep
        ins = ins + [""] * (4 - len(ins)) + ["mask"]
    contrib = make_model([node("MultiHeadAttention", ins, ["y"], True, **attrs)], feeds, ["y"])
    q4 = "q" if packed == "qkv" else "q4"  # [B, Lq, M, D]
    nodes = [
        *unpack,
        node("Transpose", [q4], ["qh"], perm=[0, 2, 1, 3]),  # [B, M, Lq, D]
        node("Transpose", ["k"], ["kt"], perm=[0, 2, 3, 1]),  # [B, M, D, Lk]
        node("Transpose", ["v"], ["vh"], perm=[0, 2, 1, 3]),  # [B, M, Lk, D]
        node("MatMul", ["qh", "kt"], ["logits"]),  # [B, M, Lq, Lk]
        node("Mul", ["logits", "scale"], ["scaled"]),
    ]
    if mask:  # + (1 - mask) * fill at the dropped keys: [B, 1, 1, Lk]
        nodes += [
            node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
            node("Sub", ["one", "maskf"], ["dropped"]),
            node("Mul", ["dropped", "fill"], ["bias2"]),
            node("Unsqueeze", ["bias2", "axes12"], ["bias"]),
            node("Add", ["scaled", "bias"], ["masked"]),
        ]
    nodes += [
        node("Softmax", ["masked" if mask else "scaled"], ["p"], axis=-1),
        node("MatMul", ["p", "vh"], ["o"]),  # [B, M, Lq, D]
        node("Transpose", ["o"], ["o2"], perm=[0, 2, 1, 3]),  # [B, Lq, M, D]
        node("Reshape", ["o2", "merge_heads"], ["y"]),  # [B, Lq, M*D]
    ]
    inits = {f"i{i}": np.int64(i) for i in range(3)} | {
        "split_heads": np.array([2, -1, heads, d]),
        "merge_heads": np.array([2, lq, heads * d]),
        "scale": np.float32(d**-0.5),
        "one": np.float32(1.0),
        "fill": np.float32(wrong_fill or -10000.0),
        "axes12": np.array([1, 2]),
    }
    return contrib, make_model(nodes, feeds, ["y"], inits), feeds


CASES = {
    "group_norm-plain-4ch_per_group": lambda: group_norm_case((2, 5, 3, 12), groups=3, silu=False),
    "group_norm-silu-4ch_per_group": lambda: group_norm_case((1, 4, 6, 16), groups=4, silu=True),
    "group_norm-silu-eps1e-6": lambda: group_norm_case((2, 3, 7, 8), groups=2, silu=True, eps=1e-6),
    "skip_group_norm-skip_b11c-bias": lambda: skip_group_norm_case((2, 5, 3, 12), 3, True, False, True),
    "skip_group_norm-full_skip-bias": lambda: skip_group_norm_case((1, 4, 6, 8), 2, False, True, True),
    "skip_group_norm-full_skip-no_bias": lambda: skip_group_norm_case((2, 3, 5, 8), 4, True, True, False),
    "nhwc_conv-3x3-s1-p1-bias": lambda: nhwc_conv_case((7, 5), 4, 6, 3, 1, 1, True),
    "nhwc_conv-3x3-s2-p1-bias": lambda: nhwc_conv_case((7, 5), 4, 6, 3, 2, 1, True),
    "nhwc_conv-3x3-s1-p1-no_bias": lambda: nhwc_conv_case((5, 8), 4, 6, 3, 1, 1, False),
    "nhwc_conv-1x1-no_bias": lambda: nhwc_conv_case((6, 6), 8, 5, 1, 1, 0, False),
    "nhwc_conv-1x1-bias": lambda: nhwc_conv_case((3, 5), 8, 4, 1, 1, 0, True),
    "nhwc_conv-3x3-group2": lambda: nhwc_conv_case((6, 5), 4, 6, 3, 1, 1, True, group=2),
    "bias_split_gelu-d8": lambda: bias_split_gelu_case(2, 5, 8),
    "bias_split_gelu-d16": lambda: bias_split_gelu_case(1, 7, 16),
    "mha-lq_ne_lk-scale": lambda: mha_case(5, 7, heads=2, d=4, scale=0.3),
    "mha-default_scale": lambda: mha_case(6, 6, heads=4, d=8),
    "mha-lq_ne_lk-default_scale": lambda: mha_case(3, 9, heads=1, d=16),
    "mha-packed_qkv": lambda: mha_packed_case("qkv", 6, 6, heads=3, d=4),
    "mha-packed_kv": lambda: mha_packed_case("kv", 5, 9, heads=2, d=8),
    "mha-packed_kv-key_padding_mask": lambda: mha_packed_case("kv", 5, 9, heads=2, d=8, mask=True),
}

# The same builders with one detail of the plain subgraph wrong: the comparison must catch each.
WRONG = {
    "group_norm-groups": lambda: group_norm_case((2, 5, 3, 12), groups=3, silu=False, wrong_groups=6),
    "group_norm-epsilon": lambda: group_norm_case((1, 4, 6, 16), groups=4, silu=True, wrong_eps=1.0),
    "skip_group_norm-bias": lambda: skip_group_norm_case((2, 5, 3, 12), 3, True, False, True, drop_bias=True),
    "nhwc_conv-kernel_hw": lambda: nhwc_conv_case((7, 5), 4, 6, 3, 1, 1, True, wrong_perm=(0, 3, 2, 1)),
    "bias_split_gelu-gate_first": lambda: bias_split_gelu_case(2, 5, 8, gate_first=True),
    "mha-scale": lambda: mha_case(5, 7, heads=2, d=4, scale=0.3, wrong_scale=0.5),
    "mha-mask_ignored": lambda: mha_packed_case("kv", 5, 9, heads=2, d=8, mask=True, wrong_fill=-1e-3),
}


@pytest.mark.parametrize("name", CASES)
def test_twin_matches_plain_subgraph(name):
    assert twin_vs_plain(CASES[name]()) < TOL


@pytest.mark.parametrize("name", WRONG)
def test_wrong_plain_subgraph_is_caught(name):
    assert twin_vs_plain(WRONG[name]()) > LARGE


def gather_case(shape, axis, n_idx):
    """data: ``shape`` (>= 64 along ``axis``); indices: ``n_idx`` along ``axis``, half of them negative."""
    rng = np.random.default_rng(5)
    data = rng.standard_normal(shape).astype(np.float32)
    n, idx_shape = shape[axis], list(shape)
    idx_shape[axis] = n_idx
    feeds = {"data": data, "idx": rng.integers(-n, n, idx_shape).astype(np.int64)}
    model = make_model([node("GatherElements", ["data", "idx"], ["y"], axis=axis)], feeds, ["y"])
    return model, feeds, np.take_along_axis(data, feeds["idx"] % n, axis)


# (data shape, axis, indices along the axis): the axis holds 64 or more elements
GATHERS = [((5, 64), 1, 64), ((3, 100), 1, 150), ((80, 4), 0, 30), ((2, 70, 3), -2, 90)]


@pytest.mark.parametrize(("shape", "axis", "n_idx"), GATHERS)
def test_gather_elements_override(shape, axis, n_idx):
    model, feeds, want = gather_case(shape, axis, n_idx)
    np.testing.assert_array_equal(reference_session(model).run(None, feeds)[0], want)
    np.testing.assert_array_equal(ort_run(model, feeds)[0], want)


@pytest.mark.parametrize(("shape", "axis", "n_idx"), GATHERS)
def test_stock_gather_elements_fails_from_64(shape, axis, n_idx):
    """Why the override exists: stock onnx.reference gathers through np.choose (<= 63 choices)."""
    model, feeds, want = gather_case(shape, axis, n_idx)
    try:
        got = ReferenceEvaluator(model).run(None, feeds)[0]
    except (ValueError, IndexError):  # np.choose's limit (63 choices), or onnx's broken 2-D fallback
        return
    assert got.shape != want.shape or not np.array_equal(got, want)
