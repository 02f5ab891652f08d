"""Bad user input as one error family, and the one way every entry point reports it (a message, exit code 2)."""
from __future__ import annotations

import functools
import sys
from typing import Callable, Optional, Sequence

# The exit code of a command refused for bad input (argparse uses the same).
EXIT_BAD_INPUT = 2


class InputError(ValueError):
    """Bad input from the user: a flag, a config key or a file; the message names it and says what would be valid."""


class OutputConflict(InputError):
    """An output would replace an input or an earlier result."""


# What an entry point reports as a message instead of a traceback: the project's input errors and the file
# errors of the standard library (their message names the file).
USER_ERRORS: tuple[type[BaseException], ...] = (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                               PermissionError, FileExistsError)


def report(error: BaseException) -> int:
    """Print `error: <message>` on stderr; the exit code for bad input."""
    print(f"error: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT


def entry_point(main: Callable[[Optional[Sequence[str]]], int]) -> Callable[[Optional[Sequence[str]]], int]:
    """Wrap a script's `main(argv)`: bad input anywhere in it ends with its message and exit code 2, not a traceback."""
    @functools.wraps(main)
    def wrapped(argv: Optional[Sequence[str]] = None) -> int:
        try:
            return main(argv)
        except USER_ERRORS as e:
            return report(e)
    return wrapped
