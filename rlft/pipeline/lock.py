"""One ``rlft pipeline`` per run folder at a time.

Two pipelines on one run folder would train the same stage folder concurrently and both export into one
``hf_model``. The guard is ``fcntl.flock`` on ``<run_dir>/pipeline.lock``, held open for the pipeline's life: the
kernel drops the lock when the holder's process ends however it ends (``kill -9`` included), so a lock left by a
dead pipeline is simply taken over, with no stale-pid heuristics. The file holds the holder's pid, for the message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

LOCK_NAME = "pipeline.lock"


class RunFolderLocked(RuntimeError):
    """Another live ``rlft pipeline`` holds the run folder."""


class RunFolderLock:
    """``with RunFolderLock(run_dir): ...`` holds ``run_dir/pipeline.lock`` or raises :class:`RunFolderLocked`.

    Stage processes do not inherit the open file (``subprocess`` closes inherited descriptors by default), so a
    stage that outlived its pipeline could not keep the folder locked either.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # "a+": opening must not erase the holder's pid
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"  # empty only in the instant between its lock and its write
            handle.close()
            raise RunFolderLocked(
                f"run folder {self.path.parent} is in use by another rlft pipeline (pid {holder}); "
                f"wait for it to finish or stop it (the lock is {self.path})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            # the pid stays in the file: harmless, since only the flock decides who holds the folder
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> RunFolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
