"""Long audio without quadratic memory: the attention forms, time-chunked decode, the memory check."""

import json

import numpy as np
import onnx
import pytest
import torch

from litefocus.attention import FocusSpec, litefocus_attention, packed_sdpa, reference_litefocus_attention
from litefocus.bench.probes import export_record
from litefocus.engine import manifest as mf
from litefocus.engine.chunking import decode_chunked, fade_weights, window_starts
from litefocus.export import cli, memory, plan, source
from litefocus.export.fused import multi_head_attention

FAST = ["--text-len", "8", "-q"]
TIME_V = """\tCommand being timed: "{command}"
\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02:03.50
\tMaximum resident set size (kbytes): 6499728
\tExit status: 0
"""


def _qkv(b=2, h=2, t=6, f=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t * f, d, generator=g) for _ in range(3)]


def _indices(kind, b, n, s, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "shared":
        return torch.randperm(n, generator=g)[:s]
    return torch.stack([torch.randperm(n, generator=g)[:s] for _ in range(b)]).int()


@pytest.mark.parametrize("kind", ["none", "shared", "per-row"])
@pytest.mark.parametrize("same_frequency", [True, False])
def test_packed_form_matches_the_float64_reference(kind, same_frequency):
    if kind == "none" and not same_frequency:
        pytest.skip("nothing to attend to")
    q, k, v = _qkv(seed=3)
    idx = _indices(kind, 2, q.shape[2], 5)
    ref = reference_litefocus_attention(q, k, v, FocusSpec(4, same_frequency=same_frequency), idx)
    grid = litefocus_attention(q, k, v, FocusSpec(4, same_frequency=same_frequency), idx)
    spec = FocusSpec(4, same_frequency=same_frequency, attend=packed_sdpa)
    packed = litefocus_attention(q, k, v, spec, idx)
    assert (packed - ref).abs().max() < 1e-5
    assert (grid - ref).abs().max() < 1e-5
    # a wrong fold (heads taken in the other order) would not match: the test can fail
    spec = FocusSpec(4, same_frequency=same_frequency, attend=_swapped_heads)
    wrong = litefocus_attention(q, k, v, spec, idx)
    assert (wrong - ref).abs().max() > 1e-3


def _swapped_heads(q, k, v, heads, scale):
    b, lq, c = q.shape
    d = c // heads

    def swap(x):  # reinterpret [.., M, D] as [.., D, M]: mixes heads
        return x.reshape(b, x.shape[1], heads, d).transpose(2, 3).reshape(b, x.shape[1], c)

    return packed_sdpa(swap(q), swap(k), swap(v), heads, scale)


class _FusedLiteFocus(torch.nn.Module):
    def forward(self, q, k, v, idx):
        return litefocus_attention(q, k, v, FocusSpec(4, attend=multi_head_attention), idx)


class _FusedSameFrequencyOnly(torch.nn.Module):
    def forward(self, q, k, v):
        return litefocus_attention(q, k, v, FocusSpec(4, attend=multi_head_attention), None)


class _FusedDense(torch.nn.Module):
    """The dense layers' form (``PackedSelfAttnProcessor``: UNet levels without LiteFocus, the VAE)."""

    def __init__(self, heads):
        super().__init__()
        self.heads = heads

    def forward(self, q, k, v):  # [B, L, H * D]
        return multi_head_attention(q, k, v, self.heads)


def _fused_session(module, args, names, tmp_path):
    import onnxruntime as ort

    from litefocus.export.contrib import finish_contrib_graph
    from litefocus.export.fold import fold_static_shapes
    from litefocus.export.fused import fused_nodes

    path = tmp_path / "a.onnx"
    torch.onnx.export(module, args, str(path), dynamo=False, opset_version=18, input_names=names)
    model = fold_static_shapes(onnx.load(str(path)))
    assert finish_contrib_graph(model) == 1
    assert not [n for n in model.graph.node if n.op_type == "Softmax"]
    (node,) = fused_nodes(model.graph)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return node, sess


@pytest.mark.parametrize("heads", [1, 3])
def test_fused_dense_form_in_onnx_runtime_matches_the_float64_reference(heads, tmp_path):
    g = torch.Generator().manual_seed(11 + heads)
    q, k, v = (torch.randn(2, 10, heads * 8, generator=g) for _ in range(3))
    node, sess = _fused_session(_FusedDense(heads), (q, k, v), ["q", "k", "v"], tmp_path)
    assert {a.name: a.i for a in node.attribute}["num_heads"] == heads
    got = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})[0]

    def split(x):  # [B, L, H*D] -> [B, H, L, D], float64
        return x.double().reshape(2, 10, heads, 8).transpose(1, 2)

    ref = torch.softmax(split(q) @ split(k).transpose(-1, -2) / 8**0.5, dim=-1) @ split(v)
    ref = ref.transpose(1, 2).reshape(2, 10, heads * 8).numpy()
    assert np.abs(got - ref).max() < 1e-5
    assert np.abs(got - ref[:, ::-1]).max() > 1e-3  # the test can fail


def test_fused_same_frequency_only_form_matches_the_float64_reference(tmp_path):
    q, k, v = _qkv(seed=7)
    node, sess = _fused_session(_FusedSameFrequencyOnly(), (q, k, v), ["q", "k", "v"], tmp_path)
    got = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})[0]
    ref = reference_litefocus_attention(q, k, v, FocusSpec(4), None).numpy()
    assert np.abs(got - ref).max() < 1e-5


@pytest.mark.parametrize("kind", ["shared", "per-row"])
def test_fused_op_in_onnx_runtime_matches_the_float64_reference(kind, tmp_path):
    q, k, v = _qkv(seed=5)
    idx = _indices(kind, 2, q.shape[2], 5, seed=6)
    node, sess = _fused_session(_FusedLiteFocus(), (q, k, v, idx), ["q", "k", "v", "idx"], tmp_path)
    assert {a.name: a.i for a in node.attribute}["num_heads"] == 2 * 4  # H * F heads
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "idx": idx.numpy()}
    got = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0]
    ref = reference_litefocus_attention(q, k, v, FocusSpec(4), idx).numpy()
    assert np.abs(got - ref).max() < 1e-5


def test_windows_cover_the_latent_and_weights_never_vanish():
    assert window_starts(16, 8, 2) == [0, 6, 8]
    assert window_starts(8, 8, 2) == [0]
    w = fade_weights(10, 4, 4)
    assert w.min() > 0 and w.max() == 1.0
    with pytest.raises(ValueError):
        window_starts(16, 8, 4)  # overlap must be under half a window


def test_chunked_decode_of_a_local_decoder_is_exact():
    """A decoder whose samples depend on their own frame only: chunking changes nothing."""
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((1, 8, 23, 16)).astype(np.float32)

    def local(x):  # [1, 8, W, 16] -> [1, W * 4]
        return np.repeat(x.sum(axis=(1, 3)), 4, axis=1)

    got = decode_chunked(local, latent, 8, 3, 4)
    assert np.allclose(got, local(latent), atol=1e-5)
    # and a decoder that is not local differs: the test can fail
    assert not np.allclose(
        decode_chunked(lambda x: local(x) * x.shape[2], latent, 8, 3, 4), local(latent) * 23
    )


def test_chunked_decode_engine_is_within_its_recorded_bound(model_dir, tmp_path):
    from litefocus.export.decode import DecodeModule
    from litefocus.models import load_components
    from litefocus.runtime import Runtime

    out = tmp_path / "engines"
    argv = ["--seconds", "1.28", "--decode-window", "0.64", "--model", str(model_dir), "--out", str(out)]
    assert cli.main([*argv, *FAST]) == 0
    entry = mf.read_manifest(out)["entries"]["1p28s-fp32"]
    decode = entry["modules"]["decode"]
    assert decode["contract"]["window_frames"] == 16 and decode["contract"]["overlap_frames"] == 4
    assert decode["contract"]["inputs"][0]["shape"] == [1, 8, 16, 16]
    bound = decode["chunking"]["max_rel_rms_vs_full"]
    assert 0 < bound < np.inf  # random tiny weights: large, but measured and recorded
    assert decode["attention"] == "fused"
    # the runtime decodes the whole bucket through the window graph; compare with PyTorch's full decode
    runtime = Runtime.load(out)
    try:
        opened = runtime.open_entry("1p28s-fp32", modules=("decode",))
        latent = np.random.default_rng(1).standard_normal((1, 8, 32, 16)).astype(np.float32)
        got = opened.decode({"latent": latent})
    finally:
        runtime.close()
    _, vae, vocoder = load_components(str(model_dir), dtype=torch.float32, device="cpu")
    with torch.no_grad():
        full = DecodeModule(vae, vocoder, samples=32 * 640)(torch.from_numpy(latent)).numpy()
        window = DecodeModule(vae, vocoder, samples=16 * 640)

        def torch_window(x):  # [1, 8, 16, 16] -> [1, 16 * 640]
            return window(torch.from_numpy(x)).numpy()

        reference = decode_chunked(torch_window, latent, 16, 4, 640)  # the same windows, in PyTorch
        hard_cut = decode_chunked(torch_window, latent, 16, 0, 640)  # no overlap, no cross-fade
    rms = np.sqrt(np.mean(full.astype(np.float64) ** 2))
    assert got.shape == full.shape == reference.shape
    # the engine computes exactly the documented windows and cross-fade (ONNX Runtime vs PyTorch) ...
    assert np.abs(got - reference).max() / rms <= 1e-4
    assert np.abs(hard_cut - reference).max() / rms > 1e-2  # ... and the cross-fade changes the result
    # ... and its error against the full decode is of the size the export measured and recorded
    err = np.abs(got - full).max() / rms
    assert err <= 2 * bound + 1e-3  # the recorded bound is for the export's own latent
    # ... and the export's record for bench/results carries it, with GNU time's wall and peak
    log = tmp_path / "export.log"
    log.write_text(TIME_V.format(command="litefocus-export --seconds 1.28"))
    argv = [str(out), "1p28s-fp32", str(log), "--commit", "abc1234", "--out", str(tmp_path), "-q"]
    assert export_record.main(argv) == 0
    (path,) = tmp_path.glob("export-cpu-*-1p28s-fp32.json")
    record = json.loads(path.read_text())
    assert record["decode_chunking"] == decode["chunking"] and record["max_rss_kib"] == 6499728
    assert record["validation"]["decode"] == decode["validation"]["outputs"] and record["commit"] == "abc1234"
    assert record["ended"] == entry["created"] and record["started"] < record["ended"]


def test_plain_form_keeps_softmaxes_and_fused_form_has_none(model_dir, tmp_path):
    out = tmp_path / "plain"
    argv = ["--seconds", "0.3", "--attention", "plain", "--model", str(model_dir), "--out", str(out)]
    assert cli.main([*argv, *FAST]) == 0
    entry = mf.read_manifest(out)["entries"]["0p32s-fp32"]
    for module in ("unet", "decode"):
        rec = entry["modules"][module]
        assert rec["attention"] == "plain"
        assert rec["audit"]["ops"].get("Softmax", 0) > 0
        assert "com.microsoft.MultiHeadAttention" not in rec["audit"]["ops"]
        assert rec["validation"]["outputs"][rec["contract"]["outputs"][0]["name"]]["max_rel_rms"] <= 1e-4


def test_attention_form_resolution():
    assert plan.resolve_attention("auto", "onnx") == "fused"
    assert plan.resolve_attention("auto", "tensorrt") == "plain"
    with pytest.raises(ValueError, match="--attention plain"):
        plan.resolve_attention("fused", "tensorrt")


def test_memory_check_names_the_need_and_the_option_that_fits(monkeypatch):
    full = memory.estimate_gib(320)
    windowed = memory.estimate_gib(320, decode_window=memory.WINDOWS[0])
    assert windowed < full
    # between the two: the full decode does not fit, the longest window does
    avail = (full + windowed) / 2 / memory.HEADROOM
    monkeypatch.setattr(memory, "available_gib", lambda: avail)
    memory.check_export_memory((10.0,), "fp32", None)  # fits: no error
    memory.check_export_memory((320.0,), "fp32", memory.WINDOWS[0])  # the offered option does fit
    with pytest.raises(ValueError) as e:
        memory.check_export_memory((320.0,), "fp32", None)
    msg = str(e.value)
    assert f"--seconds 320 needs about {full:.1f} GiB" in msg and f"{avail:.1f} GiB available" in msg
    assert f"--decode-window {memory.WINDOWS[0]:g} " in msg and f"about {windowed:.1f} GiB" in msg
    assert "\n" not in msg
    # nothing fits: the message names the machine it needs instead of a window
    monkeypatch.setattr(memory, "available_gib", lambda: 1.0)
    with pytest.raises(
        ValueError, match=r"needs about .* GiB.*1.0 GiB available: export on a machine with at least"
    ):
        memory.check_export_memory((320.0,), "fp32", None)
    # a tiny model needs next to nothing
    memory.check_export_memory((320.0,), "fp32", None, parameters=1000)


def test_bad_decode_window_exits_2(capsys, tmp_path):
    assert (
        cli.main(["--seconds", "1", "--decode-window", "0", "--random-weights", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "--decode-window 0" in capsys.readouterr().err


def test_an_export_that_would_not_fit_exits_2_before_exporting(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_gib", lambda: 1e-6)
    out = tmp_path / "engines"
    assert cli.main(["--seconds", "0.3", "--model", str(model_dir), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "--seconds 0.3 needs about" in err and "GiB available" in err
    assert not list(out.glob("*/unet.onnx"))  # nothing was exported
    monkeypatch.setattr(memory, "available_gib", lambda: 1e6)
    assert cli.main(["--seconds", "0.3", "--model", str(model_dir), "--out", str(out), *FAST]) == 0
    # cached entries are not checked (nor the model loaded for it): a rerun passes however tight memory is
    monkeypatch.setattr(memory, "available_gib", lambda: 1e-6)
    monkeypatch.setattr(source.ModelSource, "models", lambda self: pytest.fail("loaded the model"))
    assert cli.main(["--seconds", "0.3", "--model", str(model_dir), "--out", str(out), *FAST]) == 0


def test_cpu_sessions_run_without_reuse_plan_or_memory_pattern_and_only_the_unet_keeps_an_arena():
    from litefocus.engine.backends import session_options

    cpu = ["CPUExecutionProvider"]
    unet, decode = session_options(cpu, "unet"), session_options(cpu, "decode")
    assert unet.enable_cpu_mem_arena and not decode.enable_cpu_mem_arena
    assert not any(o.enable_mem_reuse or o.enable_mem_pattern for o in (unet, decode))
    gpu = session_options([("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"], "unet")
    assert gpu.enable_mem_reuse and gpu.enable_mem_pattern  # unmeasured on GPUs: ONNX Runtime's defaults


def test_the_text_graph_runs_with_basic_optimizations_on_the_cuda_ep_only():
    """On an H200 the CUDA EP's extended fusions moved the text graph's GPT-2 states by 3.5e-4 of their
    RMS (fp32 tolerance 1e-4; basic: 2.4e-6): that graph alone gets basic optimizations there."""
    import onnxruntime as ort

    from litefocus.engine.backends import session_options

    level = ort.GraphOptimizationLevel
    cuda = [("CUDAExecutionProvider", {"device_id": 0, "use_tf32": 0}), "CPUExecutionProvider"]
    assert session_options(cuda, "conditioning").graph_optimization_level == level.ORT_ENABLE_BASIC
    for providers, module in ((cuda, "unet"), (cuda, "decode"), (["CPUExecutionProvider"], "conditioning")):
        assert session_options(providers, module).graph_optimization_level == level.ORT_ENABLE_ALL


@pytest.mark.parametrize("module", ["unet", "decode", "conditioning"])
def test_engine_sessions_get_their_modules_options(module, tmp_path):
    from types import SimpleNamespace

    from onnx import TensorProto, helper

    from litefocus.engine.backends import load_session
    from litefocus.engine.contract import TensorSpec

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    contract = SimpleNamespace(module=module, inputs=(TensorSpec("x", (2, 3), "float32"),), precision="fp32")
    options = load_session(path, contract).get_session_options()
    assert options.enable_cpu_mem_arena is (module == "unet")
    assert not options.enable_mem_reuse and not options.enable_mem_pattern
