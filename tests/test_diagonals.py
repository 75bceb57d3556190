"""The positional fast path (offset_<d>, previous_token, self, bos; src/diagonals.rs) against the
general per-query path, bit for bit, and against a numpy oracle.

A request with a kind the fast path does not serve (``entropy``) takes the general path for every
kind, so ``head_scores(..., kinds=K + ["entropy"])[k]`` is the general path's value of kind k."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import induct_fast as inf
import oracle
from helpers import FLOAT_DTYPES, PATTERN_STYLES, layouts, lead_shapes, random_patterns, strided_view

POSITIONAL = ("previous_token", "self", "bos")


def bits(x) -> bytes:
    return np.ascontiguousarray(x).tobytes()


@settings(max_examples=120)
@given(
    lead=lead_shapes(max_heads=6),
    n=st.one_of(st.integers(1, 40), st.integers(250, 600)),  # one block, or several of 256 rows
    dtype=st.sampled_from(FLOAT_DTYPES),
    style=st.sampled_from(PATTERN_STYLES),
    kinds=st.lists(st.sampled_from(POSITIONAL), max_size=3, unique=True),
    offsets=st.lists(st.integers(1, 300), max_size=3, unique=True),
    exclude_bos=st.booleans(),
    per_query=st.booleans(),
    masked=st.booleans(),
    layout=layouts(2),
    seed=st.integers(0, 2**32 - 1),
)
def test_fast_path_equals_general_path_bit_for_bit(lead, n, dtype, style, kinds, offsets, exclude_bos, per_query, masked, layout, seed):
    offsets = [d for d in offsets if d < n]
    if not kinds and not offsets:
        kinds = ["previous_token"]
    rng = np.random.default_rng(seed)
    patterns = random_patterns(rng, lead + (n, n), style=style, dtype=dtype)
    steps, perm = layout[0], layout[1]
    k = len(lead)
    patterns = strided_view(patterns, (1,) * k + steps, tuple(range(k)) + tuple(k + p for p in perm), readonly=layout[2])
    mask = None
    if masked:
        mask = rng.random((lead[0], n) if lead and rng.random() < 0.5 else (n,)) < 0.8
        mask[..., 0] = True  # exclude_bos refuses a padded position 0
    options = dict(offsets=offsets, exclude_bos=exclude_bos, per_query=per_query, attention_mask=mask)
    fast = inf.head_scores(patterns, kinds=kinds, **options)
    general = inf.head_scores(patterns, kinds=kinds + ["entropy"], **options)
    assert list(fast) == [k for k in general if k != "entropy"]
    for name, value in fast.items():
        assert value.shape == general[name].shape and bits(value) == bits(general[name]), name


@pytest.mark.parametrize("threads", [1, 2])
def test_fast_path_matches_numpy_and_does_not_depend_on_threads(threads):
    rng = np.random.default_rng(0)
    patterns = random_patterns(rng, (2, 3, 700, 700), dtype=np.float32)
    before = inf.get_num_threads()
    try:
        inf.set_num_threads(threads)
        got = inf.head_scores(patterns, kinds=POSITIONAL, offsets=(1, 5, 699), per_query=False)
        inf.set_num_threads(1 if threads == 2 else 2)
        other = inf.head_scores(patterns, kinds=POSITIONAL, offsets=(1, 5, 699), per_query=False)
    finally:
        inf.set_num_threads(before)
    for name in got:
        assert bits(got[name]) == bits(other[name]), name
    wide = patterns.astype(np.float64)
    for d in (1, 5, 699):
        np.testing.assert_allclose(got[f"offset_{d}"], np.diagonal(wide, offset=-d, axis1=-2, axis2=-1).mean(-1), rtol=1e-12)
    np.testing.assert_allclose(got["bos"], wide[..., 1:, 0].mean(-1), rtol=1e-12)
    np.testing.assert_allclose(got["self"], np.diagonal(wide, axis1=-2, axis2=-1)[..., 1:].mean(-1), rtol=1e-12)


@pytest.mark.parametrize("exclude_bos", [False, True])
def test_fast_path_matches_the_oracle_with_padding(exclude_bos):
    rng = np.random.default_rng(1)
    patterns = random_patterns(rng, (2, 2, 300, 300))
    mask = rng.random((2, 300)) < 0.7
    mask[:, 0] = True
    got = inf.head_scores(patterns, kinds=POSITIONAL, offsets=(2, 257), exclude_bos=exclude_bos, attention_mask=mask, per_query=True)
    want = oracle.head_scores(patterns, None, kinds=POSITIONAL, offsets=(2, 257), exclude_bos=exclude_bos, per_query=True, attention_mask=mask)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-15, equal_nan=True, err_msg=name)


@pytest.mark.parametrize(
    "where, kind, exclude_bos",
    [((1, 300, 299), "previous_token", False), ((0, 511, 0), "bos", False), ((1, 400, 0), "offset_3", True), ((0, 5, 2), "offset_3", False)],
)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_entries_are_named_like_the_general_path(where, kind, exclude_bos, bad):
    patterns = random_patterns(np.random.default_rng(2), (2, 600, 600))
    patterns[where] = bad
    messages = []
    for kinds in ([kind], [kind, "entropy"]):
        with pytest.raises(ValueError) as info:
            inf.head_scores(patterns, kinds=kinds, exclude_bos=exclude_bos)
        messages.append(str(info.value))
    assert f"at index {where}".replace(",)", ")") in messages[0], messages[0]
    assert messages[0].startswith("patterns: expected finite values"), messages[0]
    if kind != "offset_3" or not exclude_bos:  # entropy reads the row too and may name it first
        assert messages[0] == messages[1]


def test_an_overflowing_sum_is_named():
    patterns = np.zeros((1, 300, 300))
    patterns[0, np.arange(1, 300), np.arange(0, 299)] = 1e308
    with pytest.raises(ValueError, match=r"patterns: .*overflow in row 1 of head \(0\)"):
        inf.head_scores(patterns, kinds=["previous_token"])
