"""Atomic file writes, shared by checkpoints, metrics and pictures."""

from __future__ import annotations

import os
import re
import secrets

# <name>.<pid>.<random>.tmp, as atomic_write names its temporary files
_TEMPORARY = re.compile(r"(?P<name>.+)\.(?P<pid>[1-9][0-9]*)\.[0-9a-f]{8}\.tmp")


def atomic_write(path, write, fsync: bool = False) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it over ``path``.

    A reader never sees a half-written file, and an error (or a kill) leaves
    any old file in place; a failed write removes its temporary file.
    Missing parent directories are created. ``fsync=True`` flushes the data
    to disk before the rename, so the new file survives a power cut too.
    The temporary file is ``<name>.<pid>.<random>.tmp`` and gets the usual
    umask permissions (``tempfile.mkstemp`` would make it owner-only).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f"{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only the existence check is made
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, under another user
        return True
    return True


def remove_orphans(directory, ours=lambda name: True) -> list:
    """Delete the temporary files of :func:`atomic_write` whose writer died, in ``directory``.

    A kill (or a power cut) in the middle of :func:`atomic_write` leaves its
    ``<name>.<pid>.<random>.tmp`` behind; ``<name>`` itself still holds its
    last complete version. Such a file is deleted when ``ours(<name>)`` is
    true and no process ``<pid>`` exists now; files of running processes
    (this one included) and every other file stay. Only on POSIX, where
    ``os.kill(pid, 0)`` asks without signalling; elsewhere nothing is
    deleted. Returns the names of the deleted files, sorted.
    """
    if os.name != "posix":
        return []
    removed = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or not ours(match["name"]) or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _process_exists(pid):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:  # someone else removed it first
            continue
        removed.append(entry.name)
    return removed
