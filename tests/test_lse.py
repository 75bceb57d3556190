"""scores_from_qk with a given log-sum-exp (``lse=``) and its own handed back (``return_lse=``),
DESIGN.md section 11: the lse against the numpy oracle, scores with it equal to scores without
it (fixture, hypothesis over every option), the precision bound of a float32 lse, proof that the
given lse is what normalises, whole-row kinds, flash kernels' conventions, errors."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import induct_fast as inf
import oracle
from test_attention import attention_cases, assert_scores_close

TARGET_KINDS = ("previous_token", "duplicate_token", "induction", "bos", "self")
ALL_KINDS = TARGET_KINDS + ("entropy",)
F32_ULP = 2.0**-24


def _rng_qk(shape_q, shape_k, seed=0, amplitude=1.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (
        (rng.standard_normal(shape_q) * amplitude).astype(dtype),
        (rng.standard_normal(shape_k) * amplitude).astype(dtype),
    )


def _n_of(q, layout):
    return np.shape(q)[-3 if layout == "bnhd" else -2]


def assert_lse_close(got, want, atol):
    """Same -inf rows (no allowed key), within `atol` elsewhere."""
    assert got.shape == want.shape and got.dtype == np.float64
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=0, atol=atol)


def assert_mass_ratio(got, want, ratio, rtol):
    """got == ratio * want per entry within `rtol` relative (same NaNs)."""
    for kind in want:
        g, w = got[kind], want[kind]
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg=kind)
        ok = ~np.isnan(w)
        np.testing.assert_array_less(np.abs(g[ok] - ratio * w[ok]), rtol * np.abs(ratio * w[ok]) + 1e-300, err_msg=kind)


# --- the fixture (TransformerLens q and k of 1- and 2-layer models, scale 1/4) --------------------


@pytest.mark.parametrize("model", ["L1", "L2"])
@pytest.mark.parametrize("prompt", ["rep", "nat"])
def test_lse_on_fixture(fixture, model, prompt):
    q, k = fixture[f"{model}_{prompt}_q"], fixture[f"{model}_{prompt}_k"]  # [8, layers, n, 4, 16]
    tokens = fixture[f"{model}_{prompt}_tokens"]
    opts = dict(kinds=TARGET_KINDS, offsets=(1, 3, 25), per_query=True)
    plain, lse = inf.scores_from_qk(q, k, tokens, return_lse=True, **opts)
    assert lse.shape == q.shape[:2] + (q.shape[3], q.shape[2]) and lse.dtype == np.float64
    assert_lse_close(lse, oracle.log_sum_exp(q, k), atol=1e-5)
    assert_scores_close(inf.scores_from_qk(q, k, tokens, lse=lse, **opts), plain, tol=1e-5)
    # Means too, and the lse of float64 input against the oracle to 1e-6.
    means = inf.scores_from_qk(q, k, tokens, kinds=TARGET_KINDS)
    assert_scores_close(inf.scores_from_qk(q, k, tokens, kinds=TARGET_KINDS, lse=lse), means, tol=1e-5)
    _, lse64 = inf.scores_from_qk(q.astype(np.float64), k.astype(np.float64), tokens, kinds="self", return_lse=True)
    assert_lse_close(lse64, oracle.log_sum_exp(q, k), atol=1e-6)


def test_float32_lse_within_the_documented_bound(fixture):
    """A float32 lse (ours rounded) gives every mass within 2 * 2^-24 * max(1, |L|) relative of
    the exact one, the bound the docstring states (the target logit is the same here)."""
    cases = [(fixture["L2_rep_q"], fixture["L2_rep_k"], fixture["L2_rep_tokens"])]
    # Larger logits: |L| up to ~100, where float32 rounding of L is ~4e-6.
    q, k = _rng_qk((2, 300, 2, 32), (2, 300, 1, 32), seed=11, amplitude=3.0)
    cases.append((q, k, np.random.default_rng(1).integers(0, 9, (2, 300))))
    for q, k, tokens in cases:
        opts = dict(kinds=TARGET_KINDS, offsets=(2,), per_query=True)
        exact, lse = inf.scores_from_qk(q, k, tokens, return_lse=True, **opts)
        lse32 = lse.astype(np.float32)
        got = inf.scores_from_qk(q, k, tokens, lse=lse32, **opts)
        bound = 2 * F32_ULP * np.maximum(1.0, np.abs(lse))
        for kind in exact:
            g, w = got[kind], exact[kind]
            ok = ~np.isnan(w)
            np.testing.assert_array_equal(np.isnan(g), ~ok)
            assert np.all(np.abs(g[ok] - w[ok]) <= bound[ok] * w[ok] + 1e-300), kind
        # The bound is not vacuous: the float32 rounding is visible.
        assert any(np.nanmax(np.abs(got[kd] - exact[kd])) > 0 for kd in exact)


# --- hypothesis: GQA, padding (left, right, holes), soft cap, windows, layouts, f32 / f64 ---------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attention_cases(max_n=160, extended=True), st.booleans())
def test_lse_equals_oracle_and_reproduces_the_scores(case, per_query):
    q, k, tokens, mask, kinds, offsets, options = case
    want_lse = oracle.log_sum_exp(q, k, attention_mask=mask, **options)
    opts = dict(kinds=kinds, offsets=offsets, per_query=per_query, attention_mask=mask, **options)
    for dtype, atol in ((np.float32, 1e-5), (np.float64, 1e-6)):
        qd, kd = q.astype(dtype), k.astype(dtype)
        plain, lse = inf.scores_from_qk(qd, kd, tokens, return_lse=True, **opts)
        assert_lse_close(lse, want_lse, atol=atol)
        # Ours and the oracle's (computed independently) both reproduce the scores.
        for given_lse in (lse, want_lse):
            assert_scores_close(inf.scores_from_qk(qd, kd, tokens, lse=given_lse, **opts), plain, tol=1e-5)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attention_cases(max_n=300, extended=True))
def test_given_lse_is_what_normalises(case):
    """lse + log 2 halves every mass (to 1e-12 relative): the given lse, not a full pass over
    the rows, normalised them. With a whole-row kind the rows are computed and the given lse
    is not used: the very bits of the call without it."""
    q, k, tokens, mask, kinds, offsets, options = case
    opts = dict(offsets=offsets, per_query=True, attention_mask=mask, **options)
    targets = [kd for kd in kinds if kd != "entropy"] or ["previous_token"]
    plain, lse = inf.scores_from_qk(q, k, tokens, kinds=targets, return_lse=True, **opts)
    halved = inf.scores_from_qk(q, k, tokens, kinds=targets, lse=lse + np.log(2.0), **opts)
    assert_mass_ratio(halved, plain, 0.5, rtol=1e-12)
    whole = inf.scores_from_qk(q, k, tokens, kinds=list(targets) + ["entropy"], **opts)
    ignored = inf.scores_from_qk(q, k, tokens, kinds=list(targets) + ["entropy"], lse=lse + np.log(2.0), **opts)
    for kind in whole:
        np.testing.assert_array_equal(ignored[kind], whole[kind], err_msg=kind)


# --- specific behaviour --------------------------------------------------------------------------


def test_return_convention_and_given_lse_echoed():
    q, k = _rng_qk((2, 30, 4, 8), (2, 30, 2, 8), seed=2)
    tokens = np.random.default_rng(2).integers(0, 5, 30)
    plain = inf.scores_from_qk(q, k, tokens)
    assert isinstance(plain, dict)
    result = inf.scores_from_qk(q, k, tokens, return_lse=True)
    assert isinstance(result, tuple) and len(result) == 2
    scores, lse = result
    assert_scores_close(scores, plain, tol=0)
    assert lse.shape == (2, 4, 30) and lse.dtype == np.float64 and lse.flags.c_contiguous
    # With lse given, return_lse hands it back as float64, unchanged (unread rows as they were).
    given32 = lse.astype(np.float32)
    given32[..., 0] = np.nan
    again, echoed = inf.scores_from_qk(q, k, tokens, lse=given32, return_lse=True)
    assert echoed.dtype == np.float64
    np.testing.assert_array_equal(echoed, given32.astype(np.float64))
    assert_scores_close(again, plain, tol=1e-5)


def test_unread_rows_may_hold_anything_and_strides_and_dtypes():
    """Query 0 and padding queries are never scored: their lse is not read (flash kernels leave
    -inf or NaN there). Any strides, float16/32/64 give the same scores."""
    q, k = _rng_qk((2, 40, 2, 8), (2, 40, 1, 8), seed=3)
    tokens = np.random.default_rng(3).integers(0, 4, (2, 40))
    mask = np.ones((2, 40), np.int64)
    mask[0, :5] = 0  # left padding
    mask[1, 33:] = 0  # right padding
    opts = dict(kinds=TARGET_KINDS, per_query=True, attention_mask=mask)
    plain, lse = inf.scores_from_qk(q, k, tokens, return_lse=True, **opts)
    assert np.isneginf(lse[0, :, :5]).all()  # left padding under the causal mask: no allowed key
    junk = lse.copy()
    junk[..., 0] = np.nan
    junk[0, :, :5] = np.nan
    junk[1, :, 33:] = np.inf
    reference = inf.scores_from_qk(q, k, tokens, lse=junk, **opts)
    assert_scores_close(reference, plain, tol=1e-12)
    fortran = np.asfortranarray(junk)
    reversed_ = junk[:, ::-1][:, ::-1]
    wide = np.repeat(junk, 2, axis=-1)[..., ::2]
    for variant in (fortran, reversed_, wide, junk.astype(np.float32)):
        assert_scores_close(inf.scores_from_qk(q, k, tokens, lse=variant, **opts), reference, tol=1e-5)
    assert_scores_close(inf.scores_from_qk(q, k, tokens, lse=lse.astype(np.float16), **opts), reference, tol=2e-2)
    # Inputs are never written.
    before = junk.copy()
    inf.scores_from_qk(q, k, tokens, lse=junk, **opts)
    np.testing.assert_array_equal(junk, before)


def test_lse_results_do_not_depend_on_thread_count():
    q, k = _rng_qk((1, 700, 3, 16), (1, 700, 3, 16), seed=4)
    tokens = np.random.default_rng(4).integers(0, 20, 700)
    mask = np.ones((1, 700), bool)
    mask[0, 650:] = False
    opts = dict(kinds=TARGET_KINDS, per_query=True, attention_mask=mask, softcap=5.0, window=300)
    before = inf.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            inf.set_num_threads(threads)
            scores, lse = inf.scores_from_qk(q, k, tokens, return_lse=True, **opts)
            runs.append((scores, lse, inf.scores_from_qk(q, k, tokens, lse=lse, **opts)))
    finally:
        inf.set_num_threads(before)
    for scores, lse, again in runs[1:]:
        np.testing.assert_array_equal(lse, runs[0][1])
        for kind in scores:
            np.testing.assert_array_equal(scores[kind], runs[0][0][kind])
            np.testing.assert_array_equal(again[kind], runs[0][2][kind])


def test_lse_of_torch_flash_attention():
    """The logsumexp of torch's CPU flash kernel is what ``lse`` takes: [batch, heads, n], natural
    log; passed as the torch tensor it is, the masses agree within the documented bound (float32
    lse plus the difference of the two kernels' float32 logits)."""
    torch = pytest.importorskip("torch")
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is None:
        pytest.skip("torch has no CPU flash attention op")
    n, heads, d = 200, 4, 32
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, n, d, generator=gen) for _ in range(3))
    _, lse = flash(q, k, v, 0.0, True)
    tokens = np.random.default_rng(5).integers(0, 7, (2, n))
    opts = dict(kinds=TARGET_KINDS, per_query=True, layout="bhnd")
    exact, ours = inf.scores_from_qk(q, k, tokens, return_lse=True, **opts)
    np.testing.assert_allclose(lse.numpy(), ours, rtol=0, atol=1e-5)
    got = inf.scores_from_qk(q, k, tokens, lse=lse, **opts)
    qn, kn = q.numpy().astype(np.float64), k.numpy().astype(np.float64)
    scale = 1 / np.sqrt(d)
    # Each kernel's float32 dot product is within d_head * 2^-24 * sum_p |q_p k_p| of the exact one.
    products = np.einsum("bhid,bhjd->bhij", np.abs(qn), np.abs(kn)).max(axis=-1)
    logit_err = 2 * d * F32_ULP * scale * products
    bound = 2 * F32_ULP * np.maximum(1.0, np.abs(ours)) + logit_err
    for kind in exact:
        w, g = exact[kind], got[kind]
        ok = ~np.isnan(w)
        np.testing.assert_array_equal(np.isnan(g), ~ok)
        assert np.all(np.abs(g[ok] - w[ok]) <= 1.01 * bound[ok] * w[ok] + 1e-300), kind


def test_docstring_examples_run():
    import induct_fast.attention

    result = doctest.testmod(induct_fast.attention, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# --- errors --------------------------------------------------------------------------------------


def _small():
    q, k = _rng_qk((2, 6, 4, 8), (2, 6, 2, 8), seed=6)
    _, lse = inf.scores_from_qk(q, k, kinds="previous_token", return_lse=True)
    return q, k, lse


def _with(a, index, value):
    b = np.array(a, copy=True)
    b[index] = value
    return b


@pytest.mark.parametrize(
    "change, kwargs, exc, match",
    [
        (lambda lse: lse[..., 1:], {}, ValueError, r"^lse: expected shape \(2, 4, 6\) .*got shape \(2, 4, 5\)$"),
        (lambda lse: lse[0], {}, ValueError, r"^lse: expected shape \(2, 4, 6\) .*got shape \(4, 6\)$"),
        (lambda lse: lse[..., None], {}, ValueError, r"^lse: expected shape \(2, 4, 6\) .*got shape \(2, 4, 6, 1\)$"),
        (lambda lse: np.swapaxes(lse, 0, 1), {}, ValueError, r"^lse: expected shape \(2, 4, 6\)"),
        (lambda lse: _with(lse, (1, 2, 3), np.nan), {}, ValueError, r"^lse: expected finite values at every query that is scored .*got NaN at index \(1, 2, 3\)$"),
        (lambda lse: _with(lse, (0, 0, 5), np.inf), {}, ValueError, r"got inf at index \(0, 0, 5\)$"),
        (lambda lse: _with(lse, (0, 3, 1), -np.inf), {}, ValueError, r"got -inf at index \(0, 3, 1\)$"),
        # checked (though not used) with a whole-row kind too
        (lambda lse: _with(lse, (1, 2, 3), np.nan), {"kinds": ("previous_token", "entropy")}, ValueError, r"^lse: .*\(1, 2, 3\)$"),
        # padding query 2 of prompt 0 is not read; query 3 is
        (lambda lse: _with(_with(lse, (0, 1, 2), np.nan), (0, 1, 3), np.nan), {"attention_mask": np.array([[1, 1, 0, 1, 1, 1]] * 2)}, ValueError, r"at index \(0, 1, 3\)$"),
        (lambda lse: lse - 1000.0, {}, ValueError, r"^lse: expected the log-sum-exp of the same q, k and rules.*overflow"),
        (lambda lse: lse, {"exclude_bos": True}, ValueError, r"^lse: expected None with exclude_bos=True"),
        (lambda lse: lse.astype(np.int64), {}, TypeError, r"^lse: expected a real float array"),
        (lambda lse: lse.astype(np.complex128), {}, TypeError, r"^lse: expected a real numeric array, got complex"),
        (lambda lse: lse > 0, {}, TypeError, r"^lse: expected a real float array"),
        (lambda lse: lse.astype(str), {}, TypeError, r"^lse: "),
        (lambda lse: [[1.0], [1.0, 2.0]], {}, TypeError, r"^lse: "),
    ],
)
def test_bad_lse(change, kwargs, exc, match):
    q, k, lse = _small()
    options = {"kinds": "previous_token", **kwargs}
    with pytest.raises(exc, match=match):
        inf.scores_from_qk(q, k, lse=change(lse), **options)


def test_return_lse_with_exclude_bos_is_refused():
    q, k, lse = _small()
    with pytest.raises(ValueError, match=r"^return_lse: expected False with exclude_bos=True"):
        inf.scores_from_qk(q, k, kinds="previous_token", exclude_bos=True, return_lse=True)
    with pytest.raises(ValueError, match=r"^lse: .*exclude_bos=True"):
        inf.scores_from_qk(q, k, kinds="previous_token", exclude_bos=True, lse=lse, return_lse=True)
