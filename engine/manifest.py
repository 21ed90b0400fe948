"""The engine directory format: ``manifest.json`` (versioned) + one folder per bucket entry.

    engines/
      manifest.json
      80s-fp32/unet.onnx, unet.onnx.data, decode.onnx, decode.onnx.data[, *.plan]

The manifest carries identity: schema version, library versions, model source and weight hash,
the LiteFocus config, and per entry the shapes, files (SHA-256 + size), validation errors and build
times. Entries are reused only when their cache key (a hash of everything that shapes the
artifacts) matches and their files verify.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

from litefocus.fileio import atomic_path

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KIND = "litefocus-engines"


class ManifestError(ValueError):
    pass


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path, entry: str) -> dict:
    """{"path" (``<entry>/<file name>``, relative to the engine dir), "sha256", "bytes"} of one artifact.

    Artifacts are written in a temporary folder that is renamed to ``entry``: the record names the
    final place."""
    return {
        "path": f"{entry}/{path.name}",
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
    }


def json_sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def library_versions() -> dict[str, str | None]:
    out = {}
    for name in (
        "litefocus",
        "torch",
        "diffusers",
        "transformers",
        "onnx",
        "onnxruntime",
        "onnxruntime-gpu",
        "tensorrt",
    ):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def code_sha256() -> str:
    """SHA-256 of litefocus's own Python sources: a changed exporter invalidates cached artifacts."""
    import litefocus
    import litefocus.engine
    import litefocus.export

    roots = [Path(m.__file__).parent for m in (litefocus, litefocus.export, litefocus.engine)]
    files = sorted({p for r in roots for p in r.glob("*.py")})
    return json_sha256([[p.parent.name + "/" + p.name, file_sha256(p)] for p in files])


def new_manifest(model: dict, litefocus_config: dict | None) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "versions": library_versions(),
        "model": model,
        "litefocus": litefocus_config,
        "entries": {},
    }


def is_engine_dir(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(engine_dir: Path) -> dict:
    """Parse and check the manifest's kind and schema version (no file hashing: see verify_entry)."""
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        raise ManifestError(
            f"{engine_dir} is not an engine directory: it has no {MANIFEST}; create one with litefocus-export"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(
            f"{path} is not valid JSON ({e}); re-export with litefocus-export --force"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise ManifestError(f"{path} is not a litefocus engine manifest")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(
            f"{path} has schema version {version!r}; this litefocus reads version {SCHEMA_VERSION}: re-export "
            "with this version's litefocus-export"
        )
    return manifest


def write_manifest(engine_dir: Path, manifest: dict) -> None:
    """Atomic write: a reader sees the old manifest or the new one, never half of one."""
    with atomic_path(Path(engine_dir) / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")


def entry_files(entry: dict) -> list[dict]:
    """Every file record of an entry (one per module artifact)."""
    return [f for module in entry.get("modules", {}).values() for f in module.get("files", {}).values()]


def verify_entry(engine_dir: Path, entry: dict) -> list[str]:
    """Problems with an entry's files (missing, size or hash mismatch); empty when all verify."""
    problems = []
    for rec in entry_files(entry):
        path = Path(engine_dir) / rec["path"]
        if not path.is_file():
            problems.append(f"{rec['path']} is missing")
        elif path.stat().st_size != rec["bytes"]:
            problems.append(
                f"{rec['path']} has {path.stat().st_size} bytes, the manifest says {rec['bytes']}"
            )
        elif file_sha256(path) != rec["sha256"]:
            problems.append(f"{rec['path']} does not match its SHA-256 in the manifest (modified or corrupt)")
    return problems
