"""The exceptions a user should see as one line, and the exit code each maps to.

- :class:`NeurostoreError` (exit 2): the user's input is wrong (a file, a row, an option) or asks for
  an analysis that cannot mean anything on the data given. The message says what and what would work.
- :class:`Fault` (exit 1): the machine or the data failed (disk full, I/O error, checksum mismatch,
  damaged store). The message names what failed, where, and what to do (``--resume``,
  ``info --verify``).

The CLI prints either as one line with its ``exit_code`` (``cli.common.handle_errors``); every other
exception is a bug and keeps its traceback.
"""


class NeurostoreError(Exception):
    """A user-facing error: the message alone must say what is wrong and where."""

    exit_code = 2


class Fault(NeurostoreError):
    """A fault of the machine or damage to the data, not the user's mistake."""

    exit_code = 1
