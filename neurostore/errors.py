"""The one exception type for user mistakes.

Anything raised as :class:`NeurostoreError` is a problem with the user's input (a file, a row, an
option) and is printed by the CLI as a single line with a non-zero exit code. Every other exception
is a bug and keeps its traceback.
"""


class NeurostoreError(Exception):
    """A user-facing error: the message alone must say what is wrong and where."""
