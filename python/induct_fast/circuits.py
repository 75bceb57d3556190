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
import sys
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union, overload

import numpy as np

from . import _core
from ._arrays import as_count, as_float_array, as_scale, as_seed, is_tensor

MODES = ("Q", "K", "V")

# Working memory of composition_scores beyond its inputs and outputs (float64 rows of weights,
# their products with the d_head x d_head cores, packed Gram pieces): fixed, whatever L and H.
_WORK_BYTES = 2 << 30
# Widest column strip of the packed Gram matrices (d_model / 12 below that: the diagonal blocks,
# formed whole, then cost 1/12 extra).
_WIDTH = 128
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


class _Raw(NamedTuple):
    """One attention weight as the caller gave it, never converted whole: float16/32/64 (a view
    where numpy allows), or bfloat16 held as its uint16 bit pattern (``bf16``)."""

    data: np.ndarray
    bf16: bool
    name: str


def _bfloat16_bits(x: Any, name: str) -> Optional[np.ndarray]:
    """The uint16 bit pattern of a bfloat16 CPU tensor or ml_dtypes array, sharing its memory
    (torch's own route to numpy widens bfloat16 to a float32 copy); None for anything else."""
    if is_tensor(x) and str(getattr(x, "dtype", "")) == "torch.bfloat16":
        device = getattr(x, "device", "cpu")
        if str(getattr(device, "type", device)).split(":")[0] != "cpu":
            raise ValueError(f"{name}: expected a CPU tensor or array, got a tensor on {device}; move it with .cpu() first")
        import torch

        bits: np.ndarray = x.detach().view(torch.int16).numpy().view(np.uint16)
        return bits
    if isinstance(x, np.ndarray) and x.dtype.name == "bfloat16" and x.dtype.itemsize == 2:
        return x.view(np.uint16)
    return None


def _raw_weight(x: Any, name: str, layout: str) -> _Raw:
    """A 4-axis attention weight in its own dtype; TypeError unless it is a real float array."""
    bits = _bfloat16_bits(x, name)
    arr = bits if bits is not None else as_float_array(x, name, integers=False)
    if arr.ndim != 4:
        raise ValueError(f"{name}: expected 4 axes {layout}, got shape {arr.shape}")
    if 0 in arr.shape:
        raise ValueError(f"{name}: expected non-empty axes {layout}, got shape {arr.shape}")
    return _Raw(arr, bits is not None, name)


def _float(raw: _Raw, index: Tuple[Any, ...], dtype: Any = np.float64) -> np.ndarray:
    """raw.data[index] as a C-ordered `dtype` array (bfloat16 widened exactly); a view of the
    caller's array when it is one already, so never written to."""
    part = raw.data[index]
    if raw.bf16:
        wide = part.astype(np.uint32)
        np.left_shift(wide, 16, out=wide)
        part = wide.view(np.float32)
    return np.asarray(part, dtype=dtype, order="C")


def _raw_attention(W_Q: Any, W_K: Any, W_V: Any, W_O: Any) -> Tuple[_Raw, _Raw, _Raw, _Raw]:
    """The four weights unconverted, with every L / H / d_model / d_head agreement checked."""
    Q = _raw_weight(W_Q, "W_Q", "[L, H, d_model, d_head]")
    L, H, d_model, d_head = Q.data.shape
    O = _raw_weight(W_O, "W_O", "[L, H, d_head, d_model]")
    _require(O.data.shape == (L, H, d_head, d_model), "W_O", f"shape {(L, H, d_head, d_model)} (from W_Q)", O.data.shape)
    kv = []
    for x, name in ((W_K, "W_K"), (W_V, "W_V")):
        raw = _raw_weight(x, name, "[L, H_kv, d_model, d_head]")
        shape = raw.data.shape
        ok = shape[0] == L and shape[2:] == (d_model, d_head) and H % shape[1] == 0
        _require(ok, name, f"shape ({L}, H_kv, {d_model}, {d_head}) with H_kv dividing H={H} (from W_Q)", shape)
        kv.append(raw)
    return Q, kv[0], kv[1], O


def _head_blocks(raw: _Raw, layers: range, budget: int) -> List[Tuple[int, slice]]:
    """(layer, heads) blocks of `raw` whose float64 copies take at most ~`budget` bytes each."""
    n_heads = raw.data.shape[1]
    step = max(1, min(n_heads, budget // (raw.data.shape[2] * raw.data.shape[3] * 8)))
    return [(layer, slice(h, min(h + step, n_heads))) for layer in layers for h in range(0, n_heads, step)]


# Heads whose largest |entry| lies in [2^-100, 2^100] are used as they are: a trace multiplies
# eight entries, which stays a normal float64 over that range (with room for the sums).
_ORDINARY = (2.0**-100, 2.0**100)


def _head_shifts(raw: _Raw, budget: int) -> Optional[np.ndarray]:
    """Exponents e [L, heads] that bring each head outside `_ORDINARY` to a largest |entry| in
    [0.5, 1) when scaled by 2^-e (0 for the others); None when no head needs it.

    Scores do not change when one head's weights are scaled, and powers of two scale exactly, so
    this changes no score. It is one max and one min per head, which also catches NaN and inf
    (both propagate through them) without copying float16/32/64 weights.
    """
    peak = np.empty(raw.data.shape[:2])
    for layer, heads in _head_blocks(raw, range(raw.data.shape[0]), budget):
        part = _float(raw, (layer, heads), np.float32) if raw.bf16 else raw.data[layer, heads]
        peak[layer, heads] = np.maximum(part.max(axis=(-2, -1)), -part.min(axis=(-2, -1)))
    if not np.isfinite(peak).all():
        raise ValueError(f"{raw.name}: expected finite values, got NaN or inf")
    ordinary = (peak == 0) | ((peak >= _ORDINARY[0]) & (peak <= _ORDINARY[1]))
    if ordinary.all():
        return None
    exponent: np.ndarray = np.where(ordinary, 0, np.frexp(peak)[1])
    return exponent


class _Weight(NamedTuple):
    raw: _Raw
    shift: Optional[np.ndarray]  # [L, heads] from _head_shifts, or None


def _heads(w: _Weight, index: Tuple[Any, ...]) -> np.ndarray:
    """w.raw.data[index] (index starts (layers, heads)) in float64, head h scaled by 2^-shift[h]
    (read-only: float64 inputs come back as views of the caller's array)."""
    x = _float(w.raw, index)
    if w.shift is not None:
        x = x * np.ldexp(1.0, -w.shift[index[:2]])[..., None, None]
    return x


def _cores(w: _Weight, layers: range, o_layout: bool, budget: int) -> np.ndarray:
    """d_head x d_head cores [len(layers), heads, d_head, d_head] in float64: B^T B per head of a
    weight [.., d_model, d_head], or B B^T for W_O [.., d_head, d_model]."""
    d_head = w.raw.data.shape[2 if o_layout else 3]
    out = np.empty((len(layers), w.raw.data.shape[1], d_head, d_head))
    for layer, heads in _head_blocks(w.raw, layers, budget):
        B = _heads(w, (layer, heads))
        Bt = np.swapaxes(B, -1, -2)
        _core.batched_matmul(*((B, Bt) if o_layout else (Bt, B)), out[layer - layers.start, heads], False)
    return out


class _Side(NamedTuple):
    """One side's PSD d_model x d_model matrices M_h = A_h S_h A_h^T, kept factored.

    A_h [d_model, d_head] is read from `wide` over `layers` (W_O transposed when `o_layout`);
    `wide` has one head per kv group for K and V composition (W_K, W_V), shared by the group's
    consecutive heads. The cores S_h are `core` [n_core, d_head, d_head], n_core = (L - 1) H
    or (L - 1) H_kv (one per group), shared the same way.
    """

    wide: _Weight
    o_layout: bool
    layers: range
    core: np.ndarray


def _sides(Q: _Weight, K: _Weight, V: _Weight, O: _Weight, modes: Tuple[str, ...], budget: int) -> Tuple[_Side, Dict[str, _Side]]:
    """The left side G_a = W_O^T (W_V^T W_V) W_O = W_OV^T W_OV over layers 0..L-2 and, per mode,
    the right side K_b = R R^T = A (B^T B) A^T for R = A B^T over layers 1..L-1."""
    L = Q.raw.data.shape[0]
    before, after = range(0, L - 1), range(1, L)

    def cores(w: _Weight, layers: range, o_layout: bool) -> np.ndarray:
        core = _cores(w, layers, o_layout, budget)
        return core.reshape(-1, *core.shape[2:])

    left = _Side(O, True, before, cores(V, before, False))
    rights: Dict[str, _Side] = {}
    for mode in modes:
        if mode == "Q":  # R = W_Q W_K^T: A = W_Q per head, S = W_K^T W_K per group
            rights[mode] = _Side(Q, False, after, cores(K, after, False))
        elif mode == "K":  # R = W_K W_Q^T: A = W_K per group, S = W_Q^T W_Q per head
            rights[mode] = _Side(K, False, after, cores(Q, after, False))
        else:  # R = W_V W_O: A = W_V per group, S = W_O W_O^T per head
            rights[mode] = _Side(V, False, after, cores(O, after, True))
    return left, rights


def _wide_rows(side: _Side, rows: slice) -> np.ndarray:
    """Rows `rows` of every A_h in float64: [n_wide, len(rows), d_head] (a fresh array)."""
    layers = slice(side.layers.start, side.layers.stop)
    if side.o_layout:
        x = _heads(side.wide, (layers, slice(None), slice(None), rows))
        return np.swapaxes(x.reshape(-1, *x.shape[2:]), 1, 2)
    x = _heads(side.wide, (layers, slice(None), rows))
    return x.reshape(-1, *x.shape[2:])


# Which uint16 of a float32's two holds its high (bfloat16) half.
_HIGH_HALF = 1 if sys.byteorder == "little" else 0


class _Rows:
    """Rows of every A_h of one side converted into buffers allocated once, [n_wide, rows, d_head]
    views: no allocation (and so no fresh pages to fault in) per piece, one pass per element
    (bfloat16: its bits copied into the high halves of a float32 staging buffer, then widened)."""

    def __init__(self, side: _Side, max_rows: int) -> None:
        self.side = side
        data = side.wide.raw.data
        self.layers = slice(side.layers.start, side.layers.stop)
        self.n_layers, n, a, b = len(side.layers), data.shape[1], data.shape[2], data.shape[3]
        shape = (self.n_layers, n, a, max_rows) if side.o_layout else (self.n_layers, n, max_rows, b)
        self.buffer = np.empty(shape)
        self.stage = np.zeros(shape, dtype=np.float32) if side.wide.raw.bf16 else None

    def __call__(self, start: int, stop: int) -> np.ndarray:
        w, o_layout, count = self.side.wide, self.side.o_layout, stop - start
        index = (self.layers, slice(None), slice(None), slice(start, stop)) if o_layout else (self.layers, slice(None), slice(start, stop))
        out = self.buffer[..., :count] if o_layout else self.buffer[:, :, :count]
        part = w.raw.data[index]
        if self.stage is not None:
            stage = self.stage[..., :count] if o_layout else self.stage[:, :, :count]
            halves = stage.view(np.uint16)
            halves[..., _HIGH_HALF::2] = part
            part = stage
        np.copyto(out, part)
        if w.shift is not None:
            out *= np.ldexp(1.0, -w.shift[self.layers])[..., None, None]
        if o_layout:
            return np.swapaxes(_reshaped(out, (-1, *out.shape[2:])), 1, 2)
        return _reshaped(out, (-1, *out.shape[2:]))


class _Plan(NamedTuple):
    """How the upper triangle of d_model x d_model is cut: column strips `width` wide, each cut
    into pieces of at most `height` rows; `whole`: every A_h converted to float64 once, up front
    (otherwise the rows each piece needs are converted for it)."""

    width: int
    height: int
    whole: bool


def _plan(
    n_sides: int, n_heads: int, n_wide: int, d_model: int, d_head: int, width: int, budget: int, row_bytes: int = 8
) -> _Plan:
    """The cut whose buffers fit `budget` bytes: per head (`n_heads` per side) of each of the
    `n_sides` sides a U = S A^T strip [d_head, width] and a packed piece [height, width], and per
    wide head (`n_wide` in all: A_h shared by a kv group counts once) rows of A, `row_bytes` per
    entry (float64, plus a float32 staging copy for bfloat16)."""
    n_side_heads = n_heads * n_sides
    width = max(1, min(width, max(32, d_model // 12), d_model))
    while width > 8 and n_side_heads * d_head * width * 8 > budget // 3:
        width //= 2
    spare = budget - n_side_heads * d_head * width * 8
    whole_bytes = n_wide * d_model * d_head * 8
    whole = whole_bytes <= spare // 2
    spare -= whole_bytes if whole else 0
    per_row = n_side_heads * width * 8 + (0 if whole else n_wide * d_head * row_bytes)
    return _Plan(width, max(1, min(d_model, spare // per_row)), whole)


def _reshaped(x: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    """A reshaped view (never a copy: results are written through it). ``reshape(copy=False)``
    needs numpy >= 2.1; we support numpy >= 1.22, so the view is checked instead."""
    view: np.ndarray = x.reshape(shape)
    if not np.may_share_memory(view, x):
        raise AssertionError(f"internal: reshaping {x.shape} to {shape} would copy")  # pragma: no cover
    return view


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


class _Traces(NamedTuple):
    pairs: np.ndarray  # [N, N, modes]: tr(G_a K_b) (valid where layer(a) < layer(b))
    left: np.ndarray  # [N]: tr(G_a) = ||W_OV(a)||_F^2
    right: np.ndarray  # [N, modes]: tr(K_b) = ||R(b)||_F^2


def _pair_traces(left: _Side, rights: List[_Side], plan: _Plan, shape: Tuple[int, int, int], group: int) -> _Traces:
    """tr(G_a K_b) for every left head a and right head b of every mode, with tr(G_a), tr(K_b).

    G and K are symmetric, so tr(G K) = 2 (sum_J <G_JJ, K_JJ> / 2 + sum_{I<J} <G_IJ, K_IJ>): only
    the upper triangle is formed, one piece (rows [r0, r1) of column strip J, r1 <= end of J) at
    a time, for every head of every side: first U_h = S_h A_h[J]^T [d_head, width] per strip,
    then piece_h = A_h[r0:r1] U_h (small GEMMs, batched over heads). Diagonal blocks are halved
    on the left side, and every piece's contribution to all pairs is one large GEMM per group of
    right layers (left heads x right heads of every mode). The diagonal entries give the traces.
    """
    sides = [left, *rights]
    H, d_model, d_head = shape
    N, M = len(left.layers) * H, len(rights)
    width, height = plan.width, plan.height
    # Packed pieces: the left side's [N, area], the right sides' [N, modes, area] (so that one
    # group of right heads of every mode is one matrix); U strips [sides, N, d_head, width].
    left_buffer, right_buffer = np.empty((N, height * width)), np.empty((N, M, height * width))
    u_buffer = np.empty((1 + M, N, d_head, width))
    pairs, traces = np.zeros((N, N, M)), np.zeros((N, 1 + M))
    wide = [_wide_rows(s, slice(None)) for s in sides] if plan.whole else []
    readers = [] if plan.whole else [_Rows(s, max(height, width)) for s in sides]

    def rows(k: int, start: int, stop: int) -> np.ndarray:
        return wide[k][:, start:stop] if plan.whole else readers[k](start, stop)

    groups = _right_groups(len(left.layers), H, N, group)
    for cs in range(0, d_model, width):
        ce = min(cs + width, d_model)
        c = ce - cs
        for k, side in enumerate(sides):
            _core.batched_matmul(side.core, np.swapaxes(rows(k, cs, ce), 1, 2), u_buffer[k, :, :, :c], False)
        for r0 in range(0, ce, height):
            r1 = min(r0 + height, ce)
            area = (r1 - r0) * c
            diagonal = np.arange(max(r0, cs), r1)
            for k in range(1 + M):
                target = left_buffer[:, :area] if k == 0 else right_buffer[:, k - 1, :area]
                piece = _reshaped(target, (N, r1 - r0, c))
                _core.batched_matmul(rows(k, r0, r1), u_buffer[k, :, :, :c], piece, False)
                if diagonal.size:
                    traces[:, k] += piece[:, diagonal - r0, diagonal - cs].sum(axis=1)
                    if k == 0:
                        piece[:, diagonal[0] - r0 :] *= 0.5
            G = left_buffer[:, :area]
            for right_rows, n_left in groups:
                K = _reshaped(right_buffer[right_rows, :, :area], (-1, area))
                _core.contract(G[:n_left], K, _reshaped(pairs[:n_left, right_rows], (n_left, -1)))
    pairs *= 2.0
    return _Traces(pairs, traces[:, 0], traces[:, 1:])


def _composition(
    W_Q: Any,
    W_K: Any,
    W_V: Any,
    W_O: Any,
    modes: Tuple[str, ...],
    *,
    width: int = _WIDTH,
    budget: int = _WORK_BYTES,
    group: int = _GROUP,
) -> Dict[str, np.ndarray]:
    """Composition scores [L, H, L, H] per mode, with the strip width, the working-memory budget
    (bytes) and the right-head group size of the contraction as parameters."""
    Q, K, V, O = (_Weight(raw, _head_shifts(raw, budget // 8)) for raw in _raw_attention(W_Q, W_K, W_V, W_O))
    L, H, d_model, d_head = Q.raw.data.shape
    scores = {m: np.zeros((L, H, L, H)) for m in modes}
    if L < 2:
        return scores
    left, rights = _sides(Q, K, V, O, modes, budget // 8)
    n_wide = sum(len(side.layers) * side.wide.raw.data.shape[1] for side in (left, *rights.values()))
    row_bytes = 12 if any(w.raw.bf16 for w in (Q, K, V, O)) else 8
    plan = _plan(1 + len(modes), (L - 1) * H, n_wide, d_model, d_head, width, budget, row_bytes)
    traces = _pair_traces(left, list(rights.values()), plan, (H, d_model, d_head), group)
    later = np.arange(L - 1)[:, None, None, None] < np.arange(1, L)[None, None, :, None]
    for k, mode in enumerate(modes):
        with np.errstate(invalid="ignore", divide="ignore"):  # a zero head gives NaN, like 0/0
            ratio = np.maximum(traces.pairs[:, :, k], 0.0) / (traces.left[:, None] * traces.right[None, :, k])
        pairs = np.sqrt(ratio).reshape(L - 1, H, L - 1, H)
        scores[mode][:-1, :, 1:, :] = np.where(later, pairs, 0.0)
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

    G and K are symmetric, so only their upper triangles are formed: column strip by column
    strip (d_model / 12 wide, at most 128), a piece of rows at a time, for all heads at once
    (U_h = S_h A_h[strip]^T per strip, then piece = A_h[rows] U_h: small GEMMs, one head per
    thread), and each piece's contribution to the traces of every pair is one large GEMM per
    group of layers (float64 throughout, fixed summation order: the result does not depend on
    the thread count). Per pair this costs about d_model^2 / 2 multiply-adds instead of
    d_head^2 d_model for the collapsed-SVD product TransformerLens forms; no SVD is needed.

    Memory: the weights are read where they are (float16/32/64 arrays or CPU tensors, bfloat16
    tensors too), a slice at a time, never converted whole and never expanded over kv groups.
    Beyond the inputs, the work takes a fixed budget (``_WORK_BYTES``, 2 GiB; all of it only when
    the model is large, at least one row of a strip per head when it is huge), plus the
    d_head x d_head cores (2 to 4 per head, d_head / d_model of the weights' size) and the scores
    themselves. Heads whose entries are extreme (largest |entry| outside 2^-100 .. 2^100) are
    scaled by powers of two on the fly, which changes no score.

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
    scores = _composition(W_Q, W_K, W_V, W_O, modes)
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


def _per_head(x: np.ndarray, n_heads: int) -> np.ndarray:
    """Grouped-query expansion along axis 1: group g serves heads g*r .. g*r + r - 1."""
    r = n_heads // x.shape[1]
    return x if r == 1 else np.repeat(x, r, axis=1)


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
