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
from litefocus.export.build import export_engines
from litefocus.export.plan import ExportOptions
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


@pytest.mark.parametrize("module", ["unet", "decode"])
def test_a_data_file_larger_than_its_graph_reads_is_refused_before_hashing(
    pristine, tmp_path, monkeypatch, module
):
    """Audit: under the 16 GiB cap of a data file, a sparse 15 GiB one was hashed (~3 s a GiB here)
    before it was refused; a weights file may not be larger than what its (verified) graph reads."""
    from litefocus.engine import pinned

    d, m = _copy(pristine, tmp_path)
    data = d / ENTRY / f"{module}.onnx.data"
    size = int(np.random.default_rng().integers(2, 15)) * 2**30
    with open(data, "r+b") as f:
        f.truncate(size)  # sparse: no disk used
    m["entries"][ENTRY]["modules"][module]["files"]["data"].update(bytes=size, sha256="0" * 64)
    _save(d, m)
    real = pinned._hash_fd
    hashed = []
    monkeypatch.setattr(
        pinned, "_hash_fd", lambda fd, keep: hashed.append(os.fstat(fd).st_size) or real(fd, keep)
    )
    with (
        pytest.raises(
            ValueError, match=rf"{module}.onnx.data has {size} bytes, more than what its graph reads"
        ),
        Runtime.load(d, backend="onnxruntime") as rt,
    ):
        rt.open_entry(ENTRY)
    assert size not in hashed


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


def _charsmap(piece: bytes) -> str:
    """A sentencepiece charsmap (u32 trie size, an empty trie, NUL-separated replacements) in base64."""
    import base64

    return base64.b64encode((0).to_bytes(4, "little") + piece + b"\0").decode()


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
    # audit: a pattern that is not a string, and pieces that lengthen the text (a chain of expanding
    # Replace normalizers never returns on a 2000-character prompt; a huge Prepend costs seconds a prompt)
    "regex-not-a-string": ("tokenizer_2.json", lambda s: s.update(
        normalizer={"type": "Replace", "pattern": {"Regex": ["(a+)+$"]}, "content": " "})),
    "model-type-not-a-string": ("tokenizer.json", lambda s: s["model"].update(type={"BPE": 1})),
    "expanding-replace-chain": ("tokenizer_2.json", lambda s: s.update(normalizer={"type": "Sequence", "normalizers": [
        {"type": "Replace", "pattern": {"String": "a"}, "content": "a" * 10}] * 7})),
    "expanding-decoder": ("tokenizer.json", lambda s: s.update(
        decoder={"type": "Replace", "pattern": {"String": "a"}, "content": "b" * 1000})),
    "huge-prepend": ("tokenizer_2.json", lambda s: s.update(normalizer={"type": "Prepend", "prepend": "x" * 10**6})),
    "precompiled-expanding": ("tokenizer_2.json", lambda s: s.update(normalizer={"type": "Sequence", "normalizers": [
        {"type": "Precompiled", "precompiled_charsmap": _charsmap(b"a" * 1000)}]})),
    "precompiled-twice": ("tokenizer_2.json", lambda s: s.update(normalizer={"type": "Sequence", "normalizers": [
        {"type": "Precompiled", "precompiled_charsmap": _charsmap(b"ab")}] * 2})),
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


def test_a_graph_that_returns_another_shape_than_its_contract_is_one_runtime_error(tmp_path):
    """Audit: a decode graph whose output is not the contract's shape (e.g. 7 samples instead of a
    bucket's) gave short audio or an IndexError traceback; it is one RuntimeError line."""
    rows = int(np.random.default_rng().integers(5, 50))
    value = helper.make_tensor("c", TensorProto.FLOAT, [rows], [0.5] * rows)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["y"], value=value)],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows])],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    backend = OnnxRuntimeBackend(path, _GatherContract())
    with pytest.raises(
        RuntimeError, match=rf"returned shape \({rows},\), its contract says \(2, 3\)"
    ) as info:
        backend({"ids": np.array([0, 3])})
    _one_line(info.value)


@pytest.mark.parametrize(
    "change, word",
    [
        ({"num_train_timesteps": 10**9}, "num_train_timesteps must be an int in"),
        ({"steps_offset": 10**9}, "must be below num_train_timesteps"),
    ],
)
def test_a_scheduler_config_that_would_exhaust_memory_or_crash_is_refused(pristine, tmp_path, change, word):
    """Audit: num_train_timesteps = 1e9 in the manifest allocated gigabytes per request (the process was
    killed), a steps_offset past the schedule was a StopIteration traceback; both refused at load."""
    d, m = _copy(pristine, tmp_path)
    m["scheduler"] = {**(m.get("scheduler") or {}), **change}
    _save(d, m)
    with pytest.raises(ValueError, match=word) as info:
        Runtime.load(d).close()
    _one_line(info.value)


def test_a_text_graph_that_returns_other_shapes_is_one_runtime_error(text_engines, tmp_path):
    """Audit: a conditioning graph whose outputs are not its contract's shapes was reported as the
    request's bad conditioning (ValueError: a 400 in a service); it is the engine's RuntimeError."""
    d, m = _copy(text_engines, tmp_path)
    path = d / "text" / "conditioning.onnx"
    model = onnx.load(str(path), load_external_data=False)
    rows = int(np.random.default_rng().integers(3, 9))
    outputs, nodes = [], []
    for out in model.graph.output:
        value = helper.make_tensor(out.name + "_c", TensorProto.FLOAT, [rows, 1, 1], [0.0] * rows)
        nodes.append(helper.make_node("Constant", [], [out.name], value=value))
        outputs.append(helper.make_tensor_value_info(out.name, TensorProto.FLOAT, [rows, 1, 1]))
    graph = helper.make_graph(nodes, "g", list(model.graph.input), outputs)
    onnx.save(helper.make_model(graph, opset_imports=list(model.opset_import)), str(path))
    (d / "text" / "conditioning.onnx.data").write_bytes(b"\0")  # it reads no weights
    _rehash(m["text"]["files"]["onnx"], d)
    _rehash(m["text"]["files"]["data"], d)
    _save(d, m)
    enc = TextEncoder.load(d)
    try:
        with pytest.raises(RuntimeError, match=rf"returned shapes \(\({rows}, 1, 1\)") as info:
            enc("a dog barks")
        _one_line(info.value)
    finally:
        enc.close()


def test_a_truncated_prompt_is_logged_without_control_characters(text_engines, caplog):
    """Audit: the truncation warning logged the cut-off prompt raw, so a prompt with a newline or a
    terminal escape forged log lines (and recoloured the terminal); they are logged as escapes."""
    enc = TextEncoder.load(text_engines)
    forged = "\n\x1b[31mERROR forged line\x1b[0m\r"
    try:
        with caplog.at_level("WARNING"):
            enc.tokenize("rain " * 40 + forged * 3)
    finally:
        enc.close()
    logged = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert logged and all(not any(c in m for c in "\n\r\x1b") for m in logged), logged
    assert any("\\x1b[31mERROR" in m for m in logged), logged


def test_a_t5_normalizer_with_a_precompiled_charsmap_passes_the_check(text_engines):
    """Real T5 files: Sequence[Precompiled (nmt_nfkc: its longest replacement is 33 bytes, U+FDFA),
    Replace " {2,}" -> " "] is what the allowlist must keep accepting."""
    from litefocus.runtime.text import check_tokenizer_json

    spec = json.loads((text_engines / "text" / "tokenizer_2.json").read_text())
    longest = "صلى الله عليه وسلم".encode()  # NFKC of U+FDFA
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Precompiled", "precompiled_charsmap": _charsmap(longest)},
        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]}  # fmt: skip
    check_tokenizer_json(spec, "tokenizer_2.json")
