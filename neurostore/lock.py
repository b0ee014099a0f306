"""One writer per store: a lock object inside the store, taken atomically when ``extract`` starts.

The lock is one key, :data:`KEY`, written with the store's ``set_if_not_exists`` and read back: the
writer whose token is in it holds the store. On a local disk Zarr's ``set_if_not_exists`` is an
exclusive hard link, atomic on POSIX filesystems (NFS included), so of two writers exactly one wins.
The key holds who took it (host, pid, start time), so a second writer can say who holds the store,
and a lock left by a killed process on the same host (its pid is gone) is taken over with a warning.

What is not guarded: on object stores (``s3://`` ...) Zarr's fsspec store checks that the key is
absent and then writes it (Zarr's default ``set_if_not_exists``), so two writers started within
that moment may both proceed; and a lock held by a process on another host is never
taken over automatically (this host cannot tell whether it is alive): the message says which file
to remove once that writer is known to be gone.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .errors import NeurostoreError

KEY = "neurostore.lock"
_HELD: set[str] = set()  # tokens of the locks this process holds now


@dataclass
class Lock:
    store: Any  # the zarr Store the lock lives in
    where: str  # the store's path or URL, for messages
    token: str


def acquire(store: Any, where: str, owner: str | None = None) -> Lock:
    """Take the store's lock or raise :class:`NeurostoreError` naming its holder (exit 2).

    ``owner``: a token naming the run this writer belongs to (``extract --parts`` hands one per part
    to every attempt): a lock held under the same owner is an earlier attempt that died (its worker
    was lost, on whatever host) and is taken over; the scheduler runs one attempt of a part at a time."""
    mine = {
        "host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **({"owner": owner} if owner else {}),
    }
    data = default_buffer_prototype().buffer.from_bytes(json.dumps(mine).encode())
    for _ in range(3):
        sync(store.set_if_not_exists(KEY, data))
        held = read(store)
        if held is not None and held.get("token") == mine["token"]:
            _HELD.add(mine["token"])
            return Lock(store, where, mine["token"])
        if held is None:
            continue  # released between our write and our read: try again
        if not _stale(held) and not (owner and held.get("owner") == owner):
            raise NeurostoreError(
                f"{where}: another extraction is writing this store ({describe(held)}); wait for it to end "
                f"(if it is gone, remove {where.rstrip('/')}/{KEY})"
            )
        warnings.warn(f"{where}: taking over the lock of an extraction that is gone ({describe(held)})", stacklevel=2)
        if read(store) == held:
            sync(store.delete(KEY))
    raise NeurostoreError(f"{where}: could not take the store's lock: other writers keep taking it")


def release(lock: Lock) -> None:
    """Remove the lock if it is still ours (a writer that took over a stale lock keeps its own)."""
    _HELD.discard(lock.token)
    held = read(lock.store)
    if held is not None and held.get("token") == lock.token:
        sync(lock.store.delete(KEY))


def read(store: Any) -> dict | None:
    """The lock's content, or None where there is no lock (an unreadable one reads as stale)."""
    raw = sync(store.get(KEY, prototype=default_buffer_prototype()))
    if raw is None:
        return None
    try:
        held = json.loads(raw.to_bytes())
        return held if isinstance(held, dict) else {}
    except ValueError:
        return {}  # a lock file cut short by a crash while it was written


def describe(held: dict) -> str:
    return f"pid {held.get('pid', '?')} on {held.get('host', '?')}, since {held.get('started', '?')}"


def _stale(held: dict) -> bool:
    """The holder is a process of this host that no longer runs (or a lock never completely written)."""
    if not held or "pid" not in held:
        return True
    if held.get("host") != socket.gethostname():
        return False
    pid = int(held["pid"])
    if pid == os.getpid():
        return held.get("token") not in _HELD  # left by an earlier, failed extraction of this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False
