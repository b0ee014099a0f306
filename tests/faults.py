"""Fault injection for stores, built once for every test that needs a failing disk.

:class:`FaultyStore` wraps a Zarr store and fails the N-th write (``set``, ``set_if_not_exists``,
each value of ``_set_many``) with an ``OSError`` of a chosen errno, the way SQLite's tests fail the
N-th I/O call: a sweep runs the same job once per N. Pass it to the library through
``extract(..., wrap_store=FaultyStore.wrapping(plan))``; nothing is switched on at import time.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from zarr.storage import WrapperStore


@dataclass
class Plan:
    """Which write fails (1-based; None: none) and how; counts the writes seen, across threads."""

    fail_at: int | None = None
    errno: int = errno.ENOSPC
    writes: int = 0
    failed: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def tick(self, key: str) -> None:
        with self._lock:
            self.writes += 1
            if self.fail_at is None or self.writes != self.fail_at:
                return
            self.failed.append(key)
        raise OSError(self.errno, os.strerror(self.errno), key)


class FaultyStore(WrapperStore):
    """A store whose writes fail as its :class:`Plan` says; reads and deletes pass through."""

    def __init__(self, store: Any, plan: Plan | None = None) -> None:
        super().__init__(store)
        self.plan = plan or Plan()

    @classmethod
    def wrapping(cls, plan: Plan):
        return lambda store: cls(store, plan)

    def _with_store(self, store: Any) -> "FaultyStore":
        return type(self)(store, self.plan)  # with_read_only() and friends keep the same plan

    async def set(self, key: str, value: Any) -> None:
        self.plan.tick(key)
        await self._store.set(key, value)

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        self.plan.tick(key)
        await self._store.set_if_not_exists(key, value)

    async def _set_many(self, values: Any) -> None:
        for key, value in values:
            await self.set(key, value)
