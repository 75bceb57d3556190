"""DESIGN.md section 12 in the kernels: ``measure="top1"``, the kind ``copy`` and the
``queries=`` / ``keys=`` spans, for stored patterns (``head_scores``) and fused from q/k
(``scores_from_qk``), against the numpy oracle in tests/oracle.py on the fixture, on hand-made
cases, and under hypothesis (shapes, exact ties, spans of both shapes, padding, exclude_bos)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import induct_fast as inf
import oracle
from helpers import random_patterns, random_tokens

KINDS = ("previous_token", "duplicate_token", "induction", "copy", "bos", "self", "offset_7", "entropy")
MEASURES = ("mass", "top1")


def assert_same(got: dict, want: dict, atol: float, context: str = "") -> None:
    """Same NaNs, within `atol` elsewhere (0: exactly equal; entropy, a sum of logs, to 1e-12)."""
    for kind in want:
        g, w = np.asarray(got[kind]), np.asarray(want[kind])
        tol = max(atol, 1e-12) if kind == "entropy" else atol
        assert g.shape == w.shape, (kind, context)
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg=f"{kind} {context}")
        np.testing.assert_allclose(g[~np.isnan(g)], w[~np.isnan(w)], rtol=0, atol=tol, err_msg=f"{kind} {context}")


def spans_of(kind: str, rng: np.random.Generator, batch: int, n: int):
    """(queries, keys) of one of the span configurations: none, shared [n], per prompt [batch, n]."""
    if kind == "none":
        return None, None
    shape = (n,) if kind == "shared" else (batch, n)
    return rng.random(shape) < 0.7, rng.random(shape) < 0.6


# --- the fixture: every kind x measure x span shape, stored and fused ---------------------------


@pytest.mark.parametrize("prompts", ["L2_rep", "L2_nat"])
@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("span", ["none", "shared", "per_prompt"])
def test_stored_scores_match_the_oracle_on_the_fixture(fixture, prompts, measure, span):
    patterns, tokens = fixture[f"{prompts}_patterns"], fixture[f"{prompts}_tokens"]
    queries, keys = spans_of(span, np.random.default_rng(1), tokens.shape[0], tokens.shape[1])
    options = dict(kinds=KINDS, measure=measure, queries=queries, keys=keys, per_query=True)
    got = inf.head_scores(patterns, tokens, **options)
    want = oracle.head_scores(patterns, tokens, **options)
    assert_same(got, want, 1e-12 if measure == "mass" else 0.0)
    means = inf.head_scores(patterns, tokens, **{**options, "per_query": False})
    assert_same(means, {k: np.nanmean(np.where(np.isnan(v), np.nan, v), axis=-1) for k, v in got.items()}, 1e-12)


def near_ties(patterns: np.ndarray, rtol: float) -> np.ndarray:
    """[*lead, n] True where a row's two largest entries are within `rtol` of each other: float32
    rounding may order such keys differently in the logits and in the stored pattern."""
    top2 = -np.sort(-patterns.astype(np.float64), axis=-1)[..., :2]
    return top2[..., 1] >= top2[..., 0] * (1 - rtol)


@pytest.mark.parametrize("prompts", ["L2_rep", "L2_nat"])
@pytest.mark.parametrize("span", ["none", "shared", "per_prompt"])
def test_fused_scores_match_the_stored_patterns(fixture, prompts, span):
    """Mass to 1e-5 (TransformerLens's float32 patterns); top-1 exactly, but at rows whose two
    largest stored probabilities are within 1e-5 relative (near ties, whose order float32 rounding
    may flip), which are few."""
    patterns, tokens = fixture[f"{prompts}_patterns"], fixture[f"{prompts}_tokens"]
    q, k = fixture[f"{prompts}_q"], fixture[f"{prompts}_k"]
    queries, keys = spans_of(span, np.random.default_rng(2), tokens.shape[0], tokens.shape[1])
    options = dict(kinds=KINDS, queries=queries, keys=keys, per_query=True)
    assert_same(inf.scores_from_qk(q, k, tokens, **options), inf.head_scores(patterns, tokens, **options), 1e-5)
    fused = inf.scores_from_qk(q, k, tokens, measure="top1", **options)
    stored = inf.head_scores(patterns, tokens, measure="top1", **options)
    ties = near_ties(patterns, 1e-5)
    assert ties[..., 1:].mean() < 0.05, "near ties should be rare in trained heads"
    for kind in KINDS[:-1]:  # entropy (checked above) is no top-1 kind
        f, s = fused[kind], stored[kind]
        np.testing.assert_array_equal(np.isnan(f), np.isnan(s), err_msg=kind)
        decided = ~np.isnan(f) & ~ties
        np.testing.assert_array_equal(f[decided], s[decided], err_msg=kind)


@pytest.mark.parametrize("measure", MEASURES)
def test_fused_float64_matches_the_oracle_on_the_fixture(fixture, measure):
    q, k, tokens = (fixture[f"L2_rep_{x}"].astype(np.float64) for x in ("q", "k", "tokens"))
    tokens = tokens.astype(np.int64)
    queries, keys = spans_of("per_prompt", np.random.default_rng(3), *tokens.shape)
    options = dict(kinds=KINDS, measure=measure, queries=queries, keys=keys, per_query=True)
    assert_same(inf.scores_from_qk(q, k, tokens, **options), oracle.scores_from_qk(q, k, tokens, **options), 1e-12)


# --- hand-made cases ---------------------------------------------------------------------------


def one_hot_rows(n: int, argmax: list[int], weight: float = 0.6) -> np.ndarray:
    """A causal pattern whose row i puts `weight` on key argmax[i] and spreads the rest."""
    A = np.tril(np.ones((n, n)))
    A /= A.sum(-1, keepdims=True)
    A *= 1 - weight
    A[np.arange(n), argmax] += weight
    return A


def test_copy_targets_the_keys_holding_the_next_token():
    #            0  1  2  3  4  5
    tokens = np.array([5, 1, 2, 5, 1, 2])
    # Row i attends mostly to the key holding t[i+1] (a copying head) where there is one.
    A = one_hot_rows(6, [0, 0, 0, 1, 2, 5])
    values = inf.head_scores(A, tokens, kinds="copy", measure="top1", per_query=True)["copy"]
    # T(1) = {j <= 1: t[j] == 2} is empty; T(2) = {0}; T(3) = {1}; T(4) = {2}; no next token at 5.
    np.testing.assert_array_equal(values, [np.nan, np.nan, 1.0, 1.0, 1.0, np.nan])
    mass = inf.head_scores(A, tokens, kinds="copy", per_query=True)["copy"]
    np.testing.assert_allclose(mass[2:5], [A[2, 0], A[3, 1], A[4, 2]])


def test_spans_select_queries_and_targets_but_not_whole_row_statistics():
    n = 8
    A = random_patterns(np.random.default_rng(0), (n, n))
    tokens = np.array([3, 1, 2, 3, 1, 2, 3, 1])
    no_keys = np.zeros(n, bool)
    got = inf.head_scores(A, tokens, kinds=KINDS, keys=no_keys, per_query=True)
    for kind in KINDS:
        if kind in ("bos", "entropy"):  # whole-row statistics take queries only
            np.testing.assert_array_equal(got[kind], inf.head_scores(A, tokens, kinds=kind, per_query=True)[kind])
        else:
            assert np.isnan(got[kind]).all(), kind
    queries = np.arange(n) >= 5
    got = inf.head_scores(A, tokens, kinds=KINDS, queries=queries, per_query=True)
    for kind in KINDS:
        assert np.isnan(got[kind][:5]).all(), kind


def test_top1_argmax_ranges_over_every_key_and_ties_go_to_the_lowest_index():
    n = 6
    A = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]  # uniform rows: all tied
    prev = inf.head_scores(A, kinds=("previous_token", "bos"), measure="top1", per_query=True)
    np.testing.assert_array_equal(prev["previous_token"][1:], [1.0, 0.0, 0.0, 0.0, 0.0])  # argmax 0
    np.testing.assert_array_equal(prev["bos"][1:], 1.0)
    # A key span that leaves the argmax out scores 0, never 1 for the best key inside the span.
    B = one_hot_rows(n, [0, 0, 1, 2, 0, 0])
    keys = np.arange(n) != 0
    got = inf.head_scores(B, kinds="previous_token", measure="top1", keys=keys, per_query=True)["previous_token"]
    np.testing.assert_array_equal(got[1:], [np.nan, 1.0, 1.0, 0.0, 0.0])  # T(1) = {0} is outside
    # exclude_bos: key 0 leaves the argmax; a row with all its mass on BOS has none (0).
    C = np.zeros((3, 3))
    C[:, 0] = 1.0
    C[2] = [0.5, 0.3, 0.2]
    got = inf.head_scores(C, kinds="previous_token", measure="top1", exclude_bos=True, per_query=True)
    np.testing.assert_array_equal(got["previous_token"], [np.nan, np.nan, 1.0])  # key 1 beats key 2
    got = inf.head_scores(C, kinds="self", measure="top1", exclude_bos=True, per_query=True)
    np.testing.assert_array_equal(got["self"], [np.nan, 0.0, 0.0])


def test_fused_top1_takes_the_argmax_of_the_logits_with_ties_to_the_lowest_key():
    rng = np.random.default_rng(4)
    d = 8
    q = rng.standard_normal((1, 10, 1, d)).astype(np.float32)
    k = rng.standard_normal((1, 10, 1, d)).astype(np.float32)
    k[0, 3] = k[0, 1]  # keys 1 and 3 tie for every query
    q[0, 5:] = k[0, 1] * 4  # queries 5.. point at them
    top = inf.scores_from_qk(q, k, kinds=("offset_2", "offset_4"), measure="top1", per_query=True)
    # query 5: keys 1 (offset 4) and 3 (offset 2) tie; the lowest index (1) wins.
    assert top["offset_4"][0, 0, 5] == 1.0 and top["offset_2"][0, 0, 5] == 0.0
    P = inf.attention_patterns(q, k)
    stored = inf.head_scores(P, kinds=("offset_2", "offset_4"), measure="top1", per_query=True)
    assert_same(top, stored, 0.0)


def test_top1_alone_needs_no_softmax_and_ignores_a_given_lse():
    """top-1 from q/k never exponentiates: an lse, even a wrong one, changes nothing."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 40, 2, 8)).astype(np.float32)
    tokens = random_tokens(rng, (2, 40), 5)
    options = dict(kinds=("previous_token", "copy"), measure="top1", per_query=True)
    want = inf.scores_from_qk(q, q, tokens, **options)
    wrong = np.zeros((2, 2, 40))
    assert_same(inf.scores_from_qk(q, q, tokens, lse=wrong, **options), want, 0.0)
    scores, lse = inf.scores_from_qk(q, q, tokens, return_lse=True, **options)
    assert_same(scores, want, 0.0)
    np.testing.assert_allclose(lse, oracle.log_sum_exp(q, q), atol=1e-5)


def test_spans_combine_with_padding():
    rng = np.random.default_rng(6)
    batch, n = 3, 30
    A = random_patterns(rng, (batch, 2, n, n))
    tokens = random_tokens(rng, (batch, n), 4)
    mask = np.ones((batch, n), bool)
    mask[1, 25:] = False
    queries, keys = spans_of("per_prompt", rng, batch, n)
    for measure in MEASURES:
        options = dict(kinds=KINDS, attention_mask=mask, queries=queries, keys=keys, measure=measure, per_query=True)
        assert_same(inf.head_scores(A, tokens, **options), oracle.head_scores(A, tokens, **options), 1e-12)


def test_span_and_measure_errors_name_the_argument():
    A = np.tril(np.ones((4, 4))) / 4
    with pytest.raises(ValueError, match=r'^measure: expected "mass" or "top1", got \'max\''):
        inf.head_scores(A, measure="max")
    with pytest.raises(TypeError, match=r"^measure:"):
        inf.scores_from_qk(np.zeros((4, 1, 2)), np.zeros((4, 1, 2)), measure=1)
    with pytest.raises(ValueError, match=r"^queries: expected 0/1 flags of shape \(4,\)"):
        inf.head_scores(A, kinds="self", queries=np.ones(5, bool))
    with pytest.raises(ValueError, match=r"^keys: expected 0/1 flags \(1 = in the span, 0 = outside\), got 2"):
        inf.head_scores(A, kinds="self", keys=[0, 1, 2, 1])
    with pytest.raises(ValueError, match=r"^tokens: expected a token array, which kind \"copy\" needs"):
        inf.head_scores(A, kinds="copy")


# --- hypothesis --------------------------------------------------------------------------------


@st.composite
def span_cases(draw):
    batch, heads, n = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # Quantised patterns: exact ties between keys are common.
    A = np.round(random_patterns(rng, (batch, heads, n, n), draw(st.sampled_from(["softmax", "sparse", "flat"]))) * 8) / 8
    tokens = random_tokens(rng, (batch, n), draw(st.integers(1, 4)))
    span_shape = draw(st.sampled_from([None, (n,), (batch, n)]))
    queries = keys = None
    if span_shape is not None:
        queries, keys = rng.random(span_shape) < 0.6, rng.random(span_shape) < 0.6
    mask = None
    if draw(st.booleans()):
        mask = np.ones((batch, n), bool)
        mask[:, max(1, n - draw(st.integers(0, n))):] = False  # right padding
    return A, tokens, queries, keys, mask


@settings(max_examples=60, deadline=None)
@given(case=span_cases(), measure=st.sampled_from(MEASURES), exclude_bos=st.booleans())
def test_stored_scores_match_the_oracle(case, measure, exclude_bos):
    A, tokens, queries, keys, mask = case
    kinds = ("previous_token", "duplicate_token", "induction", "copy", "bos", "self", "entropy")
    options = dict(kinds=kinds, measure=measure, queries=queries, keys=keys, attention_mask=mask,
                   exclude_bos=exclude_bos, per_query=True)
    assert_same(inf.head_scores(A, tokens, **options), oracle.head_scores(A, tokens, **options), 1e-12)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
    seed=st.integers(0, 2**32 - 1),
    window=st.sampled_from([None, 1, 5]),
    tied_keys=st.booleans(),
    span_shape=st.sampled_from(["none", "shared", "per_prompt"]),
    exclude_bos=st.booleans(),
)
def test_fused_scores_match_the_oracle(n, heads, seed, window, tied_keys, span_shape, exclude_bos):
    """float64 q/k (so only exact ties could order keys differently, and those go to the lowest
    index in both), with duplicated keys for exact ties."""
    rng = np.random.default_rng(seed)
    batch, (h, kv) = 2, heads
    q = rng.standard_normal((batch, n, h, 4))
    k = rng.standard_normal((batch, n, kv, 4))
    if tied_keys and n > 2:
        k[:, 2::3] = k[:, 1:2]  # every third key equals key 1
    tokens = random_tokens(rng, (batch, n), 3)
    queries, keys = spans_of(span_shape, rng, batch, n)
    kinds = ("previous_token", "duplicate_token", "induction", "copy", "bos", "entropy")
    for measure in MEASURES:
        options = dict(kinds=kinds, measure=measure, queries=queries, keys=keys, window=window,
                       exclude_bos=exclude_bos, per_query=True)
        got = inf.scores_from_qk(q, k, tokens, **options)
        assert_same(got, oracle.scores_from_qk(q, k, tokens, **options), 1e-9, measure)


def test_blocks_without_a_query_to_score_are_skipped_but_scores_unchanged():
    """A query span covering a few rows of a long prompt: the blocks of rows before it are not
    computed at all (stored and fused), and the scored rows are exactly those of a full pass."""
    rng = np.random.default_rng(7)
    n = 700
    q = rng.standard_normal((1, n, 2, 8)).astype(np.float32)
    tokens = random_tokens(rng, (1, n), 6)
    queries = np.zeros(n, bool)
    queries[600:620] = True
    kinds = ("previous_token", "copy", "entropy")
    for measure in MEASURES:
        full = inf.scores_from_qk(q, q, tokens, kinds=kinds, measure=measure, per_query=True)
        fused = inf.scores_from_qk(q, q, tokens, kinds=kinds, measure=measure, queries=queries, per_query=True)
        stored = inf.head_scores(inf.attention_patterns(q, q), tokens, kinds=kinds, measure=measure, queries=queries,
                                 per_query=True)
        for kind in kinds:
            want = np.where(queries, full[kind], np.nan)
            np.testing.assert_array_equal(fused[kind], want, err_msg=kind)
            np.testing.assert_allclose(stored[kind], want, atol=1e-5, err_msg=kind)
