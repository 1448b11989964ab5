"""One base for the errors a user can fix (a bad config key, a bad data row, a missing model).

The CLI catches ZhloraError in one place (zhlora/cli.py) and prints its message as one
line, with exit status `exit_code`, instead of a traceback. Anything else is a bug in
zhlora and keeps its traceback. Each module defines its own subclass (ConfigError,
DataError, ...) so a message says which stage refused, and keeps the builtin base it
always had (ValueError, RuntimeError) so older `except ValueError` callers still work.
"""
from __future__ import annotations


class ZhloraError(Exception):
    """A problem in the user's input or setup; the message says what to change."""

    exit_code = 2  # argparse's status for a usage error
    verb = "error"  # printed as `zhlora COMMAND: error: message`
