"""attention_patterns and scores_from_qk: fixture parity, a plain-numpy oracle, hypothesis
properties (fused scores == head_scores of the patterns), memory of the fused kernel, errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import induct_fast as inf

ALL_KINDS = ("previous_token", "duplicate_token", "induction", "bos", "self", "entropy")


# --- the obvious numpy implementation ------------------------------------------------------------


def oracle_patterns(q, k, *, scale=None, causal=True, attention_mask=None, layout="bnhd"):
    """softmax(scale q k^T) in float64 with numpy's matmul, masks as documented."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    if layout == "bnhd":  # -> [*lead, heads, n, d]
        q, k = np.swapaxes(q, -3, -2), np.swapaxes(k, -3, -2)
    k = np.repeat(k, q.shape[-3] // k.shape[-3], axis=-3)
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * (q @ np.swapaxes(k, -1, -2))
    n = s.shape[-1]
    allowed = np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)
    allowed = np.broadcast_to(allowed, s.shape)
    if attention_mask is not None:
        m = np.asarray(attention_mask).astype(bool)
        if m.ndim == 2:  # [batch, n]: batch is the first leading axis
            m = m.reshape((m.shape[0],) + (1,) * (s.ndim - 2) + (n,))
        allowed = allowed & m
    s = np.where(allowed, s, -np.inf)
    top = s.max(axis=-1, keepdims=True)
    e = np.where(allowed, np.exp(s - np.where(np.isfinite(top), top, 0.0)), 0.0)
    z = e.sum(axis=-1, keepdims=True)
    return np.where(z > 0, e / np.where(z > 0, z, 1.0), 0.0)


def assert_scores_close(got, want, tol=1e-5, where=None):
    assert got.keys() == want.keys()
    for kind in got:
        g, w = got[kind], want[kind]
        assert g.shape == w.shape, kind
        if where is not None:
            g, w = g[where], w[where]
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg=kind)
        np.testing.assert_allclose(g, w, rtol=0, atol=tol, equal_nan=True, err_msg=kind)


def assert_exclude_bos_close(got, q, k, tokens, mask, options, kinds):
    """Per-query fused scores with exclude_bos against head_scores(..., exclude_bos=True).

    head_scores renormalises by A[i, 0] / (1 - A[i, 0]), which loses every digit when A[i, 0] is
    within rounding of 1 (attention sinks: the fixture has rows with 1 - A[i, 0] = 1e-13), even
    in float64; the fused kernel leaves key 0 out of the softmax instead. So: equal to
    head_scores of float64 patterns on rows where 1 - A[i, 0] > 1e-6, and everywhere equal to
    head_scores of patterns whose key 0 is masked out, the same row renormalised exactly.
    """
    opts = dict(per_query=True, exclude_bos=True, attention_mask=mask, **kinds)
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    patterns = inf.attention_patterns(q64, k64, attention_mask=mask, **options)
    well_conditioned = 1.0 - patterns[..., :, 0] > 1e-6
    assert_scores_close(got, inf.head_scores(patterns, tokens, **opts), where=well_conditioned)
    n = patterns.shape[-1]
    batch = q.shape[0] if q.ndim > 3 else 1
    no_bos = np.ones((batch, n), np.int64) if mask is None else mask.copy()
    no_bos[:, 0] = 0
    exact = inf.attention_patterns(q64, k64, attention_mask=no_bos if q.ndim > 3 else no_bos[0], **options)
    assert_scores_close(got, inf.head_scores(exact, tokens, **opts))


# --- fixture parity ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["L1", "L2"])
@pytest.mark.parametrize("prompt", ["rep", "nat"])
def test_patterns_reproduce_transformerlens(fixture, model, prompt):
    q, k = fixture[f"{model}_{prompt}_q"], fixture[f"{model}_{prompt}_k"]
    expected = fixture[f"{model}_{prompt}_patterns"]
    got = inf.attention_patterns(q, k)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-6)
    np.testing.assert_array_equal(inf.attention_patterns(q, k, scale=0.25), got)


@pytest.mark.parametrize("model", ["L1", "L2"])
@pytest.mark.parametrize("prompt", ["rep", "nat"])
@pytest.mark.parametrize("per_query", [False, True])
def test_fused_scores_equal_scores_of_patterns_on_fixture(fixture, model, prompt, per_query):
    q, k = fixture[f"{model}_{prompt}_q"], fixture[f"{model}_{prompt}_k"]
    tokens = fixture[f"{model}_{prompt}_tokens"]
    opts = dict(kinds=ALL_KINDS, offsets=(1, 3, 25), per_query=per_query)
    want = inf.head_scores(inf.attention_patterns(q, k), tokens, **opts)
    assert_scores_close(inf.scores_from_qk(q, k, tokens, **opts), want)
    got = inf.scores_from_qk(q, k, tokens, exclude_bos=True, kinds=ALL_KINDS, offsets=(1, 3, 25), per_query=True)
    assert_exclude_bos_close(got, q, k, tokens, None, {}, dict(kinds=ALL_KINDS, offsets=(1, 3, 25)))


def test_patterns_match_numpy_oracle_on_fixture(fixture):
    q, k = fixture["L2_nat_q"], fixture["L2_nat_k"]
    np.testing.assert_allclose(inf.attention_patterns(q, k), oracle_patterns(q, k), rtol=0, atol=1e-6)


# --- hypothesis: random shapes, layouts, masks, GQA ----------------------------------------------


@st.composite
def attention_cases(draw):
    """q, k with small-integer entries times a power of two, so that logits are exact in float32
    and float64 alike (only the softmax differs between precisions), plus every option."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    lead = draw(st.sampled_from([(), (2,), (1,), (2, 2)]))
    n = draw(st.one_of(st.integers(1, 12), st.integers(13, 300)))
    n_kv = draw(st.sampled_from([1, 2]))
    heads = n_kv * draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from([1, 4, 16, 64]))
    amplitude = draw(st.sampled_from([0.25, 1.0, 2.0, 4.0]))
    layout = draw(st.sampled_from(["bnhd", "bhnd"]))

    def qk_array(h):
        shape = lead + ((n, h) if layout == "bnhd" else (h, n)) + (d,)
        return (rng.integers(-3, 4, size=shape) * amplitude).astype(np.float32)

    q, k = qk_array(heads), qk_array(n_kv)
    mask = None
    if lead and draw(st.booleans()):
        mask = (rng.random((lead[0], n)) > draw(st.sampled_from([0.0, 0.2, 0.6]))).astype(np.int64)
        mask[:, : draw(st.integers(0, min(n, 3)))] = 0  # left padding
    vocab = draw(st.sampled_from([2, 5, 50]))
    tokens = rng.integers(0, vocab, size=(lead[0], n) if lead and draw(st.booleans()) else (n,))
    kinds = draw(st.lists(st.sampled_from(ALL_KINDS), min_size=1, max_size=4, unique=True))
    offsets = draw(st.lists(st.integers(1, n - 1), max_size=2, unique=True)) if n > 1 else []
    options = dict(
        scale=draw(st.sampled_from([None, 1.0, 0.5])),
        causal=draw(st.booleans()),
        layout=layout,
    )
    return q, k, tokens, mask, kinds, offsets, options


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attention_cases())
def test_patterns_equal_numpy_oracle(case):
    q, k, _, mask, _, _, options = case
    want = oracle_patterns(q, k, attention_mask=mask, **options)
    got = inf.attention_patterns(q, k, attention_mask=mask, **options)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    got64 = inf.attention_patterns(q.astype(np.float64), k.astype(np.float64), attention_mask=mask, **options)
    assert got64.dtype == np.float64
    np.testing.assert_allclose(got64, want, rtol=0, atol=1e-12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attention_cases(), st.booleans())
def test_fused_scores_equal_head_scores_of_patterns(case, per_query):
    q, k, tokens, mask, kinds, offsets, options = case
    opts = dict(kinds=kinds, offsets=offsets, per_query=per_query)
    got = inf.scores_from_qk(q, k, tokens, attention_mask=mask, **options, **opts)
    patterns = inf.attention_patterns(q, k, attention_mask=mask, **options)
    # Padding positions are neither queries nor targets, in both (DESIGN.md section 10).
    assert_scores_close(got, inf.head_scores(patterns, tokens, attention_mask=mask, **opts))
    # float64 input: float64 everywhere.
    got64 = inf.scores_from_qk(q.astype(np.float64), k.astype(np.float64), tokens, attention_mask=mask, **options, **opts)
    assert_scores_close(got64, got)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attention_cases())
def test_fused_scores_with_exclude_bos(case):
    q, k, tokens, mask, kinds, offsets, options = case
    assume(q.shape[-2 if options["layout"] == "bhnd" else -3] > 1)
    if mask is not None and not mask[:, 0].all():
        # Left padding: position 0 is no BOS to exclude (DESIGN.md section 10).
        with pytest.raises(ValueError, match=r"^exclude_bos: .*attention_mask.*position 0 is padding in prompt"):
            inf.scores_from_qk(q, k, tokens, attention_mask=mask, kinds=kinds, exclude_bos=True, **options)
        mask = mask.copy()
        mask[:, 0] = 1
    got = inf.scores_from_qk(q, k, tokens, attention_mask=mask, kinds=kinds, offsets=offsets, per_query=True, exclude_bos=True, **options)
    assert_exclude_bos_close(got, q, k, tokens, mask, options, dict(kinds=kinds, offsets=offsets))


# --- specific behaviour --------------------------------------------------------------------------


def test_logits_of_80_do_not_overflow():
    n, d = 64, 16
    rng = np.random.default_rng(1)
    q = rng.choice([-1.0, 1.0], size=(n, 2, d)).astype(np.float32) * 4.0
    k = q.copy()
    # q_i . q_i = 16 * 16 = 256 on the diagonal; scale 5/16 (exact in binary) makes it 80.
    scale = 0.3125
    s = inf.scores_from_qk(q, k, kinds=("self", "previous_token", "entropy"), scale=scale, per_query=True)
    a = inf.attention_patterns(q, k, scale=scale)
    want = oracle_patterns(q, k, scale=scale)
    assert np.abs(scale * np.einsum("nhd,mhd->hnm", q, k)).max() == 80.0
    np.testing.assert_allclose(a, want, rtol=0, atol=1e-6)
    assert all(np.isfinite(v[:, 1:]).all() for v in s.values())
    assert_scores_close(s, inf.head_scores(want, kinds=("self", "previous_token", "entropy"), per_query=True))


def test_layouts_and_grouped_query_attention_agree():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 40, 6, 8)).astype(np.float32)
    k = rng.standard_normal((2, 40, 2, 8)).astype(np.float32)
    a = inf.attention_patterns(q, k)
    # kv head g serves query heads 3g .. 3g+2, as Hugging Face's repeat_kv.
    np.testing.assert_array_equal(a, inf.attention_patterns(q, np.repeat(k, 3, axis=2)))
    np.testing.assert_array_equal(a, inf.attention_patterns(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), layout="bhnd"))
    s = inf.scores_from_qk(q, k, kinds=("previous_token", "entropy"))
    t = inf.scores_from_qk(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), kinds=("previous_token", "entropy"), layout="bhnd")
    assert_scores_close(s, t, tol=0)


def test_strided_views_and_dtypes():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((2, 60, 4, 32)).astype(np.float32)
    q = base[:, ::-2, :, ::2]  # negative and non-unit strides
    k = np.asfortranarray(base[:, 1::2, :, 1::2])
    want = oracle_patterns(q, k)
    np.testing.assert_allclose(inf.attention_patterns(q, k), want, rtol=0, atol=2e-6)
    half = inf.attention_patterns(q.astype(np.float16), k.astype(np.float16))
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, oracle_patterns(q.astype(np.float16), k.astype(np.float16)), rtol=0, atol=2e-6)
    mixed = inf.attention_patterns(q.astype(np.float16), k.astype(np.float64))
    assert mixed.dtype == np.float64
    tokens = rng.integers(0, 7, size=30)
    assert_scores_close(inf.scores_from_qk(q, k, tokens), inf.head_scores(want, tokens))


def test_results_do_not_depend_on_thread_count():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((1, 500, 3, 16)).astype(np.float32)
    k = rng.standard_normal((1, 500, 3, 16)).astype(np.float32)
    tokens = rng.integers(0, 20, size=500)
    before = inf.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            inf.set_num_threads(threads)
            runs.append((inf.attention_patterns(q, k), inf.scores_from_qk(q, k, tokens, kinds=ALL_KINDS, per_query=True)))
    finally:
        inf.set_num_threads(before)
    for a, s in runs[1:]:
        np.testing.assert_array_equal(a, runs[0][0])
        for kind in s:
            np.testing.assert_array_equal(s[kind], runs[0][1][kind])


def test_padding_rows_are_zero_and_inputs_untouched():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 10, 1, 4)).astype(np.float32)
    k = rng.standard_normal((2, 10, 1, 4)).astype(np.float32)
    q0, k0 = q.copy(), k.copy()
    mask = np.ones((2, 10), bool)
    mask[1, :3] = False  # left padding of sequence 1
    a = inf.attention_patterns(q, k, attention_mask=mask)
    assert (a[1, 0, :3] == 0).all() and (a[1, 0, :, :3] == 0).all()
    np.testing.assert_allclose(a[1, 0, 3:].sum(axis=-1), 1.0, atol=1e-6)
    s = inf.scores_from_qk(q, k, kinds=("previous_token", "entropy"), attention_mask=mask, per_query=True)
    # Padding queries are not scored (DESIGN.md section 10); query 3's target, key 2, is padding.
    assert np.isnan(s["previous_token"][1, 0, :4]).all() and np.isnan(s["entropy"][1, 0, :3]).all()
    assert np.isfinite(s["previous_token"][1, 0, 4:]).all() and np.isfinite(s["entropy"][1, 0, 3:]).all()
    np.testing.assert_array_equal(q, q0)
    np.testing.assert_array_equal(k, k0)


def test_fused_scores_hold_no_n_by_n_matrix():
    """n = 16384, one head, d_head 64: the pattern alone would be 1 GiB."""
    code = textwrap.dedent(
        """
        import numpy as np, induct_fast as inf

        def peak_kib():
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        n, d = 16384, 64
        rng = np.random.default_rng(0)
        q = rng.standard_normal((n, 1, d), dtype=np.float32)
        k = rng.standard_normal((n, 1, d), dtype=np.float32)
        tokens = rng.integers(0, 5000, size=n)
        kinds = ("previous_token", "duplicate_token", "induction", "entropy")
        inf.scores_from_qk(q[:512], k[:512], tokens[:512], kinds=kinds)  # load, start threads
        before = peak_kib()
        s = inf.scores_from_qk(q, k, tokens, kinds=kinds, per_query=True)
        grown = peak_kib() - before
        assert all(v.shape == (1, n) for v in s.values())
        print(grown)
        """
    )
    if not Path("/proc/self/status").exists() and sys.platform != "linux":
        pytest.skip("peak-memory probe written for Linux")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    grown_mib = int(out.stdout.strip().splitlines()[-1]) / 1024
    assert grown_mib < 64, f"peak resident memory grew by {grown_mib:.1f} MiB"


# --- errors --------------------------------------------------------------------------------------


def _qk(n=6, heads=4, kv=2, d=8, lead=(2,)):
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal(lead + (n, heads, d)).astype(np.float32),
        rng.standard_normal(lead + (n, kv, d)).astype(np.float32),
    )


@pytest.mark.parametrize("fn", [inf.attention_patterns, inf.scores_from_qk])
@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (lambda: _qk()[:1] + (_qk(d=4)[1],), {}, r"^k: .*d_head = 8.*got n = 6, d_head = 4"),
        (lambda: _qk()[:1] + (_qk(n=7)[1],), {}, r"^k: .*n = 6.*got n = 7"),
        (lambda: _qk(heads=4, kv=3), {}, r"^k: .*divides q's 4 heads.*got 3 kv heads"),
        (lambda: _qk(), {"layout": "bshd"}, r"^layout: expected \"bnhd\" or \"bhnd\", got \"bshd\""),
        (lambda: _qk(), {"scale": float("nan")}, r"^scale: expected a finite number.*got nan"),
        (lambda: _qk(), {"scale": float("inf")}, r"^scale: expected a finite number"),
        (lambda: _qk(), {"attention_mask": np.ones((2, 5))}, r"^attention_mask: expected .*\(2, 6\).*got shape \(2, 5\)"),
        (lambda: _qk(), {"attention_mask": np.ones((3, 6))}, r"^attention_mask: "),
        (lambda: _qk(), {"attention_mask": np.full((2, 6), 2)}, r"^attention_mask: expected 0/1 .*got 2 at index \(0, 0\)"),
        (lambda: (np.zeros((6, 8), np.float32),) * 2, {}, r"^q: expected an array of shape \(\.\.\., n, n_heads, d_head\)"),
        (lambda: (_qk()[0], np.full((2, 6, 2, 8), np.nan, np.float32)), {}, r"^k: expected finite values, got NaN at index \(0, 0, 0, 0\)"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(fn, make, kwargs, match):
    q, k = make()
    with pytest.raises(ValueError, match=match):
        fn(q, k, **kwargs)


def test_bad_tokens_and_kinds():
    q, k = _qk()
    with pytest.raises(ValueError, match=r"^tokens: expected shape \(6,\) or \(2, 6\) to match q, got shape \(5,\)"):
        inf.scores_from_qk(q, k, np.zeros(5, int))
    with pytest.raises(ValueError, match=r"^tokens: expected a token array"):
        inf.scores_from_qk(q, k, kinds="induction")
    with pytest.raises(ValueError, match=r"^offset: "):
        inf.scores_from_qk(q, k, offsets=(6,), kinds=())
    with pytest.raises(ValueError, match=r"^kinds: "):
        inf.scores_from_qk(q, k, kinds="inducton")


def test_type_errors():
    q, k = _qk()
    with pytest.raises(TypeError, match=r"^q: "):
        inf.attention_patterns(q.astype(np.complex64), k)
    with pytest.raises(TypeError, match=r"^scale: "):
        inf.attention_patterns(q, k, scale="0.5")
    with pytest.raises(TypeError, match=r"^layout: "):
        inf.attention_patterns(q, k, layout=0)
    with pytest.raises(TypeError, match=r"^attention_mask: "):
        inf.attention_patterns(q, k, attention_mask=np.array([["a"] * 6] * 2))
