"""Exclusive locks on output directories: a run directory, an encode --out, a prepare --out, an
export --out. The lock is an flock on DIR/.lock held for the life of the process (the kernel
releases it however the process ends, kill -9 included), so a second command on the same
directory fails at once naming the holder, and --overwrite never deletes a directory in use."""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from llara_fast.errors import UserError

LOCK_FILE = ".lock"


class DirLock:
    """Hold DIR/.lock exclusively until release() or the process exits."""

    def __init__(self, out: str | os.PathLike, what: str = "run directory"):
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text().strip() or "another process"
            os.close(self.fd)
            raise UserError(f"{out}: in use by {holder}; one {what} holds one job at a time") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n".encode())

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def locked_by(path: str | os.PathLike) -> str | None:
    """Who holds PATH/.lock, or None when no live process does (without taking it for long)."""
    lock = Path(path) / LOCK_FILE
    if not lock.is_file():
        return None
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return lock.read_text().strip() or "another process"
    finally:
        os.close(fd)
