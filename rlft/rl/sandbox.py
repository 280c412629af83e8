"""Run untrusted, model-generated Python behind an operating-system boundary (bubblewrap namespaces).

Used by pass@k evaluation (HumanEval) and by code-execution rewards in RL. Every program runs under ``bwrap`` with:

* new user, mount, PID, IPC, UTS, cgroup and network namespaces (``--unshare-all``): no network (not even the
  host's loopback), no view of host processes, no System V IPC with the host;
* a file system that holds only the interpreter, its standard library and the shared libraries they load, all
  read-only, plus the program's private folder (read-write, at ``/sandbox``), a private ``/proc``, a minimal
  ``/dev`` and an empty ``/tmp``; nothing else of the host (no ``/etc``, no ``/home``, no shell);
* an empty environment (only ``PATH``, ``HOME``, ``TMPDIR``, ``LANG``);
* when rlft runs as root: an unprivileged host uid for the whole sandbox (one of 32 from ``RLFT_SANDBOX_UID``,
  default 200000, one per concurrent program), so the process-count limit holds (the kernel does not enforce
  ``RLIMIT_NPROC`` for root) and one program's fork bomb cannot starve another;
* resource limits set before ``exec`` that it cannot raise: address space, CPU seconds, file size, open files,
  processes, no core dumps;
* writable space of bounded total size: ``/tmp`` and (unless the caller hands in its own folder) ``/sandbox`` are
  tmpfs mounts of at most ``disk_mb`` each, so many files under the per-file limit cannot fill memory or disk;
* bounded output: stdout and stderr are read incrementally, only their heads kept (see
  :mod:`rlft.rl.bounded_output`), and the program is killed once it has written ``max_output_bytes``;
* ``--die-with-parent`` and ``--new-session``; the PID namespace's init ends with the program, and the kernel then
  kills every process left in the namespace (daemonised children included); at the timeout the whole tree is
  killed.

Fail closed: where bubblewrap is missing or cannot create the namespaces, :func:`run_program` raises
:class:`SandboxUnavailable` and runs nothing, unless the user opts in with ``RLFT_SANDBOX=unsafe``, which runs the
program with resource limits, its own process group and folder only (no isolation; ``protections`` says so).
Not covered: CPU/memory accounting by cgroup (limits are per process, except the process count), kernel exploits.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlft.rl.bounded_output import kill_group, read_bounded
from rlft.rl.bwrap import INSIDE, PROGRAM, environment, hand_over, interpreter, sandbox_uid, start_command, uid_slot

Status = Literal["passed", "failed", "timeout", "error"]
MODE_ENV = "RLFT_SANDBOX"  # unset/"bwrap": require the OS boundary; "unsafe": run without it (explicit opt-in)


class SandboxUnavailable(RuntimeError):
    """The isolation cannot be set up here, so untrusted code is not run."""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed program.

    Attributes:
        status: ``passed`` (exit code 0), ``failed`` (non-zero exit, e.g. an assertion or exception), ``timeout``
            (killed at the wall-clock or CPU limit) or ``error`` (the sandbox itself could not run the program).
        returncode: The child's exit code (negative for a signal), ``None`` if it never ran.
        stdout: Captured standard output (truncated to ``max_output_chars``, with a note saying how much was cut).
        stderr: Captured standard error (truncated likewise).
        duration_s: Wall-clock seconds from start to end (or kill).
        protections: The containment layers that applied, e.g. ``("bwrap", "userns", "pidns", "netns", ...)``.
        output_truncated: Whether some output was cut or dropped (or the program killed for writing too much).
    """

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    protections: tuple[str, ...] = field(default=())
    output_truncated: bool = False

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def isolation_problem() -> str | None:
    """Why the bubblewrap boundary cannot be set up here (``None`` when it can), probed once per process."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed; install it with `apt-get install -y bubblewrap`"
    with tempfile.TemporaryDirectory(prefix="rlft-sandbox-probe-") as folder:
        uid = sandbox_uid()
        hand_over(Path(folder), uid)
        probe_argv = [interpreter(), "-I", "-S", "-B", "-c", "import os; os.listdir('/sandbox')"]
        try:
            command, kwargs = start_command(probe_argv, Path(folder), uid)
            probe = subprocess.run(command, capture_output=True, text=True, timeout=30, **kwargs)
        except (OSError, subprocess.SubprocessError) as error:
            return f"bwrap could not start: {error}"
    if probe.returncode != 0:
        return f"bwrap cannot create the sandbox here: {probe.stderr.strip()[-300:]}"
    return None


def _own_processes(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                count += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                continue
    return count


def _limit_resources(memory_mb: int, cpu_s: int, file_mb: int, max_processes: int) -> None:
    """Runs in the forked child before exec: hard limits the (unprivileged) sandbox cannot raise."""
    limits = {
        resource.RLIMIT_AS: memory_mb * 1024 * 1024,
        resource.RLIMIT_CPU: cpu_s,
        resource.RLIMIT_FSIZE: file_mb * 1024 * 1024,
        resource.RLIMIT_NPROC: max_processes,
        resource.RLIMIT_NOFILE: 256,
        resource.RLIMIT_CORE: 0,
    }
    for kind, value in limits.items():
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):
            pass  # e.g. a hard limit already lower than ours: keep the stricter one


def sandbox_mode() -> str:
    mode = os.environ.get(MODE_ENV, "bwrap") or "bwrap"
    if mode not in ("bwrap", "unsafe"):
        raise ValueError(f"{MODE_ENV} must be 'bwrap' (default) or 'unsafe', got {mode!r}")
    return mode


def run_program(
    source: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    cwd: str | os.PathLike | None = None,
    network_namespace: bool | None = None,
    guard: bool = True,
    file_mb: int = 16,
    max_processes: int = 64,
    max_output_chars: int = 20_000,
    max_output_bytes: int = 16 * 1024 * 1024,
    disk_mb: int = 64,
) -> SandboxResult:
    """Run ``source`` as a Python program inside the sandbox.

    Args:
        source: The program text (executed as ``__main__`` from ``/sandbox/program.py``).
        timeout_s: Wall-clock limit; the whole process tree is killed when it passes. CPU time is limited to
            ``ceil(timeout_s) + 1`` seconds as well.
        memory_mb: Address-space limit of every process of the program (``RLIMIT_AS``).
        cwd: The private folder (``/sandbox`` inside). ``None`` (default) creates a temporary one that is deleted
            afterwards; a given folder is used as is and left in place (it belongs to the caller).
        network_namespace: Kept for compatibility: under bubblewrap the network is always isolated. In
            ``RLFT_SANDBOX=unsafe`` mode, ``True`` adds ``unshare -n`` where it works.
        guard: Kept for compatibility (the Python-level guard was replaced by the OS boundary); ignored.
        file_mb: Largest file the program may write (``RLIMIT_FSIZE``).
        max_processes: Processes the program may have at once (``RLIMIT_NPROC`` of the sandbox uid).
        max_output_chars: Truncate captured stdout/stderr beyond this many characters (only their heads are ever
            held in memory, whatever the program writes).
        max_output_bytes: Kill the program once stdout and stderr together pass this many bytes (status
            ``failed``, with a note in ``stderr``).
        disk_mb: Size cap of each writable tmpfs of the sandbox (``/tmp``, and ``/sandbox`` unless ``cwd`` is
            given: a caller's folder is bounded per file only). Not applied under ``RLFT_SANDBOX=unsafe``.

    Returns:
        The :class:`SandboxResult`.

    Raises:
        ValueError: If a limit is not positive.
        SandboxUnavailable: If the isolation cannot be set up and ``RLFT_SANDBOX=unsafe`` is not set.
    """
    del guard
    limits = {
        "timeout_s": timeout_s,
        "memory_mb": memory_mb,
        "max_processes": max_processes,
        "disk_mb": disk_mb,
        "max_output_chars": max_output_chars,
        "max_output_bytes": max_output_bytes,
    }
    if bad := {name: value for name, value in limits.items() if value <= 0}:
        raise ValueError(
            f"timeout_s, memory_mb, max_processes, disk_mb and the output limits must be positive, got {bad}"
        )
    isolated = sandbox_mode() == "bwrap"
    if isolated and (problem := isolation_problem()):
        raise SandboxUnavailable(
            f"the code sandbox cannot isolate untrusted programs here: {problem}. Nothing was run. To run them "
            f"without isolation anyway (trusted code only), set {MODE_ENV}=unsafe"
        )
    with uid_slot() if isolated else contextlib.nullcontext() as uid:
        output = (max_output_chars, max_output_bytes)
        return _run(
            source, uid, isolated, timeout_s, memory_mb, cwd, network_namespace, file_mb, max_processes, output, disk_mb
        )


def _run(source, uid, isolated, timeout_s, memory_mb, cwd, network_namespace, file_mb, max_processes, output, disk_mb):
    max_chars, max_bytes = output
    owned = cwd is None
    workdir = Path(tempfile.mkdtemp(prefix="rlft-sandbox-")) if owned else Path(cwd)
    try:
        (workdir / PROGRAM).write_text(source, encoding="utf-8")
        argv = [interpreter(), "-I", "-S", "-B", PROGRAM]
        if isolated:
            hand_over(workdir, uid)
            command, switch = start_command(argv, workdir, uid, disk_mb=disk_mb, private=owned)
            env = environment(INSIDE)
            protections = ["bwrap", "userns", "mountns", "pidns", "ipcns", "netns", "readonly-fs", "empty-env"]
            protections += [f"uid:{uid if uid is not None else os.geteuid()}", "rlimits", "process-tree-kill"]
            protections += ["bounded-tmpfs", "bounded-output"]
            processes = max_processes + 2 + (0 if uid is not None else _own_processes(os.geteuid()))
        else:
            command, env, switch = argv, environment(str(workdir)), {}
            protections = ["unsafe-no-isolation", "rlimits", "process-group", "own-folder", "bounded-output"]
            if network_namespace and shutil.which("unshare"):
                command, protections = ["unshare", "-n", "--", *command], [*protections, "netns"]
            processes = max_processes + (_own_processes(os.geteuid()) if os.geteuid() else 0)
        limit = functools.partial(_limit_resources, memory_mb, math.ceil(timeout_s) + 1, file_mb, processes)
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                command,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=limit,
                **switch,
            )
        except OSError as exc:
            return SandboxResult(
                "error",
                None,
                "",
                f"sandbox could not start the program: {exc}",
                time.monotonic() - start,
                tuple(protections),
            )
        # bwrap is the group leader; --die-with-parent takes the namespace's init with it, and the kernel then kills
        # everything in the PID namespace, so killing the group (at the deadline or the byte limit) ends it all
        seen = read_bounded(proc, deadline=start + timeout_s, keep_bytes=4 * max_chars, max_total_bytes=max_bytes)
        kill_group(proc)
        duration = time.monotonic() - start
        cpu_killed = proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and duration >= timeout_s * 0.5
        timed_out = seen.timed_out or (cpu_killed and not seen.over_limit)
        status: Status = "timeout" if timed_out else ("passed" if proc.returncode == 0 else "failed")
        if seen.over_limit:
            status = "failed"
        if isolated and status == "failed" and seen.stderr.head.startswith(b"bwrap:"):
            status = "error"
        stderr = seen.stderr.text(max_chars)
        if seen.over_limit:
            stderr += f"\n[killed: stdout and stderr passed the {max_bytes}-byte output limit]"
        return SandboxResult(
            status, proc.returncode, seen.stdout.text(max_chars), stderr, duration, tuple(protections), seen.truncated
        )
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)


def network_namespace_available() -> bool:
    """Whether programs run without network: always under bubblewrap (kept for callers of the old API)."""
    return isolation_problem() is None or (shutil.which("unshare") is not None and os.geteuid() == 0)


def run_programs(
    sources: Sequence[str],
    *,
    workers: int | None = None,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    **kwargs,
) -> list[SandboxResult]:
    """Run many programs, each in its own sandbox, a few at a time.

    The programs themselves are separate processes; the small thread pool here only waits on them (threads are
    enough because the waiting releases the GIL).

    Args:
        sources: Program texts.
        workers: How many run at once (default: number of CPUs, at most 8).
        timeout_s: Per-program wall-clock limit.
        memory_mb: Per-program memory limit.
        **kwargs: Further :func:`run_program` options.

    Returns:
        One :class:`SandboxResult` per source, in order.

    Raises:
        SandboxUnavailable: As :func:`run_program`, before any program runs.
    """
    if sandbox_mode() == "bwrap" and (problem := isolation_problem()):
        raise SandboxUnavailable(
            f"the code sandbox cannot isolate untrusted programs here: {problem}. Nothing was run. To run them "
            f"without isolation anyway (trusted code only), set {MODE_ENV}=unsafe"
        )
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(run_program, s, timeout_s=timeout_s, memory_mb=memory_mb, **kwargs) for s in sources]
        return [f.result() for f in futures]
