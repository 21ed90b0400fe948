"""The GPU graph form (ONNX Runtime CUDA contrib ops, channels-last) checked on a CPU.

Its contrib ops have no CPU kernels, so the tiny graphs run through ``onnx.reference`` with the
numpy twins of ``export/reference_ops.py`` (each twin is tested against the plain subgraph it
replaces in ``test_contrib_twins.py``) and are compared with the original PyTorch modules.
"""

import collections

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import litefocus
from litefocus.buckets import Bucket
from litefocus.engine.contract import GPU_OPS, DecodeContract
from litefocus.export import gpu_form as gf
from litefocus.export.audit import AuditError, audit_graph
from litefocus.export.decode import DecodeModule
from litefocus.export.fused import fused_attention
from litefocus.export.geglu import split_geglu
from litefocus.export.gpu_form import resolve_gpu_ops
from litefocus.export.group_norm import precise_group_norm
from litefocus.export.layout import cancel_transposes, layout_transposes, transpose_pairs
from litefocus.export.onnx_export import UNetExportModule, export_onnx, unet_contract_for
from litefocus.export.reference_ops import reference_session
from tiny_models import make_tiny_unet, make_tiny_vae, make_tiny_vocoder

TINY_WIDTHS = (64, 128, 256, 5120)  # the tiny model's GEGLU projections, and the real 640-level one


@pytest.fixture
def tiny_widths(monkeypatch):
    """BiasSplitGelu's kernel takes widths from 2560 up; let the tiny model's GEGLUs (64-256) qualify too."""
    monkeypatch.setattr(gf, "BIAS_SPLIT_GELU_WIDTHS", TINY_WIDTHS)


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    """form(ops) -> (module, contract, graph): the tiny UNet exported in that GPU form, once per module."""
    cache = {}

    def form(ops):
        if ops not in cache:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(gf, "BIAS_SPLIT_GELU_WIDTHS", TINY_WIDTHS)
                module, contract = _unet()
                graph = _export(module, contract, tmp_path_factory.mktemp("form") / "unet.onnx", ops)
            cache[ops] = module, contract, graph
        return cache[ops]

    return form


def _unet(precision: str = "fp32"):
    unet = make_tiny_unet()
    if precision == "fp16":
        unet = unet.half()
    config = litefocus.LiteFocusConfig()
    handle = litefocus.install(unet, config)
    contract = unet_contract_for(
        unet, Bucket.for_seconds(5), config, batch=2, text_len=16, precision=precision
    )
    return UNetExportModule(unet, contract, handle).eval(), contract


def _litefocus_levels(contract):
    """The audit's expectation at the LiteFocus level: 20 attentions of [T, T + S], no [N, N]."""
    from litefocus.export.stages import attention_expectations

    return attention_expectations(contract.bucket, contract.litefocus, [8] * 20)


def _export(module, contract, path, ops):
    """As the exporter traces a module (stages.export_module): the GPU form first."""
    with (
        gf.gpu_form(module, ops=ops),
        fused_attention(module),
        split_geglu(module),
        precise_group_norm(module),
    ):
        graph, _ = export_onnx(module, contract, path, channels_last="nhwc" in ops)
    return graph


def _ops(graph) -> collections.Counter:
    model = onnx.load(str(graph), load_external_data=False)
    return collections.Counter(n.op_type for n in model.graph.node if n.domain == "com.microsoft")


def _rel(got, want) -> float:
    return float(np.abs(got - want).max() / np.sqrt(np.mean(want.astype(np.float64) ** 2)))


@pytest.mark.parametrize(
    "ops",
    [GPU_OPS, ("nhwc",), ("packed_attention",)],
    ids=["all", "nhwc", "packed"],
)
def test_tiny_unet_gpu_form_matches_pytorch(ops, forms, tiny_widths):
    module, contract, graph = forms(ops)
    inputs = contract.sample_inputs(3)
    with torch.no_grad():
        want = module(*(inputs[n] for n in contract.input_names)).numpy()
    counts = _ops(graph)
    # 64 self-attentions, and the 32 cross-attentions fused when packed; the LiteFocus levels stay audited
    assert counts["MultiHeadAttention"] == 64 + (32 if "packed_attention" in ops else 0)
    assert (counts["NhwcConv"] > 0) == ("nhwc" in ops) and (counts["GroupNorm"] > 0) == ("nhwc" in ops)
    assert (counts["SkipGroupNorm"] > 0) == ("skip_group_norm" in ops)
    assert (counts["BiasSplitGelu"] > 0) == ("bias_split_gelu" in ops)
    report = audit_graph(graph, _litefocus_levels(contract), "fused", "direct", gpu_ops=ops)
    if "nhwc" in ops:
        assert report.layout_transposes == 2  # the NCHW latent in and the noise prediction out, nothing else
    (got,) = reference_session(graph).run(None, {n: inputs[n].numpy() for n in contract.input_names})
    assert _rel(got, want) < 1e-4
    other = contract.sample_inputs(4)  # the graph reads its inputs: other latents, another output
    (moved,) = reference_session(graph).run(None, {n: other[n].numpy() for n in contract.input_names})
    assert _rel(moved, want) > 1e-2


def test_fp16_gpu_form_stays_fp16_and_matches_pytorch(tiny_widths, tmp_path):
    """What the GPU runs: fp16 maps throughout (GroupNorm's gamma and beta are fp32 by the op's
    definition), within the fp16 tolerance of PyTorch's own fp16 module."""
    module, contract = _unet("fp16")
    inputs = contract.sample_inputs(3)
    with torch.no_grad():
        want = module(*(inputs[n] for n in contract.input_names)).float().numpy()
    graph = _export(module, contract, tmp_path / "unet.onnx", GPU_OPS)
    model = onnx.load(str(graph), load_external_data=True)
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(graph), load_external_data=False)).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.value_info, *inferred.input)}
    contrib = [n for n in model.graph.node if n.domain == "com.microsoft"]
    assert (
        {types[n.input[0]] for n in contrib} == {types[n.output[0]] for n in contrib} == {TensorProto.FLOAT16}
    )
    norms = [n for n in model.graph.node if n.op_type in ("GroupNorm", "SkipGroupNorm")]
    types.update({i.name: i.data_type for i in model.graph.initializer})
    assert {types[n.input[1]] for n in norms} == {types[n.input[2]] for n in norms} == {TensorProto.FLOAT}
    (got,) = reference_session(model).run(None, {n: inputs[n].numpy() for n in contract.input_names})
    assert got.dtype == np.float16
    assert _rel(got.astype(np.float32), want) < contract.tolerance


def test_tiny_decode_gpu_form_matches_pytorch(tmp_path):
    contract = DecodeContract(Bucket.for_seconds(0.5))
    module = DecodeModule.for_contract(make_tiny_vae(), make_tiny_vocoder(), contract).eval()
    latent = contract.sample_inputs(2)["latent"]
    with torch.no_grad():
        want = module(latent).numpy()
    graph = _export(module, contract, tmp_path / "decode.onnx", GPU_OPS)
    counts = _ops(graph)
    assert counts["NhwcConv"] > 0 and counts["GroupNorm"] > 0 and counts["MultiHeadAttention"] == 1
    report = audit_graph(graph, (), "fused", "direct", gpu_ops=GPU_OPS)
    assert report.layout_transposes <= 3  # latent in, around the VAE's token attention, mel out
    (got,) = reference_session(graph).run(None, {"latent": latent.numpy()})
    assert _rel(got, want) < 1e-4


def test_swapped_modules_compute_what_the_originals_do(tiny_widths):
    module, contract = _unet()
    inputs = [contract.sample_inputs(5)[n] for n in contract.input_names]
    with torch.no_grad():
        want = module(*inputs)
        with gf.gpu_form(module):
            got = module(*inputs)
        again = module(*inputs)  # every module put back
    assert torch.equal(again, want)
    assert (got - want).abs().max() / want.pow(2).mean().sqrt() < 1e-5
    assert not any(isinstance(m, gf._Opaque) for m in module.modules())


def test_audit_knows_the_gpu_form(forms, tiny_engines, tiny_widths, monkeypatch):
    _, _, graph = forms(GPU_OPS)
    with pytest.raises(AuditError, match="com.microsoft.NhwcConv is not supported"):
        audit_graph(graph, (), "fused", "direct", gpu_ops=())
    monkeypatch.setattr(gf, "BIAS_SPLIT_GELU_WIDTHS", (2560, 5120, 10240))  # the real kernel's widths
    with pytest.raises(AuditError, match=r"BiasSplitGelu input width not in \(2560, 5120, 10240\)"):
        audit_graph(graph, (), "fused", "direct", gpu_ops=GPU_OPS)
    plain = next(tiny_engines.glob("*/unet.onnx"))  # the CPU form
    with pytest.raises(AuditError, match="NCHW 2-D Conv node"):
        audit_graph(plain, (), "fused", "direct", gpu_ops=("nhwc",))


def _value(name, dims):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def test_layout_pass_cancels_pairs_through_add_and_concat():
    # a, b: [1, 4, 3, 5] NHWC maps leaving two blocks; Add and Concat between; the next block re-enters NHWC
    nodes = [
        helper.make_node("Transpose", ["a"], ["a_c"], perm=[0, 3, 1, 2]),
        helper.make_node("Transpose", ["b"], ["b_c"], perm=[0, 3, 1, 2]),
        helper.make_node("Add", ["a_c", "b_c"], ["s"]),
        helper.make_node("Mul", ["s", "half"], ["h"]),
        helper.make_node("Concat", ["h", "a_c"], ["cat"], axis=1),
        helper.make_node("Transpose", ["cat"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Relu", ["nhwc"], ["y"]),
    ]
    half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
    graph = helper.make_graph(nodes, "g", [_value("a", [1, 4, 3, 5]), _value("b", [1, 4, 3, 5])],
                              [_value("y", [1, 4, 3, 10])], [half])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal((1, 4, 3, 5)).astype(np.float32) for k in "ab"}
    want = reference_session(model).run(None, feeds)[0]
    assert cancel_transposes(model) == 3
    assert transpose_pairs(model.graph) == 0 and not any(n.op_type == "Transpose" for n in model.graph.node)
    np.testing.assert_allclose(reference_session(model).run(None, feeds)[0], want, rtol=1e-6)
    assert layout_transposes(model.graph) == 0


def test_gpu_ops_words_parse_or_name_the_fix():
    assert gf.parse_gpu_ops(["auto"]) == "auto" and gf.parse_gpu_ops(["none"]) == "none"
    assert gf.parse_gpu_ops(["packed_attention", "nhwc"]) == ("nhwc", "packed_attention")
    with pytest.raises(ValueError, match="auto and none stand alone"):
        gf.parse_gpu_ops(["auto", "nhwc"])
    with pytest.raises(ValueError, match="unknown GPU graph op"):
        gf.parse_gpu_ops(["nhwc", "winograd"])


def test_gpu_ops_are_resolved_once_with_one_line_errors():
    assert resolve_gpu_ops("auto", "onnx", "cpu", "winograd") == ()
    assert resolve_gpu_ops("auto", "onnx", "cuda:0", "direct") == gf.AUTO_GPU_OPS
    assert resolve_gpu_ops("auto", "tensorrt", "cuda", "direct") == ()
    assert resolve_gpu_ops(("bias_split_gelu", "nhwc"), "onnx", "cuda", "direct") == (
        "nhwc",
        "bias_split_gelu",
    )
    with pytest.raises(ValueError, match="run only on ONNX Runtime's CUDA EP.*--device cuda"):
        resolve_gpu_ops(("nhwc",), "onnx", "cpu", "direct")
    with pytest.raises(ValueError, match="skip_group_norm needs nhwc"):
        resolve_gpu_ops(("skip_group_norm",), "onnx", "cuda", "direct")
    with pytest.raises(ValueError, match="TensorRT parser takes no"):
        resolve_gpu_ops(("nhwc",), "tensorrt", "cuda", "direct")


@pytest.fixture(scope="module")
def tiny_engines(tmp_path_factory):
    from litefocus.export import cli as export_cli

    out = tmp_path_factory.mktemp("gpu-form") / "engines"
    assert (
        export_cli.main(["--seconds", "5", "--random-weights", "--preset", "tiny", "--out", str(out), "-q"])
        == 0
    )
    return out


def test_runtime_refuses_gpu_form_graphs_and_cuda_graphs_on_the_cpu(tiny_engines, tmp_path, capsys):
    import json
    import shutil

    from litefocus.runtime import Runtime
    from litefocus.runtime import cli as generate_cli

    engines = tmp_path / "engines"
    shutil.copytree(tiny_engines, engines)
    manifest = json.loads((engines / "manifest.json").read_text())
    (name,) = manifest["entries"]
    manifest["entries"][name]["modules"]["unet"]["gpu_ops"] = ["nhwc", "packed_attention"]
    (engines / "manifest.json").write_text(json.dumps(manifest))
    with (
        Runtime.load(engines) as rt,
        pytest.raises(ValueError, match=r"GPU form \(nhwc, packed_attention.*--device cuda"),
    ):
        rt.open_entry(name)
    with Runtime.load(engines) as rt:  # the decode graph alone is the CPU form: it opens
        assert rt.open_entry(name, modules=("decode",)).decode is not None
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        Runtime.load(tiny_engines, cuda_graph=True)
    argv = [
        "rain",
        "--seconds",
        "1",
        "--engines",
        str(tiny_engines),
        "-o",
        str(tmp_path / "a.wav"),
        "--cuda-graph",
    ]
    assert generate_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA graphs need a CUDA device" in err[0]
