"""Lock files: one owner at a time for a unit of work (a study cell), across processes and hosts.

A lock is a small JSON file ``{"pid", "host", "start", "token", "created"}``. It is written
completely under a temporary name and then ``os.link``-ed to the lock name: the link fails when
the lock exists, and a lock that exists is always complete (never a half-written owner).

Stale locks: a lock whose owner ran on THIS host and is gone (no process with that pid, or a
process with that pid but another start time: the pid was reused) is taken over. A lock from
another host cannot be checked and is never taken over; the error names the owner so a person
can remove it. The takeover runs under an ``fcntl.flock`` on the lock's folder (takers on the
same host only), so two processes that both find the same stale lock cannot both take it.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator

from dllm2rec.errors import Dllm2RecError


class LockBusy(Dllm2RecError):
    """Another live process holds the lock; ``owner`` is its record (or None when unreadable)."""

    def __init__(self, path: Path, owner: dict | None):
        self.path, self.owner = Path(path), owner
        who = (f"pid {owner.get('pid')} on host {owner.get('host')}" if owner else "an unreadable lock file")
        super().__init__(f"{path}: held by {who}; remove the file only if that process is gone")


def _start_time(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``), None where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of stat, counted after the "(comm)" field


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def read_owner(path: str | Path) -> dict | None:
    """The lock's owner record; None when there is no lock. A corrupt file gives ``{}``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_stale(owner: dict) -> bool:
    """True when ``owner`` ran on this host and is no longer running (see the module docstring)."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    if not _alive(owner["pid"]):
        return True
    start = _start_time(owner["pid"])
    return start is not None and owner.get("start") is not None and start != owner["start"]


def _record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
            "token": uuid.uuid4().hex, "created": time.time()}


def _link(path: Path, record: dict) -> bool:
    """Create ``path`` holding ``record`` iff it does not exist (atomic: write a temp file, link it)."""
    tmp = path.with_name(f".{path.name}.{record['token']}.tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: exclusive create (a reader may then briefly
        try:         # see an empty file, which counts as held, never as stale)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(record))
        return True
    finally:
        tmp.unlink(missing_ok=True)


def acquire(path: str | Path) -> dict:
    """Take the lock at ``path`` or raise ``LockBusy``; returns our owner record (for ``release``)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = _record()
    if _link(path, record):
        return record
    guard = os.open(path.parent, os.O_RDONLY)  # flock on the folder: no guard file is left behind
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)  # one taker at a time; released when the descriptor closes
        owner = read_owner(path)
        if owner is None:  # released meanwhile
            if _link(path, record):
                return record
            owner = read_owner(path)
        if owner and is_stale(owner):
            path.unlink(missing_ok=True)
            if _link(path, record):
                return record
            owner = read_owner(path)
    finally:
        os.close(guard)
    raise LockBusy(path, owner)


def release(path: str | Path, record: dict) -> None:
    """Remove the lock if it is still ours (it may have been taken over after we were presumed dead)."""
    path = Path(path)
    owner = read_owner(path)
    if owner and owner.get("token") == record["token"]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def hold(path: str | Path) -> Iterator[dict]:
    """``with hold(lock):`` runs the body as the only owner; ``LockBusy`` when another process is."""
    record = acquire(path)
    try:
        yield record
    finally:
        release(path, record)
