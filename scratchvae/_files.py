"""Atomic file writes, shared by checkpoints, metrics and pictures."""

from __future__ import annotations

import os
import secrets


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
