"""Hostile engine directories, part 2 (issue 31): external data hidden outside the main graph's
initializers, files swapped while they load, hostile tokenizer files, and ONNX Runtime failures.

Every refusal is one line; nothing outside the engine directory is read."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from litefocus.engine.backends import OnnxRuntimeBackend, check_external_data
from litefocus.engine.contract import TensorSpec
from litefocus.export.pipeline import ExportOptions, export_engines
from litefocus.runtime import Runtime
from litefocus.runtime.text import TextEncoder

ENTRY = "0p32s-fp32"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    out = tmp_path_factory.mktemp("pristine") / "engines"
    export_engines(
        ExportOptions(seconds=(0.32,), out=out, model=None, random_preset="tiny", text_len=16, quiet=True)
    )
    return out


@pytest.fixture(scope="module")
def text_engines(tmp_path_factory):
    from tiny_models import save_tiny_pipeline

    pipe = tmp_path_factory.mktemp("tiny-pipeline")
    save_tiny_pipeline(pipe)
    out = tmp_path_factory.mktemp("text") / "engines"
    export_engines(ExportOptions(seconds=(), out=out, model=str(pipe), text_len=10, quiet=True))
    return out


@pytest.fixture
def outside(tmp_path):
    """A canary file outside every engine directory, with fresh random content."""
    d = tmp_path / "outside"
    d.mkdir()
    secret = d / "secret.bin"
    secret.write_bytes(b"CANARY-" + os.urandom(64).hex().encode())
    return secret


def _copy(src: Path, tmp_path: Path) -> tuple[Path, dict]:
    d = tmp_path / "engines"
    shutil.copytree(src, d)
    return d, json.loads((d / "manifest.json").read_text())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save(d: Path, m: dict) -> None:
    (d / "manifest.json").write_text(json.dumps(m))


def _rehash(rec: dict, d: Path) -> None:
    f = d / rec["path"]
    rec.update(sha256=_sha(f), bytes=f.stat().st_size)


def _one_line(e: BaseException, secret: Path | None = None) -> str:
    msg = str(e)
    assert "\n" not in msg and len(msg) < 600, msg
    if secret is not None:
        assert secret.read_bytes().decode() not in msg
    return msg


# ---- defect 2: every place a tensor can live -----------------------------------------------------
def _external(name: str, location: str, dims=(4,)) -> TensorProto:
    t = helper.make_tensor(name, TensorProto.FLOAT, list(dims), [0.0] * int(np.prod(dims)))
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(4 * int(np.prod(dims))))):
        t.external_data.add(key=k, value=v)
    return t


def _model(nodes, initializers=(), sparse=(), functions=(), out="y"):
    graph = helper.make_graph(
        list(nodes),
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [4])],
        initializer=list(initializers),
        sparse_initializer=list(sparse),
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("hostile", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def _sparse(location: str, what: str):
    values = helper.make_tensor("s", TensorProto.FLOAT, [1], [1.0])
    indices = helper.make_tensor("s_idx", TensorProto.INT64, [1], [0])
    target = values if what == "values" else indices
    target.ClearField("float_data" if what == "values" else "int64_data")
    target.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "8")):
        target.external_data.add(key=k, value=v)
    return helper.make_sparse_tensor(values, indices, [4])


def _in_function(loc):
    const = helper.make_node("Constant", [], ["c"], value=_external("fc", loc))
    add = helper.make_node("Add", ["a", "c"], ["b"])
    fn = helper.make_function("hostile", "Leak", ["a"], ["b"], [const, add], [helper.make_opsetid("", 18)])
    return _model([helper.make_node("Leak", ["x"], ["y"], domain="hostile")], functions=[fn])


def _in_function_default(loc):
    fn = helper.make_function(
        "hostile",
        "Leak",
        ["a"],
        ["b"],
        [helper.make_node("Identity", ["a"], ["b"])],
        [helper.make_opsetid("", 18)],
    )
    fn.attribute_proto.append(helper.make_attribute("w", _external("fd", loc)))
    return _model([helper.make_node("Leak", ["x"], ["y"], domain="hostile")], functions=[fn])


def _nested_if(loc):
    then = helper.make_graph(
        [helper.make_node("Constant", [], ["t"], value=_external("deep", loc))],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])],
    )
    inner = helper.make_node("If", ["cond"], ["t2"], then_branch=then, else_branch=then)
    outer_branch = helper.make_graph(
        [inner], "outer", [], [helper.make_tensor_value_info("t2", TensorProto.FLOAT, [4])]
    )
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=outer_branch, else_branch=outer_branch)
    return _model([node], initializers=[cond])


def _in_training_info(loc):
    model = _model([helper.make_node("Identity", ["x"], ["y"])])
    info = model.training_info.add()
    info.initialization.CopyFrom(helper.make_graph([], "init", [], [], initializer=[_external("ti", loc)]))
    return model


HIDING_PLACES = {
    "function-constant": _in_function,
    "function-attribute-default": _in_function_default,
    "sparse-initializer-values": lambda loc: _model(
        [helper.make_node("Identity", ["x"], ["y"])], sparse=[_sparse(loc, "values")]
    ),
    "sparse-initializer-indices": lambda loc: _model(
        [helper.make_node("Identity", ["x"], ["y"])], sparse=[_sparse(loc, "indices")]
    ),
    "constant-sparse-value": lambda loc: _model(
        [helper.make_node("Constant", [], ["c"], sparse_value=_sparse(loc, "values")),
         helper.make_node("Add", ["x", "c"], ["y"])]
    ),
    "attribute-tensors": lambda loc: _model(
        [helper.make_node("Identity", ["x"], ["y"], hidden=[_external("t1", loc), _external("t2", loc)])]
    ),
    "nested-if-constant": _nested_if,
    "training-info-initializer": _in_training_info,
}  # fmt: skip


@pytest.mark.parametrize("place", sorted(HIDING_PLACES))
@pytest.mark.parametrize("location", ["../outside/secret.bin", "/etc/passwd", "*/_ORT_MEM_ADDR_/*"])
def test_external_data_hidden_outside_the_initializers_is_refused(place, location, tmp_path):
    graph, data = tmp_path / "m.onnx", tmp_path / "m.onnx.data"
    data.write_bytes(bytes(64))
    onnx.save(HIDING_PLACES[place](location), str(graph))
    with pytest.raises(ValueError, match="reads its data from") as info:
        check_external_data(graph, data)
    _one_line(info.value)


def test_the_walker_accepts_references_to_the_own_data_file(tmp_path):
    graph, data = tmp_path / "m.onnx", tmp_path / "m.onnx.data"
    data.write_bytes(bytes(64))
    onnx.save(_in_function("m.onnx.data"), str(graph))
    check_external_data(graph, data)  # in range, in its own file: fine
    onnx.save(_in_function("m.onnx.data"), str(graph))
    data.write_bytes(bytes(8))  # now past the end
    with pytest.raises(ValueError, match="truncated"):
        check_external_data(graph, data)


def test_an_engine_with_a_sparse_initializer_outside_is_refused(pristine, tmp_path, outside):
    d, m = _copy(pristine, tmp_path)
    path = d / ENTRY / "unet.onnx"
    model = onnx.load(str(path), load_external_data=False)
    model.graph.sparse_initializer.append(_sparse("../../outside/secret.bin", "values"))
    onnx.save(model, str(path))
    _rehash(m["entries"][ENTRY]["modules"]["unet"]["files"]["onnx"], d)
    _save(d, m)
    with pytest.raises(ValueError, match="secret.bin") as info, Runtime.load(d, backend="onnxruntime") as rt:
        rt.open_entry(ENTRY)
    _one_line(info.value, outside)


# ---- defect 3: the file hashed is the file loaded -------------------------------------------------
def _swap_during_load(monkeypatch, target: Path, how: str) -> list[Path]:
    """Patch ONNX Runtime's session constructor: once, just before the graph ``target`` belongs to
    is loaded (after every hash), replace ``target`` by other bytes of the same size."""
    import onnxruntime

    real, swapped = onnxruntime.InferenceSession, []

    def hostile(path_or_bytes, *args, **kwargs):
        if not swapped and isinstance(path_or_bytes, str) and Path(path_or_bytes).parent == target.parent:
            other = bytearray(target.read_bytes())
            other[len(other) // 2] ^= 0xFF
            time.sleep(0.02)  # past the file system's timestamp tick
            if how == "rename":
                tmp = target.with_name(target.name + ".evil")
                tmp.write_bytes(bytes(other))
                os.replace(tmp, target)
            else:
                with open(target, "r+b") as f:
                    f.write(bytes(other))
            swapped.append(target)
        return real(path_or_bytes, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", hostile)
    return swapped


@pytest.mark.parametrize("how", ["rename", "in-place"])
@pytest.mark.parametrize("name", ["unet.onnx.data", "decode.onnx"])
def test_a_file_swapped_while_it_loads_is_refused(pristine, tmp_path, monkeypatch, how, name):
    d, _ = _copy(pristine, tmp_path)
    swapped = _swap_during_load(monkeypatch, d / ENTRY / name, how)
    with (
        pytest.raises(ValueError, match="changed while it was loaded") as info,
        Runtime.load(d, backend="onnxruntime") as rt,
    ):
        rt.open_entry(ENTRY)
    assert swapped
    _one_line(info.value)


def test_a_text_file_swapped_while_it_loads_is_refused(text_engines, tmp_path, monkeypatch):
    d, _ = _copy(text_engines, tmp_path)
    swapped = _swap_during_load(monkeypatch, d / "text" / "conditioning.onnx.data", "rename")
    with pytest.raises(ValueError, match="changed while it was loaded"):
        TextEncoder.load(d)
    assert swapped


# ---- defect 6: sizes before hashes -------------------------------------------------------------
def test_a_huge_sparse_data_file_is_refused_before_hashing(pristine, tmp_path):
    d, m = _copy(pristine, tmp_path)
    data = d / ENTRY / "unet.onnx.data"
    size = 20 * 2**30
    with open(data, "r+b") as f:
        f.truncate(size)  # sparse: no disk used
    rec = m["entries"][ENTRY]["modules"]["unet"]["files"]["data"]
    rec.update(bytes=size, sha256="0" * 64)
    _save(d, m)
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as info, Runtime.load(d, backend="onnxruntime") as rt:
        rt.open_entry(ENTRY)
    assert time.perf_counter() - t0 < 5, "refused only after hashing 20 GiB"
    _one_line(info.value)


def test_pinning_checks_the_cap_before_reading(tmp_path, monkeypatch):
    from litefocus.engine import pinned

    (tmp_path / "text").mkdir()
    big = tmp_path / "text" / "tokenizer.json"
    with open(big, "wb") as f:
        f.truncate(33 * 2**20)
    monkeypatch.setattr(pinned, "_hash_fd", lambda *a: pytest.fail("hashed a file above its cap"))
    rec = {"path": "text/tokenizer.json", "sha256": "0" * 64, "bytes": 33 * 2**20}
    with pytest.raises(ValueError, match="above the 33554432 a tokenizer file may have"):
        pinned.pin_files(tmp_path, {"tokenizer": rec}, "the text engine")


# ---- defect 6: hostile tokenizer files -------------------------------------------------------------
def _edit_tokenizer(d: Path, m: dict, name: str, edit) -> None:
    path = d / "text" / name
    spec = json.loads(path.read_text())
    edit(spec)
    path.write_text(json.dumps(spec))
    _rehash(m["text"]["files"][name.removesuffix(".json")], d)
    _save(d, m)


def _split(pattern: str):
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


TOKENIZER_EDITS = {
    "backtracking-split": ("tokenizer_2.json", lambda s: s.update(
        pre_tokenizer={"type": "Sequence", "pretokenizers": [_split("(a+)+$"), s["pre_tokenizer"]]})),
    "backtracking-normalizer": ("tokenizer_2.json", lambda s: s.update(
        normalizer={"type": "Replace", "pattern": {"Regex": "(x|xx)+y"}, "content": " "})),
    "backtracking-decoder": ("tokenizer.json", lambda s: s.update(
        decoder={"type": "Replace", "pattern": {"Regex": "(.*a){20}"}, "content": ""})),
    "unknown-pre-tokenizer": ("tokenizer.json", lambda s: s.update(pre_tokenizer={"type": "UnicodeScripts"})),
    "wordpiece-model": ("tokenizer.json", lambda s: s["model"].update(type="WordPiece")),
    "not-json": ("tokenizer.json", None),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(TOKENIZER_EDITS))
def test_a_hostile_tokenizer_is_refused_when_the_text_engine_loads(case, text_engines, tmp_path):
    d, m = _copy(text_engines, tmp_path)
    name, edit = TOKENIZER_EDITS[case]
    if edit is None:
        (d / "text" / name).write_bytes(b"{" * 50_000)
        _rehash(m["text"]["files"][name.removesuffix(".json")], d)
        _save(d, m)
    else:
        _edit_tokenizer(d, m, name, edit)
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as info:
        TextEncoder.load(d).close()
    assert time.perf_counter() - t0 < 10
    _one_line(info.value)


def test_the_exported_tokenizers_pass_the_allowlist(text_engines):
    enc = TextEncoder.load(text_engines)
    try:
        assert enc("a dog barks").gpt2.shape[0] == 2
    finally:
        enc.close()


class PanicException(BaseException):  # what pyo3 raises for a Rust panic: not an Exception
    pass


def test_a_tokenizer_panic_is_one_runtime_error(text_engines):
    enc = TextEncoder.load(text_engines)

    class Panicking:
        def __getattr__(self, name):
            def panic(*a, **k):
                raise PanicException("called `Option::unwrap()` on a `None` value")

            return panic

    enc._t5 = Panicking()
    try:
        with pytest.raises(RuntimeError, match="PanicException") as info:
            enc("rain")
        _one_line(info.value)
    finally:
        enc.close()


def test_a_huge_prompt_is_refused_before_tokenizing(text_engines):
    enc = TextEncoder.load(text_engines)
    try:
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match="characters"):
            enc("rain " * 200_000)
        assert time.perf_counter() - t0 < 1
    finally:
        enc.close()


# ---- defect 5: ONNX Runtime failures are one RuntimeError line -------------------------------------
def test_token_ids_past_the_embeddings_are_refused_before_the_run(text_engines, tmp_path):
    d, m = _copy(text_engines, tmp_path)
    m["text"]["tokenizers"]["tokenizer_2"]["pad_id"] = 1_000_000  # every padded T5 row
    _save(d, m)
    enc = TextEncoder.load(d)
    try:
        with pytest.raises(ValueError, match="token id 1000000") as info:
            enc("rain", "a very long negative prompt that is cut to the prompt's length")
        _one_line(info.value)
    finally:
        enc.close()


class _GatherContract:
    module, precision = "decode", "fp32"
    inputs = (TensorSpec("ids", (2,), "int64"),)
    outputs = (TensorSpec("y", (2, 3), "float32"),)
    output_names = ["y"]


@pytest.mark.parametrize("bound", [False, True])
def test_an_onnx_runtime_failure_is_one_runtime_error(tmp_path, bound):
    table = helper.make_tensor("table", TensorProto.FLOAT, [4, 3], np.random.rand(12).tolist())
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"])],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[table],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    backend = OnnxRuntimeBackend(path, _GatherContract())
    run = backend.bind() if bound else backend
    assert run({"ids": np.array([0, 3])}).shape == (2, 3)
    with pytest.raises(RuntimeError, match="decode graph failed in ONNX Runtime") as info:
        run({"ids": np.array([0, 4 + np.random.randint(1000)])})
    _one_line(info.value)


class Fail(Exception):  # what onnxruntime's pybind layer raises: an Exception, not a RuntimeError
    pass


@pytest.mark.parametrize("error", [Fail("[ONNXRuntimeError] : 1 : FAIL : kernel\nstack"), MemoryError()])
def test_a_text_engine_run_failure_is_one_runtime_error(text_engines, error):
    enc = TextEncoder.load(text_engines)

    class Session:
        def run(self, *a, **k):
            raise error

    enc._session = Session()
    try:
        with pytest.raises(
            RuntimeError, match=f"conditioning graph failed in ONNX Runtime \\({type(error).__name__}"
        ):
            enc("rain")
    finally:
        enc.close()


def test_a_gpt2_style_split_and_the_t5_normalizer_are_allowed(text_engines, tmp_path):
    from litefocus.runtime.text import ALLOWED_REGEX

    gpt2 = next(p for p in ALLOWED_REGEX if p.startswith("'s"))
    d, m = _copy(text_engines, tmp_path)
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": False}
    _edit_tokenizer(
        d,
        m,
        "tokenizer.json",
        lambda s: s.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [_split(gpt2), byte_level]}),
    )
    _edit_tokenizer(d, m, "tokenizer_2.json", lambda s: s.update(
        normalizer={"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]}))  # fmt: skip
    enc = TextEncoder.load(d)
    try:
        assert enc("a  dog barks").t5.shape[0] == 2
    finally:
        enc.close()
