"""Run untrusted, model-generated Python in a contained child process.

Used by pass@k evaluation (HumanEval) and by code-execution rewards in RL. Every program gets:

* a fresh ``python -I -B`` interpreter (isolated mode: no user site, no ``PYTHON*`` variables, no cwd on ``sys.path``),
* its own temporary directory as working directory, ``HOME`` and ``TMPDIR``, removed afterwards,
* resource limits set in the child before ``exec`` (address space, CPU seconds, file size, process count, no core),
* its own process session, so a timeout kills the whole process group (children included),
* a new network namespace via ``unshare -n`` where the kernel lets us create one (no interfaces: nothing reachable),
* a guard prelude that runs before the program and disables process creation, sockets and writes/deletions
  outside the working directory.

The guard is a safety net against *accidents* of generated code (``rm -rf``, fork loops, stray downloads), not a
security boundary against an adversary: a determined program can restore what the guard removes. The kernel-side
limits (process group kill, rlimits, network namespace) do not depend on the program's cooperation.
``SandboxResult.protections`` says which layers applied to a run.

Note: ``RLIMIT_NPROC`` counts processes per user and is not enforced for root, so as root a fork bomb is stopped by
the guard (no fork/spawn functions) and by the process-group kill at the timeout.
"""

from __future__ import annotations

import functools
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Status = Literal["passed", "failed", "timeout", "error"]

# The prelude runs in the child before the user's program (program.py, executed with runpy so that tracebacks
# point at the user's own line numbers). It is kept self-contained: the child imports nothing from rlft.
_GUARD = r"""
import builtins, os, posix, runpy, shutil, sys

_ROOT = os.path.realpath(os.getcwd())

def _inside(path):
    try:
        path = os.fspath(path)
    except TypeError:
        return False  # file descriptors and other exotic targets: refuse
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    real = os.path.realpath(os.path.join(_ROOT, path))
    return real == _ROOT or real.startswith(_ROOT + os.sep)

def _blocked(name):
    def refuse(*args, **kwargs):
        raise PermissionError(f"sandbox: {name} is disabled")
    return refuse

def _confined(name, func, n_paths=1):
    def checked(*args, **kwargs):
        for p in args[:n_paths]:
            if not _inside(p):
                raise PermissionError(f"sandbox: {name} outside the sandbox directory is not allowed: {p!r}")
        return func(*args, **kwargs)
    return checked

# process creation and signalling other processes
for _mod in (os, posix):
    for _name in ("fork", "forkpty", "vfork", "system", "popen", "execv", "execve", "execl", "execle", "execlp",
                  "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
                  "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg", "setuid", "setgid",
                  "chroot", "putenv", "unsetenv"):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _blocked(f"os.{_name}"))

# file system changes outside the sandbox directory
_real_open = builtins.open
def _open(file, mode="r", *args, **kwargs):
    if any(flag in mode for flag in "wax+") and not isinstance(file, int) and not _inside(file):
        raise PermissionError(f"sandbox: writing outside the sandbox directory is not allowed: {file!r}")
    return _real_open(file, mode, *args, **kwargs)
builtins.open = _open
import io
io.open = _open

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_real_os_open = os.open
def _os_open(path, flags, *args, **kwargs):
    if flags & _WRITE_FLAGS and not _inside(path):
        raise PermissionError(f"sandbox: writing outside the sandbox directory is not allowed: {path!r}")
    return _real_os_open(path, flags, *args, **kwargs)
for _mod in (os, posix):
    _mod.open = _os_open
    for _name, _n in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("rename", 2), ("replace", 2), ("chmod", 1),
                      ("chown", 1), ("truncate", 1), ("link", 2), ("symlink", 2), ("mkdir", 1), ("utime", 1)):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _confined(f"os.{_name}", getattr(_mod, _name), _n))
os.removedirs = _confined("os.removedirs", os.removedirs)
shutil.rmtree = _confined("shutil.rmtree", shutil.rmtree)
shutil.move = _confined("shutil.move", shutil.move, 2)
shutil.chown = _blocked("shutil.chown")

# modules that reach the network or spawn processes: importing them fails
for _name in ("socket", "_socket", "ssl", "_ssl", "subprocess", "_posixsubprocess", "multiprocessing",
              "_multiprocessing", "ctypes", "_ctypes", "pty", "resource", "urllib.request", "http.client",
              "ftplib", "smtplib", "telnetlib", "asyncio", "concurrent.futures.process"):
    sys.modules[_name] = None

del _mod, _name
sys.argv = ["program.py"]
runpy.run_path("program.py", run_name="__main__")
"""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed program.

    Attributes:
        status: ``passed`` (exit code 0), ``failed`` (non-zero exit, e.g. an assertion or exception), ``timeout``
            (killed at the wall-clock or CPU limit) or ``error`` (the sandbox itself could not run the program).
        returncode: The child's exit code (negative for a signal), ``None`` if it never ran.
        stdout: Captured standard output (truncated to ``max_output_chars``).
        stderr: Captured standard error (truncated likewise).
        duration_s: Wall-clock seconds from start to end (or kill).
        protections: The containment layers that applied, e.g. ``("guard", "rlimits", "process-group", "netns")``.
    """

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    protections: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def network_namespace_available() -> bool:
    """Whether ``unshare -n`` can create a network namespace here (needs root or user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    try:
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def _limit_resources(memory_mb: int, cpu_s: int, file_mb: int, max_processes: int) -> None:
    """Runs in the forked child before exec: set hard limits the program cannot raise (unless it is root)."""
    limits = {
        resource.RLIMIT_AS: memory_mb * 1024 * 1024,
        resource.RLIMIT_CPU: cpu_s,
        resource.RLIMIT_FSIZE: file_mb * 1024 * 1024,
        resource.RLIMIT_NPROC: max_processes,
        resource.RLIMIT_CORE: 0,
    }
    for kind, value in limits.items():
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):
            pass  # e.g. a hard limit already lower than ours: keep the stricter one


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _decode(data: bytes | None, limit: int) -> str:
    text = (data or b"").decode("utf-8", errors="replace")
    return text if len(text) <= limit else text[:limit] + f"\n... [{len(text) - limit} characters truncated]"


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
) -> SandboxResult:
    """Run ``source`` as a Python program in a contained child process.

    Args:
        source: The program text (executed as ``__main__``).
        timeout_s: Wall-clock limit; the whole process group is killed when it passes. CPU time is limited to
            ``ceil(timeout_s) + 1`` seconds as well.
        memory_mb: Address-space limit of the child (``RLIMIT_AS``).
        cwd: Working directory to run in. ``None`` (default) creates a private temporary directory that is deleted
            afterwards; a given directory is used as is and left in place (it belongs to the caller).
        network_namespace: Run inside a fresh network namespace (``unshare -n``). ``None`` uses it when available.
        guard: Install the guard prelude (disable process creation, sockets, writes outside the directory).
            Only tests of the kernel-side layers turn it off.
        file_mb: Largest file the program may write (``RLIMIT_FSIZE``).
        max_processes: ``RLIMIT_NPROC`` (per user; not enforced for root).
        max_output_chars: Truncate captured stdout/stderr beyond this many characters.

    Returns:
        The :class:`SandboxResult`.

    Raises:
        ValueError: If a limit is not positive.
    """
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s and memory_mb must be positive, got timeout_s={timeout_s}, memory_mb={memory_mb}")
    use_netns = network_namespace_available() if network_namespace is None else network_namespace
    if use_netns and not network_namespace_available():
        raise ValueError("network_namespace=True but `unshare -n` does not work here (needs root or user namespaces)")
    owned = cwd is None
    workdir = Path(tempfile.mkdtemp(prefix="rlft-sandbox-")) if owned else Path(cwd)
    protections = ["rlimits", "process-group", "own-tmpdir"] + (["guard"] if guard else [])
    protections += ["netns"] if use_netns else []
    try:
        (workdir / "program.py").write_text(source, encoding="utf-8")
        if guard:
            (workdir / "_sandbox_guard.py").write_text(_GUARD, encoding="utf-8")
        entry = ["_sandbox_guard.py"] if guard else ["program.py"]
        command = [sys.executable, "-I", "-B", *entry]
        if use_netns:
            command = ["unshare", "-n", "--", *command]
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1",
        }
        limit = functools.partial(_limit_resources, memory_mb, math.ceil(timeout_s) + 1, file_mb, max_processes)
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
        try:
            out, err = proc.communicate(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            timed_out = True
        # children that outlived the main process (daemonised helpers) share its process group: end them too
        _kill_group(proc)
        duration = time.monotonic() - start
        cpu_killed = proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and duration >= timeout_s * 0.5
        status: Status = "timeout" if timed_out or cpu_killed else ("passed" if proc.returncode == 0 else "failed")
        return SandboxResult(
            status,
            proc.returncode,
            _decode(out, max_output_chars),
            _decode(err, max_output_chars),
            duration,
            tuple(protections),
        )
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)


def run_programs(
    sources: Sequence[str],
    *,
    workers: int | None = None,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    **kwargs,
) -> list[SandboxResult]:
    """Run many programs, each in its own sandboxed process, a few at a time.

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
    """
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(run_program, s, timeout_s=timeout_s, memory_mb=memory_mb, **kwargs) for s in sources]
        return [f.result() for f in futures]
