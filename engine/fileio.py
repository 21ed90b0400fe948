"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Only regular files are replaced: a FIFO, a device node, a socket or a directory at the path (or a
symlink to one) is refused with a ValueError, so ``-o /dev/null`` or ``-o some.fifo`` never turns the
special file into a regular one. A symlink to a regular file is followed: its target is replaced and
the link is kept. An existing file keeps its permission bits; one that is read-only (no write bit, or
not writable by us) is refused rather than silently replaced.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

NEW_FILE_MODE = 0o644  # replaces mkstemp's 0600: engines, manifests and audio stay readable by others

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def writable_target(path: str | os.PathLike) -> tuple[Path, int | None]:
    """(the path to replace, the mode to give it): ``path`` itself, or a symlink's final target, and
    the existing file's permission bits (None when nothing is there yet).

    Raises a one-line ValueError when the path (or what a symlink points to) is not a regular file,
    or is a read-only file."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target, None
    except OSError as e:
        raise ValueError(f"{path}: cannot inspect it ({e.strerror}); choose another path") from None
    via = f" (via the symlink {path})" if target != path else ""
    for test, kind in _KINDS:
        if test(st.st_mode):
            raise ValueError(f"{target}{via} is {kind}, not a regular file; write to a file path instead")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{target}{via} is not a regular file; write to a file path instead")
    mode = stat.S_IMODE(st.st_mode) & 0o777  # no setuid/setgid/sticky on a freshly written file
    if not mode & 0o222 or not os.access(target, os.W_OK):
        raise ValueError(
            f"{target}{via} is read-only (mode {mode:04o}); make it writable (chmod u+w) or choose another path"
        )
    return target, mode


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path``.

    On any failure (an exception, KeyboardInterrupt, or SystemExit from a signal handler) the
    temporary file is removed and ``path`` is left as it was. The new file gets ``mode`` when
    given, else the existing file's permission bits, else NEW_FILE_MODE. Special files and read-only
    files are refused (see ``writable_target``) before anything is written.
    """
    target, existing = writable_target(path)
    mode = mode if mode is not None else existing if existing is not None else NEW_FILE_MODE
    # the name's start only (48 characters, at most 192 bytes): a name near the 255-byte limit fits too
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:48]}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data) -> None:
    """Write bytes (or any buffer) atomically and durably (fsync before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
