"""Ctrl-C (SIGINT) and SIGTERM (``kill``, a laptop lid, a cluster's pre-emption) in a trainer:
stop within a training step, keep what ``--resume`` needs, say so in one line.

Both trainers install :class:`StopRequests` for their whole run. While they train
(:meth:`StopRequests.deferred`) a signal only records itself; the trainer looks after every
training step and validation batch (:meth:`StopRequests.check`) and raises
:class:`~tl_common.errors.Interrupted` there. A step is never cut in half and no checkpoint or
backup is cut short: the state of the last finished epoch, written atomically when that epoch
ended, is what ``--resume`` continues from, and the interrupted epoch is trained again from its
start (a state saved mid-epoch would not resume bit for bit: see docs/reliability.md). Outside training
(reading data, testing, writing outputs) the signal raises at once, as Python's Ctrl-C does;
every file there is written atomically. The run then ends with ``error: stopped by SIGINT: ...``
and exit status 130 (143 for SIGTERM).

A second Ctrl-C stops the process at once (``os._exit``), with one line: the files on disk are
those of the last finished epoch. Repeated SIGTERMs are not counted: a scheduler may send one to
every process and Lightning forwards it to its DDP processes as well.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType

from tl_common.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """``with StopRequests(message) as stop:`` — SIGINT and SIGTERM handled as above.

    ``message``: what the one line says is kept (e.g. where ``--resume`` continues);
    ``on_abort``: run before a second Ctrl-C ends the process at once (release a lock).
    """

    def __init__(self, message: str, on_abort: Callable[[], None] | None = None) -> None:
        self.message, self.on_abort = message, on_abort
        self.signum: int | None = None
        self._pid = os.getpid()
        self._deferring = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():  # signals reach it alone
            for signum in SIGNALS:
                if signum == signal.SIGINT and signal.getsignal(signum) is signal.SIG_IGN:
                    continue  # started with Ctrl-C ignored (nohup, a background job): kept so,
                    # as Python itself does
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def error(self, signum: int | None = None) -> Interrupted:
        return Interrupted(signum or self.signum or signal.SIGINT, self.message)

    def check(self) -> None:
        """Raise :class:`Interrupted` if a signal came: the trainers call it at safe points."""
        if self.signum is not None:
            raise self.error()

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Within the block a signal is only recorded, for :meth:`check` to act on; after it,
        a recorded signal raises."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        self.check()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            # A forked child that inherited the handler (a DataLoader worker, which Ctrl-C in a
            # terminal reaches too): Python's own behaviour, which torch's workers expect.
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.signum is not None:
            if signum == signal.SIGINT:  # the user insists
                print(f"error: stopped at once by a second SIGINT: {self.message}",
                      file=sys.stderr, flush=True)
                if self.on_abort is not None:
                    self.on_abort()
                os._exit(128 + signum)
            return
        self.signum = signum
        if not self._deferring:
            raise self.error()
