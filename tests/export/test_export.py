"""litefocus-export end to end on a tiny random AudioLDM2 saved as a diffusers directory."""

import importlib.metadata
import json
import shutil

import numpy as np
import onnx
import pytest

from litefocus.buckets import Bucket
from litefocus.config import LiteFocusConfig
from litefocus.engine import manifest as mf
from litefocus.engine.backends import open_session
from litefocus.export import cli, stages
from litefocus.export.audit import AttentionExpectation, AuditError, audit_graph

SECONDS = ["0.3", "0.6"]  # buckets of 8 and 16 latent frames
FAST = ["--text-len", "8", "-q"]


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "engines"
    assert cli.main(["--seconds", *SECONDS, "--model", str(model_dir), "--out", str(out), *FAST]) == 0
    return out


def test_two_buckets_export_with_a_manifest_that_verifies(exported, model_dir):
    manifest = mf.read_manifest(exported)
    assert manifest["schema_version"] == mf.SCHEMA_VERSION
    assert manifest["model"]["source"] == str(model_dir.resolve())
    assert len(manifest["model"]["weights_sha256"]) == 64
    assert manifest["litefocus"]["sparse_ratio"] == 0.1
    assert manifest["versions"]["torch"] == importlib.metadata.version("torch")
    assert manifest["versions"]["onnxruntime"] == importlib.metadata.version("onnxruntime")
    assert sorted(manifest["entries"]) == ["0p32s-fp32", "0p64s-fp32"]
    for name, entry in manifest["entries"].items():
        assert not mf.verify_entry(exported, entry)
        frames = entry["bucket"]["frames"]
        assert frames in (8, 16)
        unet = entry["modules"]["unet"]
        # ONNX Runtime matches PyTorch within the fp32 tolerance, and the figures are stored
        assert unet["validation"]["outputs"]["noise_pred"]["max_rel_rms"] <= 1e-4
        assert entry["modules"]["decode"]["validation"]["outputs"]["waveform"]["max_rel_rms"] <= 1e-4
        # the sparse attention is in the graph: key length T_level + S at the F = 8 level
        t8, s = frames // 2, entry["bucket"]["num_global"]["8"]
        assert unet["audit"]["attention_shapes"][f"{t8}x{t8 + s}"] == 20
        assert f"{t8 * 8}x{t8 * 8}" not in unet["audit"]["attention_shapes"]
        assert (exported / name / "unet.onnx.data").is_file()
        # fp32 on the CPU: the UNet's 3x3 convolutions in Winograd form, none left direct; decode direct
        assert unet["conv"] == "winograd" and unet["audit"]["direct_3x3_convs"] == 0
        assert entry["modules"]["decode"]["conv"] == "direct"


def test_entries_record_the_backend_as_schema_version_2_spells_it(exported):
    # "onnx": what runtimes reading version 2 accept; the code's own name is "onnxruntime"
    entries = mf.read_manifest(exported)["entries"].values()
    assert [e["backend"] for e in entries] == ["onnx"] * len(entries)


@pytest.mark.parametrize(
    "typed, want", [("onnx", "onnxruntime"), ("onnxruntime", "onnxruntime"), ("auto", "auto")]
)
def test_backend_onnx_is_still_accepted_on_the_command_line(typed, want):
    assert cli.build_parser().parse_args(["--seconds", "1", "--backend", typed]).backend == want


def test_feed_forwards_export_as_two_projections_without_copies(exported, model_dir):
    from litefocus.models import load_components

    graph = onnx.load(str(exported / "0p64s-fp32" / "unet.onnx"), load_external_data=False)
    ff = [n for n in graph.graph.node if "/ff/net.0/" in n.name]
    blocks = {n.name.split("/ff/")[0] for n in ff}
    assert blocks and not [n.name for n in ff if n.op_type in ("Split", "Slice")]
    assert sum(n.op_type == "MatMul" for n in ff) == 2 * len(blocks)  # export/geglu.py
    # the halves replace the full projection: the weights are stored once
    params = sum(p.numel() for p in load_components(str(model_dir))[0].parameters())
    assert (exported / "0p64s-fp32" / "unet.onnx.data").stat().st_size < 1.05 * 4 * params


def test_graph_inputs_follow_the_contract(exported):
    entry = mf.read_manifest(exported)["entries"]["0p64s-fp32"]
    contract = entry["modules"]["unet"]["contract"]
    session = open_session(exported / "0p64s-fp32" / "unet.onnx", ["CPUExecutionProvider"], "unet")
    got = [(i.name, list(i.shape)) for i in session.get_inputs()]
    assert got == [(s["name"], s["shape"]) for s in contract["inputs"]]
    assert got[-1] == ("litefocus_indices_f8", [2, 20, 6])  # [B, layers, S = floor(0.1 * 8 * 8)]
    assert ("timestep", [2]) in got  # one timestep per row
    wave = entry["modules"]["decode"]["contract"]["outputs"][0]
    assert wave["shape"] == [1, Bucket.for_seconds(0.6).samples] == [1, 10240]


def test_second_run_is_a_cache_hit_and_force_rebuilds(exported, model_dir, capsys):
    before = (exported / "manifest.json").read_text()
    assert cli.main(["--seconds", *SECONDS, "--model", str(model_dir), "--out", str(exported), *FAST]) == 0
    assert "cached" in capsys.readouterr().out
    assert (exported / "manifest.json").read_text() == before
    # a tampered file is not a cache hit: that entry is rebuilt
    data = exported / "0p32s-fp32" / "decode.onnx.data"
    data.write_bytes(data.read_bytes()[:-1] + b"\0")
    assert cli.main(["--seconds", "0.3", "--model", str(model_dir), "--out", str(exported), *FAST]) == 0
    assert "built" in capsys.readouterr().out
    assert not mf.verify_entry(exported, mf.read_manifest(exported)["entries"]["0p32s-fp32"])
    old_time = mf.read_manifest(exported)["entries"]["0p32s-fp32"]["build_seconds"]
    assert (
        cli.main(["--seconds", "0.3", "--model", str(model_dir), "--out", str(exported), "--force", *FAST])
        == 0
    )
    out = capsys.readouterr().out
    assert "built" in out and "cached" not in out
    assert mf.read_manifest(exported)["entries"]["0p32s-fp32"]["build_seconds"] != old_time
    assert not list(exported.glob(".tmp-*"))


def test_failure_mid_export_leaves_no_entry(model_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(stages, "validate", broken)
    out = tmp_path / "engines"
    assert cli.main(["--seconds", "0.3", "--model", str(model_dir), "--out", str(out), *FAST]) == 1
    assert mf.read_manifest(out)["entries"] == {}
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == ["manifest.json"]
    assert not list(out.glob(".tmp-*"))


def test_failure_in_a_later_bucket_keeps_the_earlier_one(model_dir, tmp_path, monkeypatch):
    real = stages.validate
    calls = []

    def fails_on_second_bucket(graph, module, contract, **kw):
        calls.append(contract.bucket.frames)
        if contract.bucket.frames == 16:
            raise RuntimeError("injected failure")
        return real(graph, module, contract, **kw)

    monkeypatch.setattr(stages, "validate", fails_on_second_bucket)
    out = tmp_path / "engines"
    assert cli.main(["--seconds", *SECONDS, "--model", str(model_dir), "--out", str(out), *FAST]) == 1
    manifest = mf.read_manifest(out)
    assert list(manifest["entries"]) == ["0p32s-fp32"]
    assert not mf.verify_entry(out, manifest["entries"]["0p32s-fp32"])
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "0p32s-fp32",
        "manifest.json",
    ]
    assert not list(out.glob(".tmp-*"))


def test_force_replaces_another_config_but_never_an_unreadable_manifest(
    exported, model_dir, tmp_path, capsys
):
    out = tmp_path / "engines"
    shutil.copytree(exported, out)
    args = ["--seconds", "0.3", "--model", str(model_dir), "--out", str(out), *FAST]
    assert cli.main([*args, "--sparse-ratio", "0.2"]) == 2  # another LiteFocus config: refused
    assert "--force to replace them" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "manifest.json").write_text("{not json")  # whose is it? litefocus cannot tell: hands off
    before = sorted(p.relative_to(broken) for p in broken.rglob("*"))
    for extra in ([], ["--force"]):
        assert (
            cli.main(["--seconds", "0.3", "--model", str(model_dir), "--out", str(broken), *FAST, *extra])
            == 2
        )
        assert "not a litefocus engine manifest" in capsys.readouterr().err
    assert sorted(p.relative_to(broken) for p in broken.rglob("*")) == before
    assert cli.main([*args, "--force", "--sparse-ratio", "0.2"]) == 0
    manifest = mf.read_manifest(out)
    assert manifest["litefocus"]["sparse_ratio"] == 0.2 and list(manifest["entries"]) == ["0p32s-fp32"]
    assert not (out / "0p64s-fp32").exists()  # the old manifest listed it: gone with it


def test_fixed_mode_and_no_litefocus_export(model_dir, tmp_path):
    out = tmp_path / "fixed"
    assert (
        cli.main(
            ["--seconds", "0.3", "--model", str(model_dir), "--out", str(out), "--index-mode", "fixed", *FAST]
        )
        == 0
    )
    inputs = [
        i.name for i in onnx.load(str(out / "0p32s-fp32" / "unet.onnx"), load_external_data=False).graph.input
    ]
    assert not any(n.startswith("litefocus_indices") for n in inputs)
    base = tmp_path / "base"
    assert (
        cli.main(
            [
                "--seconds",
                "0.3",
                "--model",
                str(model_dir),
                "--out",
                str(base),
                "--no-litefocus",
                "--conv",
                "direct",
            ]
            + FAST
        )
        == 0
    )
    entry = mf.read_manifest(base)["entries"]["0p32s-fp32"]
    assert entry["modules"]["unet"]["conv"] == "direct"  # --conv direct: one Conv node per convolution
    assert entry["modules"]["unet"]["audit"]["direct_3x3_convs"] > 0
    assert mf.read_manifest(base)["litefocus"] is None
    assert entry["modules"]["unet"]["audit"]["attention_shapes"]["32x32"] == 20  # full attention at F = 8


def test_fp16_export_validates(model_dir, tmp_path):
    out = tmp_path / "fp16"
    assert (
        cli.main(
            ["--seconds", "0.3", "--model", str(model_dir), "--out", str(out), "--precision", "fp16", *FAST]
        )
        == 0
    )
    entry = mf.read_manifest(out)["entries"]["0p32s-fp16"]
    assert entry["precision"] == "fp16"
    assert entry["modules"]["unet"]["contract"]["inputs"][0]["dtype"] == "float16"
    assert 0 < entry["modules"]["unet"]["validation"]["outputs"]["noise_pred"]["max_rel_rms"] <= 2e-2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seconds", "0"], "--seconds 0: seconds must be a positive finite number"),
        (["--seconds", "-5"], "--seconds -5: seconds must be a positive finite number"),
        (["--seconds", "nan"], "--seconds nan: seconds must be a positive finite number"),
        (["--seconds", "ten"], "--seconds ten: seconds must be a number"),
        (["--seconds", "1000"], "above the maximum of 320 s"),
        (["--seconds", "10", "--random-weights", "--preset", "audioldm3"], "--preset 'audioldm3' is unknown"),
        (["--seconds", "10", "--model", "/no/such/model"], "--model /no/such/model: no such directory"),
        (["--seconds", "10", "--sparse-ratio", "1.5"], "--sparse-ratio must be a number in (0, 1]"),
        (["--seconds", "10", "--batch", "2", "0"], "--batch 0: each batch size must be in 1..64"),
        (["--seconds", "10", "--batch", "65"], "--batch 65: each batch size must be in 1..64"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, capsys, tmp_path):
    assert cli.main([*args, "--out", str(tmp_path / "e"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "e").exists()


def test_model_dir_that_is_not_audioldm2(tmp_path, capsys):
    (tmp_path / "m" / "unet").mkdir(parents=True)
    (tmp_path / "m" / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert (
        cli.main(["--seconds", "10", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "e"), "-q"]) == 2
    )
    assert "not an AudioLDM2UNet2DConditionModel" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["not-engine-dir", "not-writable"])
def test_bad_output_directory(model_dir, tmp_path, capsys, kind):
    if kind == "not-engine-dir":
        out = tmp_path / "photos"
        out.mkdir()
        (out / "cat.jpg").write_bytes(b"x")
        match = "is not an engine directory"
    else:
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "engines"  # a path below a file cannot be created
        match = "is not writable"
    assert cli.main(["--seconds", "0.3", "--model", str(model_dir), "--out", str(out), "-q"]) == 2
    assert match in capsys.readouterr().err


def test_tensorrt_backend_without_tensorrt_exits_2(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    assert (
        cli.main(
            [
                "--seconds",
                "0.3",
                "--model",
                str(model_dir),
                "--out",
                str(tmp_path / "e"),
                "--backend",
                "tensorrt",
                "-q",
            ]
        )
        == 2
    )
    assert "pip install" in capsys.readouterr().err


def test_audit_rejects_a_dynamic_dimension(exported, tmp_path):
    src = exported / "0p32s-fp32"
    model = onnx.load(str(src / "unet.onnx"), load_external_data=False)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    shutil.copy(src / "unet.onnx.data", tmp_path / "unet.onnx.data")
    onnx.save_model(model, str(tmp_path / "unet.onnx"))
    with pytest.raises(AuditError, match="without a static shape"):
        audit_graph(tmp_path / "unet.onnx")


def test_audit_rejects_full_attention_at_the_litefocus_level(model_dir, tmp_path):
    base = tmp_path / "base"
    assert (
        cli.main(["--seconds", "0.3", "--model", str(model_dir), "--out", str(base), "--no-litefocus", *FAST])
        == 0
    )
    expect = stages.attention_expectations(Bucket.for_seconds(0.3), LiteFocusConfig(), [8] * 20)
    with pytest.raises(AuditError, match="full-length 32x32 attention"):
        audit_graph(base / "0p32s-fp32" / "unet.onnx", expect)


def test_audit_rejects_random_ops(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    nodes = [
        onnx.helper.make_node("RandomUniformLike", ["x"], ["r"]),
        onnx.helper.make_node("Add", ["x", "r"], ["y"]),
    ]
    graph = onnx.helper.make_graph(nodes, "g", [x], [y])
    onnx.save_model(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]),
        str(tmp_path / "r.onnx"),
    )
    with pytest.raises(AuditError, match="random op RandomUniformLike"):
        audit_graph(tmp_path / "r.onnx", (AttentionExpectation(1, 1, 0),))


def test_indices_input_changes_the_output(exported):
    """The global sample really is an engine input (not a baked constant)."""
    from litefocus.engine.contract import UNetContract

    entry = mf.read_manifest(exported)["entries"]["0p32s-fp32"]
    session = open_session(exported / "0p32s-fp32" / "unet.onnx", ["CPUExecutionProvider"], "unet")
    contract = UNetContract(
        Bucket.for_seconds(0.3), text_len=8, gpt2_dim=12, t5_dim=20, index_levels=((8, 20),)
    )
    assert [s.to_dict() for s in contract.inputs] == entry["modules"]["unet"]["contract"]["inputs"]
    feeds = contract.numpy_inputs(seed=3)
    a = session.run(None, feeds)[0]
    feeds["litefocus_indices_f8"] = contract.numpy_inputs(seed=4)["litefocus_indices_f8"]
    assert np.abs(session.run(None, feeds)[0] - a).max() > 1e-5


def test_cross_attention_as_long_as_a_level_is_not_taken_for_full_attention(tmp_path):
    """At 1.28 s the LiteFocus level has 16 x 8 = 128 tokens, as many as the T5 states at the default
    text length: the audit tells cross- from self-attention by where the keys come from, not by shape."""
    out = tmp_path / "engines"
    assert cli.main(["--seconds", "1", "--random-weights", "--preset", "tiny", "--out", str(out), "-q"]) == 0
    (entry,) = mf.read_manifest(out)["entries"].values()
    shapes = entry["modules"]["unet"]["audit"]["attention_shapes"]
    assert shapes == {"8x8": 24, "16x28": 20, "32x32": 20}  # self-attention only: no 128 x 128, no 128 x 8
