"""User-facing errors: one line naming the problem and what is accepted, then a non-zero exit."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn

#: Exit status of a run stopped by a user error (bad argument, bad data, no network...).
USER_ERROR_EXIT = 2
#: What the operating system says when a write finds no room: the disk, or the user's quota.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class UserError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


def non_finite_loss(loss: object, epoch: int, step: int) -> UserError:
    """The error both trainers stop with when the training loss turns NaN or infinite
    (``epoch`` from 1, as Keras prints it; ``step`` from 1 within the epoch)."""
    return UserError(f"loss became {loss} at epoch {epoch} step {step}; lower --learning-rate "
                     "or check the data")


class Interrupted(BaseException):  # noqa: N818  (a signal, like KeyboardInterrupt)
    """SIGINT or SIGTERM stopped the run at a safe point; ``message`` says how to go on.

    A ``BaseException``, as ``KeyboardInterrupt`` is: no ``except Exception`` on the way out
    (Keras', Lightning's, ours) takes it for an error of its own."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(signum, message)
        self.signum, self.message = signum, message

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process the signal ended: 130, 143."""
        return 128 + self.signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}: {self.message}"


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and (err.errno in DISK_FULL_ERRNOS or any(
        os.strerror(code) in str(err) for code in DISK_FULL_ERRNOS))


def disk_full(path: object, err: OSError) -> UserError:
    """The one line for a write that found the disk (or the quota) full."""
    reason = os.strerror(err.errno) if err.errno in DISK_FULL_ERRNOS else "no space left"
    where = f"writing {path}" if path else "writing a file"
    return UserError(f"disk full while {where} ({reason}); the files already there are "
                     "unchanged: free some space and run again (with --resume for an "
                     "unfinished training run)")


@contextlib.contextmanager
def disk_full_is_one_line(path: object) -> Iterator[None]:
    """Turn a full disk or quota met inside into :func:`disk_full`'s line, naming ``path``."""
    try:
        yield
    except OSError as err:
        if is_disk_full(err):
            raise disk_full(path, err) from None
        raise


def fail(message: str, status: int = USER_ERROR_EXIT) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``status``."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def run_main(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a command-line entry point, turning :class:`UserError`, a signal and a full disk into
    a one-line exit (2; 128 + the signal's number)."""
    try:
        main(argv)
    except UserError as err:
        fail(str(err))
    except Interrupted as err:
        fail(str(err), err.exit_status)
    except KeyboardInterrupt:
        fail("interrupted (SIGINT); rerun with --resume to continue a training run from its "
             "last finished epoch", 128 + signal.SIGINT)
    except OSError as err:
        if not is_disk_full(err):
            raise
        fail(str(disk_full(err.filename, err)))
