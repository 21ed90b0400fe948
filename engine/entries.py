"""The engine manifest as frozen records, built once from the validated JSON document.

``read_manifest`` returns the raw document (schema-validated and cross-checked): export writes it and
tests inspect it. Everything that runs engines reads this typed view instead: ``load_manifest`` gives
a ``Manifest`` whose ``entries`` are ``Entry`` records, each with one ``ModuleRecord`` per exported
module. Reading a module record rebuilds its contract from the recorded numbers and compares the
result with what the manifest recorded, so an engine directory written by another litefocus version
is refused with one ``ManifestError`` before any graph is opened.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from litefocus.buckets import Bucket
from litefocus.config import LiteFocusConfig
from litefocus.engine.contract import (
    MODULES,
    ConditioningContract,
    DecodeContract,
    UNetContract,
    index_input_name,
)
from litefocus.engine.manifest import FIX, ManifestError, read_manifest

NOT_THIS_VERSION = "the manifest's contracts do not match this litefocus version's; " + FIX


@dataclass(frozen=True)
class FileRecord:
    """One artifact: ``path`` (``<entry>/<file>``, relative to the engine directory), its SHA-256
    and its size in bytes."""

    path: str
    sha256: str
    bytes: int

    @classmethod
    def from_dict(cls, raw: dict) -> FileRecord:
        return cls(path=raw["path"], sha256=raw["sha256"], bytes=raw["bytes"])


def _files(raw: dict) -> Mapping[str, FileRecord]:
    return MappingProxyType({kind: FileRecord.from_dict(rec) for kind, rec in raw.items()})


def _unet_contract(record: dict, bucket: Bucket, config: LiteFocusConfig | None) -> UNetContract:
    shapes = {s["name"]: s["shape"] for s in record["inputs"]}
    levels = tuple(
        (f, shapes[index_input_name(f)][1])
        for f in (config.freq_bins if config else ())
        if index_input_name(f) in shapes
    )
    return UNetContract(
        bucket,
        batch=record["batch"],
        text_len=record["text_len"],
        gpt2_dim=shapes["encoder_hidden_states"][2],
        t5_dim=shapes["encoder_hidden_states_1"][2],
        precision=record["precision"],
        litefocus=config,
        index_levels=levels,
    )


def _decode_contract(record: dict, bucket: Bucket, config: LiteFocusConfig | None) -> DecodeContract:
    return DecodeContract(
        bucket,
        batch=record["batch"],
        precision=record["precision"],
        window_frames=record.get("window_frames"),
        overlap_frames=record.get("overlap_frames", 0),
    )


REBUILD = {"unet": _unet_contract, "decode": _decode_contract}


def rebuild_contract(
    module: str, record: dict, bucket: Bucket, config: LiteFocusConfig | None
) -> UNetContract | DecodeContract:
    """The contract of ``module`` rebuilt from its manifest record (shapes follow from the bucket,
    the LiteFocus config and a few recorded numbers), checked equal to the record: ManifestError
    when the record is not what this litefocus version writes."""
    try:
        contract = REBUILD[module](record, bucket, config)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ManifestError(
            f"the manifest's contracts are not this litefocus version's ({type(e).__name__}: {str(e)[:120]}); "
            f"{FIX}"
        ) from None
    if contract.to_dict() != record:
        raise ManifestError(NOT_THIS_VERSION)
    return contract


@dataclass(frozen=True)
class ModuleRecord:
    """One exported module of an entry: its rebuilt ``contract``, its ``files`` by kind ("onnx",
    "data", "plan"), the graph form it was written in (``gpu_ops``, ``conv``, ``attention``) and the
    TensorRT record of its plan, if any; ``raw``: the module's JSON object."""

    name: str
    contract: UNetContract | DecodeContract
    files: Mapping[str, FileRecord]
    gpu_ops: tuple[str, ...]
    conv: str | None
    attention: str | None
    tensorrt: dict | None
    raw: dict

    @classmethod
    def from_dict(cls, name: str, raw: dict, bucket: Bucket, config: LiteFocusConfig | None) -> ModuleRecord:
        return cls(
            name=name,
            contract=rebuild_contract(name, raw["contract"], bucket, config),
            files=_files(raw["files"]),
            gpu_ops=tuple(raw.get("gpu_ops") or ()),
            conv=raw.get("conv"),
            attention=raw.get("attention"),
            tensorrt=raw.get("tensorrt"),
            raw=raw,
        )


@dataclass(frozen=True)
class Entry:
    """One bucket entry: its ``bucket``, ``precision``, UNet ``batch`` (rows per call) and one
    ``ModuleRecord`` per module of ``engine.contract.MODULES``; ``raw``: the entry's JSON object."""

    name: str
    bucket: Bucket
    precision: str
    batch: int
    modules: Mapping[str, ModuleRecord]
    raw: dict

    @property
    def unet(self) -> ModuleRecord:
        return self.modules["unet"]

    @property
    def decode(self) -> ModuleRecord:
        return self.modules["decode"]

    @property
    def group_key(self) -> tuple[int, str]:
        """Entries with the same key are one bucket at one precision, exported at several batch sizes."""
        return (self.bucket.frames, self.precision)

    @classmethod
    def from_dict(cls, name: str, raw: dict, config: LiteFocusConfig | None) -> Entry:
        b = raw["bucket"]
        try:
            bucket = Bucket(seconds=b["seconds"], frames=b["frames"])
        except ValueError as e:
            raise ManifestError(f"$.entries[{name!r}].bucket: {e}; {FIX}") from None
        modules = {m: ModuleRecord.from_dict(m, raw["modules"][m], bucket, config) for m in MODULES}
        return cls(
            name=name,
            bucket=bucket,
            precision=raw["precision"],
            batch=modules["unet"].contract.batch,
            modules=MappingProxyType(modules),
            raw=raw,
        )


@dataclass(frozen=True)
class TextRecord:
    """The text-conditioning engine: its ``files`` by kind ("onnx", "data", "tokenizer",
    "tokenizer_2"), its rebuilt ``contract``, the two ``tokenizers``' settings (model_max_length,
    pad_id, padding); ``raw``: the JSON object."""

    files: Mapping[str, FileRecord]
    contract: ConditioningContract
    tokenizers: dict
    raw: dict

    @classmethod
    def from_dict(cls, raw: dict) -> TextRecord:
        try:
            contract = ConditioningContract.from_dict(raw["contract"])
        except ValueError as e:
            raise ManifestError(f"$.text.contract: {e}; {FIX}") from None
        return cls(files=_files(raw["files"]), contract=contract, tokenizers=raw["tokenizers"], raw=raw)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest, typed: ``entries`` sorted by (bucket frames, batch), the LiteFocus
    config they were exported with (None: LiteFocus off), the ``model`` identity, the library
    ``versions`` of the export and the ``text`` engine (None when there is none); ``raw``: the
    document."""

    raw: dict
    litefocus: LiteFocusConfig | None
    model: dict
    versions: dict
    entries: Mapping[str, Entry]
    text: TextRecord | None

    @classmethod
    def from_dict(cls, raw: dict) -> Manifest:
        """The typed view of a document ``read_manifest`` returned (schema-valid and cross-checked)."""
        cfg = raw["litefocus"]
        config = None if cfg is None else LiteFocusConfig.from_dict(cfg)
        entries = [Entry.from_dict(name, e, config) for name, e in raw["entries"].items()]
        entries.sort(key=lambda e: (e.bucket.frames, e.batch))
        return cls(
            raw=raw,
            litefocus=config,
            model=raw["model"],
            versions=raw.get("versions", {}),
            entries=MappingProxyType({e.name: e for e in entries}),
            text=TextRecord.from_dict(raw["text"]) if raw.get("text") is not None else None,
        )


def load_manifest(engine_dir: str | Path) -> Manifest:
    """``engine_dir/manifest.json`` read, checked (see ``read_manifest``) and typed."""
    return Manifest.from_dict(read_manifest(Path(engine_dir)))
