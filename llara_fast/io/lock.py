"""Outputs on disk: file checksums, and exclusive locks on output directories (a run directory,
an encode --out, a prepare --out, an export --out). The lock is an flock on DIR/.lock held for the life of the process (the kernel
releases it however the process ends, kill -9 included), so a second command on the same
directory fails at once naming the holder, and --overwrite never deletes a directory in use."""
from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import shutil
import socket
import time
from pathlib import Path

from llara_fast.errors import UserError

LOCK_FILE = ".lock"


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's content, read in 4 MiB blocks (the one file hash of the project)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class DirLock:
    """Hold DIR/.lock exclusively until release() or the process exits."""

    def __init__(self, out: str | os.PathLike, what: str = "run directory", sibling: bool = False):
        """sibling: lock .NAME.lock beside the directory instead of inside it, for outputs that are
        written elsewhere and renamed into place (prepare, export)."""
        out = Path(out)
        self.path = sibling_lock(out) if sibling else out / LOCK_FILE
        try:  # an output we cannot write is one line, before any work
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{out}: cannot write there ({e.strerror or e}); choose a writable {what}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text().strip() or "another process"
            os.close(self.fd)
            self.fd = -1
            raise UserError(f"{out}: in use by {holder}; one {what} holds one job at a time") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n".encode())

    def release(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):  # its holder is gone (a job run in-process, as the tests do): the directory is free
        self.release()


def sibling_lock(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


def locked_by(path: str | os.PathLike) -> str | None:
    """Who holds PATH/.lock or its sibling lock, or None when no other live process does."""
    me = f"pid {os.getpid()} on {socket.gethostname()} "
    for lock in (Path(path) / LOCK_FILE, sibling_lock(Path(path))):
        holder = _holder(lock)
        if holder is not None and not holder.startswith(me):
            return holder
    return None


def remove_stale_tmp(out: str | os.PathLike, sep: str) -> list[Path]:
    """Remove the temporary directories OUT{sep}PID that killed processes of this host left beside
    OUT (a live PID's is kept); returns what was removed, for the caller to name."""
    out = Path(out)
    removed = []
    for p in out.parent.glob(f"{glob.escape(out.name)}{sep}*"):
        pid = p.name[len(out.name) + len(sep):]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(lock: Path) -> str | None:
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
