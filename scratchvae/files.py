"""Atomic file writes (checkpoints, metrics, pictures) and the clean-up of what a killed write leaves."""

from __future__ import annotations

import os
import re
import secrets

# <name>.<pid>.<random>.tmp, as atomic_write names its temporary files
TEMPORARY = re.compile(r"(?P<name>.+)\.[1-9][0-9]{0,9}\.[0-9a-f]{8}\.tmp")


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


def remove_stale_temporaries(directory, names, before: float) -> list:
    """Delete the temporary files of :func:`atomic_write` for ``names`` in ``directory`` last written before ``before``.

    A kill in the middle of :func:`atomic_write` leaves its
    ``<name>.<pid>.<random>.tmp`` behind, while ``<name>`` still holds its last
    complete version. A run calls this once as it starts, with ``before`` its
    start time (``time.time()``): every temporary file it writes itself is
    newer, so only what earlier runs left goes. (A run still writing into the
    same folder at that moment would lose its temporary file and see its
    write fail; the folder belongs to one run at a time.) ``names`` is a
    predicate on ``<name>``; files that cannot be deleted are skipped.
    Returns the names of the deleted files, sorted.
    """
    removed = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        match = TEMPORARY.fullmatch(entry.name)
        if match is None or not names(match["name"]):
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or entry.stat().st_mtime >= before:
                continue
            os.unlink(entry.path)
        except OSError:  # gone already, or not ours to delete
            continue
        removed.append(entry.name)
    return removed


class FolderBusy(OSError):
    """Another live process holds the folder's lock (the message names its pid)."""


class FolderLock:
    """An exclusive lock on a folder for as long as a process works in it (a context manager).

    The lock is an OS file lock on ``<folder>/.lock`` (``fcntl.flock`` on
    POSIX, ``msvcrt.locking`` on Windows), taken without waiting: a second
    taker gets :class:`FolderBusy` naming the holder's pid, which the holder
    writes into the file. The OS releases the lock when its holder exits,
    however it exits, so a lock left by a dead process never blocks. The
    file itself stays (deleting it would let two processes lock two
    different files of the same name).
    """

    NAME = ".lock"

    def __init__(self, folder, what="folder"):
        self.path = os.path.join(os.fspath(folder), self.NAME)
        self.what = what
        self._file = None

    def __enter__(self):
        f = open(self.path, "a+")
        try:
            _lock(f)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise FolderBusy(f"{os.path.dirname(self.path)} is in use by another {self.what} (pid {holder})") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc):
        if self._file is not None:
            self._file.close()  # closing releases the lock
            self._file = None
        return False


def _lock(f) -> None:
    """Lock the open file ``f`` exclusively without waiting; ``OSError`` if another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


FILE_MAGIC = {  # the first bytes of files often given by mistake, and what they are
    b"\x93NUMPY": "a single NumPy array (.npy)",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"\x1f\x8b": "a gzip file",
    b"%PDF": "a PDF document",
    b"\x80": "a file of Python objects",
    b"\x00\x00\x08": "an IDX data file",
}


def file_kind(head: bytes) -> str:
    """What a file that starts with ``head`` is, in words, as far as its first bytes tell."""
    if not head:
        return "empty"
    for magic, kind in FILE_MAGIC.items():
        if head.startswith(magic):
            return kind
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "a binary file of another kind"
