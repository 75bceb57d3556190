"""induct_fast.probes: repeated random blocks and needles in haystacks, with the spans to score.

Spans are checked against plain-Python reconstructions of every position (the bad inputs are
in tests/test_reliability.py's table)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import induct_fast as inf
from induct_fast import probes


# -- repeated --------------------------------------------------------------------------------------


def earlier_copies(row: list[int], i: int) -> list[int]:
    """Duplicate-token targets of query i: earlier positions holding t[i] (the slow way)."""
    return [j for j in range(i) if row[j] == row[i]]


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    period=st.integers(1, 12),
    repeats=st.integers(2, 5),
    vocab=st.integers(2, 40),
    bos=st.one_of(st.none(), st.integers(0, 45)),
    seed=st.integers(0, 2**32),
)
def test_repeated_is_a_block_seen_repeats_times_scored_from_the_first_repeat(batch, period, repeats, vocab, bos, seed):
    p = probes.repeated(batch, period, repeats, vocab, seed=seed, bos=bos)
    o = 0 if bos is None else 1
    n = o + repeats * period
    assert isinstance(p, probes.Probe)
    for a, dtype in zip(p, (np.int64, np.bool_, np.bool_)):
        assert a.shape == (batch, n) and a.dtype == dtype
    tokens, queries, keys = p  # unpacks
    assert keys.all()
    assert [[i for i in range(n) if queries[b, i]] for b in range(batch)] == [list(range(o + period, n))] * batch
    for b in range(batch):
        row = tokens[b].tolist()
        if bos is not None:
            assert row[0] == bos and bos not in row[1:]
        block = row[o : o + period]
        assert row[o:] == block * repeats
        assert all(0 <= t < vocab for t in block)
        distinct = period <= vocab - int(bos is not None and bos < vocab)
        if distinct:
            assert len(set(block)) == period
            # the queries are exactly the positions whose token occurred before
            assert [i for i in range(n) if earlier_copies(row, i)] == list(range(o + period, n))


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), period=st.integers(1, 30), vocab=st.integers(2, 60), bos=st.one_of(st.none(), st.integers(0, 9)), seed=st.integers(0, 10**6))
def test_repeated_tokens_is_the_probe_with_two_repeats(batch, period, vocab, bos, seed):
    tokens = inf.repeated_tokens(batch, period, vocab, seed=seed, bos=bos)
    np.testing.assert_array_equal(tokens, probes.repeated(batch, period, 2, vocab, seed=seed, bos=bos).tokens)
    assert tokens.dtype == np.int64


def test_repeated_seeds_are_reproducible():
    a = probes.repeated(4, 25, 4, 1000, seed=7)
    b = probes.repeated(4, 25, 4, 1000, seed=7)
    c = probes.repeated(4, 25, 4, 1000, seed=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.tokens, c.tokens)
    assert a.tokens.shape == (4, 101)  # Olsson et al.: BOS + 25 tokens x 4


def random_patterns(tokens: np.ndarray, heads: int, seed: int) -> np.ndarray:
    """Causal softmax-like rows [batch, heads, n, n] (positive, summing to 1)."""
    n = tokens.shape[1]
    patterns = np.tril(np.random.default_rng(seed).random((tokens.shape[0], heads, n, n)) + 0.01)
    return patterns / patterns.sum(-1, keepdims=True)


def test_repeated_spans_keep_exactly_the_queries_the_repeats_make_predictable():
    p = probes.repeated(2, 6, 3, 50, seed=1)
    patterns = random_patterns(p.tokens, 3, seed=0)
    spans = dict(queries=p.queries, keys=p.keys)
    scored = inf.head_scores(patterns, p.tokens, kinds=("induction", "duplicate_token", "copy"), per_query=True, **spans)
    n = p.tokens.shape[1]
    for kind, last in (("induction", n), ("duplicate_token", n), ("copy", n - 1)):  # copy: i <= n - 2
        expected = np.zeros((2, n), dtype=bool)
        expected[:, 1 + 6 : last] = True
        np.testing.assert_array_equal(~np.isnan(scored[kind]), np.broadcast_to(expected[:, None], scored[kind].shape), err_msg=kind)
    # with distinct blocks no query of the first copy has an earlier copy: the spans change nothing
    plain = inf.head_scores(patterns, p.tokens, kinds=("induction", "duplicate_token"))
    with_spans = inf.head_scores(patterns, p.tokens, kinds=("induction", "duplicate_token"), **spans)
    for kind in plain:
        np.testing.assert_array_equal(plain[kind], with_spans[kind])


# -- needle ----------------------------------------------------------------------------------------


def oracle_needle_row(haystack, needle, depth, question, bos):
    """(tokens, key positions, query positions) of one row, built with lists.

    The insertion point is the gap nearest to depth * len(haystack), ties to the later gap."""
    h = len(haystack)
    p = min(range(h + 1), key=lambda k: (abs(k - depth * h), -k))
    head = [] if bos is None else [bos]
    row = head + haystack[:p] + needle + haystack[p:] + question + needle
    keys = [len(head) + p + k for k in range(len(needle))]
    answer = len(row) - len(needle)
    queries = [answer - 1 + k for k in range(len(needle))]  # query i predicts token i + 1
    return row, keys, queries


def test_needle_worked_example():
    p = probes.needle([10, 11, 12, 13], [7, 8], [0.5], question=[99], bos=1)
    assert p.tokens.tolist() == [[1, 10, 11, 7, 8, 12, 13, 99, 7, 8]]
    assert np.flatnonzero(p.keys[0]).tolist() == [3, 4]
    assert np.flatnonzero(p.queries[0]).tolist() == [7, 8]


def test_needle_at_every_depth_of_a_small_haystack():
    haystack, needle = [20, 21, 22, 23, 24], [5, 6, 7]
    depths = [k / 10 for k in range(11)]
    p = probes.needle(np.array(haystack, dtype=np.uint8), needle, depths)
    assert p.tokens.shape == (11, 5 + 3 + 3) and p.tokens.dtype == np.int64
    starts = [int(np.flatnonzero(row)[0]) for row in p.keys]
    # depth d puts the needle before haystack token round(d * 5), halves (0.1 -> 0.5, ...) up
    assert starts == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert probes.needle(haystack, needle, 0.3).tokens.shape == (1, 11)  # one number is one depth


@settings(max_examples=120, deadline=None)
@given(
    haystack=st.lists(st.integers(0, 2**40), min_size=1, max_size=40),
    needle=st.lists(st.integers(0, 50), min_size=1, max_size=6),
    depths=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6),
    question=st.one_of(st.none(), st.lists(st.integers(0, 50), max_size=4)),
    bos=st.one_of(st.none(), st.integers(0, 3)),
)
def test_needle_spans_match_the_oracle(haystack, needle, depths, question, bos):
    p = probes.needle(haystack, needle, depths, question=question, bos=bos)
    n = (bos is not None) + len(haystack) + 2 * len(needle) + len(question or [])
    for a, dtype in zip(p, (np.int64, np.bool_, np.bool_)):
        assert a.shape == (len(depths), n) and a.dtype == dtype
    for b, depth in enumerate(depths):
        row, keys, queries = oracle_needle_row(haystack, needle, depth, question or [], bos)
        assert p.tokens[b].tolist() == row
        assert np.flatnonzero(p.keys[b]).tolist() == keys
        assert np.flatnonzero(p.queries[b]).tolist() == queries
        # what the spans mean for `copy`: every query predicts a needle token held at a key
        for k, i in enumerate(queries):
            assert row[i + 1] == needle[k] == row[keys[k]] and keys[k] <= i


def test_needle_inputs_are_not_written_and_outputs_are_fresh():
    haystack = np.arange(10, 20)
    before = haystack.copy()
    p = probes.needle(haystack, [1, 2], [0.0, 1.0])
    np.testing.assert_array_equal(haystack, before)
    p.tokens[:] = 0
    np.testing.assert_array_equal(haystack, before)


def test_probes_is_exported():
    assert inf.probes is probes and "probes" in inf.__all__


def test_needle_spans_score_a_perfect_retrieval_head_1_and_a_previous_token_head_0():
    rng = np.random.default_rng(5)
    haystack, needle = rng.integers(100, 200, 30), np.array([3, 4, 5, 6])
    p = probes.needle(haystack, needle, [0.0, 0.3, 0.5, 1.0], question=[9, 9], bos=1)
    batch, n = p.tokens.shape
    patterns = random_patterns(p.tokens, 2, seed=1) * 0.5  # half of every row spread out, then:
    for b in range(batch):
        targets = np.flatnonzero(p.keys[b])
        for i in range(n):
            if p.queries[b, i]:  # head 0 attends mostly to the needle key holding token i + 1
                k = int(np.flatnonzero(p.queries[b])[0])
                patterns[b, 0, i, targets[i - k]] += 0.5
            else:
                patterns[b, 0, i, 0] += 0.5
            patterns[b, 1, i, max(i - 1, 0)] += 0.5  # head 1: the previous token
    scores = inf.head_scores(patterns, p.tokens, kinds="copy", measure="top1", queries=p.queries, keys=p.keys)["copy"]
    np.testing.assert_array_equal(scores, np.tile([1.0, 0.0], (batch, 1)))
    per_query = inf.head_scores(patterns, p.tokens, kinds="copy", measure="top1", queries=p.queries, keys=p.keys, per_query=True)["copy"]
    np.testing.assert_array_equal(~np.isnan(per_query[:, 0]), p.queries)  # every query is eligible, no other


def test_arenas_diagonal_mean_is_the_offset_kind_and_the_spans_drop_the_first_copy():
    # README recipe: ARENA's induction score, pattern.diagonal(offset=1 - seq_len) averaged over
    # batch and positions, is offset_<seq_len - 1>; the probe's queries keep only the repeat.
    seq_len = 7
    p = probes.repeated(3, seq_len, 2, 40, seed=2)
    patterns = random_patterns(p.tokens, 2, seed=3)  # [batch, head, n, n]
    arena = np.diagonal(patterns, offset=1 - seq_len, axis1=-2, axis2=-1).mean(axis=(0, -1))
    grid = inf.HeadScores({"offset": inf.head_scores(patterns, kinds=(), offsets=seq_len - 1)[f"offset_{seq_len - 1}"][:, None]})["offset"][0]
    np.testing.assert_allclose(grid, arena, rtol=1e-12)
    repeat = np.diagonal(patterns, offset=1 - seq_len, axis1=-2, axis2=-1)[..., 2:].mean(axis=(0, -1))
    spans = inf.head_scores(patterns, kinds=(), offsets=seq_len - 1, queries=p.queries)[f"offset_{seq_len - 1}"].mean(axis=0)
    np.testing.assert_allclose(spans, repeat, rtol=1e-12)
