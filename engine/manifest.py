"""The engine directory format: ``manifest.json`` (versioned) + one folder per bucket entry.

    engines/
      manifest.json
      80s-fp32/unet.onnx, unet.onnx.data, decode.onnx, decode.onnx.data[, *.plan]
      text/conditioning.onnx, conditioning.onnx.data, tokenizer.json, tokenizer_2.json  (optional)

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

SCHEMA_VERSION = (
    2  # 2: per-row timestep [B] and LiteFocus samples [B, layers, S]; several batch sizes per bucket
)
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


MAX_MANIFEST_BYTES = 16 * 2**20
FIX = "re-export with litefocus-export --force"
_SCHEMA = None


def is_engine_dir(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _schema_validator():
    """The shipped Draft 2020-12 schema (``manifest.schema.json``), checked once per process."""
    global _SCHEMA
    if _SCHEMA is None:
        from importlib import resources

        import jsonschema

        schema = json.loads(resources.files("litefocus.engine").joinpath("manifest.schema.json").read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        _SCHEMA = jsonschema.Draft202012Validator(schema)
    return _SCHEMA


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_manifest(path: Path) -> dict:
    """``path`` read as strict JSON (no NaN / Infinity, bounded size and depth) and validated
    against the manifest schema; every failure is one ManifestError naming the JSON path, the bad
    value and the fix."""
    if path.is_symlink():
        raise ManifestError(f"{path} is a symbolic link; the manifest must be a regular file; {FIX}")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"{path} is {size} bytes, above the {MAX_MANIFEST_BYTES} a manifest may have; {FIX}"
        )
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:200]
        raise ManifestError(f"{path} is not valid JSON ({reason}); {FIX}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise ManifestError(f'{path} is not a litefocus engine manifest (no "kind": "{KIND}")')
    version = manifest.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise ManifestError(
            f"{path} has schema version {_short(version)}; this litefocus reads version {SCHEMA_VERSION}; {FIX}"
        )
    from jsonschema.exceptions import best_match

    try:
        error = best_match(_schema_validator().iter_errors(manifest))  # the most relevant, or None
    except RecursionError:
        raise ManifestError(f"{path} is nested too deeply; {FIX}") from None
    if error is not None:
        raise ManifestError(
            f"{path}: {error.json_path} = {_short(error.instance)} is invalid ({error.message[:160]}); {FIX}"
        )
    for name, entry in manifest["entries"].items():
        check_entry(path, name, entry)
    if "text" in manifest:
        check_text(path, manifest["text"], manifest["entries"])
    return manifest


def entry_name(bucket, precision: str, batch: int = 2) -> str:
    """An entry's folder and key: ``10s-fp32`` for batch 2 (one guided request), ``10s-fp32-b8`` else."""
    return f"{bucket.name}-{precision}" + ("" if batch == 2 else f"-b{batch}")


def check_entry(path: Path, name: str, entry: dict) -> None:
    """Cross-check an entry's redundant numbers: every length follows from ``frames``."""
    from litefocus.buckets import Bucket

    b = entry["bucket"]
    where = f"{path}: $.entries[{name!r}]"
    try:
        bucket = Bucket(seconds=b["seconds"], frames=b["frames"])
    except ValueError as e:
        raise ManifestError(f"{where}.bucket: {e}; {FIX}") from None
    if abs(b["exact_seconds"] - bucket.exact_seconds) > 1e-6:
        raise ManifestError(
            f"{where}.bucket.exact_seconds = {_short(b['exact_seconds'])} disagrees with frames = {b['frames']} "
            f"({bucket.exact_seconds:g} s); {FIX}"
        )
    if "samples" in b and b["samples"] != bucket.samples:
        raise ManifestError(
            f"{where}.bucket.samples = {b['samples']} disagrees with frames = {b['frames']}; {FIX}"
        )
    batch = entry["modules"]["unet"]["contract"]["batch"]
    if name != entry_name(bucket, entry["precision"], batch):
        raise ManifestError(
            f"{where}: the entry name disagrees with its bucket ({bucket.name}), precision "
            f"({entry['precision']}) and batch ({_short(batch)}); {FIX}"
        )
    for module, rec in entry["modules"].items():
        if rec["contract"]["module"] != module or rec["contract"]["precision"] != entry["precision"]:
            raise ManifestError(f"{where}.modules.{module}.contract names another module or precision; {FIX}")
        for kind, f in rec["files"].items():
            folder, _, filename = f["path"].partition("/")
            expected = {"onnx": f"{module}.onnx", "data": f"{module}.onnx.data"}.get(kind)
            if folder != name or (expected is not None and filename != expected):
                raise ManifestError(
                    f"{where}.modules.{module}.files.{kind}.path = {_short(f['path'])}: must be "
                    f"{name}/{expected or '<name>.plan'}; {FIX}"
                )


TEXT_DIR = "text"  # the text-conditioning engine's folder (never a bucket entry's name)
TEXT_FILES = {
    "onnx": "conditioning.onnx",
    "data": "conditioning.onnx.data",
    "tokenizer": "tokenizer.json",
    "tokenizer_2": "tokenizer_2.json",
}


def check_text(path: Path, text: dict, entries: dict | None = None) -> None:
    """Cross-check the text engine's record: file names, the contract (rebuilt: shapes and names
    follow from its lengths and widths), the CLAP tokenizer's length, and the conditioning widths
    against every entry's UNet inputs."""
    from litefocus.engine.contract import ConditioningContract

    where = f"{path}: $.text"
    for kind, f in text["files"].items():
        want = f"{TEXT_DIR}/{TEXT_FILES[kind]}"
        if f["path"] != want:
            raise ManifestError(f"{where}.files.{kind}.path = {_short(f['path'])}: must be {want}; {FIX}")
    try:
        ConditioningContract.from_dict(text["contract"])
    except ValueError as e:
        raise ManifestError(f"{where}.contract: {e}; {FIX}") from None
    clap_len = text["tokenizers"]["tokenizer"]["model_max_length"]
    if clap_len != text["contract"]["clap_len"]:
        raise ManifestError(
            f"{where}.tokenizers.tokenizer.model_max_length = {clap_len} disagrees with the contract's "
            f"clap_len = {text['contract']['clap_len']}; {FIX}"
        )
    widths = {o["name"]: o["shape"][-1] for o in text["contract"]["outputs"]}
    for name, entry in (entries or {}).items():
        unet = {i["name"]: i["shape"][-1] for i in entry["modules"]["unet"]["contract"]["inputs"]}
        if any(unet.get(k) != v for k, v in widths.items()):
            raise ManifestError(
                f"{where}.contract: its conditioning widths {widths} differ from entry {name!r}'s UNet inputs; {FIX}"
            )


def read_manifest(engine_dir: Path) -> dict:
    """Read and check ``engine_dir/manifest.json`` (schema + cross-checks; files are verified per
    entry when it is opened: see verify_entry)."""
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        raise ManifestError(
            f"{engine_dir} is not an engine directory: it has no {MANIFEST}; create one with litefocus-export"
        )
    return parse_manifest(path)


def artifact_path(engine_dir: Path, rel: str) -> Path:
    """The file ``rel`` (``<entry>/<file>``) of an engine directory, checked before anything opens it:
    no absolute path, no ``..``, no symbolic link (entry folder or file), and inside ``engine_dir``
    after resolving."""
    from pathlib import PurePosixPath

    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or len(parts) != 2 or any(p in ("", ".", "..") for p in parts):
        raise ManifestError(
            f"engine file path {_short(rel)} is not <entry>/<file> inside the engine directory; {FIX}"
        )
    root = Path(engine_dir).resolve()
    folder, path = root / parts[0], root / parts[0] / parts[1]
    for p in (folder, path):
        if p.is_symlink():
            raise ManifestError(
                f"{rel}: {p.name} is a symbolic link; engine files must be regular files; {FIX}"
            )
    if not path.resolve().is_relative_to(root):
        raise ManifestError(f"engine file path {_short(rel)} resolves outside the engine directory; {FIX}")
    return path


GiB = 2**30
MAX_FILE_BYTES = {  # per file kind, checked before a byte is hashed; the schema has the same maxima
    "onnx": 2 * GiB,  # a protobuf's hard limit; the weights live in the data file
    "data": 16 * GiB,  # AudioLDM2-large's UNet is ~4.4 GB in fp32
    "plan": 16 * GiB,
    "tokenizer": 32 * 2**20,  # real tokenizer.json files are 1-3 MB
    "tokenizer_2": 32 * 2**20,
}


def entry_files(entry: dict) -> list[dict]:
    """Every file record of an entry (one per module artifact)."""
    return [f for module in entry.get("modules", {}).values() for f in module.get("files", {}).values()]


def verify_entry(engine_dir: Path, entry: dict) -> list[str]:
    """Problems with an entry's files (missing, too large, size or hash mismatch); empty when all verify."""
    modules = entry.get("modules", {}).values()
    return _verify_files(engine_dir, [kr for m in modules for kr in m.get("files", {}).items()])


def verify_text(engine_dir: Path, manifest: dict) -> list[str]:
    """Problems with the text engine's files (as verify_entry); empty when all verify or there is none."""
    text = manifest.get("text")
    return [] if text is None else _verify_files(engine_dir, list(text.get("files", {}).items()))


def _verify_files(engine_dir: Path, records: list[tuple[str, dict]]) -> list[str]:
    problems = []
    for kind, rec in records:
        try:
            path = artifact_path(engine_dir, rec["path"])
        except ManifestError as e:
            problems.append(str(e).removesuffix(f"; {FIX}"))
            continue
        cap = MAX_FILE_BYTES.get(kind, MAX_FILE_BYTES["data"])
        if not path.is_file():
            problems.append(f"{rec['path']} is missing")
        elif path.stat().st_size > cap:
            problems.append(
                f"{rec['path']} has {path.stat().st_size} bytes, above the {cap} a {kind} file may have"
            )
        elif path.stat().st_size != rec["bytes"]:
            problems.append(
                f"{rec['path']} has {path.stat().st_size} bytes, the manifest says {rec['bytes']}"
            )
        elif file_sha256(path) != rec["sha256"]:
            problems.append(f"{rec['path']} does not match its SHA-256 in the manifest (modified or corrupt)")
    return problems
