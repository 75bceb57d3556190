"""Circuits from weights (DESIGN.md section 6): composition scores, OV eigenvalues, copying.

Weights are in TransformerLens layout::

    W_Q, W_K, W_V : [L, H, d_model, d_head]   (W_K, W_V may have H_kv | H heads: grouped-query)
    W_O           : [L, H, d_head, d_model]
    W_E           : [vocab, d_model]
    W_U           : [d_model, vocab]
    W_pos         : [n_ctx, d_model]

with the residual stream as a row vector, so W_OV = W_V W_O and W_QK = W_Q W_K^T are
[d_model, d_model] matrices of rank d_head. Grouped-query weights are expanded the way
TransformerLens does: key/value head g serves query heads g*r .. g*r + r - 1, r = H / H_kv.

Everything is computed in float64 through d_head-sized factors; no [d_model, d_model] matrix is
ever formed per head or per pair of heads (see :func:`composition_scores` for how). This is dense
linear algebra, so numpy's BLAS/LAPACK does the work; there is no Rust kernel here.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union, overload

import numpy as np

from ._arrays import as_count, as_float_array, as_scale, as_seed

MODES = ("Q", "K", "V")

# Memory for the packed Gram slabs of composition_scores (left + right heads together).
_SLAB_BYTES = 256 * 2**20
# Width of one block row of a packed Gram matrix; 64 keeps every GEMM BLAS-sized.
_BLOCK = 64
# Right heads per contraction GEMM: fewer waste pairs below the diagonal, more starve the GEMM.
_GROUP = 48

ModeArg = Union[str, Sequence[str]]


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _weights(x: Any, name: str, ndim: int, layout: str) -> np.ndarray:
    """`x` as a float64 array of `ndim` axes; TypeError unless it is a real float array."""
    arr = as_float_array(x, name, integers=False).astype(np.float64, copy=False)
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} axes {layout}, got shape {arr.shape}")
    if 0 in arr.shape:
        raise ValueError(f"{name}: expected non-empty axes {layout}, got shape {arr.shape}")
    # A sum is finite iff every entry is (barring overflow, which the exact check then clears).
    if not np.isfinite(arr.sum()) and not np.isfinite(arr).all():
        raise ValueError(f"{name}: expected finite values, got NaN or inf")
    return arr


def _require(cond: bool, name: str, expected: str, got: Any) -> None:
    if not cond:
        raise ValueError(f"{name}: expected {expected}, got {got}")


def _attention_weights(W_Q: Any, W_K: Any, W_V: Any, W_O: Any) -> Tuple[np.ndarray, ...]:
    """The four attention weights as float64, with every L / H / d_model / d_head agreement checked."""
    W_Q = _weights(W_Q, "W_Q", 4, "[L, H, d_model, d_head]")
    L, H, d_model, d_head = W_Q.shape
    W_O = _weights(W_O, "W_O", 4, "[L, H, d_head, d_model]")
    _require(W_O.shape == (L, H, d_head, d_model), "W_O", f"shape {(L, H, d_head, d_model)} (from W_Q)", W_O.shape)
    W_K = _kv_weights(W_K, "W_K", L, H, d_model, d_head)
    W_V = _kv_weights(W_V, "W_V", L, H, d_model, d_head)
    return W_Q, W_K, W_V, W_O


def _unit_heads(W: np.ndarray) -> np.ndarray:
    """W with each head's matrix scaled by a power of two to a largest |entry| in [0.5, 1), when
    some head's entries are large or small enough for Gram products to overflow or underflow.

    Composition scores do not change when any head's weights are scaled, and powers of two
    scale exactly, so this changes no score; ordinary weights are returned as they are (no pass
    over them but the max and min). All-zero heads are left alone.
    """
    peak = np.maximum(W.max(axis=(-2, -1), keepdims=True), -W.min(axis=(-2, -1), keepdims=True))
    if ((peak == 0) | ((peak > 1e-60) & (peak < 1e60))).all():
        return W
    _, exponent = np.frexp(peak)
    result: np.ndarray = np.ldexp(W, np.where(peak > 0, -exponent, 0))
    return result


def _kv_weights(x: Any, name: str, L: int, H: int, d_model: int, d_head: int) -> np.ndarray:
    """A key or value weight [L, H_kv, d_model, d_head] with H_kv dividing H (grouped-query)."""
    x = _weights(x, name, 4, "[L, H_kv, d_model, d_head]")
    n_kv = x.shape[1]
    ok = x.shape[0] == L and x.shape[2:] == (d_model, d_head) and H % n_kv == 0
    _require(ok, name, f"shape ({L}, H_kv, {d_model}, {d_head}) with H_kv dividing H={H} (from W_Q)", x.shape)
    result: np.ndarray = x
    return result


def _value_output(W_V: Any, W_O: Any) -> Tuple[np.ndarray, np.ndarray]:
    """W_V [L, H_kv, d_model, d_head] and W_O [L, H, d_head, d_model], checked against each other."""
    W_O = _weights(W_O, "W_O", 4, "[L, H, d_head, d_model]")
    L, H, d_head, d_model = W_O.shape
    return _kv_weights(W_V, "W_V", L, H, d_model, d_head), W_O


def _parse_modes(mode: ModeArg) -> Tuple[str, ...]:
    if isinstance(mode, str):
        names: Tuple[Any, ...] = (mode,)
    elif isinstance(mode, (list, tuple)):
        names = tuple(mode)
    else:
        raise ValueError(f"mode: expected one of {MODES} or a sequence of them, got {mode!r}")
    if not names:
        raise ValueError(f"mode: expected one of {MODES} or a sequence of them, got an empty sequence")
    for m in names:
        if not isinstance(m, str) or m.upper() not in MODES:
            raise ValueError(f"mode: expected one of {MODES} (or a sequence of them), got {m!r}")
    return tuple(dict.fromkeys(m.upper() for m in names))


# --------------------------------------------------------------------------------------------
# Composition scores
# --------------------------------------------------------------------------------------------


def _per_head(x: np.ndarray, n_heads: int) -> np.ndarray:
    """Grouped-query expansion along axis 1: group g serves heads g*r .. g*r + r - 1."""
    r = n_heads // x.shape[1]
    return x if r == 1 else np.repeat(x, r, axis=1)


def _gram(W: np.ndarray) -> np.ndarray:
    """W^T W over the last two axes: [..., m, d] -> [..., d, d] (BLAS syrk per matrix)."""
    result: np.ndarray = np.matmul(np.swapaxes(W, -1, -2), W)
    return result


def _gram_operands(A: np.ndarray, M: np.ndarray, n_heads: int) -> Tuple[np.ndarray, np.ndarray]:
    """Thin operands (T, X), each [N, d_head, d_model], of the PSD matrices A_h M_h A_h^T.

    A_h M_h A_h^T = T_h^T X_h with T_h = M_h A_h^T and X_h = A_h^T (M symmetric), so any block
    of the d_model x d_model matrix costs one small GEMM and the matrix itself is never stored.
    """
    A = _per_head(A, n_heads)
    M = _per_head(M, n_heads)
    X = np.swapaxes(A, -1, -2)
    T = np.matmul(M, X)
    d_head, d_model = X.shape[-2:]
    return T.reshape(-1, d_head, d_model), X.reshape(-1, d_head, d_model)


def _factors(mode: str, W_Q: np.ndarray, W_K: np.ndarray, W_V: np.ndarray, W_O: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(A, B) with R = A B^T: W_QK = W_Q W_K^T (Q), W_QK^T = W_K W_Q^T (K), W_OV = W_V W_O (V)."""
    if mode == "Q":
        return W_Q, W_K
    if mode == "K":
        return W_K, W_Q
    return W_V, np.swapaxes(W_O, -1, -2)


def _left_operands(W_V: np.ndarray, W_O: np.ndarray, n_heads: int) -> Tuple[np.ndarray, np.ndarray]:
    """Operands of G_a = W_OV^T W_OV = W_O^T (W_V^T W_V) W_O (what a right factor sees of head a)."""
    return _gram_operands(np.swapaxes(W_O, -1, -2), _gram(W_V), n_heads)


def _right_operands(A: np.ndarray, B: np.ndarray, n_heads: int) -> Tuple[np.ndarray, np.ndarray]:
    """Operands of K_b = R R^T = A (B^T B) A^T for R = A B^T."""
    return _gram_operands(A, _gram(B), n_heads)


def _squared_norms(operands: Tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """||R||_F^2 = tr(T^T X) = sum(T * X) per head."""
    T, X = operands
    result: np.ndarray = np.einsum("nij,nij->n", T, X)
    return result


def _block_rows(d_model: int, width: int) -> list[tuple[int, int]]:
    """Block rows (start, stop) of the upper triangle of a d_model x d_model matrix."""
    return [(s, min(s + width, d_model)) for s in range(0, d_model, width)]


def _row_length(row: Tuple[int, int], d_model: int) -> int:
    s, e = row
    return (e - s) * (d_model - s)


def _slabs(rows: list[tuple[int, int]], d_model: int, bytes_per_column: int, budget: int) -> list[list[tuple[int, int]]]:
    """Consecutive block rows grouped so that each slab's buffers stay within `budget` bytes
    (at least one row per slab)."""
    slabs: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    size = 0
    for row in rows:
        n = _row_length(row, d_model) * bytes_per_column
        if current and size + n > budget:
            slabs.append(current)
            current, size = [], 0
        current.append(row)
        size += n
    slabs.append(current)
    return slabs


def _packed_gram(
    operands: Tuple[np.ndarray, np.ndarray], slab: list[tuple[int, int]], out: np.ndarray, halve_diagonal: bool
) -> np.ndarray:
    """Block rows [s:e, s:] of every head's T^T X, packed side by side: [N, sum of row lengths].

    For symmetric G and K, tr(G K) = 2 (sum_I <G_II, K_II> / 2 + sum_{I<J} <G_IJ, K_IJ>), so the
    upper block triangle suffices: `halve_diagonal` on one side makes a plain dot product of
    packed rows give tr(G K) / 2 (halving the small diagonal blocks is cheaper than doubling
    the rest).
    """
    T, X = operands
    n_heads, _, d_model = T.shape
    offset = 0
    for s, e in slab:
        length = _row_length((s, e), d_model)
        view = out[:, offset : offset + length].reshape(n_heads, e - s, d_model - s)
        np.matmul(np.swapaxes(T[:, :, s:e], 1, 2), X[:, :, s:], out=view)
        if halve_diagonal:
            view[:, :, : e - s] *= 0.5
        offset += length
    return out[:, :offset]


def _right_groups(n_right_layers: int, n_heads: int, n_left: int, per_group: int = _GROUP) -> list[tuple[slice, int]]:
    """(right rows, left rows needed) per group of right layers, triangular blocking.

    Right layer j (absolute layer j + 1) pairs with left layers 0..j only, so a group of right
    layers [j0, j1) needs the first j1 * H left heads; a few groups cut most of the wasted pairs
    while every GEMM stays large.
    """
    n_groups = max(1, min(n_right_layers, round(n_right_layers * n_heads / per_group)))
    bounds = np.linspace(0, n_right_layers, n_groups + 1).round().astype(int)
    groups: list[tuple[slice, int]] = []
    for j0, j1 in zip(bounds[:-1], bounds[1:]):
        if j1 > j0:
            groups.append((slice(j0 * n_heads, j1 * n_heads), min(j1 * n_heads, n_left)))
    return groups


def _pair_traces(
    left: Tuple[np.ndarray, np.ndarray],
    rights: Dict[str, Tuple[np.ndarray, np.ndarray]],
    n_heads: int,
    block: int,
    budget: int,
    group: int,
) -> Dict[str, np.ndarray]:
    """tr(G_a K_b) for every left head a and right head b: [N_left, N_right] per mode (entries
    with layer(a) >= layer(b) are partial or zero; the caller masks them).

    Streams over slabs of packed Gram rows: building a slab costs one small GEMM per head and
    block row, contracting it one large GEMM per group of right layers, and the left slab is
    shared by every mode.
    """
    n_left, _, d_model = left[0].shape
    n_right = next(iter(rights.values()))[0].shape[0]
    width = max(8, min(block, budget // max(1, (n_left + n_right) * d_model * 8)))
    slabs = _slabs(_block_rows(d_model, width), d_model, (n_left + n_right) * 8, budget)
    longest = max(sum(_row_length(r, d_model) for r in slab) for slab in slabs)
    g_buffer = np.empty((n_left, longest))
    k_buffer = np.empty((n_right, longest))
    groups = _right_groups(n_right // n_heads, n_heads, n_left, group)
    traces = {m: np.zeros((n_left, n_right)) for m in rights}
    for slab in slabs:
        G = _packed_gram(left, slab, g_buffer, halve_diagonal=True)
        for mode, operands in rights.items():
            K = _packed_gram(operands, slab, k_buffer, halve_diagonal=False)
            for right_rows, n_needed in groups:
                traces[mode][:n_needed, right_rows] += G[:n_needed] @ K[right_rows].T
    for values in traces.values():
        values *= 2.0
    return traces


def _composition(
    W_Q: np.ndarray,
    W_K: np.ndarray,
    W_V: np.ndarray,
    W_O: np.ndarray,
    modes: Tuple[str, ...],
    *,
    block: int = _BLOCK,
    budget: int = _SLAB_BYTES,
    group: int = _GROUP,
) -> Dict[str, np.ndarray]:
    """Composition scores [L, H, L, H] per mode from checked float64 weights."""
    L, H = W_Q.shape[:2]
    scores = {m: np.zeros((L, H, L, H)) for m in modes}
    if L < 2:
        return scores
    # Left heads live in layers 0..L-2, right heads in layers 1..L-1; nothing else can compose.
    left = _left_operands(W_V[:-1], W_O[:-1], H)
    later = (W_Q[1:], W_K[1:], W_V[1:], W_O[1:])
    rights = {m: _right_operands(*_factors(m, *later), H) for m in modes}
    traces = _pair_traces(left, rights, H, block, budget, group)
    left_sq = _squared_norms(left)
    mask = np.arange(L - 1)[:, None, None, None] < np.arange(1, L)[None, None, :, None]
    for mode, operands in rights.items():
        right_sq = _squared_norms(operands)
        with np.errstate(invalid="ignore", divide="ignore"):  # a zero head gives NaN, like 0/0
            ratio = np.maximum(traces[mode], 0.0) / (left_sq[:, None] * right_sq[None, :])
        pairs = np.sqrt(ratio).reshape(L - 1, H, L - 1, H)
        scores[mode][:-1, :, 1:, :] = np.where(mask, pairs, 0.0)
    return scores


@overload
def composition_scores(W_Q: Any, W_K: Any, W_V: Any, W_O: Any, *, mode: str = "K") -> np.ndarray: ...
@overload
def composition_scores(W_Q: Any, W_K: Any, W_V: Any, W_O: Any, *, mode: Union[Tuple[str, ...], List[str]]) -> Dict[str, np.ndarray]: ...
def composition_scores(
    W_Q: Any, W_K: Any, W_V: Any, W_O: Any, *, mode: ModeArg = "K"
) -> Union[np.ndarray, Dict[str, np.ndarray]]:
    """Q-, K- or V-composition scores of every pair of heads, as TransformerLens computes them.

    Parameters
    ----------
    W_Q : array_like, shape (L, H, d_model, d_head)
    W_K, W_V : array_like, shape (L, H_kv, d_model, d_head)
        H_kv must divide H (grouped-query attention: kv head g serves query heads g*r..g*r+r-1).
    W_O : array_like, shape (L, H, d_head, d_model)
        Real float arrays (float16/32/64 numpy arrays or CPU torch tensors).
    mode : {"Q", "K", "V"} or sequence of them
        Which input of the right head reads the left head's output.

    Returns
    -------
    ndarray of float64, shape (L, H, L, H)
        ``scores[la, a, lb, b]`` for left head (la, a) and right head (lb, b)::

            ||W_OV(a) R(b)||_F / (||W_OV(a)||_F ||R(b)||_F)

        with W_OV = W_V W_O, W_QK = W_Q W_K^T and R = W_QK (Q), W_QK^T (K), W_OV (V); zero unless
        la < lb; NaN for a pair involving an all-zero circuit. With a sequence of modes, a dict
        mode -> array (the left-hand work is shared).

    Notes
    -----
    This is TransformerLens's ``HookedTransformer.all_composition_scores(mode)`` (left = ``OV``,
    right = ``QK``, ``QK.T`` or ``OV``). Writing R = A B^T (A = W_Q, B = W_K for Q; swapped for K;
    A = W_V, B = W_O^T for V)::

        ||W_OV(a) R(b)||_F^2 = tr(G_a K_b),  G_a = W_O^T (W_V^T W_V) W_O,  K_b = A (B^T B) A^T

    G and K are symmetric, so only their upper block triangles are formed, a few block rows at a
    time for all heads at once (each block row is one small GEMM per head from d_head-wide
    factors), and the traces of every pair are one large GEMM per slab and group of layers.
    Per pair this costs about d_model^2 / 2 multiply-adds instead of d_head^2 d_model for the
    collapsed-SVD product TransformerLens forms; no SVD is needed. Extra memory: about 256 MB of
    packed slabs, plus d_head x d_model operands per head and mode (the size of the weights).

    Examples
    --------
    >>> import numpy as np, induct_fast as ift
    >>> rng = np.random.default_rng(0)
    >>> W_Q, W_K, W_V = (rng.normal(size=(2, 4, 32, 8)) for _ in range(3))
    >>> W_O = rng.normal(size=(2, 4, 8, 32))
    >>> ift.composition_scores(W_Q, W_K, W_V, W_O, mode="K").shape
    (2, 4, 2, 4)
    """
    modes = _parse_modes(mode)
    Q, K, V, O = (_unit_heads(W) for W in _attention_weights(W_Q, W_K, W_V, W_O))
    scores = _composition(Q, K, V, O, modes)
    return scores if not isinstance(mode, str) else scores[modes[0]]


# --------------------------------------------------------------------------------------------
# Random baseline for composition scores
# --------------------------------------------------------------------------------------------


class CompositionBaseline(NamedTuple):
    """Chance level of a composition score for i.i.d. Gaussian weights of the given shapes.

    Attributes
    ----------
    mean : float
        Mean score of a random pair of heads.
    std : float
        Standard deviation of that score over pairs (the spread of chance, not the error of the
        mean; that is ``std / sqrt(n)``).
    n : int
        Number of sampled pairs.
    d_model, d_head : int
    """

    mean: float
    std: float
    n: int
    d_model: int
    d_head: int

    def zscore(self, score: Any) -> Any:
        """``(score - mean) / std``: how many chance standard deviations above chance a score is.

        A whole ``[L, H, L, H]`` matrix from :func:`composition_scores` gets NaN where the left
        head's layer is not below the right head's: those pairs cannot compose and are zero by
        construction, which is no score (it would read as far below chance).
        """
        z = (np.asarray(score, dtype=np.float64) - self.mean) / self.std
        if z.ndim == 4 and z.shape[0] == z.shape[2] and z.shape[1] == z.shape[3]:
            layers = np.arange(z.shape[0])
            cannot = layers[:, None, None, None] >= layers[None, None, :, None]
            z = np.where(cannot, np.nan, z)
        return z


def _wishart_factor(df: int, p: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n matrices F with F^T F ~ Wishart_p(df, I), i.e. distributed as Z^T Z for Z [df, p] Gaussian.

    df >= p: the upper-triangular Bartlett factor (F = L^T, L_ii^2 ~ chi^2(df - i), L_ij ~ N(0, 1)
    below the diagonal), which is exactly the R of a QR of Z; df < p: Z itself, [n, df, p].
    Float32: the sampling noise is far above its rounding.
    """
    if df < p:
        return rng.standard_normal((n, df, p), dtype=np.float32)
    F = np.zeros((n, p, p), dtype=np.float32)
    rows, cols = np.triu_indices(p, k=1)
    F[:, rows, cols] = rng.standard_normal((n, rows.size), dtype=np.float32)
    idx = np.arange(p)
    F[:, idx, idx] = np.sqrt(rng.chisquare(df - idx, size=(n, p)))
    return F


def _fro2(x: np.ndarray) -> np.ndarray:
    """Squared Frobenius norms of a stack [n, a, b] -> [n], accumulated in float64."""
    result: np.ndarray = np.einsum("nij,nij->n", x, x, dtype=np.float64)
    return result


def _baseline_samples(d_model: int, d_head: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n composition scores ||W_V W_O A B^T|| / (||W_V W_O|| ||A B^T||), all four Gaussian
    [d_model, d_head] (W_O transposed), drawn exactly with d_head x d_head matrices only.

    With A = Q_A R_A (R_A the Bartlett factor, Q_A Haar and independent), W_O [Q_A, Q_perp] =
    [Z1, Z2] is Gaussian, and ||W X||_F = ||F X||_F whenever F^T F = W^T W. Hence
        numerator   = ||F_V Z1 R_A F_B^T||,
        ||W_V W_O|| = sqrt(||F_V Z1||^2 + ||F_2 F_V^T||^2)   (F_2^T F_2 = Z2 Z2^T ~ W(d_model - d_head)),
        ||A B^T||   = ||R_A F_B^T||.
    """
    F_V = _wishart_factor(d_model, d_head, n, rng)
    F_B = _wishart_factor(d_model, d_head, n, rng)
    R_A = _wishart_factor(d_model, d_head, n, rng)
    Z1 = rng.standard_normal((n, d_head, d_head), dtype=np.float32)
    F_2 = _wishart_factor(d_model - d_head, d_head, n, rng)
    left = F_V @ Z1
    F_Bt = np.swapaxes(F_B, 1, 2)
    num = _fro2(left @ R_A @ F_Bt)
    left_sq = _fro2(left) + _fro2(F_2 @ np.swapaxes(F_V, 1, 2))
    right_sq = _fro2(R_A @ F_Bt)
    result: np.ndarray = np.sqrt(num / (left_sq * right_sq))
    return result


def _square_samples(d_model: int, d_head: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """The same scores when d_model <= d_head, with d_model x d_model matrices only.

    W_V = L Q (LQ decomposition, L L^T = W_V W_V^T ~ Wishart_{d_model}(d_head), Q Haar and
    independent), so W_V W_O = L (Q W_O) with Q W_O Gaussian [d_model, d_model]; likewise
    A B^T = L_A Z_2. Then score = ||L_V Z_1 L_A Z_2|| / (||L_V Z_1|| ||L_A Z_2||).
    """
    L_V = np.swapaxes(_wishart_factor(d_head, d_model, n, rng), 1, 2)
    L_A = np.swapaxes(_wishart_factor(d_head, d_model, n, rng), 1, 2)
    Z1, Z2 = (rng.standard_normal((n, d_model, d_model), dtype=np.float32) for _ in range(2))
    OV, R = L_V @ Z1, L_A @ Z2
    result: np.ndarray = np.sqrt(_fro2(OV @ R) / (_fro2(OV) * _fro2(R)))
    return result


def composition_baseline(d_model: int, d_head: int, *, n: int = 500, seed: Optional[int] = 0) -> CompositionBaseline:
    """Mean and spread of the composition score of two random heads: chance level.

    Parameters
    ----------
    d_model, d_head : int
        The model's shapes (the score of random heads depends only on these).
    n : int
        Number of independent random pairs to sample.
    seed : int or None
        Seed of the numpy generator (None: fresh entropy).

    Returns
    -------
    CompositionBaseline
        ``(mean, std, n, d_model, d_head)``; ``baseline.zscore(score)`` = (score - mean) / std.

    Notes
    -----
    The score is ``||W_V W_O A B^T||_F / (||W_V W_O||_F ||A B^T||_F)`` with W_V, W_O^T, A, B
    i.i.d. standard Gaussian [d_model, d_head]. This one distribution is the chance level of all
    three modes (for Q, K and V the right factor pair (A, B) is (W_Q, W_K), (W_K, W_Q) or
    (W_V, W_O^T), all i.i.d. Gaussian), and scores are scale-free, so the variance does not
    matter. For d_model >> d_head it is close to 1/sqrt(d_model); a structured circuit of rank r
    scores about 1/sqrt(r).

    Sampling is exact but needs only k x k matrices, k = min(d_model, d_head) (Bartlett factors
    of the Wishart Gram matrices, see ``_baseline_samples``), so it costs O(n k^3).

    Examples
    --------
    >>> import induct_fast as ift
    >>> b = ift.composition_baseline(768, 64, n=200, seed=0)
    >>> 0.03 < b.mean < 0.05
    True
    """
    d_model, d_head, n = (as_count(v, name, 1) for v, name in ((d_model, "d_model"), (d_head, "d_head"), (n, "n")))
    rng = np.random.default_rng(as_seed(seed))
    sample = _square_samples if d_model <= d_head else _baseline_samples
    scores = sample(d_model, d_head, n, rng)
    return CompositionBaseline(float(scores.mean()), float(scores.std(ddof=1)) if n > 1 else 0.0, n, d_model, d_head)


# --------------------------------------------------------------------------------------------
# OV eigenvalues and copying scores
# --------------------------------------------------------------------------------------------


def _is_transpose(W_U: np.ndarray, W_E: np.ndarray) -> bool:
    """Whether W_U == W_E^T exactly (tied embeddings), probing one row before the full compare."""
    if W_U.shape != W_E.shape[::-1]:
        return False
    if not np.array_equal(W_U[:, 0], W_E[0]):
        return False
    return bool(np.array_equal(W_U, W_E.T))


def _unembed_embed(W_U: np.ndarray, W_E: np.ndarray) -> np.ndarray:
    """W_U W_E [d_model, d_model]: the only product over the vocabulary, formed once."""
    # W_E.T @ W_E: the same buffer transposed, so numpy uses syrk, half the work.
    result: np.ndarray = W_E.T @ W_E if _is_transpose(W_U, W_E) else W_U @ W_E
    return result


def _embedding_weights(W_E: Any, W_U: Any, d_model: int) -> Tuple[np.ndarray, np.ndarray]:
    W_E = _weights(W_E, "W_E", 2, "[vocab, d_model]")
    W_U = _weights(W_U, "W_U", 2, "[d_model, vocab]")
    _require(W_E.shape[1] == d_model, "W_E", f"shape (vocab, {d_model}) (d_model from W_O)", W_E.shape)
    _require(W_U.shape == (d_model, W_E.shape[0]), "W_U", f"shape ({d_model}, {W_E.shape[0]}) (from W_O, W_E)", W_U.shape)
    return W_E, W_U


def ov_eigenvalues(W_E: Any, W_V: Any, W_O: Any, W_U: Any) -> np.ndarray:
    """Eigenvalues of every head's full OV circuit W_E W_V W_O W_U (its non-zero part).

    Parameters
    ----------
    W_E : array_like, shape (vocab, d_model)
    W_V : array_like, shape (L, H_kv, d_model, d_head)
        H_kv divides H (grouped-query attention).
    W_O : array_like, shape (L, H, d_head, d_model)
    W_U : array_like, shape (d_model, vocab)

    Returns
    -------
    ndarray of complex128, shape (L, H, d_head)
        Per head, the eigenvalues of the [vocab, vocab] matrix W_E W_V W_O W_U other than its
        vocab - d_head structural zeros, sorted by decreasing absolute value.

    Notes
    -----
    X Y and Y X share their non-zero eigenvalues, so these are the eigenvalues of the
    d_head x d_head matrix ``W_O (W_U W_E) W_V``. ``W_U W_E`` [d_model, d_model] is formed once
    (with syrk when W_U is exactly W_E^T), then one GEMM applies it to every head's W_O:
    about d_model^2 vocab + L H d_head d_model^2 multiply-adds in all, against
    2 L H d_head d_model vocab for TransformerLens's FactoredMatrix route.
    """
    W_V, W_O = _value_output(W_V, W_O)
    L, H, d_head, d_model = W_O.shape
    W_E, W_U = _embedding_weights(W_E, W_U, d_model)
    n_kv = W_V.shape[1]
    # W_O (W_U W_E) for all heads in one GEMM, then each head's d_head x d_head matrix.
    OC = (W_O.reshape(-1, d_model) @ _unembed_embed(W_U, W_E)).reshape(L, n_kv, H // n_kv, d_head, d_model)
    M = np.matmul(OC, W_V[:, :, None]).reshape(L, H, d_head, d_head)
    eig = np.linalg.eigvals(M)
    order = np.argsort(-np.abs(eig), axis=-1, kind="stable")
    return np.take_along_axis(eig, order, axis=-1).astype(np.complex128, copy=False)


def copying_scores(W_E: Any, W_V: Any, W_O: Any, W_U: Any) -> np.ndarray:
    """How much each head's OV circuit copies tokens: Re(sum lambda) / sum |lambda|.

    Parameters
    ----------
    W_E, W_V, W_O, W_U : array_like
        As in :func:`ov_eigenvalues`.

    Returns
    -------
    ndarray of float64, shape (L, H)
        In [-1, 1]: near 1 when the full OV circuit W_E W_OV W_U has mostly positive real
        eigenvalues (attending to a token raises its own logit), near -1 for suppression; NaN
        for a head whose eigenvalues are all zero. The eigenvalues are those of
        :func:`ov_eigenvalues`, as in TransformerLens's tutorials.
    """
    eig = ov_eigenvalues(W_E, W_V, W_O, W_U)
    with np.errstate(invalid="ignore", divide="ignore"):
        result: np.ndarray = eig.sum(axis=-1).real / np.abs(eig).sum(axis=-1)
        return result


# --------------------------------------------------------------------------------------------
# Positional QK circuit
# --------------------------------------------------------------------------------------------


def positional_qk_scores(
    W_pos: Any, W_Q: Any, W_K: Any, *, n_positions: Optional[int] = None, scale: Optional[float] = None
) -> np.ndarray:
    """How strongly each head's positional QK circuit attends to the previous position.

    Parameters
    ----------
    W_pos : array_like, shape (n_ctx, d_model)
        Learned positional embeddings.
    W_Q : array_like, shape (L, H, d_model, d_head)
    W_K : array_like, shape (L, H_kv, d_model, d_head)
    n_positions : int, optional
        Use positions 0..n_positions-1 (default: all n_ctx rows of W_pos).
    scale : float, optional
        Logit scale; default 1 / sqrt(d_head).

    Returns
    -------
    ndarray of float64, shape (L, H)
        With S = scale * (W_pos W_Q)(W_pos W_K)^T [n, n] and A = causal row softmax of S, the mean
        over query positions i = 1..n-1 of A[i, i-1]: 1 for a purely positional previous-token
        head, about mean(1/(i+1)) for a position-blind one.

    Notes
    -----
    Only the positional part of the residual stream enters (no token embeddings, biases or
    earlier layers), so this reads the head's positional preference off its weights alone.
    Memory: one [H, n, n] logit block per layer.
    """
    W_Q = _weights(W_Q, "W_Q", 4, "[L, H, d_model, d_head]")
    L, H, d_model, d_head = W_Q.shape
    W_K = _kv_weights(W_K, "W_K", L, H, d_model, d_head)
    W_pos = _weights(W_pos, "W_pos", 2, "[n_ctx, d_model]")
    _require(W_pos.shape[1] == d_model, "W_pos", f"shape (n_ctx, {d_model}) (d_model from W_Q)", W_pos.shape)
    _require(W_pos.shape[0] >= 2, "W_pos", "at least 2 positions (rows)", f"shape {W_pos.shape}")
    n = W_pos.shape[0] if n_positions is None else as_count(n_positions, "n_positions", 2)
    _require(n <= W_pos.shape[0], "n_positions", f"an integer in 2..{W_pos.shape[0]}", n_positions)
    scale = as_scale(scale)
    scale = 1.0 / math.sqrt(d_head) if scale is None else scale
    P = W_pos[:n]
    scores = np.empty((L, H))
    for layer in range(L):
        q = np.matmul(P, W_Q[layer])  # [H, n, d_head]
        k = _per_head(np.matmul(P, W_K[layer])[None], H)[0]
        logits = np.matmul(q, np.swapaxes(k, 1, 2)) * scale
        if not np.isfinite(logits).all():
            raise ValueError(f"W_pos: expected weights whose positional logits stay finite, got an overflow in layer {layer}")
        scores[layer] = _previous_position_mass(logits)
    return scores


def _previous_position_mass(logits: np.ndarray) -> np.ndarray:
    """Mean over rows i >= 1 of the causal softmax mass on key i-1: [H, n, n] -> [H]."""
    n = logits.shape[-1]
    logits = np.where(np.tril(np.ones((n, n), dtype=bool)), logits, -np.inf)
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    rows = np.arange(1, n)
    mass = weights[:, rows, rows - 1] / weights[:, rows].sum(axis=-1)
    result: np.ndarray = mass.mean(axis=-1)
    return result
