"""No silent hangs: bounded collectives, signals that end every rank, and one line naming the rank and the step.

* **Collective timeout.** Every strategy's process group is created with :func:`collective_timeout` (default
  10 minutes, ``RLFT_COLLECTIVE_TIMEOUT_S`` overrides) instead of torch's 30 minutes, so a rank that waits in a
  collective no other rank enters (one died, hangs or skipped it) fails in bounded time.
* **SIGTERM / SIGINT.** The handler only notes the signal; at the end of every training batch the ranks agree (one
  tiny all-reduce: stop when any rank was signalled) and only then raise Lightning's stop flag, on every rank at the
  same batch. Lightning's own checks of that flag are local, so a flag raised by the handler itself lets the ranks
  stop at different batches and meet in different collectives (a deadlock). :class:`GracefulShutdown` then writes
  ``last.ckpt`` (all ranks are at the same step, so a sharded save works) and the run exits 143. A rank blocked in
  a native call (a collective, a forward) cannot run Python signal handlers, so a watchdog thread learns of the
  signal through ``signal.set_wakeup_fd`` at once, forwards it to the other local ranks and, when the process is
  still alive after ``RLFT_SHUTDOWN_GRACE_S`` (default 60 s), ends it with ``os._exit(128 + signal)``.
* **A failed collective** (timeout, a peer that closed its connection) prints one line with the rank and the step
  before the error propagates; a rank that fails stops the local ranks it launched, and a launched rank whose
  launcher died exits too.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

_COLLECTIVE_FAILURES = (
    "timed out",
    "timeout",
    "connection closed by peer",
    "connection reset",
    "broken pipe",
    "distbackenderror",
    "nccl error",
    "gloo",
)


def collective_timeout() -> timedelta:
    """How long a rank waits in one collective before the run fails (``RLFT_COLLECTIVE_TIMEOUT_S``, default 600)."""
    seconds = float(os.environ.get("RLFT_COLLECTIVE_TIMEOUT_S", "600"))
    if seconds <= 0:
        raise ValueError(f"RLFT_COLLECTIVE_TIMEOUT_S must be > 0 seconds, got {seconds}")
    return timedelta(seconds=seconds)


def bound_collectives(strategy) -> None:
    """Give a strategy's process group :func:`collective_timeout` unless the config set a timeout of its own (any
    value but Lightning's default). Call before the process group exists (the trainer's construction)."""
    from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

    if getattr(strategy, "_timeout", None) == default_pg_timeout:
        strategy._timeout = collective_timeout()


class _Watchdog:
    """Reads signal numbers from the interpreter's wakeup fd in a thread: works while the main thread is blocked."""

    def __init__(self, grace_s: float, forward, watch_parent: bool) -> None:
        self.grace_s, self.forward = grace_s, forward
        self.parent = os.getppid() if watch_parent else None
        self.read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self.write_fd = write_fd
        self.previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self.thread = threading.Thread(target=self._watch, name="rlft-shutdown-watchdog", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while True:
            ready, _, _ = select.select([self.read_fd], [], [], 2.0)
            if not ready:
                if self.parent is not None and os.getppid() != self.parent:  # the launching rank is gone
                    print("rlft: the process that launched this rank died: exiting", file=sys.stderr, flush=True)
                    os._exit(1)
                continue
            try:
                data = os.read(self.read_fd, 1)
            except OSError:
                return
            if not data:  # closed: the run ended
                return
            signum = data[0]
            if signum not in (signal.SIGTERM, signal.SIGINT):
                continue
            self.forward(signum)
            time.sleep(self.grace_s)
            print(
                f"rlft: still running {self.grace_s:.0f} s after signal {signum} (blocked in a native call): "
                "exiting now",
                file=sys.stderr,
                flush=True,
            )
            os._exit(128 + signum)

    def close(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self.previous)
        os.close(self.write_fd)  # the reader sees EOF and the thread ends
        self.thread.join(timeout=1.0)
        os.close(self.read_fd)


class GracefulShutdown(L.Callback):
    """Bounded shutdown of a (distributed) run; on in every ``rlft fit`` (see the module docs).

    Args:
        grace_s: Seconds a signalled process may take to stop by itself (default ``RLFT_SHUTDOWN_GRACE_S`` or 60).
    """

    def __init__(self, grace_s: float | None = None) -> None:
        self.grace_s = float(os.environ.get("RLFT_SHUTDOWN_GRACE_S", "60")) if grace_s is None else grace_s
        self._watchdog: _Watchdog | None = None
        self._forward = None
        self._signalled = False  # set by the handler; turned into Lightning's flag where the ranks agree
        self.checkpoint: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._watchdog is None and threading.current_thread() is threading.main_thread():
            launcher = trainer.strategy.launcher

            def forward(signum: int) -> None:  # the other local ranks stop too (they are this process's children)
                if launcher is not None and hasattr(launcher, "procs"):
                    launcher.kill(signum)

            # a rank started by another process (Lightning's launcher, torchrun) ends when its launcher dies
            launched = trainer.local_rank > 0 or bool(os.environ.get("TORCHELASTIC_RUN_ID"))
            self._watchdog = _Watchdog(self.grace_s, forward, watch_parent=trainer.world_size > 1 and launched)
            self._forward = forward

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's own SIGTERM handler runs a collective (a broadcast) inside the handler, which deadlocks
        # against the collectives the ranks are in; this one only takes note (the watchdog has forwarded the
        # signal to the other local ranks)
        if threading.current_thread() is not threading.main_thread():
            return
        connector = trainer._signal_connector

        def on_sigterm(signum, frame) -> None:
            self._signalled = True
            if trainer.world_size == 1:  # nobody to agree with
                connector.received_sigterm = True

        signal.signal(signal.SIGTERM, on_sigterm)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
            trainer._signal_connector.received_sigterm = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._watchdog is not None:
            self._watchdog.close()
            self._watchdog = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        rank, step = trainer.global_rank, trainer.global_step
        if isinstance(exception, SIGTERMException):
            self.checkpoint = self._save(trainer)
            where = f"; checkpoint {self.checkpoint} (resume with --ckpt_path last)" if self.checkpoint else ""
            print(f"rlft: rank {rank}: stopped by SIGTERM at step {step}{where}", file=sys.stderr, flush=True)
            return
        if self._forward is not None:  # the other local ranks must not outlive this one (see the module docs)
            self._forward(signal.SIGTERM)
        text = f"{type(exception).__name__}: {exception}".lower()
        if trainer.world_size > 1 and any(marker in text for marker in _COLLECTIVE_FAILURES):
            first = str(exception).strip().splitlines()[0] if str(exception).strip() else type(exception).__name__
            print(
                f"rlft: rank {rank} of {trainer.world_size}: a collective failed at step {step} (another rank died, "
                f"hangs or skipped it; collectives time out after {collective_timeout().total_seconds():.0f} s, "
                f"RLFT_COLLECTIVE_TIMEOUT_S): {first[:300]}",
                file=sys.stderr,
                flush=True,
            )

    @staticmethod
    def _save(trainer: L.Trainer) -> Path | None:
        """``last.ckpt`` in the run's checkpoint folder (a collective: every rank is here at the same step)."""
        folders = [c.dirpath for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
        if not folders or trainer.global_step == 0:
            return None
        path = Path(folders[0]) / "last.ckpt"
        try:
            trainer.save_checkpoint(path)
        except Exception as error:  # a failed save must not hide why the run stopped
            log.warning("rank %d: no checkpoint on SIGTERM: %s", trainer.global_rank, error)
            return None
        return path
