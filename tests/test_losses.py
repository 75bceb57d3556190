"""token_losses against a float64 numpy log-softmax oracle, and icl_score (Olsson et al. 2022)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import induct_fast as inf
from helpers import FLOAT_DTYPES, INT_DTYPES, FakeTensor, layouts, strided_view


def oracle_losses(logits, tokens) -> np.ndarray:
    """-log_softmax(logits[..., :-1, :]) at tokens[..., 1:], in float64, the obvious way."""
    x = np.asarray(logits, dtype=np.float64)[..., :-1, :]
    m = x.max(axis=-1, keepdims=True)
    log_probs = x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))
    targets = np.asarray(tokens, dtype=np.int64)[..., 1:]
    return -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def random_case(rng, batch, n, vocab, dtype=np.float64, scale=3.0):
    logits = (rng.standard_normal((batch, n, vocab)) * scale).astype(dtype)
    tokens = rng.integers(0, vocab, size=(batch, n))
    return logits, tokens


def test_uniform_logits_give_log_vocab():
    losses = inf.token_losses(np.zeros((2, 4, 7), dtype=np.float32), np.zeros((2, 4), dtype=np.int32))
    assert losses.shape == (2, 3) and losses.dtype == np.float64
    np.testing.assert_allclose(losses, np.log(7.0), rtol=1e-15)


@pytest.mark.parametrize("vocab", [1, 2, 1023, 1024, 1025, 2049, 5000])
def test_chunk_boundaries_of_the_vocabulary(vocab):
    rng = np.random.default_rng(vocab)
    logits, tokens = random_case(rng, 2, 5, vocab)
    logits[1, 2, vocab // 2] = 40.0  # a dominant logit in a later chunk
    np.testing.assert_allclose(inf.token_losses(logits, tokens), oracle_losses(logits, tokens), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("vocab", [15, 16, 17, 2047, 2048, 2049, 3 * 2048 + 37, 50257])
def test_f32_lane_kernel_is_within_1e_14_of_the_oracle(vocab, dtype):
    """float32/float16 rows take the f32-lane kernel (2048-value chunks, 16-value steps): tighter
    than the other tests' 1e-12, across chunk and step boundaries, with the max in a late chunk."""
    rng = np.random.default_rng(vocab)
    logits, tokens = random_case(rng, 2, 4, vocab, dtype)
    logits[0, 1, -1] = 20.0  # the max in the last chunk: the running max rises late
    logits[1, 0, vocab // 3] = -60000.0  # far below the max (finite in float16 too)
    np.testing.assert_allclose(inf.token_losses(logits, tokens), oracle_losses(logits, tokens), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logit_in_a_late_chunk_is_named(bad):
    logits = np.zeros((1, 3, 5000), dtype=np.float32)
    logits[0, 1, 4097] = bad
    with pytest.raises(ValueError, match=r"logits: expected finite values, got .* at index \(0, 1, 4097\)"):
        inf.token_losses(logits, np.zeros((1, 3), dtype=int))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtypes_read_in_place(dtype):
    rng = np.random.default_rng(1)
    logits, tokens = random_case(rng, 3, 6, 300, dtype)
    before = logits.copy()
    got = inf.token_losses(logits, tokens)
    np.testing.assert_allclose(got, oracle_losses(logits, tokens), rtol=1e-12, atol=1e-12)
    assert np.array_equal(logits, before)


def test_unbatched_logits():
    rng = np.random.default_rng(2)
    logits, tokens = random_case(rng, 1, 9, 40)
    got = inf.token_losses(logits[0], tokens[0])
    assert got.shape == (8,)
    np.testing.assert_array_equal(got, inf.token_losses(logits, tokens)[0])


def test_single_position_has_no_losses():
    assert inf.token_losses(np.zeros((3, 1, 5)), np.zeros((3, 1), dtype=int)).shape == (3, 0)


def test_extreme_magnitudes_are_stable():
    rng = np.random.default_rng(3)
    logits, tokens = random_case(rng, 2, 4, 500, np.float32, scale=1e4)
    logits[0, 0, :] = -3e38  # very negative but finite everywhere
    logits[0, 0, 7] = 3e38
    got = inf.token_losses(logits, tokens)
    assert np.isfinite(got[1]).all()
    np.testing.assert_allclose(got, oracle_losses(logits, tokens), rtol=1e-12)


def test_last_position_logits_are_not_read():
    rng = np.random.default_rng(4)
    logits, tokens = random_case(rng, 2, 4, 30)
    logits[:, -1, :] = np.nan
    np.testing.assert_allclose(inf.token_losses(logits, tokens), oracle_losses(logits[:, :, :], tokens), rtol=1e-12)


def test_results_do_not_depend_on_threads():
    rng = np.random.default_rng(5)
    logits, tokens = random_case(rng, 2, 64, 3000, np.float32)
    before = inf.get_num_threads()
    try:
        inf.set_num_threads(1)
        one = inf.token_losses(logits, tokens)
        inf.set_num_threads(2)
        two = inf.token_losses(logits, tokens)
    finally:
        inf.set_num_threads(before)
    assert one.tobytes() == two.tobytes()


def test_torch_like_tensors_are_accepted():
    rng = np.random.default_rng(6)
    logits, tokens = random_case(rng, 2, 5, 20, np.float32)
    got = inf.token_losses(FakeTensor(logits), FakeTensor(tokens))
    np.testing.assert_array_equal(got, inf.token_losses(logits, tokens))
    with pytest.raises(ValueError, match=r"logits: .*cuda.*\.cpu\(\)"):
        inf.token_losses(FakeTensor(logits, device="cuda:0"), tokens)


@settings(max_examples=120)
@given(
    batch=st.integers(1, 3),
    n=st.integers(1, 6),
    vocab=st.one_of(st.integers(1, 40), st.integers(1000, 1100)),
    dtype=st.sampled_from(FLOAT_DTYPES),
    token_dtype=st.sampled_from(INT_DTYPES),
    layout=layouts(3),
    seed=st.integers(0, 2**32 - 1),
    batched=st.booleans(),
)
def test_matches_oracle_for_any_shape_dtype_and_strides(batch, n, vocab, dtype, token_dtype, layout, seed, batched):
    rng = np.random.default_rng(seed)
    logits, tokens = random_case(rng, batch, n, vocab, dtype)
    if np.iinfo(token_dtype).max >= vocab - 1:  # ids must fit the dtype
        tokens = tokens.astype(token_dtype)
    steps, perm, readonly = layout
    view = strided_view(logits, steps, perm, readonly=readonly)
    if not batched:
        view, tokens = view[0], tokens[0]
    got = inf.token_losses(view, tokens)
    want = oracle_losses(view, tokens)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_are_named(bad):
    logits = np.zeros((2, 3, 5), dtype=np.float32)
    logits[1, 0, 3] = bad
    with pytest.raises(ValueError, match=r"logits: expected finite values, got .* at index \(1, 0, 3\)"):
        inf.token_losses(logits, np.zeros((2, 3), dtype=int))


@pytest.mark.parametrize("value", [-1, 5, 2**40])
def test_token_ids_out_of_range(value):
    tokens = np.zeros((2, 3), dtype=np.int64)
    tokens[1, 2] = value
    with pytest.raises(ValueError, match=rf"tokens: expected token ids in \[0, 5\).*got {value} at index \(1, 2\)"):
        inf.token_losses(np.zeros((2, 3, 5)), tokens)


@pytest.mark.parametrize(
    "logits_shape, tokens_shape, name",
    [
        ((2, 3, 5), (2, 4), "tokens"),
        ((2, 3, 5), (3,), "tokens"),
        ((3, 5), (2, 3), "tokens"),
        ((5,), (5,), "logits"),
        ((1, 2, 3, 5), (1, 2, 3), "logits"),
        ((2, 3, 0), (2, 3), "logits"),
    ],
)
def test_shape_errors_name_the_argument(logits_shape, tokens_shape, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        inf.token_losses(np.zeros(logits_shape), np.zeros(tokens_shape, dtype=int))


def test_type_errors():
    with pytest.raises(TypeError, match="logits"):
        inf.token_losses(np.zeros((2, 3, 5), dtype=complex), np.zeros((2, 3), dtype=int))
    with pytest.raises(TypeError, match="tokens"):
        inf.token_losses(np.zeros((2, 3, 5)), np.zeros((2, 3)))


# -- icl_score ---------------------------------------------------------------------------------


def test_icl_score_is_late_minus_early_averaged_over_the_batch():
    losses = np.zeros((3, 600))
    losses[:, 50] = [4.0, 5.0, 6.0]
    losses[:, 500] = [1.0, 2.0, 6.0]
    assert inf.icl_score(losses) == pytest.approx(3.0 - 5.0)
    assert inf.icl_score(losses, early=1, late=2) == 0.0
    assert inf.icl_score(losses[0]) == pytest.approx(-3.0)  # one sequence


def test_icl_score_from_token_losses():
    rng = np.random.default_rng(7)
    logits, tokens = random_case(rng, 2, 12, 9)
    losses = inf.token_losses(logits, tokens)
    assert inf.icl_score(losses, early=2, late=10) == pytest.approx(losses[:, 10].mean() - losses[:, 2].mean())


@pytest.mark.parametrize(
    "shape, kwargs, message",
    [
        ((2, 500), {}, r"losses: expected at least late \+ 1 = 501 positions .*502 tokens.*\(2, 500\)"),
        ((2, 20), {"early": 5, "late": 5}, r"early < late"),
        ((2, 20), {"early": 7, "late": 3}, r"early < late"),
        ((2, 20), {"early": -1, "late": 3}, r"early: expected an integer >= 0"),
        ((0, 20), {"early": 1, "late": 3}, r"at least one sequence"),
        ((), {"early": 1, "late": 3}, r"scalar"),
    ],
)
def test_icl_score_errors(shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        inf.icl_score(np.zeros(shape), **kwargs)
