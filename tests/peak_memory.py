"""Runs ``induct-fast`` in a child process and reports the child's own peak resident memory.

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
