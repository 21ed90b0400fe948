"""Engine directories are untrusted input: a corpus of crafted directories, built from one tiny export.

Every case must end in one ValueError line (no traceback, no other exception type), name no secret of
a canary file outside the engine directory, and open nothing outside it. Then: --force never touches
what litefocus did not write, and a new --out is created race-free.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from litefocus.engine import manifest as mf
from litefocus.engine.writer import check_out
from litefocus.export.build import export_engines
from litefocus.export.plan import ExportOptions
from litefocus.runtime import Runtime

ENTRY = "5p12s-fp32"
_OPENED: list[str] | None = None


def _audit(event, args):
    if event == "open" and _OPENED is not None and args and isinstance(args[0], (str, bytes, Path)):
        _OPENED.append(str(args[0]))


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    out = tmp_path_factory.mktemp("pristine") / "engines"
    opts = ExportOptions(seconds=(5,), out=out, model=None, random_preset="tiny", text_len=16, quiet=True)
    export_engines(opts)
    return out


@pytest.fixture
def case_dir(pristine, tmp_path):
    """A fresh copy of the engine directory plus a canary file outside it."""
    d = tmp_path / "engines"
    shutil.copytree(pristine, d)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.bin"
    secret.write_bytes(b"CANARY-" + hashlib.sha256(str(tmp_path).encode()).hexdigest().encode())
    return d, secret


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(m: dict, module: str = "unet") -> dict:
    return m["entries"][ENTRY]["modules"][module]["files"]


def _point_at(m: dict, kind: str, path: str, target: Path) -> None:
    rec = _files(m)[kind]
    rec.update(path=path, sha256=_sha(target), bytes=target.stat().st_size)


def _rehash(m: dict, d: Path, kind: str, module: str = "unet") -> None:
    rec = _files(m, module)[kind]
    f = d / rec["path"]
    rec.update(sha256=_sha(f), bytes=f.stat().st_size)


def _rewrite_external(d: Path, m: dict, location: str | None = None, length_delta: int = 0) -> None:
    """Rewrite unet.onnx's external-data records (location / length), then update its hash."""
    path = d / ENTRY / "unet.onnx"
    model = onnx.load(str(path), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for e in t.external_data:
        if e.key == "location" and location is not None:
            e.value = location
        if e.key == "length" and length_delta:
            e.value = str(int(e.value) + length_delta)
    onnx.save(model, str(path))
    _rehash(m, d, "onnx")


def _truncate(d: Path, m: dict, kind: str) -> None:
    f = d / _files(m)[kind]["path"]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _rehash(m, d, kind)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _symlink_file(d: Path, m: dict, secret: Path) -> None:
    f = d / ENTRY / "unet.onnx"
    f.unlink()
    f.symlink_to(secret)
    _rehash(m, d, "onnx")


def _symlink_entry(d: Path, m: dict, secret: Path) -> None:
    copy = secret.parent / "entry-copy"
    shutil.move(d / ENTRY, copy)
    (d / ENTRY).symlink_to(copy, target_is_directory=True)


def _symlink_manifest(d: Path, m: dict, secret: Path) -> None:
    target = secret.parent / "manifest.json"
    target.write_text(json.dumps(m))
    (d / "manifest.json").unlink()
    (d / "manifest.json").symlink_to(target)
    return "keep"


def _set(path: str, value):
    """Mutation: set the JSON value at a dotted path (``E`` = the entry)."""

    def mutate(d, m, secret):
        keys = [ENTRY if k == "E" else k for k in path.split(".")]
        node = m
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if value is _DELETE:
            del node[keys[-1]]
        elif isinstance(node, list):
            node[int(keys[-1])] = value
        else:
            node[keys[-1]] = value

    return mutate


_DELETE = object()


def _raw(text_fn):
    def mutate(d, m, secret):
        return text_fn(json.dumps(m))

    return mutate


def _rename_entry(new: str):
    def mutate(d, m, secret):
        m["entries"][new] = m["entries"].pop(ENTRY)

    return mutate


CASES = {
    # path escapes: relative, absolute, through the entry, other separators, symlinks
    "path-dotdot": lambda d, m, s: _point_at(m, "onnx", "../outside/secret.bin", s),
    "path-absolute": lambda d, m, s: _point_at(m, "onnx", str(s), s),
    "path-absolute-etc": lambda d, m, s: _point_at(m, "data", "/etc/passwd", s),
    "path-through-entry": lambda d, m, s: _point_at(m, "onnx", f"{ENTRY}/../../outside/secret.bin", s),
    "path-backslash": lambda d, m, s: _point_at(m, "onnx", f"{ENTRY}\\..\\..\\outside\\secret.bin", s),
    "path-dot-prefix": lambda d, m, s: _point_at(m, "onnx", f"./{ENTRY}/unet.onnx", s),
    "path-too-deep": lambda d, m, s: _point_at(m, "onnx", f"{ENTRY}/x/unet.onnx", s),
    "path-other-entry": lambda d, m, s: _point_at(m, "onnx", "other/unet.onnx", s),
    "path-wrong-file": lambda d, m, s: _point_at(m, "onnx", f"{ENTRY}/decode.onnx", s),
    "path-int": _set("entries.E.modules.unet.files.onnx.path", 7),
    "symlink-file": _symlink_file,
    "symlink-entry": _symlink_entry,
    "symlink-manifest": _symlink_manifest,
    # ONNX external data and truncated artifacts (hashes updated to match)
    "external-dotdot": lambda d, m, s: _rewrite_external(d, m, location="../outside/secret.bin"),
    "external-absolute": lambda d, m, s: _rewrite_external(d, m, location=str(s)),
    "external-other-name": lambda d, m, s: _rewrite_external(d, m, location="decode.onnx.data"),
    "external-past-end": lambda d, m, s: _rewrite_external(d, m, length_delta=10**9),
    "truncated-data": lambda d, m, s: _truncate(d, m, "data"),
    "truncated-onnx": lambda d, m, s: _truncate(d, m, "onnx"),
    "garbage-onnx": lambda d, m, s: ((d / ENTRY / "unet.onnx").write_bytes(b"\x08\xff" * 999), _rehash(m, d, "onnx")),
    # wrong types and missing keys
    "entries-list": _set("entries", []),
    "entries-string": _set("entries", "x"),
    "entry-string": _set("entries.E", "x"),
    "frames-string": _set("entries.E.bucket.frames", "128"),
    "exact-seconds-string": _set("entries.E.bucket.exact_seconds", "5.12"),
    "bytes-string": _set("entries.E.modules.unet.files.onnx.bytes", "1847670"),
    "versions-list": _set("versions", []),
    "litefocus-string": _set("litefocus", "on"),
    "freq-bins-3": _set("litefocus.freq_bins", [3]),
    "shape-strings": _set("entries.E.modules.unet.contract.inputs.0.shape", ["2", "8"]),
    "shape-short": _set("entries.E.modules.unet.contract.inputs.2.shape", [2]),
    "missing-entries": _set("entries", _DELETE),
    "missing-model": _set("model", _DELETE),
    "missing-frames": _set("entries.E.bucket.frames", _DELETE),
    "missing-decode": _set("entries.E.modules.decode", _DELETE),
    "missing-data": _set("entries.E.modules.unet.files.data", _DELETE),
    "missing-outputs": _set("entries.E.modules.decode.contract.outputs", _DELETE),
    "sha-not-hex": _set("entries.E.modules.unet.files.onnx.sha256", "z" * 64),
    "module-swapped": _set("entries.E.modules.unet.contract.module", "decode"),
    # numbers
    "exact-infinity": _raw(lambda t: t.replace('"exact_seconds": 5.12', '"exact_seconds": Infinity')),
    "exact-nan": _raw(lambda t: t.replace('"exact_seconds": 5.12', '"exact_seconds": NaN')),
    "exact-1e308": _set("entries.E.bucket.exact_seconds", 1e308),
    "exact-disagrees": _set("entries.E.bucket.exact_seconds", 100.0),
    "frames-not-multiple": _set("entries.E.bucket.frames", 130),
    "frames-huge": _set("entries.E.bucket.frames", 10**9),
    "frames-disagree-contract": lambda d, m, s: (_set("entries.E.bucket.frames", 256)(d, m, s), _set("entries.E.bucket.exact_seconds", 10.24)(d, m, s), _rename_entry("10p24s-fp32")(d, m, s)),
    "seconds-negative": _set("entries.E.bucket.seconds", -5),
    "bytes-negative": _set("entries.E.modules.unet.files.onnx.bytes", -1),
    "samples-disagree": _set("entries.E.bucket.samples", 1),
    "contract-batch-disagrees": _set("entries.E.modules.unet.contract.batch", 4),
    # JSON shape and nesting
    "deep-nesting": lambda d, m, s: "[" * 200_000 + "]" * 200_000,
    "deep-nesting-in-object": lambda d, m, s: json.dumps(m)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "not-json": lambda d, m, s: "{not json",
    "top-level-list": lambda d, m, s: "[]",
    "empty-file": lambda d, m, s: "",
    "too-large": lambda d, m, s: json.dumps({**m, "pad": "x" * (mf.MAX_MANIFEST_BYTES + 1)}),
    "not-utf8": lambda d, m, s: b"\xff\xfe{}",
    # schema version and kind
    "schema-true": _set("schema_version", True),
    "schema-string": _set("schema_version", "2"),
    "schema-1": _set("schema_version", 1),
    "schema-float": _set("schema_version", 2.0),
    "kind-missing": _set("kind", _DELETE),
    # names and files
    "entry-name-dotdot": _rename_entry(".."),
    "entry-name-mismatch": _rename_entry("80s-fp32"),
    "hash-mismatch": lambda d, m, s: (d / ENTRY / "unet.onnx").write_bytes((d / ENTRY / "unet.onnx").read_bytes() + b"x"),
    "content-modified": lambda d, m, s: _flip_byte(d / ENTRY / "decode.onnx.data"),
    "file-missing": lambda d, m, s: (d / ENTRY / "unet.onnx.data").unlink(),
    "size-mismatch": _set("entries.E.modules.unet.files.data.bytes", 12),
}  # fmt: skip


def _load_all(d: Path) -> None:
    with Runtime.load(d, backend="onnxruntime") as rt:
        for name in rt.entries:
            rt.open_entry(name)
        rt.bucket_for(5)


def test_the_pristine_directory_loads(pristine):
    _load_all(pristine)


@pytest.mark.parametrize("case", sorted(CASES))
def test_crafted_engine_directory_is_refused_in_one_line(case, case_dir):
    global _OPENED
    d, secret = case_dir
    m = json.loads((d / "manifest.json").read_text())
    raw = CASES[case](d, m, secret)
    if raw != "keep":
        data = raw if isinstance(raw, (str, bytes)) else json.dumps(m)
        (d / "manifest.json").write_bytes(data.encode() if isinstance(data, str) else data)
    outside = secret.parent.resolve()
    _OPENED = []
    try:
        with pytest.raises(ValueError) as info:
            _load_all(d)
    finally:
        opened, _OPENED = _OPENED, None
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 600, msg
    for leak in (secret.read_bytes().decode(), _sha(secret), f" {secret.stat().st_size} bytes"):
        assert leak not in msg
    read_outside = [p for p in opened if Path(p).resolve().is_relative_to(outside)]
    assert read_outside == [], read_outside


def test_generate_cli_answers_a_crafted_directory_with_exit_2(case_dir, capsys, tmp_path):
    from litefocus.runtime.cli import main

    d, secret = case_dir
    m = json.loads((d / "manifest.json").read_text())
    _point_at(m, "onnx", "../outside/secret.bin", secret)
    (d / "manifest.json").write_text(json.dumps(m))
    assert main(["rain", "--seconds", "5", "--engines", str(d), "-o", str(tmp_path / "a.wav"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and "litefocus-export --force" in err


def test_generate_cli_refuses_a_file_as_engines_and_a_huge_seed(tmp_path, capsys, pristine):
    from litefocus.runtime.cli import main

    f = tmp_path / "file"
    f.write_text("x")
    assert main(["rain", "--seconds", "5", "--engines", str(f), "-o", str(tmp_path / "a.wav")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    argv = [
        "rain",
        "--seconds",
        "5",
        "--engines",
        str(pristine),
        "-o",
        str(tmp_path / "a.wav"),
        "--seed",
        str(2**64),
    ]
    assert main(argv) == 2
    assert "--seed 18446744073709551616 is out of range" in capsys.readouterr().err


def test_seconds_beyond_the_export_limit_suggest_no_impossible_export(pristine):
    with (
        Runtime.load(pristine) as rt,
        pytest.raises(ValueError, match="than the 320 s that litefocus-export builds"),
    ):
        rt.bucket_for(1e9)


def _tree(root: Path) -> dict:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("force", [False, True])
def test_export_never_touches_a_foreign_directory(tmp_path, force):
    foreign = tmp_path / "app"
    (foreign / "src").mkdir(parents=True)
    (foreign / "photos").mkdir()
    (foreign / "src" / "main.py").write_text("print('hi')\n")
    (foreign / "photos" / "cat.jpg").write_bytes(b"\xff\xd8" * 100)
    (foreign / "manifest.json").write_text('{"name": "my-web-app"}')
    before = _tree(foreign)
    opts = ExportOptions(
        seconds=(5,), out=foreign, model=None, random_preset="tiny", text_len=16, quiet=True, force=force
    )
    with pytest.raises(ValueError, match="not a litefocus engine manifest"):
        export_engines(opts)
    assert _tree(foreign) == before  # byte for byte, and no .lock left behind


def test_a_new_out_with_only_a_lock_is_not_foreign(tmp_path):
    out = tmp_path / "engines"
    out.mkdir()
    scratch = ".tmp-5p12s-fp32-" + "ab" * 8  # a concurrent export's folder, recorded in its lock
    (out / ".lock").write_text(scratch + "\n")  # what a concurrent export creates first
    (out / scratch).mkdir()
    check_out(out)  # no error: the other export's lock does not make the directory foreign
    (out / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not an engine directory"):
        check_out(out)


def test_export_cli_refuses_a_negative_weights_seed(capsys, tmp_path):
    from litefocus.export.cli import main

    assert (
        main(["--seconds", "5", "--random-weights", "--weights-seed", "-1", "--out", str(tmp_path / "e")])
        == 2
    )
    assert "--weights-seed must be >= 0" in capsys.readouterr().err


_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=20),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)  # fmt: skip


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_mutated_manifest_loads_or_is_refused_in_one_line(pristine, tmp_path_factory, data):
    d = tmp_path_factory.mktemp("mutated") / "engines"
    shutil.copytree(pristine, d)
    m = json.loads((d / "manifest.json").read_text())
    paths = [p for p in _paths(m) if p]
    path = data.draw(st.sampled_from(paths))
    node = m
    for k in path[:-1]:
        node = node[k]
    if data.draw(st.booleans()) and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = data.draw(_LEAVES)
    (d / "manifest.json").write_text(json.dumps(m))
    try:
        _load_all(d)
    except ValueError as e:
        assert "\n" not in str(e)


def test_bench_refuses_a_bad_engines_path_before_writing(tmp_path, capsys):
    from litefocus.bench.cli import main

    f = tmp_path / "engines-file"
    f.write_text("x")
    out = tmp_path / "results"
    with pytest.raises(SystemExit) as info:
        main(["--quick", "--backends", "onnxruntime", "--engines", str(f), "--out", str(out), "-q"])
    assert info.value.code == 2
    assert "--engines" in capsys.readouterr().err and not out.exists()


def test_local_model_identity_covers_only_what_the_engines_use(tmp_path):
    from litefocus.export.source import ModelSource

    for sub in ("unet", "vae", "vocoder", "text_encoder"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(f'{{"name": "{sub}"}}')
    opts = ExportOptions(seconds=(5,), out=tmp_path / "e", model=str(tmp_path))
    first = ModelSource(opts).identity["weights_sha256"]
    (tmp_path / "text_encoder" / "config.json").write_text('{"name": "changed"}')  # not hashed: not used
    assert ModelSource(opts).identity["weights_sha256"] == first
    (tmp_path / "vae" / "config.json").write_text('{"name": "changed"}')  # hashed: the decode engine uses it
    assert ModelSource(opts).identity["weights_sha256"] != first


def test_validation_checks_output_names_and_shapes_first(tmp_path):
    import torch

    from litefocus.engine.contract import TensorSpec
    from litefocus.export.validate import ValidationError, validate

    class Contract:  # the parts of a contract that validate() reads
        module, precision, tolerance = "unet", "fp32", 1e-4
        inputs = (TensorSpec("x", (2, 3), "float32"),)
        outputs = (TensorSpec("y", (2, 4), "float32"),)
        input_names, output_names = ["x"], ["y"]

        def sample_inputs(self, seed):
            return {"x": torch.randn(2, 3, generator=torch.Generator().manual_seed(seed))}

    module = torch.nn.Linear(3, 5).eval()  # returns [2, 5], the contract says [2, 4]
    path = tmp_path / "m.onnx"
    torch.onnx.export(
        module, (torch.randn(2, 3),), str(path), input_names=["x"], output_names=["y"], dynamo=False
    )
    with pytest.raises(ValidationError, match=r"graph outputs \[\('y', \[2, 5\]"):
        validate(path, module, Contract())
