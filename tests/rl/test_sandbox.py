"""Hostile programs against the bubblewrap sandbox: each escape attempt is contained, and it fails closed.

Every test here runs a program written to break out (read host secrets, write or delete host files, start a shell,
fork-bomb, leave a daemon behind, reach the host's network, exhaust memory, see or signal host processes, read the
host's environment) and checks, from the host side, that nothing got out.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from rlft.rl import sandbox
from rlft.rl.sandbox import SandboxUnavailable, isolation_problem, run_program, run_programs

IN_CI = os.environ.get("CI", "").lower() == "true"
NO_ISOLATION_NEEDED = {"test_fails_closed_without_bubblewrap_unless_the_user_opts_in", "test_bad_limits_are_rejected"}


@pytest.fixture(autouse=True)
def isolation(request):
    """The OS boundary must be there (CI installs bubblewrap via scripts/services.sh); skip with the reason if not."""
    if request.node.name in NO_ISOLATION_NEEDED:
        return
    problem = isolation_problem()
    if problem and IN_CI:
        pytest.fail(f"CI=true but the sandbox is unavailable: {problem}")
    if problem:
        pytest.skip(f"sandbox unavailable: {problem}")


def _host_processes_with(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if marker.encode() in handle.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def test_ordinary_programs_pass_fail_and_report_output():
    ok = run_program("print(sum(range(10)))", timeout_s=10)
    assert ok.status == "passed" and ok.stdout.strip() == "45"
    assert {"bwrap", "userns", "pidns", "netns", "ipcns", "mountns"} <= set(ok.protections)
    bad = run_program("def f():\n    return 1\nassert f() == 2, 'wrong'", timeout_s=10)
    assert bad.status == "failed" and bad.returncode == 1
    assert "AssertionError: wrong" in bad.stderr and 'program.py", line 3' in bad.stderr


def test_host_files_cannot_be_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    secret.chmod(0o644)  # readable by anyone on the host: only the mount view keeps it out
    for path in ("/etc/shadow", "/etc/passwd", str(secret), "/root/.bash_history", os.path.expanduser("~/.ssh")):
        result = run_program(f"print(open({path!r}).read())", timeout_s=10)
        assert result.status == "failed" and "host secret" not in result.stdout, path
        assert "FileNotFoundError" in result.stderr or "PermissionError" in result.stderr, path
    listing = run_program("import os; print(sorted(os.listdir('/')))", timeout_s=10)
    assert set(eval(listing.stdout)) <= {"sandbox", "tmp", "dev", "proc", "usr", "lib", "lib64", "root", "opt"}


def test_host_files_cannot_be_written_or_deleted(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    victim.chmod(0o666)
    attacks = [
        f"import os; os.remove({str(victim)!r})",
        f"open({str(victim)!r}, 'w').write('overwritten')",
        f"import shutil; shutil.rmtree({str(tmp_path)!r})",
        "open('/usr/pwned', 'w').write('x')",  # the interpreter's own tree is read-only
        "import os, sys; os.remove(sys.executable)",
        "import ctypes; assert ctypes.CDLL(None).unlink(b'/etc/passwd') == 0",
    ]
    for attack in attacks:
        result = run_program(attack, timeout_s=10)
        assert result.status == "failed", attack
    assert victim.read_text() == "keep me"
    inside = run_program(
        "import os, shutil\nos.makedirs('a/b')\nopen('a/b/f','w').write('1')\nshutil.rmtree('a')\nprint(os.getcwd())",
        timeout_s=10,
    )
    assert inside.status == "passed" and inside.stdout.strip() == "/sandbox", inside.stderr


def test_no_shell_and_no_host_binaries():
    for attack in (
        "import os; assert os.system('echo pwned') == 0",
        "import subprocess; subprocess.run(['/bin/sh', '-c', 'echo pwned'], check=True)",
        "import os; os.execv('/usr/bin/env', ['env'])",
        "import subprocess; subprocess.run(['bwrap', '--help'], check=True)",
    ):
        result = run_program(attack, timeout_s=10)
        assert result.status == "failed" and "pwned" not in result.stdout, attack


def test_fork_bomb_is_capped_by_the_process_limit_and_leaves_nothing():
    marker = f"rlft-bomb-{time.time_ns()}"
    bomb = (
        "import os, sys, time\n"
        "made = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        f"            os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(100)', '{marker}'])\n"
        "        made += 1\n"
        "except OSError as error:\n"
        "    print(made, error.errno, flush=True)\n"
        "time.sleep(100)\n"
    )
    result = run_program(bomb, timeout_s=3, max_processes=16)
    made = int(result.stdout.split()[0])
    assert result.status == "timeout" and made <= 16
    time.sleep(0.5)
    assert _host_processes_with(marker) == []
    assert run_program("print('alive')", timeout_s=10).stdout.strip() == "alive"


def test_daemon_child_does_not_outlive_the_program():
    marker = f"rlft-daemon-{time.time_ns()}"
    daemon = (
        "import os, sys\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(1000)', '{marker}'])\n"
        "    os._exit(0)\n"
        "print('parent done')\n"
    )
    quick = run_program(daemon, timeout_s=10)  # the program exits at once, leaving its grandchild behind
    assert quick.status == "passed"
    looping = run_program(daemon + "while True:\n    pass\n", timeout_s=1.5)  # killed at the timeout
    assert looping.status == "timeout"
    deadline = time.monotonic() + 5
    while _host_processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _host_processes_with(marker) == []


def test_host_network_is_unreachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    result = run_program(
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')",
        timeout_s=10,
    )
    assert result.status == "failed" and "connected" not in result.stdout
    dns = run_program("import socket; socket.create_connection(('pypi.org', 443), timeout=2)", timeout_s=10)
    assert dns.status == "failed"
    server.settimeout(0.2)  # the kernel would complete a handshake into the backlog even without accept()
    with pytest.raises(TimeoutError):
        server.accept()
    server.close()


def test_memory_hog_is_stopped():
    result = run_program("x = bytearray(3 * 1024 ** 3)\nprint('allocated')", timeout_s=10, memory_mb=256)
    assert result.status == "failed" and "MemoryError" in result.stderr


def test_host_processes_environment_and_root_are_out_of_reach(monkeypatch):
    monkeypatch.setenv("RLFT_TEST_SECRET_TOKEN", "s3cret")
    probe = (
        "import os\n"
        "print(sorted(os.environ))\n"
        "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
        "try:\n"
        "    os.setuid(0)\n"
        "    print('became root')\n"
        "except OSError:  # uid 0 does not even exist in its user namespace\n"
        "    print('no root')\n"
    )
    result = run_program(probe, timeout_s=10)
    env, pids, root = result.stdout.splitlines()
    assert "RLFT_TEST_SECRET_TOKEN" not in env and "s3cret" not in result.stdout
    assert max(eval(pids)) < 10  # its own PID namespace: a handful of processes, none of the host's
    assert root == "no root"
    kill = run_program(f"import os; os.kill({os.getpid()}, 9)", timeout_s=10)
    assert kill.status == "failed"  # the host pid does not exist in its namespace; this test process lives on


def test_batch_helper_keeps_order_and_isolates_programs():
    sources = [f"print({i} * {i})" for i in range(6)] + ["raise SystemExit(3)", "while True: pass"]
    results = run_programs(sources, workers=3, timeout_s=1.5)
    assert [r.stdout.strip() for r in results[:6]] == [str(i * i) for i in range(6)]
    assert results[6].status == "failed" and results[6].returncode == 3
    assert results[7].status == "timeout"


def test_fails_closed_without_bubblewrap_unless_the_user_opts_in(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    sandbox.isolation_problem.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="RLFT_SANDBOX=unsafe"):
            run_program("print('ran')", timeout_s=5)
        with pytest.raises(SandboxUnavailable):
            run_programs(["print('ran')"], timeout_s=5)
        monkeypatch.setenv("RLFT_SANDBOX", "unsafe")
        result = run_program("print('ran')", timeout_s=5)
        assert result.stdout.strip() == "ran" and "unsafe-no-isolation" in result.protections
        monkeypatch.setenv("RLFT_SANDBOX", "bogus")
        with pytest.raises(ValueError, match="RLFT_SANDBOX"):
            run_program("print('ran')", timeout_s=5)
    finally:
        sandbox.isolation_problem.cache_clear()


def test_bad_limits_are_rejected():
    with pytest.raises(ValueError, match="timeout_s"):
        run_program("pass", timeout_s=0)
