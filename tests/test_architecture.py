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
        (("runtime", "runtime/x.py:1", "litefocus.models", ["unet_structure"], "litefocus"), "runtime imports"),
        (("export", "export/x.py:1", "litefocus.engine.manifest", ["_short"], "engine"), "private _short"),
        (("litefocus", "litefocus/x.py:1", "litefocus.engine.contract", ["X"], "engine"), "litefocus imports"),
        (("serve", "serve/x.py:1", "litefocus.export.pipeline", ["x"], "export"), "serve imports"),
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
