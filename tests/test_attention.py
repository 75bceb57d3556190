"""attention_patterns and scores_from_qk: fixture parity, a plain-numpy oracle, hypothesis
properties (fused scores == head_scores of the patterns), the soft cap, sliding window and
padding options, memory of the fused kernel, errors."""

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
import oracle

ALL_KINDS = ("previous_token", "duplicate_token", "induction", "bos", "self", "entropy")


# --- the obvious numpy implementation (tests/oracle.py) -------------------------------------------

oracle_patterns = oracle.attention_patterns


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
    no_bos = np.ones(patterns.shape[-1], np.int64) if mask is None else np.array(mask, copy=True)
    no_bos[..., 0] = 0
    exact = inf.attention_patterns(q64, k64, attention_mask=no_bos, **options)
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
def attention_cases(draw, max_n=300, extended=False):
    """q, k with small-integer entries times a power of two, so that logits are exact in float32
    and float64 alike (only the softmax differs between precisions), plus every option.

    ``extended`` adds the options of DESIGN.md section 10: a soft cap, a sliding window (1, 2,
    n, past n, any), padding on the left, on the right or anywhere ([batch, n] or a shared [n],
    whole prompts of padding included) and up to 3 kv heads each serving up to 3 heads."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    lead = draw(st.sampled_from([(), (2,), (1,), (2, 2)] + ([(3,)] if extended else [])))
    n = draw(st.one_of(st.integers(1, 12), st.integers(13, max_n)))
    n_kv = draw(st.sampled_from([1, 2, 3] if extended else [1, 2]))
    heads = n_kv * draw(st.sampled_from([1, 2, 3] if extended else [1, 2]))
    d = draw(st.sampled_from([1, 4, 16, 32] if extended else [1, 4, 16, 64]))
    amplitude = draw(st.sampled_from([0.25, 1.0, 2.0, 4.0]))
    layout = draw(st.sampled_from(["bnhd", "bhnd"]))

    def qk_array(h):
        shape = lead + ((n, h) if layout == "bnhd" else (h, n)) + (d,)
        return (rng.integers(-3, 4, size=shape) * amplitude).astype(np.float32)

    q, k = qk_array(heads), qk_array(n_kv)
    mask, options = None, {}
    if extended:
        window = draw(st.one_of(st.none(), st.just(1), st.just(2), st.integers(1, n + 3), st.just(n)))
        options = dict(window=window, softcap=draw(st.sampled_from([None, 0.5, 3.0, 20.0, 50.0])))
        style = draw(st.sampled_from(["none", "right", "left", "holes"]))
        if style != "none":
            shared = not lead or draw(st.booleans())
            mask = padding_mask(draw, rng, (n,) if shared else (lead[0], n), style)
    elif lead and draw(st.booleans()):
        mask = (rng.random((lead[0], n)) > draw(st.sampled_from([0.0, 0.2, 0.6]))).astype(np.int64)
        mask[:, : draw(st.integers(0, min(n, 3)))] = 0  # left padding
    vocab = draw(st.sampled_from([2, 5, 50]))
    tokens = rng.integers(0, vocab, size=(lead[0], n) if lead and draw(st.booleans()) else (n,))
    kinds = draw(st.lists(st.sampled_from(ALL_KINDS), min_size=1, max_size=4, unique=True))
    offsets = draw(st.lists(st.integers(1, n - 1), max_size=2, unique=True)) if n > 1 else []
    options.update(
        scale=draw(st.sampled_from([None, 1.0, 0.5])),
        causal=True if options.get("window") is not None else draw(st.booleans()),
        layout=layout,
    )
    return q, k, tokens, mask, kinds, offsets, options


def padding_mask(draw, rng, shape, style):
    """0/1 flags of `shape` ([n] or [batch, n]): right or left padding of random lengths (whole
    prompts of padding included), or random holes."""
    n = shape[-1]
    mask = np.ones(shape, np.int64).reshape(-1, n)
    for row in mask:
        pad = draw(st.integers(0, n))
        if style == "right":
            row[n - pad :] = 0
        elif style == "left":
            row[:pad] = 0
        else:
            row[rng.random(n) < draw(st.sampled_from([0.1, 0.4, 0.8]))] = 0
    mask = mask.reshape(shape)
    return mask.astype(bool) if draw(st.booleans()) else mask


# Both the options of section 5 alone and with those of section 10.
any_attention_cases = st.booleans().flatmap(lambda extended: attention_cases(extended=extended))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_attention_cases)
def test_patterns_equal_numpy_oracle(case):
    q, k, _, mask, _, _, options = case
    want = oracle_patterns(q, k, attention_mask=mask, **options)
    got = inf.attention_patterns(q, k, attention_mask=mask, **options)
    assert got.dtype == np.float32 and got.shape == want.shape
    # float32 tanh and division: a capped logit is off by a few ulp of the cap
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 if options.get("softcap") is None else 5e-6)
    got64 = inf.attention_patterns(q.astype(np.float64), k.astype(np.float64), attention_mask=mask, **options)
    assert got64.dtype == np.float64
    np.testing.assert_allclose(got64, want, rtol=0, atol=1e-12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_attention_cases, st.booleans())
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


def _exclude_bos_needs_a_real_position_0(q, k, tokens, mask, options):
    """Left padding with exclude_bos is refused (position 0 is no BOS then, DESIGN.md section
    10); returns the mask with position 0 made real."""
    if mask is None or np.asarray(mask)[..., 0].all():
        return mask
    with pytest.raises(ValueError, match=r"^exclude_bos: .*attention_mask.*position 0 is padding in prompt \d"):
        inf.scores_from_qk(q, k, tokens, attention_mask=mask, exclude_bos=True, **options)
    mask = np.array(mask, copy=True)
    mask[..., 0] = 1
    return mask


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_attention_cases)
def test_fused_scores_with_exclude_bos(case):
    q, k, tokens, mask, kinds, offsets, options = case
    assume(q.shape[-2 if options["layout"] == "bhnd" else -3] > 1)
    mask = _exclude_bos_needs_a_real_position_0(q, k, tokens, mask, options)
    got = inf.scores_from_qk(q, k, tokens, attention_mask=mask, kinds=kinds, offsets=offsets, per_query=True, exclude_bos=True, **options)
    assert_exclude_bos_close(got, q, k, tokens, mask, options, dict(kinds=kinds, offsets=offsets))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attention_cases(max_n=40, extended=True), st.booleans(), st.booleans())
def test_fused_scores_with_softcap_window_and_padding_equal_oracle(case, per_query, exclude_bos):
    q, k, tokens, mask, kinds, offsets, options = case
    if exclude_bos:
        mask = _exclude_bos_needs_a_real_position_0(q, k, tokens, mask, options)
    opts = dict(kinds=kinds, offsets=offsets, per_query=per_query, exclude_bos=exclude_bos)
    got = inf.scores_from_qk(q, k, tokens, attention_mask=mask, **options, **opts)
    assert_scores_close(got, oracle.scores_from_qk(q, k, tokens, attention_mask=mask, **options, **opts))


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
    mask = np.ones((1, 500), bool)
    mask[0, 450:] = False
    options = [{}, dict(softcap=3.0, window=200, attention_mask=mask)]
    before = inf.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            inf.set_num_threads(threads)
            for o in options:
                runs.append((inf.attention_patterns(q, k, **o), inf.scores_from_qk(q, k, tokens, kinds=ALL_KINDS, per_query=True, **o)))
    finally:
        inf.set_num_threads(before)
    for r, (a, s) in enumerate(runs[len(options) :]):
        np.testing.assert_array_equal(a, runs[r % len(options)][0])
        for kind in s:
            np.testing.assert_array_equal(s[kind], runs[r % len(options)][1][kind])


def test_window_edges():
    """window >= n is no window (bit for bit); window 1 attends to itself only: a target outside
    the window (previous_token) has mass 0 and its query stays eligible; numpy ints work."""
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 300, 2, 16)).astype(np.float32)
    k = rng.standard_normal((2, 300, 1, 16)).astype(np.float32)
    tokens = rng.integers(0, 9, (2, 300))
    kinds = dict(kinds=ALL_KINDS, offsets=(3, 299), per_query=True)
    plain = inf.scores_from_qk(q, k, tokens, softcap=7.0, **kinds)
    for wide in (300, 301, np.int64(10**6), 2**70):
        assert_scores_close(inf.scores_from_qk(q, k, tokens, softcap=7.0, window=wide, **kinds), plain, tol=0)
        np.testing.assert_array_equal(inf.attention_patterns(q, k, window=wide), inf.attention_patterns(q, k))
    one = inf.scores_from_qk(q, k, tokens, window=1, **kinds)
    np.testing.assert_allclose(one["self"][..., 1:], 1.0, rtol=0, atol=1e-6)
    assert (one["previous_token"][..., 1:] == 0).all() and (one["bos"][..., 1:] == 0).all()
    np.testing.assert_allclose(one["entropy"][..., 1:], 0.0, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(inf.attention_patterns(q, k, window=1), np.broadcast_to(np.eye(300, dtype=np.float32), (2, 2, 300, 300)))
    # window w: offset d < w sees its key, offset d >= w does not
    w = inf.scores_from_qk(q, k, tokens, window=4, **kinds)
    assert (w["offset_3"][..., 3:] > 0).all() and (w["offset_299"][..., 299:] == 0).all()


def test_softcap_bounds_the_logits():
    """With softcap c every logit lies in (-c, c): huge q.k cannot overflow, and a row's
    probabilities stay within exp(2c) of each other."""
    rng = np.random.default_rng(8)
    q = (rng.standard_normal((40, 1, 8)) * 1e3).astype(np.float32)
    k = (rng.standard_normal((40, 1, 8)) * 1e3).astype(np.float32)
    a = inf.attention_patterns(q, k, softcap=2.0)
    np.testing.assert_allclose(a, oracle.attention_patterns(q, k, softcap=2.0), rtol=0, atol=5e-6)
    rows = [a[0, i, : i + 1] for i in range(40)]
    assert all(r.max() / r.min() <= np.exp(4.0) * (1 + 1e-5) for r in rows)
    s = inf.scores_from_qk(q, k, kinds=("previous_token", "entropy"), softcap=2.0, per_query=True)
    assert_scores_close(s, inf.head_scores(a, kinds=("previous_token", "entropy"), per_query=True))


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
        (lambda: _qk(), {"softcap": 0.0}, r"^softcap: expected a finite number > 0 or None, got 0.0"),
        (lambda: _qk(), {"softcap": -2}, r"^softcap: expected a finite number > 0 or None, got -2"),
        (lambda: _qk(), {"softcap": float("nan")}, r"^softcap: expected a finite number > 0"),
        (lambda: _qk(), {"softcap": float("inf")}, r"^softcap: expected a finite number > 0"),
        (lambda: _qk(), {"softcap": 1e300}, r"^softcap: expected a finite number > 0 .*got 1e300"),  # not a float32
        (lambda: _qk(), {"softcap": 1e-300}, r"^softcap: expected a finite number > 0 .*got 1e-300"),  # 0 in float32
        (lambda: _qk(), {"window": 0}, r"^window: expected an integer >= 1, got 0"),
        (lambda: _qk(), {"window": -3}, r"^window: expected an integer >= 1, got -3"),
        (lambda: _qk(), {"window": 3, "causal": False}, r"^window: .*needs causal=True.*got window=3 with causal=False"),
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
    for fn in (inf.attention_patterns, inf.scores_from_qk):
        for softcap in ("50", True, 1j, np.array([1.0, 2.0])):
            with pytest.raises(TypeError, match=r"^softcap: expected a real number > 0 or None"):
                fn(q, k, softcap=softcap)
        for window in (1.5, "3", True, np.float64(4.0), [3]):
            with pytest.raises(TypeError, match=r"^window: expected an integer"):
                fn(q, k, window=window)


def test_exclude_bos_refuses_left_padding():
    q, k = _qk()
    mask = np.ones((2, 6), int)
    mask[1, :2] = 0
    with pytest.raises(ValueError, match=r"^exclude_bos: .*attention_mask.*position 0 is padding in prompt 1 .*pad on the right"):
        inf.scores_from_qk(q, k, exclude_bos=True, attention_mask=mask, kinds="previous_token")
    with pytest.raises(ValueError, match=r"^exclude_bos: .*prompt 0"):
        inf.scores_from_qk(q, k, exclude_bos=True, attention_mask=mask[1], kinds="previous_token")
    right = mask[:, ::-1]
    inf.scores_from_qk(q, k, exclude_bos=True, attention_mask=right, kinds="previous_token")
    inf.attention_patterns(q, k, attention_mask=mask)  # patterns have no exclude_bos: fine
