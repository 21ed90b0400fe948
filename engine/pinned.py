"""Engine files pinned while they load: the file that is hashed is the file that is loaded.

``pin_files`` opens each artifact once (no symbolic link at any step: ``O_NOFOLLOW`` through the
entry folder's descriptor), checks its size against the manifest's record and the cap of its kind
BEFORE reading a byte, hashes it through that descriptor and, for small files (graphs, tokenizers),
keeps the very bytes it hashed. ONNX Runtime and TensorRT open engine files by path, so after they
have loaded, ``Pinned.recheck`` compares the identity (device, inode, size, modification and change
times) of both the path and the descriptor with what was hashed: a file swapped (renamed over) or
rewritten in between is refused. Memory stays flat for GB weights files: they are streamed.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from litefocus.engine.manifest import FIX, MAX_FILE_BYTES, ManifestError, artifact_path

KEEP = (
    "onnx",
    "tokenizer",
    "tokenizer_2",
)  # kinds whose hashed bytes are kept (read once, parsed from memory)
CHUNK = 1 << 22


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Pinned:
    """Open, verified engine files: ``path(key)``, ``data(key)`` (the hashed bytes of KEEP kinds),
    ``recheck()`` once the backends have loaded, ``close()`` (or use it as a context manager)."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[Path, int, tuple, bytes | None]] = {}

    def add(self, key: str, path: Path, fd: int, identity: tuple, data: bytes | None) -> None:
        self._files[key] = (path, fd, identity, data)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def path(self, key: str) -> Path:
        return self._files[key][0]

    def data(self, key: str) -> bytes | None:
        return self._files[key][3]

    def recheck(self) -> None:
        """ValueError (one line) when any pinned file changed or was replaced since it was hashed."""
        for path, fd, identity, _ in self._files.values():
            try:
                now = (_identity(os.stat(path, follow_symlinks=False)), _identity(os.fstat(fd)))
            except OSError:
                now = None
            if now != (identity, identity):
                raise ValueError(
                    f"{path.parent.name}/{path.name} changed while it was loaded (replaced or rewritten after "
                    "its SHA-256 was checked); do not modify an engine directory while it is in use, and "
                    "re-export it with litefocus-export --force if it was damaged"
                )

    def close(self) -> None:
        for _, fd, _, _ in self._files.values():
            os.close(fd)
        self._files = {}

    def __enter__(self) -> Pinned:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_nofollow(engine_dir: Path, rel: str) -> int:
    """A read-only descriptor of ``<entry>/<file>``: the entry folder and the file opened without
    following a symbolic link, relative to the engine directory's descriptor."""
    folder, name = rel.split("/")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    root = os.open(engine_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sub = os.open(folder, flags | os.O_DIRECTORY, dir_fd=root)
        try:
            return os.open(name, flags | os.O_NONBLOCK, dir_fd=sub)  # O_NONBLOCK: a FIFO does not hang
        finally:
            os.close(sub)
    finally:
        os.close(root)


def _hash_fd(fd: int, keep: bool) -> tuple[str, bytes | None]:
    h, parts, offset = hashlib.sha256(), [], 0
    while block := os.pread(fd, CHUNK, offset):
        h.update(block)
        offset += len(block)
        if keep:
            parts.append(block)
    return h.hexdigest(), (b"".join(parts) if keep else None)


# A weights file ends where its graph's last tensor does (litefocus-export writes them back to back);
# a little slack for writers that pad. Capping it there refuses a huge file before a byte is hashed.
DATA_SLACK = 1 << 16


def _graph_limit(key: str, kinds: dict, records: dict, pinned: Pinned) -> tuple[int, str] | bool | None:
    """For a weights file: (cap, why) from its graph's references, False to skip it (its graph failed
    verification: hashing gigabytes would not make that better), None when nothing bounds it."""
    if kinds.get(key, key) != "data":
        return None
    graph = key.removesuffix("data") + "onnx"
    if graph not in records:
        return None
    if graph not in pinned:
        return False
    from litefocus.engine.onnx_refs import data_extent

    extent = data_extent(pinned.data(graph) or b"")
    return None if extent is None else (extent + DATA_SLACK, f"what its graph reads ({extent} bytes)")


def _pin_one(
    engine_dir: Path, key: str, kind: str, rec: dict, pinned: Pinned, limit: tuple[int, str] | None = None
) -> str | None:
    """Pin one file into ``pinned``; the problem, without the fix, when it does not verify. ``limit``:
    a tighter (cap, reason) than the kind's."""
    try:
        path = artifact_path(engine_dir, rec["path"])
    except ManifestError as e:
        return str(e).removesuffix(f"; {FIX}")
    try:
        fd = _open_nofollow(Path(engine_dir), rec["path"])
    except FileNotFoundError:
        return f"{rec['path']} is missing"
    except OSError as e:
        return f"{rec['path']} cannot be opened as a regular file ({e.strerror})"
    try:
        st = os.fstat(fd)
        cap = MAX_FILE_BYTES.get(kind, MAX_FILE_BYTES["data"])
        if not stat.S_ISREG(st.st_mode):
            return f"{rec['path']} is not a regular file"
        if st.st_size > cap:
            return f"{rec['path']} has {st.st_size} bytes, above the {cap} a {kind} file may have"
        if limit is not None and st.st_size > limit[0]:
            return f"{rec['path']} has {st.st_size} bytes, more than {limit[1]}"
        if st.st_size != rec["bytes"]:
            return f"{rec['path']} has {st.st_size} bytes, the manifest says {rec['bytes']}"
        digest, data = _hash_fd(fd, keep=kind in KEEP)
        if digest != rec["sha256"] or _identity(os.fstat(fd)) != _identity(st):
            return f"{rec['path']} does not match its SHA-256 in the manifest (modified or corrupt)"
        pinned.add(key, path, fd, _identity(st), data)
        fd = None
        return None
    finally:
        if fd is not None:
            os.close(fd)


def pin_files(engine_dir: Path, records: dict[str, dict], what: str, kinds: dict | None = None) -> Pinned:
    """Open and verify ``records`` ({key: file record}; ``kinds`` maps a key to its file kind, the key
    itself by default); ValueError (one line naming every problem and the fix) when any is missing,
    too large, of another size than recorded or of another hash. ``what`` names the engine."""
    pinned, problems, kinds = Pinned(), [], kinds or {}
    try:  # graphs first: a weights file is capped by what its graph reads
        for key, rec in sorted(records.items(), key=lambda kv: kinds.get(kv[0], kv[0]) != "onnx"):
            limit = _graph_limit(key, kinds, records, pinned)
            if limit is False:
                continue
            problem = _pin_one(Path(engine_dir), key, kinds.get(key, key), rec, pinned, limit)
            if problem:
                problems.append(problem)
    except BaseException:
        pinned.close()
        raise
    if problems:
        pinned.close()
        raise ValueError(f"{what} in {engine_dir} failed verification: {'; '.join(problems)}; {FIX}")
    return pinned
