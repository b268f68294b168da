"""Write secret files atomically, and refuse directories other users can reach.

A reader (nginx, HAProxy, ... on reload) sees either the whole old file or the whole new one: the
new content goes to a temporary file in the same directory, created with its final mode (never a
moment world-readable), fsynced, renamed over the target, and the directory is fsynced so the
rename survives a crash.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from sessionbus.servers.keyfile.formats import KeyFileError

__all__ = ["UnsafeDirectoryError", "check_private_dir", "write_atomic"]


class UnsafeDirectoryError(KeyFileError):
    """The directory meant for key files is missing or reachable by other users (one line)."""


def _same_content(path: Path, data: bytes) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != len(data):
        return False  # a symlink or anything else gets replaced by a regular file
    with open(path, "rb") as f:
        return f.read() == data


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, gid: int | None = None) -> bool:
    """Replace ``path`` with ``data``; return False (and write nothing) if it already holds it.

    The False return lets callers skip a server reload.  When the content is unchanged but the
    file's permission bits (or group, with ``gid``) differ, they are corrected in place.  With
    ``gid`` the file gets that group before it is renamed into place (a server reading as a
    member of the group never meets a file it cannot open).
    """
    path = Path(path)
    directory = path.parent
    if _same_content(path, data):
        st = os.lstat(path)
        if gid is not None and st.st_gid != gid:
            os.chown(path, -1, gid, follow_symlinks=False)
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)
        return False

    tmp = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        try:
            if gid is not None:
                os.fchown(fd, -1, gid)
            os.fchmod(fd, mode)  # the umask may have taken bits off; never adds any
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    return True


def check_private_dir(path: Path) -> None:
    """Raise :class:`UnsafeDirectoryError` unless ``path`` is a directory with no access for others.

    Group access is allowed (0o750: a server reading as a group member); any "other" bit
    (``mode & 0o007``) is refused.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UnsafeDirectoryError(f"{path}: key file directory does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectoryError(f"{path}: not a directory")
    perms = stat.S_IMODE(st.st_mode)
    if perms & 0o007:
        raise UnsafeDirectoryError(
            f"{path}: key file directory is open to other users (mode {perms:04o}); "
            "run chmod o-rwx on it"
        )
