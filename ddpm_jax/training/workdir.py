"""Run directories: checked before anything is written, and held by one process at a time.

:func:`prepare_workdir` turns a ``--workdir`` into an absolute, existing,
writable directory, or raises ValueError (an empty path, a file, a folder that
cannot be created or written). :class:`WorkdirLock` is an OS file lock
(``flock``) on a file inside it: a second process that asks for the same lock
is refused with the holder's PID, and since the kernel drops the lock when its
holder dies, even a SIGKILLed run never leaves a stale one behind.
"""

from __future__ import annotations

import os
import tempfile

try:  # POSIX; elsewhere runs go unlocked (see WorkdirLock)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class WorkdirBusyError(ValueError):
    """Another live process holds the lock a run or an evaluation needs."""


def check_workdir(workdir, flag: str = "--workdir") -> str:
    """What :func:`prepare_workdir` checks, without creating anything: ``workdir`` as an absolute path that is
    a directory, or could be made one under its nearest existing ancestor, which this process can write.
    For a command that must refuse bad data before it writes anything, yet name a bad workdir first."""
    if workdir is None or not str(workdir).strip():
        raise ValueError(f"{flag} is empty; give a directory for the run, e.g. {flag} runs/mnist.")
    path = os.path.abspath(os.path.expanduser(str(workdir)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {workdir}: {path} exists and is not a directory; give a directory.")
    ancestor = path
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    try:
        if not os.path.isdir(ancestor):
            raise NotADirectoryError(20, f"{ancestor} is not a directory")
        with tempfile.TemporaryFile(dir=ancestor):  # leaves nothing behind
            pass
    except OSError as e:
        raise ValueError(f"{flag} {workdir}: cannot write there ({e.strerror or e}); give a writable directory.") from e
    return path


def prepare_workdir(workdir, flag: str = "--workdir") -> str:
    """``workdir`` as an absolute path to a directory this process can write, created if missing.

    Raises ValueError naming ``flag`` and the path for an empty path, an existing
    non-directory, or a directory that cannot be created or written to.
    """
    if workdir is None or not str(workdir).strip():
        raise ValueError(f"{flag} is empty; give a directory for the run, e.g. {flag} runs/mnist.")
    path = os.path.abspath(os.path.expanduser(str(workdir)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {workdir}: {path} exists and is not a directory; give a directory.")
    try:
        os.makedirs(path, exist_ok=True)
        # Ask the filesystem rather than os.access: root passes os.access on read-only mounts and folders.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {workdir}: cannot write there ({e.strerror or e}); give a writable directory.") from e
    return path


class WorkdirLock:
    """An exclusive, non-blocking lock on ``directory/name`` for the life of a ``with`` block.

    ``what`` says what the holder does there (for the message a second process gets).
    The lock file keeps the holder's PID; it is left in place when released (removing
    it could race a process that has just opened it), which is harmless: only a
    live ``flock`` counts, never the file's existence.
    """

    def __init__(self, directory: str, name: str = ".lock", what: str = "training"):
        self.path = os.path.join(directory, name)
        self.what = what
        self._file = None

    def acquire(self) -> "WorkdirLock":
        if fcntl is None:  # pragma: no cover - no flock: unlocked, as before
            return self
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise WorkdirBusyError(
                f"{os.path.dirname(self.path)} is in use: process {holder} is {self.what} there (lock "
                f"{self.path}). Wait for it to finish, stop it (kill {holder}), or use another directory."
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
