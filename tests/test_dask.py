"""induct_fast.dask.head_scores: lazy, blockwise, and equal to the in-memory scores on the local
schedulers and on a two-process distributed cluster."""

from __future__ import annotations

import os

import numpy as np
import pytest

import induct_fast as inf

da = pytest.importorskip("dask.array", reason="dask[array] is not installed")
dask = pytest.importorskip("dask", reason="dask is not installed")
ifd = pytest.importorskip("induct_fast.dask")

from helpers import random_patterns, random_tokens  # noqa: E402

KINDS = ("previous_token", "duplicate_token", "induction", "entropy")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(8)
    patterns = random_patterns(rng, (5, 3, 2, 12, 12), "peaked", np.float32)
    tokens = random_tokens(rng, (5, 12), alphabet=4)
    return patterns, tokens


def assert_equal(lazy: dict, want: dict):
    assert list(lazy) == list(want)
    computed = dask.compute(lazy)[0]
    for kind, values in want.items():
        assert computed[kind].dtype == np.float64
        np.testing.assert_array_equal(computed[kind], values, err_msg=kind)


@pytest.mark.parametrize("chunks", [(2, 1, 2, 12, 12), (3, 2, 1, -1, -1), (5, 3, 2, 12, 12)])
def test_equal_to_in_memory_scores(data, chunks):
    patterns, tokens = data
    array = da.from_array(patterns, chunks=chunks)
    lazy = ifd.head_scores(array, tokens, kinds=KINDS, offsets=(3,))
    assert all(isinstance(v, da.Array) for v in lazy.values())
    assert lazy["induction"].chunks == array.chunks[:3]
    assert_equal(lazy, inf.head_scores(patterns, tokens, kinds=KINDS, offsets=(3,)))


def test_shared_tokens_dask_tokens_and_no_tokens(data):
    patterns, tokens = data
    array = da.from_array(patterns, chunks=(2, 1, 2, 12, 12))
    assert_equal(ifd.head_scores(array, tokens[1]), inf.head_scores(patterns, tokens[1]))
    dask_tokens = da.from_array(tokens, chunks=(4, 6))  # chunked differently from the patterns
    assert_equal(ifd.head_scores(array, dask_tokens, exclude_bos=True), inf.head_scores(patterns, tokens, exclude_bos=True))
    assert_equal(ifd.head_scores(array, kinds="previous_token"), inf.head_scores(patterns, kinds="previous_token"))


def test_matrix_axes_split_across_chunks_are_rechunked(data):
    patterns, tokens = data
    array = da.from_array(patterns, chunks=(2, 1, 2, 5, 7))
    assert_equal(ifd.head_scores(array, tokens), inf.head_scores(patterns, tokens))


def test_a_single_matrix_and_numpy_input(data):
    patterns, tokens = data
    assert_equal(ifd.head_scores(patterns[0, 0, 0], tokens[0]), inf.head_scores(patterns[0, 0, 0], tokens[0]))


@pytest.mark.parametrize("scheduler", ["threads", "synchronous"])
def test_local_schedulers(data, scheduler):
    patterns, tokens = data
    lazy = ifd.head_scores(da.from_array(patterns, chunks=(1, 1, 2, 12, 12)), tokens)
    with dask.config.set(scheduler=scheduler):
        assert_equal(lazy, inf.head_scores(patterns, tokens))


def test_errors(data):
    patterns, tokens = data
    array = da.from_array(patterns, chunks=(2, 1, 2, 12, 12))
    with pytest.raises(ValueError, match=r"tokens: expected shape \(12,\) or \(5, 12\).*got shape \(4, 12\)"):
        ifd.head_scores(array, tokens[:4])
    with pytest.raises(ValueError, match=r"tokens: expected shape"):
        ifd.head_scores(array, tokens[:, :5])
    with pytest.raises(TypeError, match="tokens: expected an integer array"):
        ifd.head_scores(array, tokens.astype(float))
    with pytest.raises(ValueError, match="array: expected square matrices"):
        ifd.head_scores(array[..., :5])
    with pytest.raises(ValueError, match="kinds: expected one of"):
        ifd.head_scores(array, tokens, kinds="nope").popitem()[1].compute()


def test_distributed_cluster_of_two_processes(data):
    distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed")
    patterns, tokens = data
    with distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None, silence_logs=40
    ) as cluster, distributed.Client(cluster) as client:
        array = da.from_array(patterns, chunks=(1, 3, 2, 12, 12))
        lazy = ifd.head_scores(array, tokens, kinds=KINDS, offsets=(5,))
        futures = client.compute(lazy)
        computed = client.gather(futures)
        want = inf.head_scores(patterns, tokens, kinds=KINDS, offsets=(5,))
        for kind in want:
            np.testing.assert_array_equal(computed[kind], want[kind], err_msg=kind)
        # two separate worker processes, neither of them this one
        pids = client.run(os.getpid)
        assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
