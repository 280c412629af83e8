"""Programs that flood their output or the sandbox's writable space cannot take the caller (the trainer, pass@k
evaluation) down with them: output is read incrementally with only its head kept, and writes are capped in total."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from rlft.rl.sandbox import isolation_problem, run_program

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(autouse=True)
def isolation():
    problem = isolation_problem()
    if problem and IN_CI:
        pytest.fail(f"CI=true but the sandbox is unavailable: {problem}")
    if problem:
        pytest.skip(f"sandbox unavailable: {problem}")


FLOOD = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range({mb}):\n    sys.stdout.write(chunk)\n"


def _peak_rss_growth_mb(program: str, **options) -> dict:
    """Run ``program`` from a fresh interpreter and report its peak-RSS growth (a pytest process's peak is noise)."""
    script = textwrap.dedent(
        f"""
        import json
        from rlft.rl.sandbox import run_program

        def peak_mb():
            return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024

        before = peak_mb()
        result = run_program({program!r}, **{options!r})
        print(json.dumps({{"growth_mb": peak_mb() - before, "status": result.status, "stdout": result.stdout[-200:],
                          "chars": len(result.stdout), "truncated": result.output_truncated}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_output_flood_keeps_the_callers_memory_bounded_and_reports_truncation():
    # 200 MB of stdout, under a byte limit high enough that all of it is read (and dropped) rather than killed
    seen = _peak_rss_growth_mb(FLOOD.format(mb=200), timeout_s=60, max_output_bytes=1 << 30, max_output_chars=1000)
    assert seen["status"] == "passed", seen
    assert seen["growth_mb"] < 64, seen  # was ~600 MB when communicate() buffered everything
    assert seen["truncated"] and seen["chars"] < 1100
    assert "output truncated: " in seen["stdout"] and "more bytes not shown" in seen["stdout"]


def test_output_past_the_hard_limit_kills_the_program():
    result = run_program(FLOOD.format(mb=10_000), timeout_s=60, max_output_bytes=4 << 20)
    assert result.status == "failed" and result.output_truncated
    assert "passed the 4194304-byte output limit" in result.stderr
    assert result.duration_s < 30  # killed at the limit, not at the timeout


def test_stderr_flood_and_timeouts_are_bounded_too():
    spam = "import sys\nwhile True:\n    sys.stderr.write('e' * 65536)\n"
    result = run_program(spam, timeout_s=60, max_output_bytes=2 << 20, max_output_chars=100)
    assert result.status == "failed" and result.stderr.startswith("e" * 100) and len(result.stderr) < 400
    quiet = run_program("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(100)\n", timeout_s=1.5)
    assert quiet.status == "timeout" and quiet.duration_s < 10  # closed pipes do not outlast the deadline
    small = run_program("print('é' * 10)", timeout_s=10, max_output_chars=4)
    assert small.stdout.startswith("éééé\n... [output truncated: ") and small.output_truncated


@pytest.mark.parametrize("place", ["/sandbox", "/tmp"])
def test_many_files_hit_the_total_write_cap(place):
    filler = (
        "import os\n"
        "written = 0\n"
        "try:\n"
        "    for i in range(1000):\n"
        f"        with open(os.path.join({place!r}, f'f{{i}}'), 'wb') as handle:\n"
        "            handle.write(b'x' * (1 << 20))\n"
        "        written += 1\n"
        "except OSError as error:\n"
        "    print(written, error.errno)\n"
    )
    result = run_program(filler, timeout_s=30, file_mb=4, disk_mb=16)
    written, errno = map(int, result.stdout.split())
    assert 8 <= written <= 16 and errno == 28, result  # ENOSPC once the 16 MB tmpfs is full, each file under 4 MB
    assert run_program("print('alive')", timeout_s=10).stdout.strip() == "alive"


def test_a_callers_folder_is_still_bound_as_is():
    # a folder the sandbox uid can reach (pytest's tmp_path sits under a root-only folder when tests run as root)
    with tempfile.TemporaryDirectory(prefix="rlft-caller-") as folder:
        (Path(folder) / "data.txt").write_text("from the caller")
        result = run_program("print(open('data.txt').read()); open('out.txt', 'w').write('left')", cwd=folder)
        assert result.status == "passed" and result.stdout.strip() == "from the caller", result
        assert (Path(folder) / "out.txt").read_text() == "left"
