"""Winograd 3x3 convolutions (export/winograd.py): the transforms, the rewritten graph against a
float64 convolution, what is and is not rewritten, the audit, and the sessions that run them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from litefocus.engine.backends import disabled_optimizers, open_session
from litefocus.export.audit import AuditError, audit_graph
from litefocus.export.winograd import rewrite_convs, tile_for, winograd_matrices

CPU = ["CPUExecutionProvider"]
# max |winograd - float64| / rms(float64) per conv in fp32; direct convolution's own error is ~1e-6
BOUND = {2: 1e-5, 4: 6e-5}


@pytest.mark.parametrize("m", [2, 4])
def test_transforms_compute_a_3_tap_correlation_exactly(m):
    rng = np.random.default_rng(m)
    bt, g, at = winograd_matrices(m)
    a = m + 2
    d, w = rng.standard_normal((a, a)), rng.standard_normal((3, 3))
    y = at @ ((g @ w @ g.T) * (bt @ d @ bt.T)) @ at.T  # [m, m]
    ref = np.array([[np.sum(d[i : i + 3, j : j + 3] * w) for j in range(m)] for i in range(m)])
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-12)


def _conv_model(shape, co, stride=1, group=1, kernel=3, bias=True, seed=0):
    b, c, h, w = shape
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((co, c // group, kernel, kernel)) / np.sqrt(c * kernel * kernel)).astype(
        np.float32
    )
    inits = [numpy_helper.from_array(weight, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(co).astype(np.float32), "b"))
        inputs.append("b")
    pad = kernel // 2
    node = helper.make_node(
        "Conv", inputs, ["y"], name="conv", kernel_shape=[kernel, kernel], pads=[pad] * 4,
        strides=[stride, stride], group=group,
    )  # fmt: skip
    out = [b, co, (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1]
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), weight, inits


def _reference(x, weight, bias):
    """float64 3x3 convolution, padding 1: y[b, o, i, j] = sum_c,di,dj w[o, c, di, dj] x[b, c, i+di-1, j+dj-1]."""
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, w = x.shape[2:]
    y = sum(
        np.einsum("bchw,oc->bohw", xp[:, :, i : i + h, j : j + w], weight[:, :, i, j].astype(np.float64))
        for i in range(3)
        for j in range(3)
    )
    return y + (0.0 if bias is None else bias.astype(np.float64)[None, :, None, None])


def _run(model, tmp_path, x):
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    return open_session(path, CPU, "unet").run(None, {"x": x})[0]


@pytest.mark.parametrize(
    "shape, co, bias",
    [
        ((2, 8, 16, 16), 12, True),  # F(4, 3), whole tiles
        ((1, 5, 13, 6), 7, False),  # F(4, 3), partial tiles on both axes (the Slice), no bias
        ((2, 16, 10, 2), 16, True),  # 2 wide: F(2, 3)
        ((1, 3, 7, 3), 4, True),  # 3 wide: F(2, 3) with a partial tile
    ],
)
def test_rewritten_conv_matches_a_float64_conv(shape, co, bias, tmp_path):
    rng = np.random.default_rng(sum(shape) + co)
    model, weight, inits = _conv_model(shape, co, bias=bias, seed=co)
    assert rewrite_convs(model, min_channels=1) == 1
    onnx.checker.check_model(model, full_check=True)
    assert not [n for n in model.graph.node if n.op_type == "Conv" and n.name == "conv"]
    assert "w" not in {t.name for t in model.graph.initializer}  # replaced by its [9, Co*C] form
    x = rng.standard_normal(shape).astype(np.float32)
    ref = _reference(x, weight, numpy_helper.to_array(inits[1]) if bias else None)
    got = _run(model, tmp_path, x)
    assert got.shape == ref.shape
    err = np.abs(got - ref).max() / np.sqrt(np.mean(ref**2))
    assert err <= BOUND[tile_for(shape[3])], err
    assert err > 0  # a different computation, not the Conv node under another name


@pytest.mark.parametrize("shape, co", [((2, 4, 17, 8), 5), ((1, 5, 13, 6), 3), ((1, 3, 9, 3), 4)])
def test_row_chunks_compute_the_same_convolution(shape, co, tmp_path):
    """A conv whose transform-domain input exceeds chunk_bytes runs in row chunks (each with its
    1-row halo, the map's own edges padded by the conv): the same numbers as in one piece."""
    x = np.random.default_rng(co).standard_normal(shape).astype(np.float32)
    whole, _, _ = _conv_model(shape, co, seed=co)
    chunked, _, _ = _conv_model(shape, co, seed=co)
    rewrite_convs(whole, min_channels=1)
    rewrite_convs(chunked, chunk_bytes=1, min_channels=1)  # one tile row per chunk
    tile_rows = -(-shape[2] // tile_for(shape[3]))
    assert sum(n.op_type == "ConvTranspose" for n in whole.graph.node) == 1
    assert sum(n.op_type == "ConvTranspose" for n in chunked.graph.node) == tile_rows > 1
    np.testing.assert_allclose(_run(chunked, tmp_path, x), _run(whole, tmp_path, x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [{"stride": 2}, {"kernel": 1}, {"group": 2}],
    ids=["stride-2", "1x1", "grouped"],
)
def test_only_plain_3x3_convolutions_are_rewritten(kwargs, tmp_path):
    model, _, _ = _conv_model((1, 4, 8, 8), 6, **kwargs)
    before = model.SerializeToString()
    assert rewrite_convs(model, min_channels=1) == 0
    assert model.SerializeToString() == before


def test_audit_refuses_a_direct_3x3_conv_in_a_winograd_graph(tmp_path):
    model, _, _ = _conv_model((1, 32, 8, 8), 32)
    onnx.save(model, str(tmp_path / "direct.onnx"))
    assert audit_graph(tmp_path / "direct.onnx").direct_3x3_convs == 1
    with pytest.raises(AuditError, match="1 direct 3x3 convolution"):
        audit_graph(tmp_path / "direct.onnx", conv="winograd")
    rewrite_convs(model)
    onnx.save(model, str(tmp_path / "winograd.onnx"))
    report = audit_graph(tmp_path / "winograd.onnx", conv="winograd")
    assert report.direct_3x3_convs == 0 and report.to_dict()["conv_form"] == "winograd"


def test_few_channels_stay_direct():
    """Under MIN_WINOGRAD_CHANNELS in or out (the UNet's conv_in and conv_out) the transforms cost
    more than they save: left as Conv nodes, and the audit does not count them."""
    for c, co in ((8, 32), (32, 8)):
        model, _, _ = _conv_model((1, c, 8, 8), co)
        assert rewrite_convs(model) == 0
    model, _, _ = _conv_model((1, 32, 8, 8), 32)
    assert rewrite_convs(model) == 1


def test_constant_folding_is_off_only_where_it_would_store_every_transformed_weight():
    cuda = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    assert disabled_optimizers(CPU, "unet") == ["ConstantFolding"]
    assert disabled_optimizers(CPU, "decode") == disabled_optimizers(CPU, "conditioning") == []
    assert disabled_optimizers(cuda, "unet") == []


def test_the_benchmark_measures_each_conv_shape_of_a_graph(tmp_path):
    import json

    from litefocus.bench.probes import winograd as bench

    model, _, _ = _conv_model((1, 32, 9, 8), 32)
    model.graph.node.insert(
        0, helper.make_node("Constant", [], ["unused"], value_float=1.0)
    )  # a node without inputs
    onnx.save(model, str(tmp_path / "unet.onnx"))
    assert (
        bench.main([str(tmp_path / "unet.onnx"), "--repeats", "2", "--out", str(tmp_path / "out"), "-q"]) == 0
    )
    (path,) = (tmp_path / "out").glob("winograd-cpu-*.json")
    (row,) = json.loads(path.read_text())["rows"]
    assert (
        row["shape"] == [1, 32, 9, 8] and row["out_channels"] == 32 and row["convs"] == 1 and row["tile"] == 4
    )
    assert len(row["direct_ms_all"]) == len(row["winograd_ms_all"]) == 2 and row["speedup"] > 0
    assert 0 < row["max_err_rel_rms"] <= BOUND[4]
    rewrite_convs(model)  # nothing left to measure: one line, exit 2
    onnx.save(model, str(tmp_path / "done.onnx"))
    with pytest.raises(SystemExit) as e:
        bench.main([str(tmp_path / "done.onnx"), "-q"])
    assert e.value.code == 2


def test_unet_sessions_compute_the_transformed_weights_per_call_instead_of_storing_them(tmp_path):
    """ONNX Runtime's constant folding would turn each U = MatMul(K, weight) into a stored initializer
    (4x the weight for F(4, 3)); UNet sessions on the CPU keep the MatMul (the optimized graph shows it)."""
    from litefocus.engine.backends import session_options

    model, _, _ = _conv_model((1, 32, 8, 8), 32)
    rewrite_convs(model)
    onnx.save(model, str(tmp_path / "g.onnx"))

    def u_matmuls(module: str) -> int:
        options = session_options(CPU, module)
        options.optimized_model_filepath = str(tmp_path / f"{module}-optimized.onnx")
        open_session(tmp_path / "g.onnx", CPU, module, options)
        optimized = onnx.load(options.optimized_model_filepath)
        return sum(n.op_type == "MatMul" and "winograd/F4/k" in n.input for n in optimized.graph.node)

    assert u_matmuls("unet") == 1
    assert u_matmuls("conditioning") == 0  # folding on: U stored
