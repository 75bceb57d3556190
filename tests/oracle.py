"""A slow, obvious numpy oracle for the scores of DESIGN.md section 4.

Written from the DESIGN.md table and the fixture README's description of TransformerLens, not
from the Rust code: dense 0/1 target masks D[i, j], explicit loops over the leading indices,
float64 everywhere. Nothing here is clever on purpose.
"""

from __future__ import annotations

import functools

import numpy as np

TOKEN_KINDS = ("duplicate_token", "induction")
TARGET_KINDS = ("previous_token", "duplicate_token", "induction", "bos", "self")


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


def per_query_one_head(A: np.ndarray, kind: str, tokens_row=None, exclude_bos: bool = False) -> np.ndarray:
    """Per-query values [n] of one head [n, n]: NaN where not eligible."""
    A = np.asarray(A, dtype=np.float64)
    n = A.shape[-1]
    out = np.full(n, np.nan)
    Ap = renormalise_without_bos(A) if exclude_bos else A
    if kind == "entropy":
        for i in range(1, n):
            p = Ap[i, 1:] if exclude_bos else Ap[i]
            p = p[p > 0]  # 0 log 0 = 0
            out[i] = -np.sum(p * np.log(p))
        return out
    D = target_mask(kind, n, tokens_row)
    if exclude_bos:
        D[:, 0] = False
    for i in range(1, n):
        if D[i].any():
            out[i] = np.sum(Ap[i][D[i]])
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


def head_scores(patterns, tokens=None, kinds=("previous_token", "duplicate_token", "induction"), offsets=(),
                exclude_bos=False, per_query=False) -> dict[str, np.ndarray]:
    """Oracle for ``induct_fast.head_scores``: {kind: [*lead] or [*lead, n]} float64."""
    P = np.array(patterns, dtype=np.float64)
    lead, n = P.shape[:-2], P.shape[-1]
    result = {}
    for kind in kind_names(kinds, offsets):
        out = np.full(lead + ((n,) if per_query else ()), np.nan)
        for index in np.ndindex(*lead):
            row = _token_row(tokens, index) if kind in TOKEN_KINDS else None
            values = per_query_one_head(P[index], kind, row, exclude_bos)
            out[index] = values if per_query else mean_eligible(values)
        result[kind] = out
    return result


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
