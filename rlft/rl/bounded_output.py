"""Read a sandboxed child's stdout and stderr without letting it decide how much memory the caller uses.

``Popen.communicate`` keeps everything a child writes until it exits, so a generated program that prints 800 MB
grows the trainer by gigabytes before any cap applies. :func:`read_bounded` reads both pipes incrementally, keeps
only the head of each stream (enough for the caller's character cap), counts and drops the rest, and kills the
child's process group once the two streams together pass a hard byte limit or the wall-clock deadline passes.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass

CHUNK = 1 << 16
# after a kill the pipes close when the last process holding them dies; a writer that escaped the process group
# (possible only without bubblewrap) must not keep the caller waiting, so draining is bounded too
DRAIN_AFTER_KILL_S = 2.0


@dataclass
class StreamHead:
    """The kept head of one stream and how many bytes were dropped after it."""

    keep_bytes: int
    head: bytearray
    dropped: int = 0

    def add(self, data: bytes) -> None:
        room = self.keep_bytes - len(self.head)
        if room > 0:
            self.head += data[:room]
        self.dropped += max(0, len(data) - max(room, 0))

    def text(self, max_chars: int) -> str:
        """The head decoded, cut at ``max_chars``, with a note saying how much was cut or dropped."""
        text = bytes(self.head).decode("utf-8", errors="replace")
        hidden = len(text[max_chars:].encode("utf-8")) + self.dropped
        return text if not hidden else text[:max_chars] + f"\n... [output truncated: {hidden} more bytes not shown]"


@dataclass
class BoundedOutput:
    """What :func:`read_bounded` saw: both heads, whether the deadline passed, whether the byte limit was hit."""

    stdout: StreamHead
    stderr: StreamHead
    timed_out: bool
    over_limit: bool

    @property
    def total_bytes(self) -> int:
        return sum(len(s.head) + s.dropped for s in (self.stdout, self.stderr))

    @property
    def truncated(self) -> bool:
        return self.over_limit or bool(self.stdout.dropped or self.stderr.dropped)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (it was started with its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def read_bounded(proc: subprocess.Popen, *, deadline: float, keep_bytes: int, max_total_bytes: int) -> BoundedOutput:
    """Read ``proc``'s stdout and stderr pipes until both close, keeping at most ``keep_bytes`` of each.

    Args:
        proc: A child started with ``stdout=PIPE, stderr=PIPE`` and ``start_new_session=True``.
        deadline: ``time.monotonic()`` value at which the child's process group is killed (a timeout).
        keep_bytes: Head bytes kept per stream; the rest is counted and dropped.
        max_total_bytes: When stdout and stderr together pass this many bytes the process group is killed: a
            program that only floods its output would otherwise burn CPU until its timeout.

    Returns:
        The :class:`BoundedOutput`; ``proc`` has been waited for.
    """
    heads = {proc.stdout: StreamHead(keep_bytes, bytearray()), proc.stderr: StreamHead(keep_bytes, bytearray())}
    timed_out = over_limit = False
    seen = 0
    with selectors.DefaultSelector() as selector:
        for pipe in heads:
            os.set_blocking(pipe.fileno(), False)
            selector.register(pipe, selectors.EVENT_READ)
        drain_until = None
        while selector.get_map():
            now = time.monotonic()
            if drain_until is None and now >= deadline:
                timed_out = True
                kill_group(proc)
                drain_until = now + DRAIN_AFTER_KILL_S
            if drain_until is not None and now >= drain_until:
                break
            until = deadline if drain_until is None else drain_until
            for key, _ in selector.select(timeout=max(0.0, until - now)):
                try:
                    data = os.read(key.fileobj.fileno(), CHUNK)
                except BlockingIOError:
                    continue
                if not data:
                    selector.unregister(key.fileobj)
                    continue
                if drain_until is None:  # after a kill only closing matters; what is still buffered is dropped
                    heads[key.fileobj].add(data)
                    seen += len(data)
                    if seen > max_total_bytes:
                        over_limit = True
                        kill_group(proc)
                        drain_until = time.monotonic() + DRAIN_AFTER_KILL_S
    for pipe in heads:
        pipe.close()
    try:  # a program that closed its pipes early still runs only until the deadline
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(proc)
        proc.wait()
    return BoundedOutput(heads[proc.stdout], heads[proc.stderr], timed_out, over_limit)
