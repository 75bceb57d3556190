"""Threads (DESIGN.md section 3): results are bit-identical whatever the number of threads,
across repeated calls and across concurrent Python threads; a forked child gets its own pool."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import induct_fast as inf
from helpers import ALL_KINDS, random_patterns, random_tokens

N = 600  # three 256-row blocks per head, so the combination order of blocks matters
KINDS = ALL_KINDS


@pytest.fixture(autouse=True)
def restore_threads():
    before = inf.get_num_threads()
    yield
    inf.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(77)
    patterns = random_patterns(rng, (2, 3, N, N), "peaked", np.float32)
    patterns[1, 2, 300:310] = 0.0  # rows all on BOS
    patterns[1, 2, 300:310, 0] = 1.0
    tokens = random_tokens(rng, (2, N), alphabet=3)
    detection = (rng.random((3, N, N)) < 0.1) * rng.normal(size=(3, N, N))
    return patterns, tokens, detection


def all_results(patterns, tokens, detection) -> list[np.ndarray]:
    out = []
    for exclude_bos in (False, True):
        for per_query in (False, True):
            s = inf.head_scores(patterns, tokens, kinds=KINDS, offsets=(1, 7, 300), exclude_bos=exclude_bos, per_query=per_query)
            out.extend(s.values())
    for measure in ("mul", "abs"):
        for flags in ({}, {"exclude_bos": True, "exclude_current_token": True}):
            for kind in ("previous_token", "induction", "offset_5"):
                out.append(inf.detection_scores(patterns, kind, tokens=tokens, measure=measure, **flags))
            out.append(inf.detection_scores(patterns, detection, measure=measure, **flags))
    return out


def assert_identical(a: list[np.ndarray], b: list[np.ndarray]):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype == np.float64 and x.shape == y.shape, i
        # bit-identical, NaN positions included (array_equal(equal_nan) plus the raw bytes)
        assert np.array_equal(x, y, equal_nan=True), i
        assert x.tobytes() == y.tobytes(), i


def test_set_and_get_num_threads():
    for n in (1, 2, 3):
        inf.set_num_threads(n)
        assert inf.get_num_threads() == n


def test_bit_identical_for_any_number_of_threads(data):
    inf.set_num_threads(1)
    reference = all_results(*data)
    assert any(np.isnan(r).any() for r in reference)  # NaN positions are part of the comparison
    for n in (2, 3, 4):
        inf.set_num_threads(n)
        assert_identical(all_results(*data), reference)


def test_bit_identical_across_repeated_calls(data):
    inf.set_num_threads(2)
    reference = all_results(*data)
    for _ in range(3):
        assert_identical(all_results(*data), reference)


def test_concurrent_python_threads_get_identical_results(data):
    patterns, tokens, detection = data
    inf.set_num_threads(2)
    small = patterns[:, :, :300, :300]  # a strided view, shared by every thread
    reference = all_results(patterns, tokens, detection)
    reference_small = inf.head_scores(small, tokens[:, :300], kinds=KINDS)
    barrier = threading.Barrier(8)

    def work(k):
        # half the threads share the caller's arrays, half use private copies (fresh allocations)
        inputs = (patterns, tokens, detection) if k % 2 else tuple(np.array(x, copy=True) for x in (patterns, tokens, detection))
        barrier.wait()  # start together
        got = all_results(*inputs)
        got_small = inf.head_scores(small, tokens[:, :300], kinds=KINDS)
        return got, got_small

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(8)))
    for got, got_small in results:
        assert_identical(got, reference)
        assert_identical(list(got_small.values()), list(reference_small.values()))


def test_resizing_the_pool_while_other_threads_compute(data):
    patterns, tokens, detection = data
    inf.set_num_threads(1)
    reference = inf.head_scores(patterns, tokens, kinds=KINDS, per_query=True)
    reference_det = inf.detection_scores(patterns, detection, measure="abs")
    stop = threading.Event()

    def resize():
        k = 0
        while not stop.is_set():
            inf.set_num_threads(1 + k % 3)
            k += 1

    def work(_):
        s = inf.head_scores(patterns, tokens, kinds=KINDS, per_query=True)
        return s, inf.detection_scores(patterns, detection, measure="abs")

    resizer = threading.Thread(target=resize)
    resizer.start()
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(work, range(8)))
    finally:
        stop.set()
        resizer.join(timeout=30)
    assert not resizer.is_alive()
    for s, d in results:
        assert_identical(list(s.values()), list(reference.values()))
        assert_identical([d], [reference_det])


def test_gil_is_released_during_kernels(data):
    """The main Python thread keeps running while another thread is inside a long kernel call
    (DESIGN.md: the GIL is released around every kernel)."""
    patterns, _, _ = data
    big = np.broadcast_to(patterns[:1], (400,) + patterns.shape[1:])  # ~0.4 G reads, no memory
    inf.set_num_threads(1)
    started, finished = threading.Event(), threading.Event()

    def kernel():
        started.set()
        inf.detection_scores(big, "previous_token")
        finished.set()

    worker = threading.Thread(target=kernel)
    worker.start()
    started.wait()
    spins = 0
    while not finished.is_set():
        spins += 1
    worker.join()
    # with the GIL held for the whole call, this loop would run only until the kernel starts
    assert spins > 1000, spins


def _child(conn, patterns, tokens):
    try:
        s = inf.head_scores(patterns, tokens, kinds=KINDS, per_query=True)
        d = inf.detection_scores(patterns, "induction", tokens=tokens, measure="abs")
        threads = inf.get_num_threads()
        inf.set_num_threads(1)
        again = inf.head_scores(patterns, tokens, kinds=KINDS, per_query=True)
        conn.send((s, d, threads, again))
    except BaseException as exc:  # pragma: no cover - reported to the parent
        conn.send(exc)
    finally:
        conn.close()


def test_forked_child_can_use_the_pool(data):
    patterns, tokens, _ = data
    patterns = patterns[:, :, :400, :400]
    tokens = tokens[:, :400]
    inf.set_num_threads(2)
    reference = inf.head_scores(patterns, tokens, kinds=KINDS, per_query=True)  # the parent's pool is up
    reference_det = inf.detection_scores(patterns, "induction", tokens=tokens, measure="abs")

    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(child_end, patterns, tokens))
    child.start()
    child_end.close()
    try:
        assert parent_end.poll(60), "forked child hung calling head_scores after the parent used the pool"
        result = parent_end.recv()
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
            child.join()
    assert not isinstance(result, BaseException), repr(result)
    s, d, threads, again = result
    assert child.exitcode == 0
    assert threads == 2  # the child keeps the parent's setting, with threads of its own
    assert_identical(list(s.values()), list(reference.values()))
    assert_identical(list(again.values()), list(reference.values()))
    assert_identical([d], [reference_det])
    # and the parent's pool still works
    assert_identical(list(inf.head_scores(patterns, tokens, kinds=KINDS, per_query=True).values()), list(reference.values()))


def test_num_threads_environment_variable():
    env = dict(os.environ, INDUCT_FAST_NUM_THREADS="3")
    code = "import induct_fast as inf; print(inf.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "3"
