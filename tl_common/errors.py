"""User-facing errors: one line naming the problem and what is accepted, then a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

#: Exit status of a run stopped by a user error (bad argument, bad data, no network...).
USER_ERROR_EXIT = 2


class UserError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


def non_finite_loss(loss: object, epoch: int, step: int) -> UserError:
    """The error both trainers stop with when the training loss turns NaN or infinite
    (``epoch`` from 1, as Keras prints it; ``step`` from 1 within the epoch)."""
    return UserError(f"loss became {loss} at epoch {epoch} step {step}; lower --learning-rate "
                     "or check the data")


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with :data:`USER_ERROR_EXIT`."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(USER_ERROR_EXIT)


def run_main(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a command-line entry point, turning :class:`UserError` into a one-line exit."""
    try:
        main(argv)
    except UserError as err:
        fail(str(err))
    except KeyboardInterrupt:
        fail("interrupted; rerun with --resume to continue from the last finished epoch")
