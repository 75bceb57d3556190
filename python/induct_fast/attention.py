"""Attention patterns from queries and keys, and head scores computed without them.

Shapes (DESIGN.md section 5)
----------------------------
``q``: ``[*lead, n, n_heads, d_head]`` and ``k``: ``[*lead, n, n_kv_heads, d_head]`` (the layout of
TransformerLens ``hook_q`` / ``hook_k``), or ``[*lead, heads, n, d_head]`` with ``layout="bhnd"``
(Hugging Face). ``n_kv_heads`` must divide ``n_heads``: with r = n_heads / n_kv_heads, kv head g
serves query heads g*r .. g*r + r - 1 (grouped-query attention, as Hugging Face's ``repeat_kv``).
Typical ``lead``: ``[batch]`` or ``[batch, layer]``.

Formulas
--------
Logits s_ij = scale * q_i . k_j with ``scale = 1 / sqrt(d_head)`` unless given; with
``softcap=c`` they become s_ij = c * tanh(scale * q_i . k_j / c) (Gemma-2's
``attn_logit_softcapping``, TransformerLens's ``attn_scores_soft_cap``), before any masking. Key
j is *allowed* for query i when j <= i (``causal=True``), i - j < ``window`` (if given: the
sliding window of Hugging Face's ``sliding_window``; it needs ``causal=True``) and
``attention_mask[b, j] == 1``. Then

    A[i, j] = exp(s_ij) / sum_{j' allowed} exp(s_ij')   for allowed j, else 0.

Choices
-------
* Padding: ``attention_mask`` is ``[batch, n]`` (or ``[n]``) of 0/1 flags, as Hugging Face passes
  it. In :func:`attention_patterns` padding keys are never attended, and a query row with no
  allowed key (a left-padding position under the causal mask) is all zeros rather than NaN;
  padding query rows are otherwise computed like any row. In :func:`scores_from_qk` (and
  :func:`induct_fast.head_scores` given the same mask) padding positions are neither queries nor
  targets: a padding query is not eligible (NaN per query, left out of every mean, ``entropy``
  and ``bos`` included) and a padding key is dropped from every T(i); so
  ``scores_from_qk(q, k, attention_mask=m) == head_scores(attention_patterns(q, k,
  attention_mask=m), attention_mask=m)``. With ``exclude_bos=True`` position 0 must be a real
  token (the BOS) in every prompt: pad on the right.
* Sliding window: a target outside the window gets probability 0 but stays a target (its query
  stays eligible), exactly as the stored pattern shows it. The fused kernel computes only the
  key tiles that reach into a window: time O(n * (window + 128) * d_head) per head, not
  O(n^2 d_head). ``window >= n`` is no window at all (identical results).
* Soft cap: one tanh per allowed logit, in float32 a vectorised tanh within 2 ulp (about 1.5x
  the uncapped time), in float64 the C library's; the uncapped path is unchanged. The fused
  kernel recomputes a target's logit through the very same arithmetic, so it matches the
  log-sum-exp to the bit. A logit q . k that overflows is still an error, never a silent cap.
* Output dtype: float32 for bfloat16, float16 and float32 input (computed in float32, like
  TransformerLens and PyTorch), float64 for float64 input. q and k of different dtypes are
  promoted to a common one. Scores are always float64.
* bfloat16 (CPU torch tensors, ml_dtypes/JAX numpy arrays) and float16 q and k are read in place
  and converted to float32 one head at a time (extra memory O(threads * n * d_head), never a
  float32 copy of q or k); values, patterns and scores equal those of float32 q and k of the
  same values bit for bit.
* Precision: logits by an f32 GEMM per tile (f32 accumulation over d_head, as TransformerLens);
  exponentials in float32 (2 ulp) summed in float32 over at most 16 terms per lane, in float64
  beyond; log-sum-exp, target probabilities and entropy in float64. Logits of +-80 do not
  overflow. Results are bit-identical for any number of threads.
* ``exclude_bos`` in :func:`scores_from_qk` leaves key 0 out of the softmax, which is the exact
  form of ``head_scores``' renormalisation A[i, j] / (1 - A[i, 0]). On float32 patterns that
  division loses every digit when A[i, 0] is within ~1e-7 of 1 (an attention sink), so there the
  fused scores are the accurate ones.
* GEMM: matrixmultiply (see src/attention.rs for the measurements behind the choice).
* A given log-sum-exp (DESIGN.md section 11): ``scores_from_qk(..., lse=L)`` takes each row's
  normaliser from the attention kernel that ran the model (FlashAttention's ``softmax_lse``,
  the logsumexp output of torch's flash SDPA ops) and computes only the target logits:
  O(n * |T| * d_head) per head instead of O(n^2 d_head). ``return_lse=True`` hands back the
  kernel's own, so one full pass can serve many later calls.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Optional, Union, overload

import numpy as np

from . import _core
from ._arrays import (
    BFLOAT16_BITS,
    as_float_array,
    as_key_mask,
    as_measure,
    as_scale,
    as_softcap,
    as_span,
    as_tokens,
    as_window,
    bfloat16_to_float32,
    kernel_array,
)
from .scores import DEFAULT_KINDS, KindArg, OffsetArg, _kind_names

LAYOUTS = ("bnhd", "bhnd")


def _qk(q: Any, k: Any) -> tuple[np.ndarray, np.ndarray]:
    """q and k as float arrays of one dtype (views when they already share a kernel dtype;
    bfloat16 as :data:`~induct_fast._arrays.BFLOAT16_BITS`). Two dtypes are promoted as numpy
    and ml_dtypes do (bfloat16 with float16 or float32: float32, a copy of the bfloat16 side)."""
    q = as_float_array(q, "q", bfloat16=True)
    k = as_float_array(k, "k", bfloat16=True)
    if q.dtype != k.dtype:
        q, k = (bfloat16_to_float32(a) if a.dtype == BFLOAT16_BITS else a for a in (q, k))
        common = np.promote_types(q.dtype, k.dtype)
        q, k = q.astype(common, copy=False), k.astype(common, copy=False)
    return q, k


def _options(scale: Any, causal: Any, layout: Any, softcap: Any, window: Any) -> dict[str, Any]:
    """The logit options as the extension takes them (window and causal are checked there)."""
    if not isinstance(layout, str):
        raise TypeError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return dict(
        scale=as_scale(scale),
        causal=bool(causal),
        layout=layout,
        softcap=as_softcap(softcap),
        window=as_window(window),
    )


def attention_patterns(
    q: Any,
    k: Any,
    *,
    scale: Optional[float] = None,
    causal: bool = True,
    attention_mask: Any = None,
    layout: str = "bnhd",
    softcap: Optional[float] = None,
    window: Optional[int] = None,
) -> np.ndarray:
    """Attention patterns softmax(s) of the logits s = scale * q k^T, with the causal, window and
    padding masks and an optional logit soft cap.

    Parameters
    ----------
    q : array_like, shape (*lead, n, n_heads, d_head), or (*lead, n_heads, n, d_head) for "bhnd"
        Queries (bfloat16, float16/32/64, any strides; TransformerLens ``hook_q``).
    k : array_like, shape (*lead, n, n_kv_heads, d_head), or (*lead, n_kv_heads, n, d_head)
        Keys; ``n_kv_heads`` divides ``n_heads`` (grouped-query attention).
    scale : float, optional
        Multiplier of q . k; default ``1 / sqrt(d_head)``. Must be finite.
    causal : bool
        Mask keys j > i.
    attention_mask : array_like of 0/1 or bool, shape (lead[0], n) or (n,), optional
        1 for real keys, 0 for padding keys (never attended). Padding query rows are computed
        like any row (all zeros when no key is allowed).
    layout : {"bnhd", "bhnd"}
        Axis order of q and k.
    softcap : float > 0, optional
        Logit soft cap c: s_ij = c * tanh(scale * q_i . k_j / c) (Gemma-2's
        ``attn_logit_softcapping``). Must be finite (and representable in float32 for
        bfloat16/float16/32 input).
    window : int >= 1, optional
        Sliding window w: key j is allowed only when i - j < w (Hugging Face's
        ``sliding_window``). Needs ``causal=True``; ``w >= n`` changes nothing.

    Returns
    -------
    ndarray, shape (*lead, n_heads, n, n)
        ``A[..., h, i, j] = exp(s_ij) / sum_{j' allowed} exp(s_ij')`` for allowed keys j
        (j <= i when causal, i - j < window, mask 1), else 0; rows without an allowed key are all
        zeros. float32 for bfloat16/float16/float32 input, float64 for float64 input.

    Notes
    -----
    Costs O(n^2 d_head) per head (O(n * window * d_head) with a window) and allocates the n x n
    output; for scores alone, use :func:`scores_from_qk`, which never holds it. Releases the
    GIL; multi-threaded.

    Examples
    --------
    >>> import numpy as np, induct_fast as inf
    >>> q = np.zeros((4, 2, 8), np.float32)
    >>> inf.attention_patterns(q, q)[0, 3]
    array([0.25, 0.25, 0.25, 0.25], dtype=float32)
    """
    q, k = _qk(q, k)
    o = _options(scale, causal, layout, softcap, window)
    mask = as_key_mask(attention_mask)
    return _core.attention_patterns(
        kernel_array(q), kernel_array(k), o["scale"], o["causal"], mask, o["layout"], o["softcap"], o["window"]
    )


@overload
def scores_from_qk(
    q: Any,
    k: Any,
    tokens: Any = None,
    *,
    kinds: KindArg = DEFAULT_KINDS,
    offsets: OffsetArg = (),
    scale: Optional[float] = None,
    causal: bool = True,
    attention_mask: Any = None,
    layout: str = "bnhd",
    exclude_bos: bool = False,
    per_query: bool = False,
    softcap: Optional[float] = None,
    window: Optional[int] = None,
    lse: Any = None,
    return_lse: Literal[False] = False,
    measure: str = "mass",
    queries: Any = None,
    keys: Any = None,
) -> dict[str, np.ndarray]: ...


@overload
def scores_from_qk(
    q: Any,
    k: Any,
    tokens: Any = None,
    *,
    kinds: KindArg = DEFAULT_KINDS,
    offsets: OffsetArg = (),
    scale: Optional[float] = None,
    causal: bool = True,
    attention_mask: Any = None,
    layout: str = "bnhd",
    exclude_bos: bool = False,
    per_query: bool = False,
    softcap: Optional[float] = None,
    window: Optional[int] = None,
    lse: Any = None,
    return_lse: Literal[True],
    measure: str = "mass",
    queries: Any = None,
    keys: Any = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]: ...


def scores_from_qk(
    q: Any,
    k: Any,
    tokens: Any = None,
    *,
    kinds: KindArg = DEFAULT_KINDS,
    offsets: OffsetArg = (),
    scale: Optional[float] = None,
    causal: bool = True,
    attention_mask: Any = None,
    layout: str = "bnhd",
    exclude_bos: bool = False,
    per_query: bool = False,
    softcap: Optional[float] = None,
    window: Optional[int] = None,
    lse: Any = None,
    return_lse: bool = False,
    measure: str = "mass",
    queries: Any = None,
    keys: Any = None,
) -> Union[dict[str, np.ndarray], tuple[dict[str, np.ndarray], np.ndarray]]:
    """Head scores of the attention of q and k, without forming the n x n patterns.

    Equal (to ~1e-6) to ``head_scores(attention_patterns(q, k, scale=..., causal=...,
    attention_mask=m, layout=..., softcap=..., window=...), tokens, kinds=..., offsets=...,
    exclude_bos=..., per_query=..., attention_mask=m)``.

    Parameters
    ----------
    q, k, scale, causal, layout, softcap, window
        As in :func:`attention_patterns`.
    attention_mask : array_like of 0/1 or bool, shape (lead[0], n) or (n,), optional
        0 marks padding positions, which are never attended, never queries (NaN per query,
        left out of every mean, ``entropy`` and ``bos`` included) and never targets (dropped
        from every T(i)). With ``exclude_bos=True``, position 0 must be 1 in every prompt
        (pad on the right).
    tokens : array_like of int, shape (n,) or (lead[0], n), optional
        Token ids; needed by ``duplicate_token``, ``induction`` and ``copy``.
    kinds : str or sequence of str
        Any of ``previous_token``, ``duplicate_token``, ``induction``, ``copy``, ``bos``,
        ``self``, ``entropy``, ``offset_<d>`` (target sets as in :func:`induct_fast.head_scores`).
    offsets : iterable of int
        Extra positional kinds ``offset_<d>`` (T(i) = {i - d}), each in 1..n-1.
    exclude_bos : bool
        Leave key 0 out of every softmax (A'[i, j] = A[i, j] / (1 - A[i, 0]), j >= 1, exactly).
        An ``attention_mask`` with padding at position 0 (left padding) is then a ValueError.
    per_query : bool
        Return per-query values, shape (*lead, n_heads, n), NaN where not eligible.
    lse : array_like, shape (*lead, n_heads, n), optional
        Each query row's log-sum-exp, ``lse[..., h, i] = log sum_{j allowed} exp(s_ij)``
        (natural log) over the scaled, soft-capped logits s_ij and the keys the same rules allow
        (causal, ``window``, ``attention_mask`` padding keys): what flash-style attention kernels
        return (FlashAttention's ``softmax_lse``, torch's flash SDPA ops' logsumexp; for
        ``layout="bnhd"`` input too the lse is ``[*lead, n_heads, n]``). bfloat16, float16/32/64,
        any strides, CPU torch tensors. Then no logit
        tile is computed: for each target j of query i, A[i, j] = exp(s_ij - lse_i), with s_ij
        recomputed by the same arithmetic as without ``lse``. It is read only at the rows that
        are scored (i >= 1, not padding), which must be finite; the others (query 0, padding
        queries, where flash kernels leave -inf or NaN) may hold anything. It must come from the
        same q, k, scale, softcap, window and mask: a wrong lse gives wrong masses (possibly
        above 1), which are not detected. With a whole-row kind (``entropy``) the rows are
        computed exactly as without ``lse``, for every kind, and the given lse is checked but
        not used. ``exclude_bos=True`` with ``lse`` is a ValueError (an lse sums over key 0).
    return_lse : bool
        Also return the log-sum-exp of every row, a float64 array ``(*lead, n_heads, n)``: the
        kernel's own (every row is computed, padding rows too; -inf for a row with no allowed
        key, such as a left-padding row under the causal mask), ready to pass back as ``lse``;
        or, when ``lse`` is given, that lse as float64, unchanged. Not with
        ``exclude_bos=True`` (ValueError): its rows leave key 0 out.
    measure : {"mass", "top1"}
        ``top1``: 1 where the argmax of the row's logits s_ij over its allowed keys (causal,
        window, no padding, j >= 1 with ``exclude_bos``; ties to the lowest index) is in T(i).
        Found in the tile pass with no exponential at all (unless ``entropy`` or
        ``return_lse`` also needs the softmax); a given ``lse`` is then not used. Equal to
        ``head_scores(..., measure="top1")`` of the patterns except where two logits of a row
        are so close that their probabilities round to the same value.
    queries, keys : array_like of 0/1 or bool, shape (n,) or (lead[0], n), optional
        Spans, as in :func:`induct_fast.head_scores`: they narrow what is scored, never what is
        attended (every softmax and argmax still range over all allowed keys).

    Returns
    -------
    dict of str to ndarray of float64, or (dict, ndarray) with ``return_lse=True``
        One array per kind, shape ``(*lead, n_heads)`` (or ``(*lead, n_heads, n)``): the mean
        over eligible queries (i >= 1 a real token, T(i) without padding keys non-empty) of
        sum_{j in T(i)} A[i, j]. A target outside the window counts with A[i, j] = 0. With
        ``return_lse=True``, the tuple ``(scores, lse)``.

    Notes
    -----
    Per query row i, tile by tile over its keys: the online log-sum-exp lse_i = log sum_j
    exp(s_ij) (and, for ``entropy``, H_i = lse_i - sum_j A[i, j] s_ij in the same pass), then
    A[i, j] = exp(s_ij - lse_i) for the target keys only (s_ij soft-capped by the same function
    as the tile). Time O(n^2 d_head) per head like the patterns, O(n * (window + 128) * d_head)
    with a window (key tiles wholly before every window of a block of rows are skipped); extra
    memory O(threads x 128 x 256) plus O(n) per head: n = 32k fits in a few MB.
    Releases the GIL; results are bit-identical for any number of threads.

    With ``lse`` (and no whole-row kind) the cost is O(n * |T| * d_head) per head: one dot
    product per target, where |T| is the number of targets of a query summed over the kinds
    (1 for positional kinds; the earlier occurrences of a token for ``duplicate_token`` and
    ``induction``). A row that has no target costs nothing. Measured (benches/bench_attention.py,
    one head, d_head 64, float32, three kinds, 2 cores): 1.1 ms against 23 ms at n = 4096,
    4.5 ms against 350 ms at 16384, ~20 ms against 3-6 s at 65536.

    Precision with ``lse``: an error delta in lse_i and epsilon in the recomputed logit s_ij
    make A[i, j] off by a factor exp(epsilon - delta), a relative error of about
    |delta| + |epsilon|, and a mass (a sum of such probabilities) by at most the same relative
    amount. The lse of a float32 kernel (bf16 and fp16 kernels keep theirs in float32) is a
    float32 of magnitude L: rounding alone puts it 2^-24 * |L| from its float64 value, and the
    kernel's own arithmetic a few more ulp, so |delta| <= ~2 * 2^-24 * max(1, |L|) (1.2e-7
    relative at |L| <= 1, 1.2e-6 at |L| = 10). epsilon is the difference between the float32
    logit that kernel summed and the one recomputed here: each float32 dot product is within
    about d_head * 2^-24 * sum_p |q_p k_p| of the exact one, so
    |epsilon| <= ~2 * d_head * 2^-24 * scale * sum_p |q_p k_p| (and 0 for an lse from
    ``return_lse``, which comes from the very same logits). A float64 lse adds only float64
    rounding. Without ``lse`` nothing changes.

    Examples
    --------
    >>> import numpy as np, induct_fast as inf
    >>> q = np.zeros((4, 1, 8), np.float32)
    >>> inf.scores_from_qk(q, q, kinds="previous_token")["previous_token"]  # (1/2 + 1/3 + 1/4) / 3
    array([0.36111111])
    >>> scores, lse = inf.scores_from_qk(q, q, kinds="self", return_lse=True)
    >>> lse[0]  # log(i + 1): every logit is 0
    array([0.        , 0.69314718, 1.09861229, 1.38629436])
    >>> inf.scores_from_qk(q, q, kinds="self", lse=lse)["self"]  # no logit tile computed
    array([0.36111111])
    """
    names = _kind_names(kinds, offsets)
    q, k = _qk(q, k)
    o = _options(scale, causal, layout, softcap, window)
    given = None if lse is None else kernel_array(as_float_array(lse, "lse", integers=False, bfloat16=True))
    result = _core.scores_from_qk(
        kernel_array(q),
        kernel_array(k),
        as_tokens(tokens),
        names,
        o["scale"],
        o["causal"],
        as_key_mask(attention_mask),
        o["layout"],
        bool(exclude_bos),
        bool(per_query),
        o["softcap"],
        o["window"],
        given,
        bool(return_lse),
        as_measure(measure),
        as_span(queries, "queries"),
        as_span(keys, "keys"),
    )
    if isinstance(result, tuple):  # return_lse
        values, lse_out = result
        return {name: values[i] for i, name in enumerate(names)}, lse_out
    return {name: result[i] for i, name in enumerate(names)}
