"""Atomic file writes, shared by checkpoints, metrics and pictures."""

from __future__ import annotations

import os
import re
import secrets
import threading

# <name>.<pid>.<random>.tmp, as atomic_write names its temporary files
_TEMPORARY = re.compile(r"(?P<name>.+)\.(?P<pid>[1-9][0-9]{0,9})\.[0-9a-f]{8}\.tmp")
_writing = set()  # names of the temporary files this process is writing now (each name is unique)
_writing_lock = threading.Lock()


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
    with _writing_lock:
        _writing.add(os.path.basename(tmp))
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
    finally:
        with _writing_lock:
            _writing.discard(os.path.basename(tmp))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only the existence check is made
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it exists, under another user; else: cannot tell
        return True
    return True


def remove_orphans(directory, ours=lambda name: True) -> list:
    """Delete the temporary files of :func:`atomic_write` whose writer died, in ``directory``.

    A kill (or a power cut) in the middle of :func:`atomic_write` leaves its
    ``<name>.<pid>.<random>.tmp`` behind; ``<name>`` itself still holds its
    last complete version. Such a file is deleted when ``ours(<name>)`` is
    true and no process ``<pid>`` exists now, or ``<pid>`` is this process's
    and it is not writing that file (a restarted container often gets the
    pid its killed predecessor had). Files of other running processes stay,
    and so do those whose pid was taken by an unrelated process since;
    processes are looked up on this machine, so a writer elsewhere (another
    host or container sharing the folder) counts as gone. A file that
    cannot be deleted is skipped. Only on POSIX, where ``os.kill(pid, 0)``
    asks without signalling; elsewhere nothing is deleted. Returns the names
    of the deleted files, sorted.
    """
    if os.name != "posix":
        return []
    removed = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or not ours(match["name"]) or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(match["pid"])
        if pid == os.getpid():
            with _writing_lock:
                if entry.name in _writing:
                    continue
        elif _process_exists(pid):
            continue
        try:
            os.unlink(entry.path)
        except OSError:  # gone already, not ours to delete, or no longer a file
            continue
        removed.append(entry.name)
    return removed
