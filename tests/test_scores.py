"""head_scores, the one-kind shortcuts, offset_scores and detection_scores against the numpy
oracle (DESIGN.md sections 3 and 4): exact up to float64 rounding, for every kind and option,
every dtype and memory layout."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import induct_fast as inf
import oracle
from helpers import (
    ALL_KINDS,
    FLOAT_DTYPES,
    INT_DTYPES,
    PATTERN_STYLES,
    TARGET_KINDS,
    layouts,
    lead_shapes,
    random_patterns,
    random_tokens,
    sequence_lengths,
    strided_view,
)

RTOL, ATOL = 1e-12, 1e-13


def assert_close(got, expected, err_msg=""):
    got = np.asarray(got)
    assert got.dtype == np.float64, err_msg
    assert got.shape == np.shape(expected), f"{err_msg}: shape {got.shape} != {np.shape(expected)}"
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, equal_nan=True, err_msg=err_msg)


def assert_scores_match(got: dict, expected: dict):
    assert list(got) == list(expected)
    for kind in expected:
        assert_close(got[kind], expected[kind], kind)


@pytest.fixture(scope="module")
def case():
    """Patterns [2, 3, 17, 17] with a small token alphabet, one token row per batch element."""
    rng = np.random.default_rng(1234)
    patterns = random_patterns(rng, (2, 3, 17, 17), "peaked")
    patterns[1, 2, 5] = 0.0  # a row entirely on key 0
    patterns[1, 2, 5, 0] = 1.0
    tokens = random_tokens(rng, (2, 17), alphabet=3, base=7)
    return patterns, tokens


# --------------------------------------------------------------------------- hand-computed values


def test_oracle_targets_follow_the_design_table():
    #         0  1  2  3  4  5
    tokens = [9, 5, 7, 5, 9, 5]
    dup = oracle.target_mask("duplicate_token", 6, tokens)
    ind = oracle.target_mask("induction", 6, tokens)
    assert np.flatnonzero(dup[5]).tolist() == [1, 3]
    assert np.flatnonzero(ind[5]).tolist() == [2, 4]
    assert np.flatnonzero(dup[4]).tolist() == [0] and np.flatnonzero(ind[4]).tolist() == [1]
    assert not dup[2].any() and not ind[0].any()
    assert np.flatnonzero(oracle.target_mask("offset_3", 6)[5]).tolist() == [2]
    assert not oracle.target_mask("offset_3", 6)[2].any()


def test_uniform_causal_rows():
    tokens = inf.repeated_tokens(1, period=5, vocab_size=50, seed=0)[0]
    A = np.tril(np.ones((11, 11))) / np.arange(1, 12)[:, None]
    s = inf.head_scores(A, tokens)
    # uniform causal rows: the previous token of query i gets 1/(i+1), i = 1..10
    assert float(s["previous_token"]) == pytest.approx(np.mean(1 / np.arange(2, 12)), rel=1e-14)


def test_docstring_examples_run():
    """The examples in the package's docstrings are correct (they are the first thing users copy)."""
    import doctest

    import induct_fast.scores

    result = doctest.testmod(induct_fast.scores, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


def test_small_hand_computed_example():
    # tokens  a b a b ; uniform causal attention
    A = np.tril(np.ones((4, 4))) / np.arange(1, 5)[:, None]
    t = np.array([1, 2, 1, 2])
    s = inf.head_scores(A, t, kinds=("previous_token", "duplicate_token", "induction", "bos", "self", "entropy"),
                        per_query=True)
    nan = np.nan
    np.testing.assert_array_equal(s["previous_token"], [nan, 1 / 2, 1 / 3, 1 / 4])
    np.testing.assert_array_equal(s["duplicate_token"], [nan, nan, 1 / 3, 1 / 4])  # T(2)={0}, T(3)={1}
    np.testing.assert_array_equal(s["induction"], [nan, nan, 1 / 3, 1 / 4])  # T(2)={1}, T(3)={2}
    np.testing.assert_array_equal(s["bos"], [nan, 1 / 2, 1 / 3, 1 / 4])
    np.testing.assert_array_equal(s["self"], [nan, 1 / 2, 1 / 3, 1 / 4])
    np.testing.assert_allclose(s["entropy"], [nan, np.log(2), np.log(3), np.log(4)], rtol=1e-15)
    # exclude_bos: rows renormalised over keys 1..i, key 0 no longer a target
    s = inf.head_scores(A, t, kinds=("previous_token", "duplicate_token", "bos", "entropy"), exclude_bos=True,
                        per_query=True)
    np.testing.assert_allclose(s["previous_token"], [nan, nan, 1 / 2, 1 / 3], rtol=1e-15)  # T(1)={0} dropped
    np.testing.assert_allclose(s["duplicate_token"], [nan, nan, nan, 1 / 3], rtol=1e-15)
    assert np.all(np.isnan(s["bos"]))
    np.testing.assert_allclose(s["entropy"], [nan, 0.0, np.log(2), np.log(3)], rtol=1e-15, atol=1e-300)
    # detection, TransformerLens mul: sum(A*D) / sum(A) over the whole matrix (sum(A) = 4)
    assert inf.detection_scores(A, "previous_token") == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 4, rel=1e-15)
    # abs: 1 - sum|A - D| / n
    D = oracle.target_mask("previous_token", 4).astype(float)
    assert inf.detection_scores(A, "previous_token", measure="abs") == pytest.approx(
        1 - np.abs(A - D).sum() / 4, rel=1e-15
    )


def test_padding_is_neither_query_nor_target_by_hand():
    # tokens a b a b a, uniform causal attention; prompt 0 pads position 1, prompt 1 pads 3, 4
    A = np.tril(np.ones((5, 5))) / np.arange(1, 6)[:, None]
    A = np.stack([A, A])
    t = np.array([1, 2, 1, 2, 1])
    mask = np.array([[1, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    kinds = ("previous_token", "duplicate_token", "induction", "bos", "entropy")
    s = inf.head_scores(A, t, kinds=kinds, per_query=True, attention_mask=mask)
    nan = np.nan
    np.testing.assert_array_equal(s["previous_token"], [[nan, nan, nan, 1 / 4, 1 / 5], [nan, 1 / 2, 1 / 3, nan, nan]])
    # duplicate: T(3) = {1} is padding in prompt 0; induction: T(2) = {1} likewise, T(4) = {1, 3} -> {3}
    np.testing.assert_array_equal(s["duplicate_token"], [[nan, nan, 1 / 3, nan, 2 / 5], [nan, nan, 1 / 3, nan, nan]])
    np.testing.assert_array_equal(s["induction"], [[nan, nan, nan, 1 / 4, 1 / 5], [nan, nan, 1 / 3, nan, nan]])
    np.testing.assert_array_equal(s["bos"], [[nan, nan, 1 / 3, 1 / 4, 1 / 5], [nan, 1 / 2, 1 / 3, nan, nan]])
    np.testing.assert_allclose(s["entropy"], [[nan, nan, np.log(3), np.log(4), np.log(5)], [nan, np.log(2), np.log(3), nan, nan]], rtol=1e-15)
    means = inf.head_scores(A, t, kinds=kinds, attention_mask=mask.astype(bool))
    assert means["previous_token"][1] == pytest.approx((1 / 2 + 1 / 3) / 2, rel=1e-15)
    assert means["entropy"][0] == pytest.approx((np.log(3) + np.log(4) + np.log(5)) / 3, rel=1e-15)
    # a shared [n] mask serves every head; all padding: nothing is eligible
    shared = inf.head_scores(A, t, kinds=kinds, attention_mask=mask[1])
    assert all(np.array_equal(shared[kind][0], shared[kind][1], equal_nan=True) for kind in kinds)
    assert all(np.isnan(v).all() for v in inf.head_scores(A, t, kinds=kinds, attention_mask=np.zeros(5)).values())
    # an all-ones mask changes nothing, bit for bit
    plain = inf.head_scores(A, t, kinds=kinds, per_query=True)
    assert all(np.array_equal(plain[k], inf.head_scores(A, t, kinds=kinds, per_query=True, attention_mask=np.ones((2, 5)))[k], equal_nan=True) for k in kinds)


# --------------------------------------------------------------------------- head_scores vs oracle


@pytest.mark.parametrize("per_query", [False, True])
@pytest.mark.parametrize("exclude_bos", [False, True])
@pytest.mark.parametrize("shared_tokens", [False, True])
def test_head_scores_every_kind_matches_oracle(case, exclude_bos, per_query, shared_tokens):
    patterns, tokens = case
    if shared_tokens:
        tokens = tokens[0]
    kinds = ALL_KINDS + ("offset_2",)
    offsets = (1, 3, 16)
    got = inf.head_scores(patterns, tokens, kinds=kinds, offsets=offsets, exclude_bos=exclude_bos, per_query=per_query)
    expected = oracle.head_scores(patterns, tokens, kinds, offsets, exclude_bos, per_query)
    assert list(got) == list(ALL_KINDS) + ["offset_2", "offset_1", "offset_3", "offset_16"]
    assert_scores_match(got, expected)
    assert got["previous_token"].shape == patterns.shape[:-2] + ((17,) if per_query else ())


def test_default_kinds_and_string_kind(case):
    patterns, tokens = case
    got = inf.head_scores(patterns, tokens)
    assert tuple(got) == inf.DEFAULT_KINDS == ("previous_token", "duplicate_token", "induction")
    assert_scores_match(got, oracle.head_scores(patterns, tokens))
    got = inf.head_scores(patterns, tokens, kinds="induction")
    assert_scores_match(got, oracle.head_scores(patterns, tokens, kinds=("induction",)))


def test_duplicate_kind_names_and_offsets_are_merged(case):
    patterns, tokens = case
    got = inf.head_scores(patterns, tokens, kinds=("induction", "offset_2", "induction"), offsets=(2, 4, 4))
    assert list(got) == ["induction", "offset_2", "offset_4"]
    assert inf.head_scores(patterns, tokens, kinds=()) == {}


def test_positional_kinds_need_no_tokens(case):
    patterns, _ = case
    kinds = ("previous_token", "bos", "self", "entropy")
    got = inf.head_scores(patterns, kinds=kinds, offsets=(5,))
    assert_scores_match(got, oracle.head_scores(patterns, None, kinds, (5,)))


@pytest.mark.parametrize("per_query", [False, True])
@pytest.mark.parametrize("exclude_bos", [False, True])
def test_one_kind_shortcuts(case, exclude_bos, per_query):
    patterns, tokens = case
    opts = dict(exclude_bos=exclude_bos, per_query=per_query)
    expect = lambda kind, offsets=(): oracle.head_scores(patterns, tokens, (kind,) if kind else (), offsets, **opts)
    assert_close(inf.previous_token_scores(patterns, **opts), expect("previous_token")["previous_token"])
    assert_close(inf.duplicate_token_scores(patterns, tokens, **opts), expect("duplicate_token")["duplicate_token"])
    assert_close(inf.induction_scores(patterns, tokens, **opts), expect("induction")["induction"])
    for d in (1, 2, 7, 16):
        assert_close(inf.offset_scores(patterns, d, **opts), expect(None, (d,))[f"offset_{d}"], f"offset {d}")
    # offset 1 is previous_token by definition
    np.testing.assert_array_equal(inf.offset_scores(patterns, 1, **opts), inf.previous_token_scores(patterns, **opts))


def test_exclude_bos_zero_row_stays_eligible(case):
    """A row with all its mass on key 0 renormalises to zeros: eligible, contributes 0."""
    patterns, tokens = case
    pq = inf.head_scores(patterns, tokens, kinds=("previous_token", "entropy"), exclude_bos=True, per_query=True)
    assert pq["previous_token"][1, 2, 5] == 0.0
    assert pq["entropy"][1, 2, 5] == 0.0


def test_rows_above_one_on_bos_renormalise_to_zero():
    A = np.tril(np.full((5, 5), 0.1))
    A[:, 0] = [1.0, 1.5, 1.0, 0.5, 1.0 + 1e-9]
    got = inf.head_scores(A, kinds=("previous_token", "self", "entropy"), exclude_bos=True, per_query=True)
    expected = oracle.head_scores(A, None, ("previous_token", "self", "entropy"), (), True, True)
    assert_scores_match(got, expected)
    assert got["self"][1] == 0.0 and got["self"][3] == pytest.approx(0.1 / 0.5)


# --------------------------------------------------------------------------- detection_scores vs oracle

DETECTION_KINDS = TARGET_KINDS + ("offset_3",)


@pytest.mark.parametrize("kind", DETECTION_KINDS)
@pytest.mark.parametrize("measure", ["mul", "abs"])
def test_detection_named_kinds_match_oracle(case, kind, measure):
    patterns, tokens = case
    for exclude_bos in (False, True):
        for exclude_current_token in (False, True):
            flags = dict(exclude_bos=exclude_bos, exclude_current_token=exclude_current_token)
            got = inf.detection_scores(patterns, kind, tokens=tokens, measure=measure, **flags)
            expected = oracle.detection_scores(patterns, kind, tokens, measure, **flags)
            assert_close(got, expected, f"{kind} {measure} {flags}")
            # the named kind is exactly its explicit T(i) matrix, per token row
            D = np.stack([oracle.target_mask(kind, 17, tokens[b]) for b in range(2)])[:, None]  # [2, 1, n, n]
            assert_close(inf.detection_scores(patterns, D, measure=measure, **flags), got, f"explicit {kind}")


@pytest.mark.parametrize("measure", ["mul", "abs"])
@pytest.mark.parametrize("dshape", [(17, 17), (3, 17, 17), (1, 3, 17, 17), (2, 1, 17, 17), (2, 3, 17, 17), (1, 17, 17), (1, 1, 17, 17)])
def test_detection_explicit_arrays_broadcast(case, measure, dshape):
    patterns, _ = case
    rng = np.random.default_rng(sum(dshape))
    D = (rng.random(dshape) < 0.3).astype(np.float64)
    for flags in ({}, {"exclude_bos": True}, {"exclude_current_token": True}, {"exclude_bos": True, "exclude_current_token": True}):
        got = inf.detection_scores(patterns, D, measure=measure, **flags)
        assert_close(got, oracle.detection_scores(patterns, D, None, measure, **flags), f"{dshape} {flags}")


@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.int64, np.float16, np.float32, np.float64])
def test_detection_explicit_array_dtypes_and_weights(case, dtype):
    patterns, _ = case
    rng = np.random.default_rng(5)
    D01 = rng.random((3, 17, 17)) < 0.4
    if dtype == np.bool_:
        D = D01
    elif np.issubdtype(dtype, np.integer):
        D = (D01 * rng.integers(-3, 4, size=D01.shape)).astype(dtype)  # any finite values allowed
    else:
        D = (D01 * rng.normal(size=D01.shape)).astype(dtype)
    for measure in ("mul", "abs"):
        got = inf.detection_scores(patterns, D, measure=measure, exclude_current_token=True)
        assert_close(got, oracle.detection_scores(patterns, D.astype(np.float64), None, measure, False, True))


def test_detection_list_input():
    A = (np.tril(np.ones((3, 3))) / np.arange(1, 4)[:, None]).tolist()
    D = np.eye(3).tolist()
    assert_close(inf.detection_scores(A, D), oracle.detection_scores(A, D))
    assert_close(inf.head_scores(A, [1, 2, 1], kinds="induction")["induction"],
                 oracle.head_scores(A, [1, 2, 1], ("induction",))["induction"])


def test_zero_lead_result_types():
    """A leading shape of () gives float64 scalars (README: "a leading shape of () gives numpy
    float64 scalars"), the same type from head_scores and detection_scores."""
    A = np.tril(np.ones((5, 5))) / np.arange(1, 6)[:, None]
    h = inf.head_scores(A, kinds="previous_token")["previous_token"]
    d = inf.detection_scores(A, "previous_token")
    assert isinstance(h, np.float64)
    assert isinstance(d, np.float64), f"detection_scores returned {type(d).__name__} {d!r} for 2-d patterns"


def test_nan_where_no_query_is_eligible():
    A = np.ones((2, 1, 1))
    got = inf.head_scores(A, np.array([3]), kinds=ALL_KINDS)
    for kind in ALL_KINDS:
        assert np.all(np.isnan(got[kind])), kind
    # all tokens distinct: no duplicates, no induction targets
    A = np.tril(np.ones((6, 6))) / np.arange(1, 7)[:, None]
    got = inf.head_scores(A, np.arange(6))
    assert np.isnan(got["duplicate_token"]) and np.isnan(got["induction"]) and not np.isnan(got["previous_token"])


def test_zero_length_sequences():
    A = np.zeros((2, 0, 0))
    got = inf.head_scores(A, np.zeros(0, dtype=np.int64), kinds=ALL_KINDS, per_query=True)
    assert all(v.shape == (2, 0) for v in got.values())
    got = inf.head_scores(A, np.zeros((2, 0), dtype=np.int64), kinds=ALL_KINDS)
    assert all(v.shape == (2,) and np.all(np.isnan(v)) for v in got.values())


@pytest.mark.parametrize("lead", [(0,), (0, 3), (2, 0), (2, 0, 4)])
def test_empty_leading_axes(lead):
    n = 5
    A = np.zeros(lead + (n, n))
    tokens = np.zeros((lead[0], n), dtype=np.int64)
    got = inf.head_scores(A, tokens, kinds=ALL_KINDS, offsets=(2,), per_query=True)
    assert all(v.shape == lead + (n,) for v in got.values())
    got = inf.head_scores(A, tokens[0] if lead[0] else np.zeros(n, dtype=np.int64), kinds=ALL_KINDS)
    assert all(v.shape == lead for v in got.values())
    assert inf.detection_scores(A, "induction", tokens=tokens).shape == lead
    assert inf.detection_scores(A, np.eye(n)).shape == lead


@pytest.mark.parametrize("n", [256, 257, 530])
def test_long_sequences_span_several_row_blocks(n):
    """Rows are processed in blocks of 256: block boundaries change nothing."""
    rng = np.random.default_rng(n)
    patterns = random_patterns(rng, (2, 1, n, n), "peaked", np.float32)
    tokens = random_tokens(rng, (2, n), alphabet=3)
    kinds = ("previous_token", "induction", "entropy")
    offsets = (1, 255, n - 1)
    for exclude_bos in (False, True):
        for per_query in (False, True):
            got = inf.head_scores(patterns, tokens, kinds=kinds, offsets=offsets, exclude_bos=exclude_bos, per_query=per_query)
            assert_scores_match(got, oracle.head_scores(patterns, tokens, kinds, offsets, exclude_bos, per_query))
    for measure in ("mul", "abs"):
        got = inf.detection_scores(patterns, "induction", tokens=tokens, measure=measure, exclude_current_token=True)
        assert_close(got, oracle.detection_scores(patterns, "induction", tokens, measure, False, True))


# --------------------------------------------------------------------------- numerical accuracy


@pytest.mark.parametrize("rest_mass", [1e-6, 1e-12])
@pytest.mark.parametrize("exclude", ["bos", "current"])
def test_detection_mul_is_accurate_when_excluded_entries_dominate(exclude, rest_mass):
    """exclude_bos / exclude_current_token on heads that put almost all their mass on the excluded
    key (attention sinks, self heads): sum(A') is a sum of small, exactly representable float64
    values, so the score is well conditioned; the oracle (zero the column, then sum) gets it to
    ~1e-15. Computing sum(A') as sum(A) - A[i, 0] cancels catastrophically instead."""
    rng = np.random.default_rng(0)
    n = 20
    A = np.zeros((n, n))
    for i in range(n):
        rest = rng.random(i + 1) * rest_mass
        col = 0 if exclude == "bos" else i
        rest[col] = 0.0
        A[i, : i + 1] = rest
        A[i, col] = 1.0 - rest.sum()
    flags = {"exclude_bos": exclude == "bos", "exclude_current_token": exclude == "current"}
    got = inf.detection_scores(A, "previous_token", **flags)
    expected = oracle.detection_scores(A, "previous_token", **flags)
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_detection_mul_with_no_mass_left_is_nan():
    """With column 0 and the diagonal zeroed, this pattern has no mass left: sum(A') = 0 and
    sum(A' * D) = 0, so mul is 0/0 = NaN (what TransformerLens returns). Found by hypothesis: the
    kernel computes sum(A') as sum(A) - A[i, 0] - A[i, i] = 1.0 - a - b = -5.6e-17 and returns -0.0."""
    A = np.array([[1.0, 0.0], [0.5926341954947536, 0.40736580450524645]])
    flags = dict(exclude_bos=True, exclude_current_token=True)
    assert np.isnan(oracle.detection_scores(A, "previous_token", **flags))
    assert np.isnan(inf.detection_scores(A, "previous_token", **flags))
    assert np.isnan(inf.detection_scores(A, np.tril(np.ones((2, 2))), **flags))


# --------------------------------------------------------------------------- tokens


def test_repeated_tokens_identities_per_query():
    """On BOS + a block of P distinct tokens repeated twice, the queries of the second copy have
    T_induction(i) = {i - (P-1)} and T_duplicate(i) = {i - P}, for any pattern."""
    rng = np.random.default_rng(3)
    for P in (1, 2, 5, 13):
        tokens = inf.repeated_tokens(3, P, 50, seed=P)
        n = 2 * P + 1
        assert tokens.shape == (3, n) and np.all(tokens[:, 0] == 0)
        A = random_patterns(rng, (3, 2, n, n), "softmax")
        offsets = tuple(d for d in (P - 1, P) if d >= 1)
        s = inf.head_scores(A, tokens, kinds=("induction", "duplicate_token"), offsets=offsets, per_query=True)
        second = slice(P + 1, n)
        if P > 1:
            np.testing.assert_array_equal(s["induction"][..., second], s[f"offset_{P - 1}"][..., second])
        np.testing.assert_array_equal(s["duplicate_token"][..., second], s[f"offset_{P}"][..., second])
        # and no query of the first copy has a token target
        assert np.all(np.isnan(s["induction"][..., :second.start]))
        assert np.all(np.isnan(s["duplicate_token"][..., :second.start]))


def test_repeated_tokens_without_bos_duplicate_equals_offset():
    """Without BOS the eligible queries of duplicate_token and offset(P) coincide, so even the means agree."""
    rng = np.random.default_rng(4)
    for P in (1, 3, 8):
        tokens = inf.repeated_tokens(2, P, 30, seed=P, bos=None)
        A = random_patterns(rng, (2, 3, 2 * P, 2 * P), "peaked")
        s = inf.head_scores(A, tokens, kinds=("duplicate_token",), offsets=(P,))
        np.testing.assert_array_equal(s["duplicate_token"], s[f"offset_{P}"])


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_integer_token_dtypes(case, dtype):
    patterns, tokens = case
    kinds = ("duplicate_token", "induction")
    reference = inf.head_scores(patterns, tokens, kinds=kinds, per_query=True)
    got = inf.head_scores(patterns, tokens.astype(dtype), kinds=kinds, per_query=True)
    for kind in kinds:
        np.testing.assert_array_equal(got[kind], reference[kind])
    np.testing.assert_array_equal(
        inf.detection_scores(patterns, "induction", tokens=tokens.astype(dtype)),
        inf.detection_scores(patterns, "induction", tokens=tokens),
    )


def test_extreme_token_values(case):
    """Ids beyond int64 (uint64) and negative ids only matter through equality."""
    patterns, tokens = case
    kinds = ("duplicate_token", "induction")
    reference = inf.head_scores(patterns, tokens, kinds=kinds)
    big = (tokens.astype(np.uint64) + np.uint64(2**64 - 100))
    negative = -tokens - 2**40
    for other in (big, negative, tokens.tolist()):
        got = inf.head_scores(patterns, other, kinds=kinds)
        for kind in kinds:
            np.testing.assert_array_equal(got[kind], reference[kind])


def test_token_layouts(case):
    patterns, tokens = case
    reference = inf.head_scores(patterns, tokens, kinds=("induction",))["induction"]
    views = [
        np.asfortranarray(tokens),
        tokens[::-1][::-1],
        strided_view(tokens, (-2, 3), (1, 0), fill=-1),
        np.broadcast_to(tokens[:1], tokens.shape),
    ]
    for i, v in enumerate(views):
        expected = oracle.head_scores(patterns, np.array(v), ("induction",))["induction"]
        assert_close(inf.head_scores(patterns, v, kinds=("induction",))["induction"], expected, f"view {i}")
    assert_close(reference, oracle.head_scores(patterns, tokens, ("induction",))["induction"])


def test_one_token_row_broadcast_over_batch(case):
    patterns, tokens = case
    got = inf.head_scores(patterns, tokens[:1], kinds=("induction",))["induction"]
    assert_close(got, oracle.head_scores(patterns, tokens[0], ("induction",))["induction"])


# --------------------------------------------------------------------------- arrays


def test_memmap_input(case, tmp_path):
    patterns, tokens = case
    for dtype in FLOAT_DTYPES:
        path = tmp_path / f"patterns_{np.dtype(dtype).name}.npy"
        np.save(path, patterns.astype(dtype))
        mm = np.load(path, mmap_mode="r")
        assert isinstance(mm, np.memmap)
        values = np.array(mm, dtype=np.float64)
        assert_scores_match(
            inf.head_scores(mm, tokens, kinds=ALL_KINDS, offsets=(4,)),
            oracle.head_scores(values, tokens, ALL_KINDS, (4,)),
        )
        assert_close(inf.detection_scores(mm, "induction", tokens=tokens), oracle.detection_scores(values, "induction", tokens))
        raw = np.memmap(tmp_path / f"raw_{np.dtype(dtype).name}.bin", dtype=dtype, mode="w+", shape=patterns.shape, order="F")
        raw[...] = patterns
        raw.flush()
        ro = np.memmap(raw.filename, dtype=dtype, mode="r", shape=patterns.shape, order="F")
        assert_close(inf.head_scores(ro, tokens)["induction"], oracle.head_scores(values, tokens)["induction"])
        assert_close(inf.previous_token_scores(ro[:, ::-1, ..., ::-1, :]),
                     oracle.head_scores(values[:, ::-1, ..., ::-1, :], None, ("previous_token",))["previous_token"])


@pytest.mark.parametrize("dtype", ["int32", "bool", "longdouble", ">f8", ">f4", "<f2"])
def test_other_pattern_dtypes_are_widened(case, dtype):
    patterns, tokens = case
    x = (patterns > 0.2) if dtype == "bool" else (patterns * 100).astype(dtype) if dtype == "int32" else patterns.astype(dtype)
    values = np.array(x, dtype=np.float64)
    assert_scores_match(inf.head_scores(x, tokens, kinds=ALL_KINDS), oracle.head_scores(values, tokens, ALL_KINDS))
    assert_close(inf.detection_scores(x, "induction", tokens=tokens, measure="abs"),
                 oracle.detection_scores(values, "induction", tokens, "abs"))


def test_broadcast_zero_stride_patterns():
    rng = np.random.default_rng(9)
    one = random_patterns(rng, (9, 9), "peaked", np.float32)
    A = np.broadcast_to(one, (2, 3, 9, 9))
    assert A.strides[:2] == (0, 0) and not A.flags.writeable
    tokens = random_tokens(rng, (2, 9), 2)
    values = np.array(A, dtype=np.float64)
    assert_scores_match(inf.head_scores(A, tokens, kinds=ALL_KINDS), oracle.head_scores(values, tokens, ALL_KINDS))
    assert_close(inf.detection_scores(A, np.eye(9)), oracle.detection_scores(values, np.eye(9)))
    # stride 0 inside a matrix as well
    row = np.broadcast_to(one[4], (9, 9))
    assert_close(inf.head_scores(row, kinds="entropy")["entropy"], oracle.head_scores(np.array(row), None, ("entropy",))["entropy"])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_unaligned_buffers(case, dtype):
    """Arrays viewed at an odd byte offset of a buffer (np.frombuffer, struct fields)."""
    patterns, tokens = case
    x = patterns.astype(dtype)
    buf = bytearray(x.nbytes + 1)
    unaligned = np.frombuffer(buf, dtype=dtype, offset=1, count=x.size).reshape(x.shape)
    unaligned[...] = x
    tbuf = bytearray(tokens.nbytes + 1)
    t_unaligned = np.frombuffer(tbuf, dtype=np.int64, offset=1, count=tokens.size).reshape(tokens.shape)
    t_unaligned[...] = tokens
    assert not unaligned.flags.aligned and not t_unaligned.flags.aligned
    values = x.astype(np.float64)
    assert_scores_match(inf.head_scores(unaligned, t_unaligned, kinds=ALL_KINDS), oracle.head_scores(values, tokens, ALL_KINDS))
    assert_close(inf.detection_scores(unaligned, "induction", tokens=t_unaligned), oracle.detection_scores(values, "induction", tokens))


# --------------------------------------------------------------------------- hypothesis


@st.composite
def score_cases(draw):
    lead = draw(lead_shapes())
    n = draw(sequence_lengths)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    style = draw(st.sampled_from(PATTERN_STYLES))
    patterns = random_patterns(rng, lead + (n, n), style, dtype)
    steps, perm, readonly = draw(layouts(patterns.ndim))
    if lead and draw(st.integers(0, 9)) == 0:
        view = np.broadcast_to(patterns[:1], patterns.shape)  # stride 0 on the batch axis
    else:
        view = strided_view(patterns, steps, perm, readonly=readonly)
    shared = not lead or draw(st.booleans())
    tshape = (n,) if shared else (lead[0], n)
    tokens = random_tokens(rng, tshape, draw(st.integers(1, 3)), draw(st.sampled_from(INT_DTYPES)), base=draw(st.sampled_from((0, 5, 100))))
    if draw(st.booleans()):
        tokens = strided_view(tokens, tuple(draw(st.sampled_from((1, -1, 2))) for _ in tshape), tuple(range(len(tshape)))[::-1], fill=0)
    return view, tokens


def padding_mask(rng, shape, style):
    """0/1 flags of `shape`: per row, right or left padding of a random length (0..n), random
    holes, all padding or all real."""
    n = shape[-1]
    mask = np.ones(shape, np.int64).reshape(-1, n)
    for row in mask:
        pad = int(rng.integers(0, n + 1))
        if style == "right":
            row[n - pad :] = 0
        elif style == "left":
            row[:pad] = 0
        elif style == "holes":
            row[rng.random(n) < 0.4] = 0
        elif style == "none":
            row[:] = 0
    return mask.reshape(shape)


@given(
    data=score_cases(),
    kinds=st.lists(st.sampled_from(ALL_KINDS), max_size=6, unique=True),
    offset_fracs=st.lists(st.floats(0, 1), max_size=3),
    exclude_bos=st.booleans(),
    per_query=st.booleans(),
    padding=st.sampled_from((None, "right", "left", "holes", "none", "ones")),
    more=st.data(),
)
def test_head_scores_match_oracle_property(data, kinds, offset_fracs, exclude_bos, per_query, padding, more):
    view, tokens = data
    lead, n = view.shape[:-2], view.shape[-1]
    offsets = tuple(1 + int(f * (n - 2)) for f in offset_fracs) if n > 1 else ()
    mask = None
    if padding is not None:  # [n] or [batch, n], 0/1 or bool
        rng = np.random.default_rng(more.draw(st.integers(0, 2**32 - 1)))
        mask = padding_mask(rng, (lead[0], n) if lead and more.draw(st.booleans()) else (n,), padding)
        mask = mask.astype(bool) if more.draw(st.booleans()) else mask
    opts = dict(kinds=kinds, offsets=offsets, exclude_bos=exclude_bos, per_query=per_query)
    if exclude_bos and mask is not None and n and not mask[..., 0].all():
        with pytest.raises(ValueError, match=r"^exclude_bos: .*attention_mask.*position 0 is padding in prompt"):
            inf.head_scores(view, tokens, attention_mask=mask, **opts)
        mask[..., 0] = 1  # BOS is position 0: pad on the right
    before, tokens_before = np.array(view, copy=True), np.array(tokens, copy=True)
    got = inf.head_scores(view, tokens, attention_mask=mask, **opts)
    assert np.array_equal(view, before, equal_nan=True) and np.array_equal(tokens, tokens_before)
    expected = oracle.head_scores(before.astype(np.float64), tokens_before, kinds, offsets, exclude_bos, per_query, attention_mask=mask)
    assert_scores_match(got, expected)


@st.composite
def detection_arrays(draw, lead, n):
    """Explicit D [*dlead, n, n], dlead broadcasting against the right end of lead."""
    k = draw(st.integers(0, len(lead)))
    dlead = tuple(draw(st.sampled_from((1, s))) for s in lead[len(lead) - k :])
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = draw(st.sampled_from(("01", "weights", "lower")))
    D = (rng.random(dlead + (n, n)) < 0.3).astype(np.float64)
    if values == "weights":
        D *= rng.normal(size=D.shape)
    elif values == "lower":
        D = np.tril(D)
    D = D.astype(draw(st.sampled_from((np.float64, np.float32, np.int64) if values != "weights" else (np.float64,))))
    steps, perm, _ = draw(layouts(D.ndim))
    return strided_view(D, steps, perm, fill=np.nan if D.dtype.kind == "f" else 0)


@given(
    data=score_cases(),
    which=st.one_of(st.sampled_from(DETECTION_KINDS), st.just("array")),
    measure=st.sampled_from(("mul", "abs")),
    exclude_bos=st.booleans(),
    exclude_current_token=st.booleans(),
    more=st.data(),
)
def test_detection_scores_match_oracle_property(data, which, measure, exclude_bos, exclude_current_token, more):
    view, tokens = data
    n = view.shape[-1]
    if which == "array":
        detection = more.draw(detection_arrays(view.shape[:-2], n))
    elif which.startswith("offset_"):
        if n < 2:
            return
        detection = f"offset_{1 + (n - 1) // 2}"
    else:
        detection = which
    flags = dict(measure=measure, exclude_bos=exclude_bos, exclude_current_token=exclude_current_token)
    before = np.array(view, copy=True)
    det_before = None if isinstance(detection, str) else np.array(detection, copy=True)
    got = inf.detection_scores(view, detection, tokens=tokens, **flags)
    assert np.array_equal(view, before, equal_nan=True)
    if det_before is not None:
        assert np.array_equal(detection, det_before)
    expected = oracle.detection_scores(before.astype(np.float64), detection if det_before is None else det_before, tokens, **flags)
    assert_close(got, expected)


@given(
    P=st.integers(1, 15),
    batch=st.integers(1, 3),
    vocab=st.integers(2, 40),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=30)
def test_repeated_tokens_identities_property(P, batch, vocab, seed):
    tokens = inf.repeated_tokens(batch, P, vocab, seed=seed)
    n = 2 * P + 1
    A = random_patterns(np.random.default_rng(seed), (batch, 2, n, n), "softmax")
    s = inf.head_scores(A, tokens, kinds=("induction", "duplicate_token"), offsets=tuple(d for d in (P - 1, P) if d), per_query=True)
    if P <= vocab - 1:  # the block is made of distinct tokens
        second = slice(P + 1, n)
        if P > 1:
            np.testing.assert_array_equal(s["induction"][..., second], s[f"offset_{P - 1}"][..., second])
        np.testing.assert_array_equal(s["duplicate_token"][..., second], s[f"offset_{P}"][..., second])
    assert_scores_match(
        {k: s[k] for k in ("induction", "duplicate_token")},
        oracle.head_scores(A, tokens, ("induction", "duplicate_token"), (), False, True),
    )
