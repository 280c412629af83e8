"""Stage processes that die with their pipeline.

A stage (``rlft fit``, online DPO sampling, the evaluation) runs in its own process group, led by a small guard:
this file run as a script (stdlib only, so it starts in milliseconds), which starts the stage in its group and
kills the whole group, the stage's own children included, when the pipeline dies. Without it a ``kill -9`` of
``rlft pipeline`` left the stage training, and a re-run trained the same stage folder next to it.

The guard learns of the pipeline's death from ``PR_SET_PDEATHSIG`` (Linux: SIGTERM the moment its parent exits,
by any signal) and, as a fallback for other systems and for a parent that died before the ``prctl`` call, from
polling its parent pid once a second. The pipeline kills the group itself when it stops on an exception
(Ctrl-C included: the group is its own session, so the terminal's SIGINT reaches only the pipeline).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO

POLL_S = 1.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def run_stage_process(argv: list[str], *, stdout: IO, env: dict[str, str]) -> int:
    """Run ``argv`` under the guard in a new process group (session); returns its exit code (``-N``: signal N).

    If this process stops while waiting (an exception, KeyboardInterrupt), the stage's group is killed first.
    """
    guard = [sys.executable, os.path.abspath(__file__), str(os.getpid()), *argv]
    proc = subprocess.Popen(guard, stdout=stdout, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            _kill_group(proc.pid)
            proc.wait()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # the group is already gone
        pass


def _die_with(parent: int) -> None:
    """Kill this process group when ``parent`` is gone (SIGTERM from PDEATHSIG, or the poll)."""
    signal.signal(signal.SIGTERM, lambda *_: _kill_group(os.getpgid(0)))
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    def poll() -> None:
        while True:
            if os.getppid() != parent:  # re-parented: the pipeline is dead (also before the prctl took effect)
                _kill_group(os.getpgid(0))
            time.sleep(POLL_S)

    threading.Thread(target=poll, daemon=True).start()


def main(argv: list[str]) -> None:
    """Guard mode: ``python stage_process.py PIPELINE_PID COMMAND...``."""
    parent, command = int(argv[0]), argv[1:]
    _die_with(parent)
    code = subprocess.Popen(command).wait()  # in this group: a group kill takes it and everything it starts
    if code < 0:  # the stage died of a signal: die of the same one, so the pipeline reports it as before
        try:
            signal.signal(-code, signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL/SIGSTOP have no handler to reset
            pass
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
