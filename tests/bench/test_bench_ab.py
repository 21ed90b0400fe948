"""litefocus.bench.probes.ab: interleaved A/B of ONNX Runtime sessions (tiny graphs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

from litefocus.bench.probes import ab

N = 256  # big enough that a MatMul takes measurable microseconds


def _graph(path, scale: float = 1.0, input_name: str = "sample"):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((N, N)) * scale).astype(np.float32), "w")
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [N, N])
    mask = helper.make_tensor_value_info("encoder_attention_mask_1", TensorProto.INT32, [2, 4])
    y = helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, [N, N])
    nodes = [helper.make_node("MatMul", [input_name, "w"], ["noise_pred"])]
    graph = helper.make_graph(nodes, "g", [x, mask], [y], [w])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_ab_interleaves_setups_and_records_paired_differences(tmp_path):
    a, b = _graph(tmp_path / "a.onnx"), _graph(tmp_path / "b.onnx", scale=2.0)
    out = tmp_path / "results"
    argv = [
        f"before={a}@defaults",
        f"after={a}@unet",
        f"other={b}@decode",
        "--rounds",
        "3",
        "--out",
        str(out),
        "-q",
    ]
    assert ab.main(argv) == 0
    (path,) = out.glob("ab-cpu-*.json")
    record = json.loads(path.read_text())
    assert record["benchmark"] == "ab" and record["rounds"] == 3
    rows = {r["label"]: r for r in record["rows"]}
    assert list(rows) == ["before", "after", "other"]
    for r in rows.values():
        assert len(r["times_s"]) == 3 and len(r["paired_diff_vs_before_s"]) == 3
        assert r["median_s"] > 0
    assert rows["before"]["paired_diff_vs_before_s"] == [0, 0, 0]
    assert rows["after"]["max_abs_diff_vs_before"] == 0  # same graph, other session options
    assert rows["other"]["max_abs_diff_vs_before"] > 0  # another graph: the record shows it
    assert rows["after"]["graph_sha256"] == rows["before"]["graph_sha256"] != rows["other"]["graph_sha256"]


@pytest.mark.parametrize(
    "arg, message",
    [
        ("nolabel.onnx@unet", "expected LABEL=GRAPH.onnx@SETUP"),
        ("x={graph}@fast", "setup 'fast' is not one of"),
        ("x={missing}@unet", "is not a file"),
    ],
)
def test_ab_rejects_bad_arguments_in_one_line(tmp_path, capsys, arg, message):
    graph = _graph(tmp_path / "a.onnx")
    bad = arg.format(graph=graph, missing=tmp_path / "missing.onnx")
    with pytest.raises(SystemExit) as exc:
        ab.main([bad, f"y={graph}@unet", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_ab_refuses_graphs_with_different_inputs(tmp_path, capsys):
    a, b = _graph(tmp_path / "a.onnx"), _graph(tmp_path / "b.onnx", input_name="latent")
    with pytest.raises(SystemExit) as exc:
        ab.main([f"a={a}@unet", f"b={b}@unet", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "A/B needs the same inputs" in capsys.readouterr().err


def test_ort_profile_counts_ops_flops_and_prefixes(tmp_path):
    from litefocus.bench.probes import ort_profile

    graph = _graph(tmp_path / "a.onnx")
    out = tmp_path / "results"
    assert (
        ort_profile.main([str(graph), "--setup", "unet", "--prefix", "", "nothing", "--out", str(out), "-q"])
        == 0
    )
    (path,) = out.glob("ort-profile-cpu-*.json")
    record = json.loads(path.read_text())
    (matmul,) = [r for r in record["ops"] if r["op"] == "MatMul"]
    assert matmul["nodes"] == 1 and matmul["gflop"] == round(2 * N**3 / 1e9, 6) > 0
    assert matmul["gflop_per_s"] > 0
    assert record["prefix_seconds"][""] == record["kernel_seconds"] > 0  # every node starts with ""
    assert record["prefix_seconds"]["nothing"] == 0
    (shape,) = [r for r in record["shapes"] if r["shape"].startswith("MatMul ")]
    assert shape["nodes"] == 1 and shape["gflop"] == matmul["gflop"] and f"[{N}, {N}]" in shape["shape"]


def test_node_flops_from_recorded_shapes():
    from litefocus.bench.probes.ort_profile import node_flops

    assert (
        node_flops("Conv", [[2, 8, 10, 4], [16, 8, 3, 3], [16]], [2, 16, 10, 4]) == 2 * (2 * 16 * 10 * 4) * 72
    )
    assert node_flops("Gemm", [[100, 32], [64]], [100, 64]) == 2 * 100 * 64 * 32
    assert (
        node_flops("MultiHeadAttention", [[2, 10, 64], [2, 30, 64], [2, 30, 64]], [2, 10, 64])
        == 4 * 2 * 10 * 30 * 64
    )
    assert node_flops("Add", [[2, 3], [2, 3]], [2, 3]) == 0


def test_a_graph_onnx_runtime_cannot_load_exits_2_in_one_line(tmp_path, capsys):
    from litefocus.bench.probes import ort_profile

    good, bad = _graph(tmp_path / "a.onnx"), tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(SystemExit) as exc:
        ab.main([f"a={good}@unet", f"b={bad}@unet", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "bad.onnx: ONNX Runtime cannot load it" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        ort_profile.main([str(bad), "--out", str(tmp_path)])
    assert exc.value.code == 2 and "bad.onnx: ONNX Runtime cannot load it" in capsys.readouterr().err
