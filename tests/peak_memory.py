"""Peak resident memory: of a job in this process (:func:`measure`), or of ``induct-fast`` run in a
child process (:func:`run_cli`).

A plain subprocess is no good for this on Linux: ``execve`` carries the parent's peak RSS into
the child's ``ru_maxrss`` (the test process may hold far more than the scan does). A child forked
from a ``forkserver`` starts from the small server process instead, so its ``ru_maxrss`` is its
own.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import resource
import time


def run_cli(argv: list[str]) -> tuple[int, str, str, int]:
    """(exit status, stdout, stderr, peak RSS in bytes) of ``induct-fast *argv`` in a fresh child."""
    ctx = multiprocessing.get_context("forkserver")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(argv, sender))
    child.start()
    sender.close()
    try:
        return receiver.recv()
    finally:
        child.join()


def _child(argv: list[str], sender) -> None:
    from induct_fast.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    sender.send((code, out.getvalue(), err.getvalue(), peak))


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(job, *args) -> dict:
    """The growth of peak resident memory while ``job(*args)`` runs, over the resident memory just
    before (bytes), and its time: the peak is reset first (writing 5 to /proc/self/clear_refs
    resets VmHWM, the kernel's record of peak RSS, to the current RSS)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_bytes("VmRSS")
    start = time.perf_counter()
    job(*args)
    seconds = time.perf_counter() - start
    return {"growth": status_bytes("VmHWM") - before, "seconds": seconds}
