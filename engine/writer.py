"""The engine directory's write rules, next to its read rules (``manifest.py``).

Only the exporter writes an engine directory, and only through this module: which ``--out`` is
acceptable, one export at a time (``.lock``), scratch folders, install by rename, and the one
function that writes ``manifest.json`` (``EngineDirLock.write_manifest``, under the held lock). The
manifest document itself is built here as data (``new_manifest``, ``with_entry``, ``with_text``, ...):
every change to it is a new document handed to that writer.

litefocus deletes only what it created and recorded. Every temporary folder gets an unguessable
name (``.tmp-<label>-<16 hex digits>``), written into the record *before* the folder is made; the
record is the ``.lock`` file itself (one name a line), read and written only through the locked
descriptor. A name that merely looks like litefocus's (a user's ``.tmp-photos/``) is never
deleted and never taken for litefocus's own. ``.lock`` is opened without following a symbolic link
and without blocking (a FIFO), and anything but a regular file with one link is refused.
Deleting never follows a symbolic link (``shutil.rmtree`` refuses one and removes links inside a
tree as links), and only folders owned by this user are deleted.

Killed runs may also leave ``engine/fileio.atomic_path``'s temporary manifest
(``.manifest.json.<random>.tmp``): a regular file of that exact pattern, owned by this user, is
litefocus's and is removed under the lock; it never makes a directory look foreign.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from litefocus.engine.fileio import atomic_path
from litefocus.engine.manifest import (
    KIND,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    SCHEMA_VERSION,
    file_sha256,
    library_versions,
)

logger = logging.getLogger(__name__)

LOCK = ".lock"
MAX_RECORD_BYTES = 1 << 16  # a record holds a few dozen names at most
SCRATCH = re.compile(r"\.tmp-[A-Za-z0-9._-]{1,64}-[0-9a-f]{16}")
ATOMIC_LEFTOVER = re.compile(r"\." + re.escape(MANIFEST) + r"\.[A-Za-z0-9_]{1,32}\.tmp")


def _regular_file(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1


def _not_a_lock(out: Path) -> ValueError:
    return ValueError(
        f"--out {out}: {LOCK} is not a regular file (a symbolic link, FIFO, device or hard link); litefocus "
        "leaves it alone: remove it or pass a new directory"
    )


def _open_lock(out: Path, write: bool) -> int | None:
    """The lock's descriptor (created when ``write``), None when there is none to read. Never follows a
    symbolic link, never blocks on a FIFO, never opens a device; refuses all but a regular file."""
    path = out / LOCK
    try:
        if not _regular_file(os.lstat(path)):
            raise _not_a_lock(out)
    except FileNotFoundError:
        if not write:
            return None
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_RDWR | os.O_CREAT if write else os.O_RDONLY)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EWOULDBLOCK):
            raise _not_a_lock(out) from None
        raise ValueError(
            f"--out {out}: cannot open {LOCK} ({e.strerror}); pass a directory you can write to"
        ) from None
    if not _regular_file(os.fstat(fd)):  # swapped between lstat and open
        os.close(fd)
        raise _not_a_lock(out)
    return fd


def _parse_record(data: bytes) -> list[str]:
    """The scratch names of a record; anything else in it (a torn write, junk) is ignored."""
    names = data.decode("utf-8", "replace").splitlines()
    return list(dict.fromkeys(n for n in names if SCRATCH.fullmatch(n)))


def recorded_names(out: Path) -> list[str]:
    """The scratch folders litefocus recorded in ``out``'s lock (read without taking it)."""
    fd = _open_lock(out, write=False)
    if fd is None:
        return []
    try:
        return _parse_record(os.pread(fd, MAX_RECORD_BYTES, 0))
    finally:
        os.close(fd)


def _atomic_leftover(path: Path) -> bool:
    """A temporary manifest of a killed atomic write: the exact pattern, a regular file of ours."""
    if not ATOMIC_LEFTOVER.fullmatch(path.name):
        return False
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        return _regular_file(st) and st.st_uid == os.geteuid()
    return False


def foreign_entries(out: Path) -> list[str]:
    """Names in ``out`` that are not litefocus's own: its lock, recorded scratch folders and leftovers."""
    own = {LOCK, *recorded_names(out)}
    return sorted(p.name for p in out.iterdir() if p.name not in own and not _atomic_leftover(p))


def check_out(out: Path) -> None:
    """Refuse, before writing anything, an ``--out`` that is not (or cannot become) a litefocus engine
    directory: a file, a non-empty folder without a manifest, a folder whose manifest.json is not
    litefocus's (``--force`` never changes that: it only rebuilds what a litefocus manifest lists), or a
    lock that is not a regular file."""
    if out.is_symlink() and not out.is_dir():
        raise ValueError(f"--out {out} is a symbolic link to no directory; pass a new or engine directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory; pass a new or engine directory")
    if not out.is_dir():
        return
    manifest = out / MANIFEST
    if manifest.exists() or manifest.is_symlink():
        if manifest.is_symlink() or not manifest.is_file():
            raise ValueError(f"--out {out}: {MANIFEST} is not a regular file; pass a new directory")
        try:
            kind = json.loads(manifest.read_bytes()[:MAX_MANIFEST_BYTES]).get("kind")
        except (ValueError, AttributeError, RecursionError):
            kind = None
        if kind != KIND:
            raise ValueError(
                f"--out {out} holds a {MANIFEST} that is not a litefocus engine manifest; litefocus leaves "
                "it alone (with --force too): pass a new directory"
            )
        recorded_names(out)  # refuses a lock that is not a regular file
    elif foreign_entries(out):
        raise ValueError(
            f"--out {out} exists, is not empty and is not an engine directory (no manifest.json); "
            "pass a new directory or an engine directory"
        )


def check_out_beside_model(out: Path, model: Path | None) -> None:
    """Refuse an ``--out`` inside the model directory: its files would change the model's hash."""
    if model is not None and model.is_dir() and out.resolve().is_relative_to(model.resolve()):
        raise ValueError(
            f"--out {out} is inside --model {model}: the engines would change the model's hash; pass an "
            "--out outside the model directory"
        )


def prepare_out(out: Path) -> None:
    """Create ``out`` or check it is an engine directory we can write (see check_out)."""
    check_out(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(
            f"--out {out} is not writable ({e.strerror}); pass a directory you can write to"
        ) from None


def refuse_unlisted(out: Path, name: str, listed: bool) -> None:
    """litefocus replaces only a folder it recorded (``listed``), and never a link or a file."""
    path = out / name
    if not (path.exists() or path.is_symlink()):
        return
    if not listed:
        raise ValueError(
            f"--out {out} has a {name} that its manifest does not list (an interrupted export's, or not "
            "litefocus's); litefocus leaves it alone: remove it or pass another --out"
        )
    if path.is_symlink() or not path.is_dir():
        raise ValueError(
            f"--out {out}: {name} is not a directory (a symbolic link or a file); litefocus leaves it alone: "
            "remove it"
        )


class EngineDirLock:
    """The held lock of one engine directory and the record of the scratch folders made under it."""

    def __init__(self, out: Path, fd: int):
        self.out, self._fd = out, fd
        self._identity = self._stat_key(os.fstat(fd))

    @staticmethod
    def _stat_key(st: os.stat_result) -> tuple[int, int]:
        return st.st_dev, st.st_ino

    def check_same_dir(self) -> None:
        """``out`` is still the directory that was locked (not swapped for another one meanwhile)."""
        try:
            same = self._stat_key(os.lstat(self.out / LOCK)) == self._identity
        except OSError:
            same = False
        if not same:
            raise RuntimeError(f"--out {self.out} was replaced during the export; run the export again")

    def write_manifest(self, manifest: dict) -> None:
        """THE writer of manifest.json: atomically, under the held lock, and only to a manifest.json
        that is not (now) a link out of the directory."""
        self.check_same_dir()
        path = self.out / MANIFEST
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise RuntimeError(f"--out {self.out}: {MANIFEST} was replaced during the export; run it again")
        with atomic_path(path) as tmp:  # a reader sees the old manifest or the new one, never half
            tmp.write_text(json.dumps(manifest, indent=1) + "\n")

    def names(self) -> list[str]:
        return _parse_record(os.pread(self._fd, MAX_RECORD_BYTES, 0))

    def _write(self, names: list[str]) -> None:
        data = "".join(f"{n}\n" for n in names).encode()
        if len(data) > MAX_RECORD_BYTES:
            raise RuntimeError(f"--out {self.out}: too many temporary folders recorded; remove {LOCK}")
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))
        os.fsync(self._fd)

    def _reserve(self, label: str) -> Path:
        """A new unguessable scratch name, recorded before anything of that name is made."""
        name = f".tmp-{label}-{secrets.token_hex(8)}"
        assert SCRATCH.fullmatch(name), name
        self._write([*self.names(), name])
        return self.out / name

    def make_dir(self, label: str) -> Path:
        """A new private (0700) scratch folder, recorded first: cleanup finds it after a crash."""
        self.check_same_dir()
        path = self._reserve(label)
        os.mkdir(path, 0o700)
        return path

    def _delete(self, name: str) -> None:
        """Delete a recorded scratch folder when it is a real folder of ours; forget the name."""
        path = self.out / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid != os.geteuid():
            logger.warning("%s belongs to another user: left alone (and recorded)", path)
            return
        if st is not None and stat.S_ISDIR(st.st_mode):
            try:
                shutil.rmtree(path)  # refuses a symbolic link; links inside are removed, never followed
            except OSError as e:
                logger.warning("could not remove %s (%s); it stays recorded", path, e.strerror)
                return
        elif st is not None:
            logger.warning("%s is not a folder litefocus made (a link or a file): left alone", path)
        self._write([n for n in self.names() if n != name])

    def discard(self, path: Path) -> None:
        """Delete a scratch folder made by make_dir (a failed build)."""
        self._delete(path.name)

    def clean_stale(self) -> None:
        """Remove what killed runs left: recorded scratch folders and temporary manifests of ours."""
        self.check_same_dir()
        for name in self.names():
            self._delete(name)
        for path in self.out.iterdir():
            if _atomic_leftover(path):
                path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def building(self, name: str, listed: bool) -> Iterator[Path]:
        """A scratch folder to build ``name`` in: installed (see install) when the block finishes,
        deleted when it raises (an interrupted or failed build leaves nothing half-written)."""
        tmp = self.make_dir(name)
        try:
            yield tmp
            self.install(tmp, name, listed)
        except BaseException:
            self.discard(tmp)
            raise

    def install(self, tmp: Path, name: str, listed: bool) -> None:
        """Swap the finished scratch folder ``tmp`` into place as ``name`` (replacing the older build the
        manifest lists); an unlisted ``name``, a link or a file there is refused, never replaced."""
        self.check_same_dir()
        refuse_unlisted(self.out, name, listed)
        final = self.out / name
        os.chmod(tmp, 0o755)  # scratch folders are 0700: engines are shared with the serving user
        for f in tmp.iterdir():
            if not f.is_symlink():
                f.chmod(0o644)
        old = None
        if final.exists():
            old = self._reserve(f"old-{name}")
            final.rename(old)
        tmp.rename(final)
        self._write([n for n in self.names() if n != tmp.name])
        if old is not None:
            self._delete(old.name)


@contextlib.contextmanager
def locked(out: Path) -> Iterator[EngineDirLock]:
    """One export at a time per engine directory (a second one waits)."""
    fd = _open_lock(out, write=True)
    assert fd is not None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("%s: another export holds %s; waiting for it", out, LOCK)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield EngineDirLock(out, fd)
    finally:
        os.close(fd)  # releases the lock


# ---- the manifest as data: each change is a new document, handed to EngineDirLock.write_manifest ----
# How schema version 2 spells a build backend in an entry's "backend": ONNX Runtime is "onnx" there,
# so that runtimes which read version 2 keep reading what this exporter writes (the schema also
# accepts "onnxruntime", for a later version to write).
MANIFEST_BACKEND = {"onnxruntime": "onnx", "tensorrt": "tensorrt"}


def new_manifest(model: dict, litefocus_config: dict | None) -> dict:
    """An engine directory's manifest without entries: the model's identity and the LiteFocus config."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "versions": library_versions(),
        "model": model,
        "litefocus": litefocus_config,
        "entries": {},
    }


def file_record(path: Path, entry: str) -> dict:
    """{"path" (``<entry>/<file name>``, relative to the engine dir), "sha256", "bytes"} of one artifact.

    Artifacts are written in a temporary folder that is renamed to ``entry``: the record names the
    final place."""
    return {"path": f"{entry}/{path.name}", "sha256": file_sha256(path), "bytes": path.stat().st_size}


def with_scheduler(manifest: dict, scheduler: dict) -> dict:
    """The manifest with the model's scheduler config (the runtime's samplers read it there)."""
    return {**manifest, "scheduler": scheduler}


def with_entry(manifest: dict, name: str, entry: dict) -> dict:
    """The manifest listing ``entry`` as ``name`` (replacing an older build of it in place)."""
    return {**manifest, "entries": {**manifest["entries"], name: entry}, "versions": library_versions()}


def with_text(manifest: dict, record: dict) -> dict:
    """The manifest listing the text-conditioning engine ``record``."""
    return {**manifest, "text": record, "versions": library_versions()}


def without_engines(manifest: dict) -> dict:
    """The manifest listing no entry and no text engine (written before their folders are deleted)."""
    return {**{k: v for k, v in manifest.items() if k != "text"}, "entries": {}}


def module_record(entry: dict, module: str) -> dict:
    """One module's record (``unet`` or ``decode``) of a raw entry document."""
    return entry["modules"][module]


def entry_bytes(entry: dict) -> int:
    """The size of every file a raw entry document lists."""
    return sum(f["bytes"] for m in entry["modules"].values() for f in m["files"].values())
