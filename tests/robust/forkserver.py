"""A fork server for fault injection: imports rlft once, then forks one ``rlft fit`` child per request.

Starting ``python -m rlft fit`` costs seconds of imports per process; forking a process that already imported
everything makes two dozen SIGKILLed runs fit in a CI budget. The children are real, separate processes (SIGKILL
is the real thing), and the parent test kills them by pid.

Protocol (JSON lines on stdin/stdout): ``{"argv": [...], "cwd": ..., "log": ..., "fault": ...}`` -> ``{"pid": N}``;
``{"wait": N}`` -> ``{"status": rc}`` (negative: killed by that signal).

Faults (set in the child only, by patching the libraries rlft calls, never rlft itself):
* ``after_save:STEP`` — SIGKILL right after the first ``last.ckpt`` of global step >= STEP is on disk.
* ``timer:STEP:SECONDS`` — once a ``last.ckpt`` of step >= STEP is written, SIGKILL after SECONDS wherever the run is
  (forward, backward, optimiser, logging, validation, a checkpoint write): a random point with a known minimum.
* ``trace:FILE`` — no fault; appends the time of every ``last.ckpt`` write to FILE.
* ``mid_save:K`` — the K-th checkpoint write stops half-way through its bytes (then SIGKILL).
* ``mid_export`` — the final export's first safetensors file is half written (then SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
import lightning.fabric.plugins.io.torch_io as torch_plugin  # noqa: E402
import peft.peft_model  # noqa: E402
import safetensors.torch  # noqa: E402
import transformers.modeling_utils  # noqa: E402

import rlft.cli  # noqa: E402
import rlft.cli.fit  # noqa: E402, F401
import rlft.methods  # noqa: E402, F401


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_fault(fault: str | None) -> None:
    if not fault:
        return
    kind, _, arg = fault.partition(":")
    original = torch_plugin._atomic_save
    if kind == "after_save":

        def save(checkpoint, path):
            original(checkpoint, path)
            if str(path).endswith("last.ckpt") and checkpoint.get("global_step") >= int(arg):
                _die()

        torch_plugin._atomic_save = save
    elif kind == "trace":  # no fault: record when each last.ckpt is written (the step time for random kills)

        def save(checkpoint, path):
            original(checkpoint, path)
            if str(path).endswith("last.ckpt"):
                with open(arg, "a") as handle:
                    handle.write(f"{time.monotonic()}\n")

        torch_plugin._atomic_save = save
    elif kind == "timer":
        step, seconds = arg.split(":")

        armed = [True]

        def save(checkpoint, path):
            original(checkpoint, path)
            if armed[0] and str(path).endswith("last.ckpt") and checkpoint.get("global_step") >= int(step):
                armed[0] = False
                threading.Timer(float(seconds), _die).start()

        torch_plugin._atomic_save = save
    elif kind == "mid_save":
        calls = [0]

        def save(checkpoint, path):
            calls[0] += 1
            if calls[0] < int(arg):
                return original(checkpoint, path)
            import io

            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            data = buffer.getvalue()
            # the way a crash mid-write leaves the file a non-atomic writer would produce
            with open(path, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            _die()

        torch_plugin._atomic_save = save
    elif kind == "mid_export":
        original_save_file = safetensors.torch.save_file

        def save_file(tensors, filename, metadata=None):
            original_save_file(tensors, filename, metadata)
            size = os.path.getsize(filename)
            with open(filename, "r+b") as handle:
                handle.truncate(size // 2)
            _die()

        # transformers and peft bind ``save_file`` by name at import (which happened above): patch every binding
        bindings = [(safetensors.torch, "save_file")]
        bindings += [(transformers.modeling_utils, "safe_save_file"), (peft.peft_model, "safe_save_file")]
        for module, name in bindings:
            assert getattr(module, name) is original_save_file, f"{module.__name__}.{name} is another function"
            setattr(module, name, save_file)
    else:
        raise ValueError(f"unknown fault {fault!r}")


def run_child(request: dict) -> None:
    os.chdir(request["cwd"])
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    code = 0
    try:
        install_fault(request.get("fault"))
        rlft.cli.main(list(request["argv"]))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 - the child reports everything through its exit code and log
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        if "wait" in request:
            _, status = os.waitpid(int(request["wait"]), 0)
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            reply = {"status": code}
        else:
            pid = os.fork()
            if pid == 0:
                run_child(request)
            reply = {"pid": pid}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
