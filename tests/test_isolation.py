"""tests/isolation.py: a native crash, a hang or an error in an isolated child fails only the test that ran it, by
name, while pytest goes on; a normal function hands its value back."""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import os
import signal
import time

import pytest

from tests.isolation import ChildCrashed, ChildError, ChildTimeout, run_isolated


class LibraryError(Exception):
    """Stands for a native library's exception type, which the parent must not import to unpickle."""


def _describe(values, *, scale):
    return {"sum": sum(values) * scale, "pid": os.getpid()}


def _segfault():
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def _sleep(seconds):
    time.sleep(seconds)


def _fail_an_assertion():
    assert 1 + 1 == 3, "arithmetic in the child"


def _skip():
    pytest.skip("llama-cpp-python is not installed")


def _raise_a_library_error():
    raise LibraryError("model file is corrupt")


def _start_a_process_of_its_own():
    grandchild = multiprocessing.get_context("spawn").Process(target=os.getpid)
    grandchild.start()
    grandchild.join(120)
    return grandchild.exitcode


def _exit():
    raise SystemExit(3)


def _return_then_crash_at_exit():
    atexit.register(os.kill, os.getpid(), signal.SIGSEGV)  # a native destructor crashing at interpreter exit
    return "done"


def test_isolated_child_returns_the_functions_value_from_another_process():
    result = run_isolated(_describe, [1, 2, 3], scale=10, timeout=120)
    assert result["sum"] == 60
    assert result["pid"] != os.getpid()


def test_segfault_in_isolated_child_fails_naming_the_signal_and_pytest_survives():
    with pytest.raises(ChildCrashed, match=r"_segfault: isolated child died with SIGSEGV before returning"):
        run_isolated(_segfault, timeout=120)
    assert run_isolated(_describe, [1], scale=1, timeout=120)["sum"] == 1  # this process is alive and can go on


def test_isolated_child_past_its_timeout_is_killed_and_fails_with_the_timeout():
    start = time.monotonic()
    with pytest.raises(ChildTimeout, match=r"_sleep did not finish within 5 s in its isolated child \(killed\)"):
        run_isolated(_sleep, 600, timeout=5)
    assert time.monotonic() - start < 60  # bounded: the sleeping child was killed, not waited for


def test_assertion_in_isolated_child_is_raised_again_with_its_traceback():
    with pytest.raises(AssertionError, match="arithmetic in the child") as raised:
        run_isolated(_fail_an_assertion, timeout=120)
    note = "\n".join(raised.value.__notes__)
    assert "raised in the isolated child" in note and "_fail_an_assertion" in note


def test_skip_in_isolated_child_skips_the_test():
    with pytest.raises(pytest.skip.Exception, match="llama-cpp-python is not installed"):
        run_isolated(_skip, timeout=120)


def test_library_exception_in_isolated_child_comes_back_as_text_without_importing_its_module():
    with pytest.raises(ChildError, match=r"(?s)raised LibraryError.*model file is corrupt"):
        run_isolated(_raise_a_library_error, timeout=120)


def test_crash_while_the_isolated_child_exits_fails_even_after_it_returned():
    with pytest.raises(ChildCrashed, match=r"returned, then its isolated child died with SIGSEGV at exit"):
        run_isolated(_return_then_crash_at_exit, timeout=120)


def _fail():
    pytest.fail("the exported model's logits are off")


def test_pytest_fail_in_isolated_child_fails_the_test_with_its_message():
    with pytest.raises(pytest.fail.Exception, match=r"logits are off \(in the isolated child running .*_fail\)"):
        run_isolated(_fail, timeout=120)


def test_isolated_child_may_start_processes_of_its_own():
    assert run_isolated(_start_a_process_of_its_own, timeout=120) == 0  # DataLoader workers, W&B's service


def test_system_exit_in_isolated_child_fails_the_test_instead_of_exiting_pytest():
    with pytest.raises(ChildError, match=r"(?s)_exit raised SystemExit in its isolated child.*SystemExit: 3"):
        run_isolated(_exit, timeout=120)
