"""A slow, obvious numpy oracle for the scores of DESIGN.md section 4 and the attention of
section 5 (with the soft cap, sliding window and padding of section 10, the row log-sum-exp of
section 11, and the top-1 measure, ``copy`` kind and query/key spans of section 12).

Written from the DESIGN.md table and the fixture README's description of TransformerLens, not
from the Rust code: dense 0/1 target masks D[i, j], explicit loops over the leading indices,
heads and query rows, float64 everywhere. Nothing here is clever on purpose.
"""

from __future__ import annotations

import functools

import numpy as np

TOKEN_KINDS = ("duplicate_token", "induction", "copy")
TARGET_KINDS = ("previous_token", "duplicate_token", "induction", "copy", "bos", "self")


def offset_of(kind: str) -> int | None:
    """d for ``offset_<d>``, else None."""
    if kind.startswith("offset_"):
        return int(kind[len("offset_") :])
    return None


def target_mask(kind: str, n: int, tokens_row=None) -> np.ndarray:
    """D[i, j] = True iff key j is in T(i), straight from the DESIGN.md table (every i, row 0 too)."""
    t = None if tokens_row is None else tuple(int(x) for x in np.asarray(tokens_row))
    return _target_mask(kind, n, t).copy()


@functools.lru_cache(maxsize=4096)
def _target_mask(kind: str, n: int, t) -> np.ndarray:
    D = np.zeros((n, n), dtype=bool)
    d = offset_of(kind)
    if kind in TOKEN_KINDS and t is None:
        raise ValueError(f"oracle: kind {kind} needs tokens")
    for i in range(n):
        for j in range(n):
            if kind == "previous_token":
                hit = j == i - 1
            elif kind == "duplicate_token":
                hit = j < i and t[j] == t[i]
            elif kind == "induction":
                hit = 1 <= j <= i and t[j - 1] == t[i] and j - 1 < i
            elif kind == "copy":
                hit = j <= i and i + 1 < n and t[j] == t[i + 1]
            elif kind == "bos":
                hit = j == 0
            elif kind == "self":
                hit = j == i
            elif d is not None:
                hit = j == i - d
            else:
                raise ValueError(f"oracle: unknown kind {kind!r}")
            D[i, j] = hit
    return D


def _token_row(tokens, index: tuple):
    """The token row of leading index `index` (tokens [n] shared, or [lead[0], n])."""
    if tokens is None:
        return None
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        return tokens
    return tokens[index[0]]


def renormalise_without_bos(A: np.ndarray) -> np.ndarray:
    """A'[i, j] = A[i, j] / (1 - A[i, 0]) for j >= 1, A'[i, 0] = 0; a zero row where 1 - A[i, 0] <= 0."""
    out = np.zeros_like(A, dtype=np.float64)
    for i in range(A.shape[0]):
        rest = 1.0 - A[i, 0]
        if rest > 0:
            out[i, 1:] = A[i, 1:] / rest
    return out


def per_query_one_head(A: np.ndarray, kind: str, tokens_row=None, exclude_bos: bool = False, valid=None,
                       measure: str = "mass", queries=None, keys=None) -> np.ndarray:
    """Per-query values [n] of one head [n, n]: NaN where not eligible.

    ``valid`` ([n] bool, None = all real) marks real tokens; a padding position is no query (NaN,
    entropy included) and no target (its column leaves every T(i)). ``queries`` ([n] bool) leaves
    the queries outside not eligible; ``keys`` drops the keys outside from T(i) (not for ``bos``).
    ``measure="top1"``: 1 if the row's largest entry over the candidate keys (j >= 1 under
    exclude_bos, real tokens; every key whatever ``keys`` says), first one on ties, is in T(i);
    0 if it is in none, or if no candidate entry is positive.
    """
    A = np.asarray(A, dtype=np.float64)
    n = A.shape[-1]
    real = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    scored = real & (np.ones(n, bool) if queries is None else np.asarray(queries, bool))
    out = np.full(n, np.nan)
    Ap = renormalise_without_bos(A) if exclude_bos else A
    if kind == "entropy":
        for i in range(1, n):
            if not scored[i]:
                continue
            p = Ap[i, 1:] if exclude_bos else Ap[i]
            p = p[p > 0]  # 0 log 0 = 0
            out[i] = -np.sum(p * np.log(p))
        return out
    D = target_mask(kind, n, tokens_row)
    if exclude_bos:
        D[:, 0] = False
    D[:, ~real] = False
    if keys is not None and kind != "bos":
        D[:, ~np.asarray(keys, bool)] = False
    first = 1 if exclude_bos else 0
    for i in range(1, n):
        if not (scored[i] and D[i].any()):
            continue
        if measure == "mass":
            out[i] = np.sum(Ap[i][D[i]])
        else:
            candidates = np.flatnonzero(real & (np.arange(n) >= first))
            row = A[i, candidates]
            best = candidates[np.argmax(row)] if row.size and row.max() > 0 else None  # first max
            out[i] = 1.0 if best is not None and D[i, best] else 0.0
    return out


def mean_eligible(values: np.ndarray) -> float:
    """Mean of the non-NaN entries, NaN if there are none."""
    kept = [v for v in values if not np.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def kind_names(kinds, offsets=()) -> list[str]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    names = list(kinds) + [f"offset_{int(d)}" for d in offsets]
    return list(dict.fromkeys(names))


def _mask_row(mask, index: tuple):
    """The 0/1 row of leading index `index` of a mask [n], [1, n] or [lead[0], n], as bool (None: none)."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.ndim == 1:
        return mask != 0
    return mask[index[0] if mask.shape[0] > 1 else 0] != 0


def head_scores(patterns, tokens=None, kinds=("previous_token", "duplicate_token", "induction"), offsets=(),
                exclude_bos=False, per_query=False, attention_mask=None, measure="mass", queries=None,
                keys=None) -> dict[str, np.ndarray]:
    """Oracle for ``induct_fast.head_scores``: {kind: [*lead] or [*lead, n]} float64."""
    P = np.array(patterns, dtype=np.float64)
    lead, n = P.shape[:-2], P.shape[-1]
    result = {}
    for kind in kind_names(kinds, offsets):
        out = np.full(lead + ((n,) if per_query else ()), np.nan)
        for index in np.ndindex(*lead):
            row = _token_row(tokens, index) if kind in TOKEN_KINDS else None
            values = per_query_one_head(P[index], kind, row, exclude_bos, _mask_row(attention_mask, index), measure,
                                        _mask_row(queries, index), _mask_row(keys, index))
            out[index] = values if per_query else mean_eligible(values)
        result[kind] = out
    return result


def allowed_keys(n: int, causal=True, window=None, real=None) -> np.ndarray:
    """M[i, j] = True iff query i may attend to key j: j <= i (causal), i - j < window (if given)
    and key j a real token."""
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    M = np.ones((n, n), dtype=bool)
    if causal:
        M &= j <= i
    if window is not None:
        M &= i - j < window
    if real is not None:
        M &= np.asarray(real, bool)[None, :]
    return M


def allowed_logits(q, k, *, scale=None, causal=True, attention_mask=None, layout="bnhd", softcap=None,
                   window=None):
    """Yields (index + (h,), s, allowed) for every head: s [n, n] = scale * q_i . k_j, then
    softcap * tanh(s / softcap), and allowed [n, n] from ``allowed_keys``. Query head h reads
    kv head h // (heads / kv_heads)."""
    Q, K = np.asarray(q, np.float64), np.asarray(k, np.float64)
    if layout == "bnhd":  # -> [*lead, heads, n, d]
        Q, K = np.swapaxes(Q, -3, -2), np.swapaxes(K, -3, -2)
    lead, heads, n, d = Q.shape[:-3], Q.shape[-3], Q.shape[-2], Q.shape[-1]
    group = heads // K.shape[-3] if K.shape[-3] else 1
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    for index in np.ndindex(*lead):
        allowed = allowed_keys(n, causal, window, _mask_row(attention_mask, index))
        for h in range(heads):
            s = scale * (Q[index][h] @ K[index][h // group].T)
            if softcap is not None:
                s = softcap * np.tanh(s / softcap)
            yield index + (h,), s, allowed


def _heads_shape(q, layout) -> tuple:
    """[*lead, heads, n] of q."""
    shape = np.shape(q)
    return shape[:-3] + ((shape[-2], shape[-3]) if layout == "bnhd" else (shape[-3], shape[-2]))


def attention_patterns(q, k, *, scale=None, causal=True, attention_mask=None, layout="bnhd", softcap=None,
                       window=None) -> np.ndarray:
    """Oracle for ``induct_fast.attention_patterns``: [*lead, heads, n, n] float64.

    s = scale * q_i . k_j, then softcap * tanh(s / softcap); each row a softmax over its allowed
    keys (``allowed_keys``), 0 elsewhere, all zeros when none is allowed.
    """
    shape = _heads_shape(q, layout)
    out = np.zeros(shape + shape[-1:])
    rules = dict(scale=scale, causal=causal, attention_mask=attention_mask, layout=layout, softcap=softcap, window=window)
    for head, s, allowed in allowed_logits(q, k, **rules):
        for i in range(shape[-1]):
            keys = np.flatnonzero(allowed[i])
            if keys.size:
                e = np.exp(s[i, keys] - s[i, keys].max())
                out[head + (i,)][keys] = e / e.sum()
    return out


def log_sum_exp(q, k, *, scale=None, causal=True, attention_mask=None, layout="bnhd", softcap=None,
                window=None) -> np.ndarray:
    """Oracle for the ``lse`` of ``induct_fast.scores_from_qk``: [*lead, heads, n] float64,
    lse[..., h, i] = log sum_{j allowed} exp(s_ij) with the logits and allowed keys of
    ``attention_patterns``; -inf for a row with no allowed key. Every row, padding rows too."""
    shape = _heads_shape(q, layout)
    out = np.full(shape, -np.inf)
    rules = dict(scale=scale, causal=causal, attention_mask=attention_mask, layout=layout, softcap=softcap, window=window)
    for head, s, allowed in allowed_logits(q, k, **rules):
        for i in range(shape[-1]):
            row = s[i, allowed[i]]
            if row.size:
                top = row.max()
                out[head + (i,)] = top + np.log(np.sum(np.exp(row - top)))
    return out


def scores_from_qk(q, k, tokens=None, *, kinds=("previous_token", "duplicate_token", "induction"), offsets=(),
                   scale=None, causal=True, attention_mask=None, layout="bnhd", exclude_bos=False, per_query=False,
                   softcap=None, window=None, measure="mass", queries=None, keys=None) -> dict[str, np.ndarray]:
    """Oracle for ``induct_fast.scores_from_qk``: the scores of the oracle patterns under the same
    mask (padding is neither query nor target). ``exclude_bos`` in its exact form: key 0 is left
    out of every softmax (so no 1 - A[i, 0] is ever divided by). ``top1`` through the float64
    patterns, whose argmax is the logits' (exp is increasing) unless two logits are so close
    that their float64 probabilities round equal."""
    n = np.shape(q)[-3 if layout == "bnhd" else -2]
    real = None if attention_mask is None else (np.asarray(attention_mask) != 0)
    if exclude_bos:
        real = np.ones(n, bool) if real is None else real.copy()
        real[..., :1] = False
    P = attention_patterns(q, k, scale=scale, causal=causal, attention_mask=real, layout=layout, softcap=softcap,
                           window=window)
    return head_scores(P, tokens, kinds, offsets, exclude_bos=exclude_bos, per_query=per_query,
                       attention_mask=attention_mask, measure=measure, queries=queries, keys=keys)


def detection_one_head(A: np.ndarray, D: np.ndarray, measure: str = "mul", exclude_bos: bool = False,
                       exclude_current_token: bool = False) -> float:
    """TransformerLens ``head_detector`` on one head, as the fixture README describes it (unrounded)."""
    A = np.array(A, dtype=np.float64)
    D = np.array(D, dtype=np.float64)
    n = A.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        if measure == "mul":
            if exclude_bos:
                A[:, 0] = 0
            if exclude_current_token:
                np.fill_diagonal(A, 0)
            return np.float64((A * D).sum()) / np.float64(A.sum())
        if measure == "abs":
            E = np.abs(A - D)
            if exclude_bos:
                E[:, 0] = 0
            if exclude_current_token:
                np.fill_diagonal(E, 0)
            return np.float64(1.0) - np.float64(E.sum()) / np.float64(n)
    raise ValueError(f"oracle: unknown measure {measure!r}")


def detection_scores(patterns, detection, tokens=None, measure="mul", exclude_bos=False,
                     exclude_current_token=False) -> np.ndarray:
    """Oracle for ``induct_fast.detection_scores``: [*lead] float64.

    ``detection`` is a kind name (D is its target mask) or explicit matrices broadcast against the
    patterns the numpy way.
    """
    P = np.array(patterns, dtype=np.float64)
    lead, n = P.shape[:-2], P.shape[-1]
    if not isinstance(detection, str):
        Dfull = np.broadcast_to(np.asarray(detection, dtype=np.float64), lead + (n, n))
    out = np.full(lead, np.nan)
    for index in np.ndindex(*lead):
        if isinstance(detection, str):
            row = _token_row(tokens, index) if detection in TOKEN_KINDS else None
            D = target_mask(detection, n, row)
        else:
            D = Dfull[index]
        out[index] = detection_one_head(P[index], D, measure, exclude_bos, exclude_current_token)
    return out
