"""Run one function in a fresh interpreter, so a native library that crashes (llama.cpp, onnxruntime, W&B's
service client) fails the test that loaded it instead of killing the whole pytest process.

``run_isolated(fn, *args, timeout=..., **kwargs)`` starts a ``spawn`` child (never ``fork``: the parent holds
OpenMP and torch threads), calls ``fn(*args, **kwargs)`` there and returns its (picklable) result. ``fn`` must be
a module-level function: the child imports its module by name (pytest's ``sys.path`` travels with the child). An
exception in the child is raised again in the parent with the child's traceback attached; a child killed by a
signal raises :class:`ChildCrashed` naming the signal; a child still running after ``timeout`` seconds is killed
and :class:`ChildTimeout` raised. The child's stdout and stderr are the parent's file descriptors, so pytest's
capture shows what it printed, and faulthandler (on in the child) prints the Python stack of a crash."""

from __future__ import annotations

import multiprocessing
import pickle
import signal
import traceback

import pytest

_SPAWN = multiprocessing.get_context("spawn")
# pytest's outcomes by the function that raises them again (xfail first: XFailed is a Failed)
_OUTCOMES = [(pytest.xfail.Exception, "xfail"), (pytest.skip.Exception, "skip"), (pytest.fail.Exception, "fail")]


class IsolationError(RuntimeError):
    """The isolated child did not hand back a result."""


class ChildCrashed(IsolationError):
    """The child died (a signal, or an exit code) without returning, or died while exiting after it returned."""


class ChildTimeout(IsolationError):
    """The child was still running at the deadline; it has been killed."""


class ChildError(IsolationError):
    """The child raised an exception that could not be pickled back; the message holds its traceback."""


def _describe(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"died with {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"died with signal {-exitcode}"
    return f"exited with code {exitcode}"


def _error_payload(error: BaseException) -> dict:
    """The child's exception as ``kind`` (type name), ``text`` (traceback), ``msg`` (pytest's skip, fail and xfail,
    raised again in the parent by their own call) and ``pickled`` (only exceptions of Python itself: unpickling a
    library's exception would import that library into the parent)."""
    payload = {"kind": type(error).__name__, "text": "".join(traceback.format_exception(error))}
    for outcome, kind in _OUTCOMES:
        if isinstance(error, outcome):
            return {**payload, "kind": kind, "msg": error.msg}
    if type(error).__module__ == "builtins" and isinstance(error, Exception):  # not SystemExit, KeyboardInterrupt
        try:
            pickled = pickle.dumps(error)
            pickle.loads(pickled)  # an exception whose __init__ takes other arguments than its args fails here
            payload["pickled"] = pickled
        except Exception:  # noqa: BLE001 - not picklable: the traceback text alone goes back
            pass
    return payload


def _child(connection, fn, args, kwargs) -> None:
    import faulthandler
    import sys

    faulthandler.enable()  # a crash prints the child's Python stack before the signal kills it
    try:
        reply = ("ok", pickle.dumps(fn(*args, **kwargs)))
    except BaseException as error:  # noqa: BLE001 - every failure, SystemExit and pytest's skip included, goes back
        reply = ("error", _error_payload(error))
    connection.send(reply)
    connection.close()
    sys.stdout.flush()
    sys.stderr.flush()


def run_isolated(fn, *args, timeout: float, **kwargs):
    """``fn(*args, **kwargs)`` in a fresh ``spawn`` interpreter, bounded by ``timeout`` seconds (see the module)."""
    __tracebackhide__ = True  # a failure points at the test's call, not at this function
    name = f"{fn.__module__}.{fn.__qualname__}"
    receive, send = _SPAWN.Pipe(duplex=False)
    # not a daemon: a daemonic process may not start processes of its own (DataLoader workers, a Pool)
    process = _SPAWN.Process(target=_child, args=(send, fn, args, kwargs), name=f"isolated {name}")
    process.start()
    send.close()  # the child holds the only write end: its death without a reply reads as EOF
    try:
        if not receive.poll(timeout):
            process.kill()
            process.join(30)
            raise ChildTimeout(f"{name} did not finish within {timeout:g} s in its isolated child (killed)")
        try:
            status, payload = receive.recv()
        except EOFError:
            process.join(30)
            raise ChildCrashed(f"{name}: isolated child {_describe(process.exitcode)} before returning") from None
        process.join(60)  # the result is in; a native library that crashes while the child exits still fails
        if process.exitcode is None:
            process.kill()
            process.join(30)
            raise ChildTimeout(f"{name} returned but its isolated child did not exit within 60 s (killed)")
        if process.exitcode != 0 and status == "ok":
            raise ChildCrashed(f"{name} returned, then its isolated child {_describe(process.exitcode)} at exit")
    finally:
        receive.close()
        if process.is_alive():  # pytest-timeout or Ctrl-C interrupted the wait
            process.kill()
            process.join(30)
    if status == "ok":
        return pickle.loads(payload)
    kind, text = payload["kind"], payload["text"]
    if "msg" in payload:  # pytest.skip / fail / xfail in the child: the same outcome here
        if kind == "fail":
            pytest.fail(f"{payload['msg']} (in the isolated child running {name})\n{text}", pytrace=False)
        getattr(pytest, kind)(payload["msg"])
    if "pickled" in payload:
        error = pickle.loads(payload["pickled"])
        error.add_note(f"raised in the isolated child running {name}:\n{text}")
        raise error
    raise ChildError(f"{name} raised {kind} in its isolated child:\n{text}")
