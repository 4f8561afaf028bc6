"""One run at a time in an output folder: ``run.lock``, holding its owner's pid and host.

Both trainers take the lock as soon as ``--output-dir`` exists and before they read or change
anything in it, and release it when they end, by an error or a signal too. A second run on a
locked folder stops at once with one line naming the owner and the lock file.

The lock is ``fcntl.flock`` on the file, not the file's existence (``O_CREAT | O_EXCL``): the
kernel drops a flock when its process ends however it ends (kill -9, out of memory, a crash),
so a dead run never blocks the folder and no "is that pid still alive, or reused?" guess is
needed, and NFS (v4, and v3 through lockd) carries flocks between hosts. The pid and host in
the file are for people: they name the owner in the refusal, and a file left by a run that
ended without releasing it is taken over with a one-line warning naming the dead owner.
The file descriptor is not inherited across ``exec`` (Python's default), so the processes
that Lightning starts for DDP do not hold it; only the launching process takes it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from tl_common.errors import UserError, disk_full_is_one_line

LOCK_FILE = "run.lock"
#: Where launchers say which process this is. torchrun: RANK (of all processes); SLURM's srun:
#: SLURM_PROCID; Lightning's own launcher: LOCAL_RANK in the processes it starts, NODE_RANK (or
#: torchrun's GROUP_RANK) on every node, set by the user or the cluster.
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK")


def owns_output_dir() -> bool:
    """Whether this process is a run's first (global rank 0), which alone locks and writes the
    output folder; read from the launcher's environment, before any framework loads.

    Lightning's own rank (``rank_zero_only.rank``) is known only once its Trainer is made, and
    reads 0 in the process a user starts on a second node with ``NODE_RANK=1`` (which sets no
    rank of its own): that process would lock the folder the first node's run holds.
    """
    return all(int(os.environ.get(name) or 0) == 0 for name in RANK_VARIABLES)


def _owner(fd: int) -> dict[str, object]:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}


def describe_owner(owner: dict[str, object]) -> str:
    if not owner:
        return "an owner not yet recorded"
    since = owner.get("started")
    since_text = (f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
                  if isinstance(since, int | float) else "")
    return f"pid {owner.get('pid')} on host {owner.get('host')}{since_text}"


class OutputLock:
    """``with OutputLock(folder):`` holds ``folder/run.lock`` for the block (the folder exists)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            with disk_full_is_one_line(self.path):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _owner(fd)
                os.close(fd)
                raise UserError(f"{self.path.parent} is in use by another run "
                                f"({describe_owner(owner)}; lock file {self.path}): wait for it "
                                "to end, or choose another --output-dir") from None
            except OSError as err:
                os.close(fd)
                raise UserError(f"cannot lock {self.path} ({err.strerror}): the file system "
                                "of --output-dir does not support locks; choose a folder on "
                                "another one") from None
            # The owner may have released (removed) the file between our open and our lock:
            # then we hold a lock on a file no one else will see; open the name again.
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            held = os.fstat(fd)
            if current is not None and (current.st_ino, current.st_dev) == (held.st_ino,
                                                                            held.st_dev):
                break
            os.close(fd)
        previous = _owner(fd)
        if previous:
            print(f"warning: taking over {self.path}: its owner ({describe_owner(previous)}) "
                  "ended without releasing it", file=sys.stderr, flush=True)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.time()}).encode()
        try:
            with disk_full_is_one_line(self.path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, record, 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Remove the file, then drop the lock (closing it): in this order, a run that opened
        the old file just before finds, once it has the lock, that the name is gone."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
