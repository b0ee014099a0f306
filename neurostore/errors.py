"""The exceptions a user should see as one line, and the exit code each maps to.

- :class:`NeurostoreError` (exit 2): the user's input is wrong (a file, a row, an option) or asks for
  an analysis that cannot mean anything on the data given. The message says what and what would work.
- :class:`Fault` (exit 1): the machine or the data failed (disk full, I/O error, checksum mismatch,
  damaged store). The message names what failed, where, and what to do (``--resume``,
  ``info --verify``).

The CLI prints either as one line with its ``exit_code`` (``cli.common.handle_errors``); every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os

# Faults of the machine rather than bugs: one line and exit 1, wherever they surface.
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS})


class NeurostoreError(Exception):
    """A user-facing error: the message alone must say what is wrong and where."""

    exit_code = 2


class Fault(NeurostoreError):
    """A fault of the machine or damage to the data, not the user's mistake."""

    exit_code = 1


def io_fault(err: OSError, doing: str, then: str) -> Fault:
    """One line for an I/O fault while ``doing`` something: what failed, the file, the free space
    where the disk is full, and ``then``, what to do once it is fixed."""
    path = err.filename or ""
    text = f"{doing}: {err.strerror or os.strerror(err.errno or 0) or err}" + (f" ({path})" if path else "")
    if err.errno in (errno.ENOSPC, errno.EDQUOT) and path:
        from .space import free_bytes

        free = free_bytes(str(path))
        if free is not None:
            text += f", {free / 2**20:,.1f} MiB free there"
    return Fault(f"{text}; {then}")
