"""The architecture holds: imports point one way, the serving path loads no torch.

Allowed edges between litefocus's packages (by module path, lazy imports inside functions included):
  litefocus (the method)  -> itself
  engine                  -> engine, and the method's torch-free core (config, buckets, geometry)
  export                  -> export, engine, litefocus
  runtime                 -> runtime, engine, the torch-free core
  bench                   -> anything
  serve                   -> serve, runtime, engine, the torch-free core (and litefocus.extras, for its entry point)
No package imports another package's private (``_``) names.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {
    "litefocus": "litefocus",
    "engine": "engine",
    "export": "export",
    "runtime": "runtime",
    "bench": "bench",
    "serve": "serve",
}
SUBPACKAGES = ("engine", "export", "runtime", "bench", "serve")
TORCH_FREE_CORE = {"litefocus.config", "litefocus.buckets", "litefocus.geometry"}
ALLOWED = {
    "litefocus": {"litefocus"},
    "engine": {"engine", *TORCH_FREE_CORE},
    "export": {"export", "engine", "litefocus"},
    "runtime": {"runtime", "engine", *TORCH_FREE_CORE},
    "bench": {"bench", "export", "engine", "runtime", "litefocus", "serve"},
    "serve": {"serve", "runtime", "engine", "litefocus.extras", *TORCH_FREE_CORE},
}


def package_of(module: str) -> str | None:
    """litefocus.engine.x -> "engine"; litefocus.config -> "litefocus"; other libraries -> None."""
    parts = module.split(".")
    if parts[0] != "litefocus":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else "litefocus"


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every import in a file, nested ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
    return out


def edges():
    for folder, pkg in FOLDERS.items():
        for path in sorted((REPO / folder).glob("*.py")):
            for line, module, names in imports(path):
                target = package_of(module)
                if target is not None:
                    yield pkg, f"{folder}/{path.name}:{line}", module, names, target


def check(edge_list) -> list[str]:
    problems = []
    for pkg, where, module, names, target in edge_list:
        allowed = ALLOWED[pkg]
        ok = target in allowed or (target == "litefocus" and module in allowed)
        if target == "litefocus" and "litefocus" not in allowed and module == "litefocus":
            ok = False
        if not ok:
            problems.append(f"{where}: {pkg} imports {module}")
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private and target != pkg:
            problems.append(f"{where}: {pkg} imports private {', '.join(private)} from {module}")
    return problems


def test_imports_point_one_way():
    found = list(edges())
    assert len(found) > 50  # the walk sees the code
    assert check(found) == []


@pytest.mark.parametrize(
    "edge, fragment",
    [
        (("runtime", "runtime/x.py:1", "litefocus.export.validate", ["x"], "export"), "runtime imports"),
        (("engine", "engine/x.py:1", "litefocus.installer", ["install"], "litefocus"), "engine imports"),
        (
            ("runtime", "runtime/x.py:1", "litefocus.models", ["unet_structure"], "litefocus"),
            "runtime imports",
        ),
        (("export", "export/x.py:1", "litefocus.engine.manifest", ["_short"], "engine"), "private _short"),
        (
            ("litefocus", "litefocus/x.py:1", "litefocus.engine.contract", ["X"], "engine"),
            "litefocus imports",
        ),
        (("serve", "serve/x.py:1", "litefocus.export.build", ["x"], "export"), "serve imports"),
        (("serve", "serve/x.py:1", "litefocus.installer", ["install"], "litefocus"), "serve imports"),
        (("runtime", "runtime/x.py:1", "litefocus.serve.app", ["build_app"], "serve"), "runtime imports"),
    ],
)
def test_the_check_catches_a_wrong_edge(edge, fragment):
    assert any(fragment in p for p in check([edge]))


SERVING_PROBE = """
import sys
import litefocus.runtime, litefocus.runtime.cli, litefocus.runtime.text, litefocus.engine.manifest
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "onnxscript", "litefocus.export",
                           "litefocus.installer", "litefocus.attention") if m in sys.modules)
print(",".join(heavy))
"""


def test_the_serving_path_imports_no_torch_or_exporter():
    out = subprocess.run([sys.executable, "-c", SERVING_PROBE], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_a_missing_extra_is_one_line(capsys):
    from litefocus.extras import run_with_extra

    status = run_with_extra("litefocus-x", "export", ("no_such_module_xyz",), "litefocus.export.cli:main", [])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "no_such_module_xyz not installed" in err and "pip install 'litefocus[export]'" in err


# ---- one place per rule --------------------------------------------------------------------------
SOURCE_FOLDERS = tuple(FOLDERS)  # the packages' folders (tests and scripts outside them are not sources)
MAX_LINES = 400
MAX_PARAMS = 6


def source_files() -> list[Path]:
    return sorted(p for folder in SOURCE_FOLDERS for p in (REPO / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    """bench/probes/ab.py -> litefocus.bench.probes.ab; litefocus/config.py -> litefocus.config."""
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] != "litefocus":
        parts.insert(0, "litefocus")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    return names + [f"*{x.arg}" for x in (a.vararg, a.kwarg) if x is not None]


def long_signatures(tree: ast.AST, where: str) -> list[str]:
    return [
        f"{where}:{n.lineno} {n.name} takes {len(_params(n))} parameters"
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(_params(n)) > MAX_PARAMS
    ]


def test_no_long_files_or_signatures_outside_tests():
    problems = []
    for path in source_files():
        text = path.read_text()
        where = str(path.relative_to(REPO))
        if text.count("\n") > MAX_LINES:
            problems.append(f"{where} has {text.count(chr(10))} lines (at most {MAX_LINES})")
        problems += long_signatures(ast.parse(text), where)
    assert problems == []


def test_the_signature_check_counts_parameters():
    tree = ast.parse("def f(self, a, b, c, d, e, f, g): ...\ndef ok(self, a, b, c, d, e, *rest): ...")
    assert long_signatures(tree, "x.py") == ["x.py:1 f takes 7 parameters"]


WRITES = {"write_text", "write_bytes", "dump", "atomic_path", "atomic_write_bytes", "replace", "rename"}


def manifest_writers(tree: ast.AST, where: str) -> list[str]:
    """Functions that name the manifest file and write something: the manifest's writers."""
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        names = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute)}
        strings = {n.value for n in ast.walk(fn) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        calls = {
            c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", "")
            for c in ast.walk(fn)
            if isinstance(c, ast.Call)
        }
        if ("MANIFEST" in names or "manifest.json" in strings) and calls & WRITES:
            found.append(f"{where}:{fn.name}")
    return found


def test_the_manifest_is_written_from_one_function():
    writers = [w for p in source_files() for w in manifest_writers(ast.parse(p.read_text()), p.name)]
    assert writers == ["writer.py:write_manifest"]


def test_the_writer_check_sees_a_second_writer():
    src = "def sneaky(d):\n    (d / MANIFEST).write_text('{}')\ndef reader(d):\n    return (d / MANIFEST).read_text()\n"
    assert manifest_writers(ast.parse(src), "x.py") == ["x.py:sneaky"]


def raw_module_lookups(tree: ast.AST, where: str) -> list[str]:
    """``x["modules"]`` / ``x.get("modules")``: the manifest read as a raw dict."""
    found = []
    for n in ast.walk(tree):
        key = None
        if isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Constant):
            key = n.slice.value
        elif (
            isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get" and n.args
        ):
            key = getattr(n.args[0], "value", None)
        if key == "modules":
            found.append((n.lineno, f"{where}:{n.lineno}"))
    return [text for _, text in sorted(found)]


def test_only_engine_reads_the_raw_manifest_modules():
    outside = [p for p in source_files() if p.relative_to(REPO).parts[0] != "engine"]
    found = [
        h for p in outside for h in raw_module_lookups(ast.parse(p.read_text()), str(p.relative_to(REPO)))
    ]
    assert found == []
    assert raw_module_lookups(ast.parse('e["modules"]["unet"]\ne.get("modules")'), "x.py") == [
        "x.py:1",
        "x.py:2",
    ]


def import_graph(paths: list[Path]) -> dict[str, set[str]]:
    """module -> the modules of the same tree it imports (lazy and TYPE_CHECKING imports included).
    ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``;
    a module's own parent packages are not edges (Python imports them first, whatever the code says)."""
    known = {module_name(p): p for p in paths}
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        for _, target, names in imports(path):
            for t in [f"{target}.{n}" for n in names if f"{target}.{n}" in known] or [target]:
                if t in known and t != mod and not mod.startswith(t + "."):
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("folder", SOURCE_FOLDERS)
def test_no_import_cycles_inside_a_package(folder):
    paths = sorted((REPO / folder).rglob("*.py"))
    assert cycles(import_graph(paths)) == []


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_docstrings_say_what_not_which_issue():
    import re

    cited = []
    for path in source_files():
        tree = ast.parse(path.read_text())
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node) or ""
                if re.search(r"\bissues? ?#?\d", doc, re.IGNORECASE):
                    cited.append(f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 1)}")
    assert cited == []


def test_no_test_folder_shadows_an_importable_package():
    """``pytest`` puts tests/ on sys.path (pythonpath), so a folder there named like an importable
    package (say tests/litefocus/) is found as a namespace package in its place: the method's tests
    live in tests/method/."""
    import importlib.machinery
    import sys

    ours = {REPO, REPO / "tests"}
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() not in ours]
    for folder in sorted(p for p in (REPO / "tests").iterdir() if p.is_dir() and p.name.isidentifier()):
        found = importlib.machinery.PathFinder.find_spec(folder.name, elsewhere)
        assert folder.name != "litefocus" and found is None, f"tests/{folder.name}/ shadows a package"
