"""The bubblewrap command line of :mod:`rlft.rl.sandbox`: what is mounted read-only (the interpreter, its standard
library and the shared libraries they load), which unprivileged host uid runs it when rlft is root, and how paths
that uid cannot reach are staged for it."""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import re
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

UID_ENV = "RLFT_SANDBOX_UID"
INSIDE = "/sandbox"
PROGRAM = "program.py"


def interpreter() -> str:
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _shared_libraries(binaries: list[str]) -> set[str]:
    """Library paths (as the loader names them) that ``binaries`` need, from ``ldd``."""
    libs: set[str] = set()
    for start in range(0, len(binaries), 64):
        try:
            out = subprocess.run(["ldd", *binaries[start : start + 64]], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        for match in re.finditer(r"(?:=>\s*)?(/\S+)\s+\(0x", out.stdout):
            libs.add(match.group(1))
    return libs


@functools.cache
def _read_only_binds() -> tuple[tuple[str, str], ...]:
    """(host path, sandbox path) pairs: the interpreter, its standard library, and the libraries they load."""
    exe = interpreter()
    stdlib = sysconfig.get_path("stdlib", vars={"installed_base": sys.base_prefix, "base": sys.base_prefix})
    platstdlib = sysconfig.get_path("platstdlib", vars={"platbase": sys.base_prefix, "base": sys.base_prefix})
    dynload = [str(p) for d in {stdlib, platstdlib} for p in Path(d, "lib-dynload").glob("*.so")]
    binds = {exe: exe}
    for folder in {stdlib, platstdlib}:
        if os.path.isdir(folder):
            binds[os.path.realpath(folder)] = folder
    for lib in _shared_libraries([exe, *dynload]):
        if os.path.exists(lib):
            binds[os.path.realpath(lib)] = lib
    return tuple(sorted(binds.items(), key=lambda kv: kv[1]))


_UID_SLOTS = 32
_free_uids: queue.Queue[int] | None = None
_uid_lock = threading.Lock()


def sandbox_uid() -> int | None:
    """The first unprivileged host uid of the sandbox range when rlft is root (None: keep the caller's own uid)."""
    if os.geteuid() != 0:
        return None
    return int(os.environ.get(UID_ENV, "200000"))


@contextlib.contextmanager
def uid_slot():
    """A host uid no other running sandbox uses (its process count is this program's alone)."""
    global _free_uids
    base = sandbox_uid()
    if base is None:
        yield None
        return
    with _uid_lock:
        if _free_uids is None:
            _free_uids = queue.Queue()
            for offset in range(_UID_SLOTS):
                _free_uids.put(base + offset)
    uid = _free_uids.get()
    try:
        yield uid
    finally:
        _free_uids.put(uid)


def _reachable_by_others(path: str) -> bool:
    """Whether an unprivileged uid can reach ``path`` (every ancestor searchable, the file readable)."""
    target = Path(path)
    for folder in target.parents:
        if not os.stat(folder).st_mode & 0o001:
            return False
    return bool(os.stat(target).st_mode & (0o005 if target.is_dir() else 0o004))


def _staging(uid: int | None) -> list[tuple[str, str]]:
    """(source, mount point) pairs for interpreter paths the sandbox uid cannot reach (e.g. under ``/root``).

    They are bind-mounted, in a private mount namespace of the launcher only, onto world-reachable empty mount
    points, from where the unprivileged bwrap can bind them; the host's mounts are not touched.
    """
    if uid is None:
        return []
    root = Path("/run/rlft-sandbox" if os.path.isdir("/run") else os.path.join(tempfile.gettempdir(), "rlft-stage"))
    pairs = []
    for index, (host, _) in enumerate(_read_only_binds()):
        if _reachable_by_others(host):
            continue
        point = root / str(index)
        root.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        if os.path.isdir(host):
            point.mkdir(exist_ok=True)
        else:
            point.touch(exist_ok=True)
        pairs.append((host, str(point)))
    return pairs


def _launcher(uid: int | None, staged: list[tuple[str, str]]) -> list[str]:
    """What starts bwrap: as root, mount the staged paths privately, then become ``uid`` for good."""
    if uid is None or not staged:
        return []
    mounts = [path for pair in staged for path in pair]
    script = 'while [ "$1" != "--" ]; do mount --bind "$1" "$2" || exit 125; shift 2; done; shift; exec "$@"'
    drop = [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, "sh", *mounts, "--", *drop]


def _bwrap_command(
    argv: list[str], workdir: Path, staged: list[tuple[str, str]] = (), disk_mb: int | None = None, private=False
) -> list[str]:
    command = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    sources = dict(staged)
    for host, inside in _read_only_binds():
        command += ["--ro-bind", sources.get(host, host), inside]
    # RLIMIT_FSIZE bounds each file only; a size-capped tmpfs bounds what many files add up to (memory, not disk)
    size = [] if disk_mb is None else ["--size", str(disk_mb * 1024 * 1024)]
    command += ["--proc", "/proc", "--dev", "/dev", *size, "--tmpfs", "/tmp"]
    if private:  # a folder of rlft's own: only the program comes from the host, everything written stays in memory
        command += [*size, "--tmpfs", INSIDE, "--ro-bind", str(workdir / PROGRAM), f"{INSIDE}/{PROGRAM}"]
    else:  # the caller's folder, used as is (its files visible, what the program writes left for the caller)
        command += ["--bind", str(workdir), INSIDE]
    command += ["--chdir", INSIDE, "--hostname", "sandbox", "--clearenv"]
    for name, value in environment(INSIDE).items():
        command += ["--setenv", name, value]
    return [*command, "--", *argv]


def environment(home: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}


def start_command(
    argv: list[str], workdir: Path, uid: int | None, *, disk_mb: int | None = None, private: bool = False
) -> tuple[list[str], dict]:
    """The full command and the Popen arguments that switch user (directly, or through the launcher).

    Args:
        argv: The program's command line inside the sandbox.
        workdir: The host folder behind ``/sandbox``.
        uid: The unprivileged host uid (``None``: the caller's own).
        disk_mb: Size cap of each writable tmpfs (``/tmp``, and ``/sandbox`` when ``private``); ``None``: uncapped.
        private: ``/sandbox`` is a fresh tmpfs holding only ``workdir/program.py`` (read-only), instead of a bind
            of ``workdir`` itself.
    """
    staged = _staging(uid)
    command = [*_launcher(uid, staged), *_bwrap_command(argv, workdir, staged, disk_mb, private)]
    if uid is None or staged:
        return command, {}
    return command, {"user": uid, "group": uid, "extra_groups": []}


def hand_over(folder: Path, uid: int | None) -> None:
    """Give the private folder to the sandbox uid (only needed when rlft is root and the sandbox is not)."""
    if uid is None:
        return
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, uid, uid, follow_symlinks=False)
