"""Circuits from weights: TransformerLens parity on the fixture, a direct numpy oracle on random
weights (grouped-query included), the random baseline, and input errors."""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import induct_fast as inf
from induct_fast import circuits

@pytest.fixture(scope="module")
def ref(fixture):
    """The TransformerLens reference arrays (conftest's `fixture`, which skips when absent)."""
    return fixture


def _attn(ref, model):
    return [ref[f"{model}_W_{c}"] for c in "QKVO"]


def _ov(ref, model):
    return [ref[f"{model}_W_{c}"] for c in ("E", "V", "O", "U")]


# ---- slow, obvious oracles: d_model x d_model products -------------------------------------------


def _expand(W, H):
    return np.repeat(W, H // W.shape[1], axis=1)


def oracle_composition(W_Q, W_K, W_V, W_O, mode):
    W_Q, W_K, W_V, W_O = (np.asarray(w, dtype=np.float64) for w in (W_Q, W_K, W_V, W_O))
    L, H = W_Q.shape[:2]
    W_K, W_V = _expand(W_K, H), _expand(W_V, H)
    OV = W_V @ W_O
    QK = W_Q @ np.swapaxes(W_K, -1, -2)
    R = {"Q": QK, "K": np.swapaxes(QK, -1, -2), "V": OV}[mode]
    out = np.zeros((L, H, L, H))
    for la in range(L):
        for a in range(H):
            for lb in range(la + 1, L):
                for b in range(H):
                    num = np.linalg.norm(OV[la, a] @ R[lb, b])
                    out[la, a, lb, b] = num / (np.linalg.norm(OV[la, a]) * np.linalg.norm(R[lb, b]))
    return out


def oracle_full_ov_eigenvalues(W_E, W_V, W_O, W_U):
    """Eigenvalues of the [vocab, vocab] matrix W_E W_V W_O W_U, the d_head largest per head."""
    W_V = _expand(np.asarray(W_V, dtype=np.float64), W_O.shape[1])
    full = W_E @ W_V @ W_O @ W_U
    eig = np.linalg.eigvals(full)
    order = np.argsort(-np.abs(eig), axis=-1)
    return np.take_along_axis(eig, order, axis=-1)[..., : W_O.shape[2]]


def oracle_positional(W_pos, W_Q, W_K):
    L, H, _, d_head = W_Q.shape
    W_K = _expand(W_K, H)
    n = W_pos.shape[0]
    out = np.zeros((L, H))
    for layer in range(L):
        for head in range(H):
            s = (W_pos @ W_Q[layer, head]) @ (W_pos @ W_K[layer, head]).T / np.sqrt(d_head)
            mass = []
            for i in range(1, n):
                row = np.exp(s[i, : i + 1] - s[i, : i + 1].max())
                mass.append(row[i - 1] / row.sum())
            out[layer, head] = np.mean(mass)
    return out


def assert_same_multiset(ours, theirs, rtol, atol=0.0):
    """Every eigenvalue of `theirs` matched to a distinct nearest one of `ours` (greedy)."""
    for o_row, t_row in zip(ours.reshape(-1, ours.shape[-1]), theirs.reshape(-1, theirs.shape[-1])):
        remaining = list(o_row)
        for x in t_row:
            j = int(np.argmin([abs(x - y) for y in remaining]))
            assert abs(x - remaining[j]) <= rtol * abs(x) + atol, (x, remaining[j], t_row)
            remaining.pop(j)


def random_attention(rng, L, H, n_kv, d_model, d_head, dtype=np.float64):
    W_Q = rng.standard_normal((L, H, d_model, d_head)).astype(dtype)
    W_K = rng.standard_normal((L, n_kv, d_model, d_head)).astype(dtype)
    W_V = rng.standard_normal((L, n_kv, d_model, d_head)).astype(dtype)
    W_O = rng.standard_normal((L, H, d_head, d_model)).astype(dtype)
    return W_Q, W_K, W_V, W_O


shapes = st.fixed_dictionaries(
    {
        "L": st.integers(1, 3),
        "n_kv": st.integers(1, 3),
        "group": st.integers(1, 3),
        "d_model": st.integers(1, 20),
        "d_head": st.integers(1, 8),
        "seed": st.integers(0, 2**32 - 1),
        "dtype": st.sampled_from([np.float32, np.float64]),
    }
)


# ---- TransformerLens parity -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_composition_matches_transformer_lens(ref, mode):
    scores = inf.composition_scores(*_attn(ref, "L2"), mode=mode)
    assert scores.shape == (2, 4, 2, 4) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, ref[f"L2_tl_comp_{mode}"], rtol=0, atol=1e-5)


def test_composition_all_modes_in_one_call(ref):
    together = inf.composition_scores(*_attn(ref, "L2"), mode=("Q", "K", "V"))
    assert list(together) == ["Q", "K", "V"]
    for mode, scores in together.items():
        np.testing.assert_array_equal(scores, inf.composition_scores(*_attn(ref, "L2"), mode=mode))


@pytest.mark.parametrize("model", ["L1", "L2"])
def test_ov_eigenvalues_match_transformer_lens(ref, model):
    eig = inf.ov_eigenvalues(*_ov(ref, model))
    assert eig.dtype == np.complex128 and eig.shape == ref[f"{model}_tl_ov_eigs"].shape
    assert_same_multiset(eig, ref[f"{model}_tl_ov_eigs"].astype(np.complex128), rtol=1e-3)


@pytest.mark.parametrize("model", ["L1", "L2"])
def test_copying_scores_match_transformer_lens(ref, model):
    scores = inf.copying_scores(*_ov(ref, model))
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, ref[f"{model}_tl_copying_score"], rtol=0, atol=1e-4)


def test_positional_qk_finds_the_fixture_previous_token_head(ref):
    """The trained L2 model's previous-token head (by TransformerLens's detector) is also the head
    whose positional QK circuit most prefers the previous position."""
    positional = inf.positional_qk_scores(ref["L2_W_pos"], ref["L2_W_Q"], ref["L2_W_K"])
    detected = ref["L2_rep_tl_previous_token_mul_bos0_cur0"].mean(axis=0)
    assert np.unravel_index(positional.argmax(), positional.shape) == np.unravel_index(detected.argmax(), detected.shape)


# ---- numpy oracle on random weights ---------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(shapes, st.sampled_from(["Q", "K", "V"]))
def test_composition_matches_oracle(p, mode):
    rng = np.random.default_rng(p["seed"])
    weights = random_attention(rng, p["L"], p["n_kv"] * p["group"], p["n_kv"], p["d_model"], p["d_head"], p["dtype"])
    expected = oracle_composition(*weights, mode)
    np.testing.assert_allclose(inf.composition_scores(*weights, mode=mode), expected, rtol=1e-9, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(shapes, st.integers(1, 40), st.integers(1, 10**5), st.integers(1, 20))
def test_composition_strips_pieces_and_groups_do_not_change_the_result(p, width, budget, group):
    """Narrow strips and tiny budgets force ragged strips, pieces of a few rows (diagonal blocks
    cut across pieces) and weights converted piece by piece; small groups split the contraction
    into several triangular pieces."""
    rng = np.random.default_rng(p["seed"])
    weights = random_attention(rng, p["L"] + 1, p["n_kv"] * p["group"], p["n_kv"], p["d_model"], p["d_head"], p["dtype"])
    got = circuits._composition(*weights, ("Q", "K", "V"), width=width, budget=budget, group=group)
    for mode in "QKV":
        np.testing.assert_allclose(got[mode], oracle_composition(*weights, mode), rtol=1e-9, atol=1e-7)


def test_composition_plan_stays_within_its_budget_and_converts_whole_when_it_fits():
    N, n_wide = 8 * 16, 8 * (16 + 16 + 4 + 4)  # 9 layers of 16 heads, 4 kv heads; modes Q, K, V
    for budget in (4 << 20, 16 << 20):
        plan = circuits._plan(4, N, n_wide, 1024, 16, circuits._WIDTH, budget)
        used = 4 * N * plan.width * (16 + plan.height) * 8 + n_wide * 16 * (1024 if plan.whole else plan.height) * 8
        assert used <= budget and not plan.whole and plan.height < 1024, plan
    plan = circuits._plan(4, N, n_wide, 1024, 16, circuits._WIDTH, 1 << 30)
    assert plan.whole and plan.height == 1024 and plan.width == 85


def test_composition_many_layers_uses_grouped_contractions():
    rng = np.random.default_rng(3)
    weights = random_attention(rng, 9, 12, 4, 24, 4)
    assert len(circuits._right_groups(8, 12, 96)) > 1
    np.testing.assert_allclose(inf.composition_scores(*weights, mode="K"), oracle_composition(*weights, "K"), atol=1e-7)


def test_composition_layout_and_grouped_query_expansion():
    rng = np.random.default_rng(0)
    W_Q, W_K, W_V, W_O = random_attention(rng, 3, 6, 2, 16, 4)
    scores = inf.composition_scores(W_Q, W_K, W_V, W_O, mode="V")
    layer = np.arange(3)
    later = layer[:, None, None, None] < layer[None, None, :, None]
    assert np.all(scores[~np.broadcast_to(later, scores.shape)] == 0)
    assert np.all(scores[np.broadcast_to(later, scores.shape)] > 0)
    expanded = inf.composition_scores(W_Q, np.repeat(W_K, 3, axis=1), np.repeat(W_V, 3, axis=1), W_O, mode="V")
    np.testing.assert_allclose(scores, expanded, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("exponent", [-300, -120, 0, 120, 300])
def test_composition_is_exact_under_extreme_head_scales(exponent):
    """Scores are scale-free per head; heads far outside float64's comfortable range are scaled by
    powers of two on the fly, so huge, tiny and mixed scales give the unscaled scores."""
    rng = np.random.default_rng(5)
    weights = random_attention(rng, 3, 4, 2, 12, 3)
    expected = {m: oracle_composition(*weights, m) for m in "QKV"}
    scaled = [w.copy() for w in weights]
    for i, w in enumerate(scaled):
        w[:, ::2] *= 2.0**exponent  # every other head (group) of every weight
        w[1, -1] *= 2.0 ** (-exponent // (i + 1))  # and one head the other way
    copies = [w.copy() for w in scaled]
    got = inf.composition_scores(*scaled, mode=("Q", "K", "V"))
    for before, after in zip(copies, scaled):
        np.testing.assert_array_equal(before, after)  # scaled on the fly, never in place
    for m in "QKV":
        np.testing.assert_allclose(got[m], expected[m], rtol=1e-12, atol=1e-15)


def test_composition_of_huge_float32_weights():
    rng = np.random.default_rng(6)
    weights = random_attention(rng, 2, 2, 2, 8, 2)
    big = [(w * 2.0**120).astype(np.float32) for w in weights]
    expected = oracle_composition(*[b.astype(np.float64) / 2.0**120 for b in big], "V")
    np.testing.assert_allclose(inf.composition_scores(*big, mode="V"), expected, rtol=1e-12, atol=1e-15)


def test_composition_of_bfloat16_tensors_is_that_of_their_float32_values():
    """bfloat16 torch tensors are read as they are (their bits widened exactly, a slice at a time),
    not converted whole: the scores are those of the same values in float32, bit for bit."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    weights = [torch.from_numpy(w).to(torch.bfloat16) for w in random_attention(rng, 3, 4, 2, 16, 4, np.float32)]
    weights[3] = weights[3].transpose(2, 3).contiguous().transpose(2, 3)  # a strided tensor too
    got = inf.composition_scores(*weights, mode=("Q", "K", "V"))
    floats = [w.float().numpy() for w in weights]
    pieces = circuits._composition(*weights, ("Q", "K", "V"), width=5, budget=20000)  # rows read piece by piece
    for mode, scores in got.items():
        np.testing.assert_array_equal(scores, inf.composition_scores(*floats, mode=mode))
        np.testing.assert_allclose(pieces[mode], scores, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(scores, oracle_composition(*floats, mode), rtol=1e-9, atol=1e-12)


def test_composition_does_not_depend_on_the_thread_count():
    """Per-head products run one per thread and the contraction in fixed depth chunks (Rust), so
    one thread instead of all changes no bit (BLAS limited too, for anything numpy does)."""
    script = (
        "import sys, numpy as np, induct_fast as inf\n"
        "rng = np.random.default_rng(0)\n"
        "W = [rng.standard_normal(s) for s in [(3, 8, 256, 16), (3, 4, 256, 16), (3, 4, 256, 16), (3, 8, 16, 256)]]\n"
        "s = inf.composition_scores(*W, mode=('Q', 'K', 'V'))\n"
        "sys.stdout.buffer.write(np.stack([s[m] for m in 'QKV']).tobytes())\n"
    )
    import os
    import subprocess
    import sys

    outputs = []
    for threads in ("1", "2"):
        env = dict(os.environ, INDUCT_FAST_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads)
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        outputs.append(np.frombuffer(done.stdout, dtype=np.float64))
    assert outputs[0].size == 3 * (3 * 8) ** 2 and np.array_equal(outputs[0], outputs[1])


def test_composition_matches_transformer_lens_with_grouped_query_attention():
    """A live HookedTransformer with 2 key/value heads for 4 query heads: its own
    all_composition_scores (which expands K and V) against ours on the unexpanded _W_K, _W_V."""
    torch = pytest.importorskip("torch")
    tl = pytest.importorskip("transformer_lens")
    torch.manual_seed(0)
    cfg = tl.HookedTransformerConfig(
        n_layers=3, d_model=32, n_ctx=8, d_head=8, n_heads=4, n_key_value_heads=2, d_vocab=16, attn_only=True,
        device="cpu",
    )
    model = tl.HookedTransformer(cfg)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.2)
    grouped = [torch.stack([getattr(b.attn, name) for b in model.blocks]).detach() for name in ("_W_K", "_W_V")]
    assert grouped[0].shape == (3, 2, 32, 8)
    ours = inf.composition_scores(model.W_Q.detach(), *grouped, model.W_O.detach(), mode=("Q", "K", "V"))
    for mode in "QKV":
        with torch.no_grad():
            theirs = model.all_composition_scores(mode).numpy()
        np.testing.assert_allclose(ours[mode], theirs, rtol=0, atol=1e-5)


def test_one_layer_has_no_composition():
    rng = np.random.default_rng(0)
    assert not inf.composition_scores(*random_attention(rng, 1, 3, 3, 8, 2), mode="Q").any()


def test_zero_head_gives_nan_not_garbage():
    rng = np.random.default_rng(0)
    W_Q, W_K, W_V, W_O = random_attention(rng, 2, 2, 2, 8, 2)
    W_O[0, 1] = 0.0
    scores = inf.composition_scores(W_Q, W_K, W_V, W_O, mode="K")
    assert np.isnan(scores[0, 1, 1]).all() and np.isfinite(scores[0, 0, 1]).all()


@settings(max_examples=30, deadline=None)
@given(shapes, st.integers(0, 12))
def test_ov_eigenvalues_and_copying_match_oracle(p, extra_vocab):
    rng = np.random.default_rng(p["seed"])
    H = p["n_kv"] * p["group"]
    _, _, W_V, W_O = random_attention(rng, p["L"], H, p["n_kv"], p["d_model"], p["d_head"], p["dtype"])
    vocab = p["d_head"] + extra_vocab
    W_E = rng.standard_normal((vocab, p["d_model"])).astype(p["dtype"])
    W_U = rng.standard_normal((p["d_model"], vocab)).astype(p["dtype"])
    eig = inf.ov_eigenvalues(W_E, W_V, W_O, W_U)
    assert eig.shape == (p["L"], H, p["d_head"]) and eig.dtype == np.complex128
    assert np.all(np.diff(np.abs(eig), axis=-1) <= 1e-12 * np.abs(eig).max())  # sorted by |lambda|
    W = [np.asarray(w, dtype=np.float64) for w in (W_E, W_V, W_O, W_U)]
    expected = oracle_full_ov_eigenvalues(*W)
    scale = np.abs(expected).max(axis=-1, keepdims=True)
    for o, t, s in zip(eig.reshape(-1, p["d_head"]), expected.reshape(-1, p["d_head"]), scale.reshape(-1)):
        assert_same_multiset(o[None], t[None], rtol=1e-6, atol=1e-9 * s)
    trace = np.trace(W[0] @ _expand(W[1], H) @ W[2] @ W[3], axis1=-2, axis2=-1)
    copying = inf.copying_scores(W_E, W_V, W_O, W_U)
    np.testing.assert_allclose(copying, trace / np.abs(expected).sum(axis=-1), rtol=1e-6, atol=1e-9)


def test_tied_embeddings_take_the_symmetric_product():
    rng = np.random.default_rng(1)
    W_E = rng.standard_normal((50, 12))
    W_U = W_E.T.copy()
    assert circuits._is_transpose(W_U, W_E)
    W_U2 = W_U.copy()
    W_U2[3, 7] += 1e-9
    assert not circuits._is_transpose(W_U2, W_E)
    np.testing.assert_allclose(circuits._unembed_embed(W_U, W_E), W_U @ W_E, rtol=1e-12)


def test_copying_is_one_for_a_pure_copier_and_minus_one_for_a_suppressor():
    d, vocab = 6, 5
    W_E = np.eye(vocab, d)
    W_U = np.eye(d, vocab)
    W_V = np.zeros((1, 2, d, 3))
    W_O = np.zeros((1, 2, 3, d))
    W_V[0, :, :3, :3] = np.eye(3)
    W_O[0, 0, :3, :3] = 2 * np.eye(3)
    W_O[0, 1, :3, :3] = -np.eye(3)
    np.testing.assert_allclose(inf.copying_scores(W_E, W_V, W_O, W_U), [[1.0, -1.0]])


@settings(max_examples=20, deadline=None)
@given(shapes, st.integers(2, 9))
def test_positional_qk_matches_oracle(p, n_ctx):
    rng = np.random.default_rng(p["seed"])
    W_Q, W_K, _, _ = random_attention(rng, p["L"], p["n_kv"] * p["group"], p["n_kv"], p["d_model"], p["d_head"])
    W_pos = rng.standard_normal((n_ctx, p["d_model"]))
    expected = oracle_positional(W_pos, W_Q, W_K)
    np.testing.assert_allclose(inf.positional_qk_scores(W_pos, W_Q, W_K), expected, rtol=1e-9, atol=1e-12)


def test_positional_qk_of_a_built_previous_position_head():
    n, d_head = 8, 8
    W_pos = np.eye(n)
    W_Q = np.zeros((1, 2, n, d_head))
    W_K = np.zeros((1, 2, n, d_head))
    W_Q[0, 0, np.arange(1, n), np.arange(1, n)] = 40.0  # query i matches key i-1
    W_K[0, 0, np.arange(n - 1), np.arange(1, n)] = 1.0
    scores = inf.positional_qk_scores(W_pos, W_Q, W_K)
    assert scores[0, 0] > 0.99
    np.testing.assert_allclose(scores[0, 1], np.mean(1 / (np.arange(1, n) + 1)))  # blind head: uniform
    assert inf.positional_qk_scores(W_pos, W_Q, W_K, n_positions=4).shape == (1, 2)


# ---- random baseline ------------------------------------------------------------------------------


def gaussian_composition_samples(d_model, d_head, n, rng):
    """Oracle: scores of n random pairs built from full Gaussian matrices."""
    W_V, A, B = (rng.standard_normal((n, d_model, d_head)) for _ in range(3))
    W_O = rng.standard_normal((n, d_head, d_model))
    OV = W_V @ W_O
    R = A @ np.swapaxes(B, 1, 2)
    fro2 = lambda x: (x**2).sum(axis=(1, 2))  # noqa: E731
    return np.sqrt(fro2(OV @ R) / (fro2(OV) * fro2(R)))


@pytest.mark.parametrize("d_model,d_head", [(24, 6), (40, 4), (12, 12), (6, 9), (3, 1), (1, 4)])
def test_baseline_samplers_agree_with_gaussian_matrices(d_model, d_head):
    """The k x k samplers against full Gaussian matrices, and E[score^2] = 1/d_model exactly
    (by rotation invariance: E over a Haar O of ||X O R||^2 = ||X||^2 ||R||^2 / d_model)."""
    n = 3000
    sampler = circuits._square_samples if d_model <= d_head else circuits._baseline_samples
    exact = sampler(d_model, d_head, n, np.random.default_rng(1))
    direct = gaussian_composition_samples(d_model, d_head, n, np.random.default_rng(2))
    for sample in (exact, direct):
        se = (sample**2).std() / np.sqrt(n)
        assert abs((sample**2).mean() - 1 / d_model) < 5 * se + 1e-6
    se = np.hypot(exact.std(), direct.std()) / np.sqrt(n)
    assert abs(exact.mean() - direct.mean()) < 5 * se + 1e-6
    assert abs(exact.std() - direct.std()) < 0.1 * direct.std() + 1e-6  # float32 sampling


def test_baseline_is_chance_for_random_heads():
    rng = np.random.default_rng(0)
    weights = random_attention(rng, 2, 16, 16, 64, 8)
    scores = inf.composition_scores(*weights, mode="K")[0, :, 1, :]
    base = inf.composition_baseline(64, 8, n=2000, seed=0)
    assert isinstance(base, inf.CompositionBaseline) and base.n == 2000 and (base.d_model, base.d_head) == (64, 8)
    assert abs(scores.mean() - base.mean) < 4 * base.std / np.sqrt(16)  # 16 independent left heads
    assert abs(scores.std() - base.std) < 0.35 * base.std
    assert abs(base.mean - 1 / np.sqrt(64)) < 0.01
    assert np.isclose(base.zscore(base.mean + 2 * base.std), 2.0)


def test_baseline_is_reproducible_and_cheap_at_gpt2_size():
    a = inf.composition_baseline(768, 64, n=100, seed=7)
    assert a == inf.composition_baseline(768, 64, n=100, seed=7)
    assert abs(a.mean - 768**-0.5) < 3e-3 and 0 < a.std < 3e-3
    single_head = inf.composition_baseline(256, 256, n=20, seed=0)  # d_model <= d_head path
    assert abs(single_head.mean - 256**-0.5) < 3e-3


@pytest.mark.parametrize(
    "bad, error",
    [({"d_model": 0}, ValueError), ({"d_head": -1}, ValueError), ({"n": 0}, ValueError), ({"d_model": 2.5}, TypeError), ({"d_head": True}, TypeError)],
)
def test_baseline_rejects_bad_sizes(bad, error):
    kwargs = {"d_model": 16, "d_head": 4, "n": 10, **bad}
    name = next(iter(bad))
    with pytest.raises(error, match=name):
        inf.composition_baseline(kwargs.pop("d_model"), kwargs.pop("d_head"), **kwargs)


# ---- errors ---------------------------------------------------------------------------------------


@pytest.fixture
def small():
    return random_attention(np.random.default_rng(0), 2, 4, 2, 8, 2)


@pytest.mark.parametrize(
    "index,shape,name",
    [
        (0, (2, 4, 8), "W_Q"),
        (1, (3, 2, 8, 2), "W_K"),
        (1, (2, 3, 8, 2), "W_K"),
        (2, (2, 2, 9, 2), "W_V"),
        (3, (2, 4, 2, 9), "W_O"),
        (3, (2, 5, 2, 8), "W_O"),
    ],
)
def test_composition_shape_errors_name_the_argument(small, index, shape, name):
    weights = list(small)
    weights[index] = np.zeros(shape)
    with pytest.raises(ValueError, match=name) as info:
        inf.composition_scores(*weights)
    assert str(shape).replace(" ", "") in str(info.value).replace(" ", "")


@pytest.mark.parametrize("mode", ["X", "", ("K", "O"), (), 3])
def test_unknown_mode(small, mode):
    with pytest.raises(ValueError, match="mode"):
        inf.composition_scores(*small, mode=mode)


def test_lowercase_mode_is_accepted(small):
    np.testing.assert_array_equal(inf.composition_scores(*small, mode="q"), inf.composition_scores(*small, mode="Q"))


@pytest.mark.parametrize("bad", [np.ones((2, 4, 8, 2), dtype=np.int64), np.ones((2, 4, 8, 2), dtype=complex), None, "W"])
def test_non_float_weights_raise_type_error(small, bad):
    with pytest.raises(TypeError, match="W_Q"):
        inf.composition_scores(bad, *small[1:])


def test_nan_weights_raise(small):
    W_V = small[2].copy()
    W_V[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="W_V"):
        inf.composition_scores(small[0], small[1], W_V, small[3])


def test_inputs_are_not_written(small):
    copies = [w.copy() for w in small]
    inf.composition_scores(*small, mode=("Q", "K", "V"))
    for before, after in zip(copies, small):
        np.testing.assert_array_equal(before, after)


def test_ov_shape_errors_name_the_argument(small):
    _, _, W_V, W_O = small
    W_E, W_U = np.ones((10, 8)), np.ones((8, 10))
    with pytest.raises(ValueError, match="W_E"):
        inf.ov_eigenvalues(np.ones((10, 7)), W_V, W_O, W_U)
    with pytest.raises(ValueError, match="W_U"):
        inf.ov_eigenvalues(W_E, W_V, W_O, np.ones((8, 11)))
    with pytest.raises(ValueError, match="W_V"):
        inf.copying_scores(W_E, W_V[:1], W_O, W_U)
    with pytest.raises(TypeError, match="W_U"):
        inf.copying_scores(W_E, W_V, W_O, W_U.astype(np.int32))


def test_positional_errors_name_the_argument(small):
    W_Q, W_K = small[:2]
    with pytest.raises(ValueError, match="W_pos"):
        inf.positional_qk_scores(np.ones((5, 7)), W_Q, W_K)
    with pytest.raises(ValueError, match="n_positions"):
        inf.positional_qk_scores(np.ones((5, 8)), W_Q, W_K, n_positions=6)
    with pytest.raises(TypeError, match="n_positions"):
        inf.positional_qk_scores(np.ones((5, 8)), W_Q, W_K, n_positions=2.5)
