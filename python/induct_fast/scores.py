"""Scores of attention heads from their attention patterns (DESIGN.md section 4).

Every function takes ``patterns`` of shape ``[*lead, n, n]`` (query rows, key columns; typically
``[batch, layer, head, n, n]``) in bfloat16, float16, float32 or float64 with any strides, and
returns float64 arrays. bfloat16 (CPU torch tensors, ml_dtypes/JAX numpy arrays) is read natively,
without a copy, and scores exactly like float32 of the same values. ``tokens`` is ``[n]`` (shared by every leading index) or ``[lead[0], n]`` (one row
per batch element).

Target sets T(i) of query i, for a token row t:

==================  ===============================================
kind                T(i)
==================  ===============================================
``previous_token``  {i-1}
``duplicate_token`` {j < i : t[j] == t[i]}
``induction``       {j + 1 : j < i, t[j] == t[i]} (the token after an earlier occurrence)
``offset_<d>``      {i-d}
``bos``             {0}
``self``            {i}
``copy``            {j <= i : t[j] == t[i+1]} (the keys holding the token that comes next)
==================  ===============================================

A head's score is the mean over eligible queries (i >= 1 and T(i) non-empty) of
``sum_{j in T(i)} A[i, j]`` (``measure="mass"``) or of ``[argmax_j A[i, j] in T(i)]``
(``measure="top1"``, ties to the lowest index); NaN when no query is eligible. ``entropy`` is
the mean over rows i >= 1 of ``-sum_j A[i, j] log A[i, j]``.

Spans: ``queries`` and ``keys`` (0/1 flags ``[n]`` or ``[lead[0], n]``) narrow what is scored:
a query outside ``queries`` is not eligible; a key outside ``keys`` is dropped from every T(i)
(not from ``bos``'s; and the argmax of ``top1`` still ranges over every key).

Padding: with ``attention_mask`` (``[n]`` or ``[lead[0], n]``, 0 = padding) padding positions
are neither queries nor targets: a padding query i is not eligible (nor counted by ``entropy``)
and a padding key j is dropped from every T(i).
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Optional, Sequence, Union, overload

import numpy as np

from . import _core
from ._arrays import as_count, as_float_array, as_key_mask, as_measure, as_span, as_tokens, kernel_array

DEFAULT_KINDS = ("previous_token", "duplicate_token", "induction")
KINDS = ("previous_token", "duplicate_token", "induction", "copy", "bos", "self", "entropy")

KindArg = Union[str, Sequence[str]]
# One offset (``offsets=49``) or several (``offsets=(1, 49)``).
OffsetArg = Union[int, Iterable[int]]


def _kind_names(kinds: KindArg, offsets: OffsetArg) -> list[str]:
    """Requested kinds plus one ``offset_<d>`` per offset (a bare integer is one offset),
    duplicates dropped, order kept."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    if isinstance(offsets, (int, np.integer)) and not isinstance(offsets, (bool, np.bool_)):
        offsets = (int(offsets),)
    if not isinstance(kinds, Iterable):
        raise TypeError(f"kinds: expected a kind name or a sequence of them such as {KINDS}, got {kinds!r}")
    if not isinstance(offsets, Iterable) or isinstance(offsets, str):
        raise TypeError(f"offsets: expected a sequence of integers, got {offsets!r}")
    names = []
    for kind in kinds:
        if not isinstance(kind, str):
            raise TypeError(f"kinds: expected kind names (str) such as {KINDS}, got {kind!r}")
        names.append(kind)
    for offset in offsets:
        d = as_count(offset, "offset", 1)
        if d > sys.maxsize:
            raise ValueError(f"offset: expected an offset in 1..n-1, got {d}")
        names.append(f"offset_{d}")
    return list(dict.fromkeys(names))


def head_scores(
    patterns: Any,
    tokens: Any = None,
    *,
    kinds: KindArg = DEFAULT_KINDS,
    offsets: OffsetArg = (),
    exclude_bos: bool = False,
    per_query: bool = False,
    attention_mask: Any = None,
    measure: str = "mass",
    queries: Any = None,
    keys: Any = None,
) -> dict[str, np.ndarray]:
    """Scores of several kinds in one pass over the patterns.

    Parameters
    ----------
    patterns : array_like, shape (*lead, n, n)
        Attention patterns, query rows and key columns (bfloat16, float16/32/64, any strides).
    tokens : array_like of int, shape (n,) or (lead[0], n), optional
        Token ids; needed by ``duplicate_token``, ``induction`` and ``copy``.
    kinds : str or sequence of str
        Any of ``previous_token``, ``duplicate_token``, ``induction``, ``copy``, ``bos``,
        ``self``, ``entropy``, ``offset_<d>``. ``copy``: T(i) = {j <= i : t[j] == t[i+1]},
        eligible for 1 <= i <= n-2 (with ``measure="top1"`` and spans: the retrieval score).
    offsets : iterable of int
        Extra positional kinds ``offset_<d>`` (T(i) = {i-d}), each in 1..n-1.
    exclude_bos : bool
        Renormalise every row without key 0 first: A'[i, j] = A[i, j] / (1 - A[i, 0]) for j >= 1
        (a row with all its mass on key 0 becomes all zeros); key 0 is no longer a target.
    per_query : bool
        Return the per-query values, shape (*lead, n), NaN where a query is not eligible,
        instead of their mean.
    attention_mask : array_like of 0/1 or bool, shape (n,) or (lead[0], n), optional
        0 marks padding positions (broadcast over the other leading axes like ``tokens``).
        Padding positions are neither queries nor targets: with M the mask row,

            value(i) = sum_{j in T(i), M[j] = 1} A'[i, j]   for M[i] = 1, i >= 1 and that set
            non-empty; NaN (not eligible) otherwise, ``entropy`` included.

        With ``exclude_bos=True`` position 0 must be 1 in every prompt (BOS is position 0):
        left padding raises ValueError; pad on the right.
    measure : {"mass", "top1"}
        ``mass``: the attention mass on T(i), as above. ``top1``: 1 where the row's argmax key
        (over keys j >= first_key that are not padding, ties to the lowest index) is in T(i),
        else 0; a row with no positive entry there counts 0. ``entropy`` is unchanged. Reads
        whole rows: O(n^2) per head.
    queries, keys : array_like of 0/1 or bool, shape (n,) or (lead[0], n), optional
        Spans, broadcast like ``tokens``. Queries outside ``queries`` are not eligible (for
        every kind, ``entropy`` included); keys outside ``keys`` are dropped from every T(i)
        (but ``bos``'s: whole-row statistics take ``queries`` only); the argmax of ``top1``
        still ranges over all keys, so a head whose top key lies outside ``keys`` scores 0.

    Returns
    -------
    dict of str to ndarray of float64
        One array per kind (offsets keyed ``offset_<d>``), shape ``lead`` (or ``(*lead, n)``).

    Notes
    -----
    Only the entries a kind needs are read: O(n) per head for positional kinds, O(n + |T|) for
    token kinds (targets are built once per token row), O(n^2) for ``entropy``. NaN or inf in an
    entry that is read raises ValueError; entries no kind reads are not inspected.

    Examples
    --------
    >>> import numpy as np, induct_fast as ift
    >>> tokens = ift.repeated_tokens(1, period=5, vocab_size=50, seed=0)[0]
    >>> A = np.tril(np.ones((11, 11))) / np.arange(1, 12)[:, None]
    >>> s = ift.head_scores(A, tokens)
    >>> round(float(s["previous_token"]), 3)
    0.202
    """
    names = _kind_names(kinds, offsets)
    values = _core.head_scores(
        kernel_array(as_float_array(patterns, "patterns", bfloat16=True)),
        as_tokens(tokens),
        names,
        bool(exclude_bos),
        bool(per_query),
        as_key_mask(attention_mask),
        as_measure(measure),
        as_span(queries, "queries"),
        as_span(keys, "keys"),
    )
    return {name: values[i] for i, name in enumerate(names)}


def _one_kind(kind: str, patterns: Any, tokens: Any, exclude_bos: bool, per_query: bool) -> np.ndarray:
    return head_scores(patterns, tokens, kinds=(kind,), exclude_bos=exclude_bos, per_query=per_query)[kind]


def previous_token_scores(patterns: Any, *, exclude_bos: bool = False, per_query: bool = False) -> np.ndarray:
    """Mean attention from each query i >= 1 to key i-1, shape ``lead`` (see :func:`head_scores`)."""
    return _one_kind("previous_token", patterns, None, exclude_bos, per_query)


def duplicate_token_scores(patterns: Any, tokens: Any, *, exclude_bos: bool = False, per_query: bool = False) -> np.ndarray:
    """Mean attention to earlier copies of the current token, shape ``lead``.

    T(i) = {j < i : t[j] == t[i]}; queries whose token has not occurred before are not eligible.
    See :func:`head_scores` for shapes and options.
    """
    return _one_kind("duplicate_token", patterns, tokens, exclude_bos, per_query)


def induction_scores(patterns: Any, tokens: Any, *, exclude_bos: bool = False, per_query: bool = False) -> np.ndarray:
    """Mean attention to the token after each earlier copy of the current token, shape ``lead``.

    T(i) = {j + 1 : j < i, t[j] == t[i]}. See :func:`head_scores` for shapes and options.
    """
    return _one_kind("induction", patterns, tokens, exclude_bos, per_query)


def offset_scores(patterns: Any, offset: int, *, exclude_bos: bool = False, per_query: bool = False) -> np.ndarray:
    """Mean attention from each query i >= offset to key i - offset, shape ``lead``.

    No tokens needed: on repeated random tokens of period P (:func:`repeated_tokens`), the
    per-query induction score of every query in the repeated half equals its offset P-1 score
    (and duplicate_token equals offset P), so offset P-1 is a token-free induction probe; the
    means differ slightly because offsets also count queries of the first half. Reads
    n - offset entries per head.
    ``offset`` must be in 1..n-1.
    """
    # A plain int in range names its kind directly (what _kind_names gives it, a few
    # microseconds sooner); anything else gets _kind_names's checks and errors.
    names = [f"offset_{offset}"] if type(offset) is int and 1 <= offset <= sys.maxsize else _kind_names((), (offset,))
    # Straight to the kernel (a few microseconds less than through head_scores: small stacks
    # take tens of microseconds in all).
    values: np.ndarray = _core.head_scores(
        kernel_array(as_float_array(patterns, "patterns", bfloat16=True)), None, names, bool(exclude_bos), bool(per_query), None
    )[0]
    return values


@overload
def detection_scores(
    patterns: Any,
    detection: Union[list[str], tuple[str, ...]],
    *,
    tokens: Any = None,
    measure: str = "mul",
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
) -> dict[str, np.ndarray]: ...


@overload
def detection_scores(
    patterns: Any,
    detection: Any,
    *,
    tokens: Any = None,
    measure: str = "mul",
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
) -> np.ndarray: ...


def detection_scores(
    patterns: Any,
    detection: Any,
    *,
    tokens: Any = None,
    measure: str = "mul",
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
) -> Union[np.ndarray, dict[str, np.ndarray]]:
    """TransformerLens ``head_detector`` scores, shape ``lead``.

    Parameters
    ----------
    patterns : array_like, shape (*lead, n, n)
    detection : str, list or tuple of str, or array_like, shape (n, n) or (..., n, n)
        A kind name (``previous_token``, ``duplicate_token``, ``induction``, ``bos``, ``self``,
        ``offset_<d>``; its 0/1 matrix D is the T(i) table); a list or tuple of kind names,
        scored together in one pass over the patterns; or explicit matrices D, broadcast
        against the leading axes of ``patterns`` the numpy way (any finite values). Kind names
        and explicit matrices cannot be mixed in one call.
    tokens : array_like of int, shape (n,) or (lead[0], n), optional
        Needed by token kinds.
    measure : {"mul", "abs"}
        With A' = A with column 0 zeroed (``exclude_bos``) and the diagonal zeroed
        (``exclude_current_token``): ``mul`` = sum(A' * D) / sum(A') over the whole matrix;
        ``abs`` = 1 - sum(E) / n with E = |A - D| zeroed the same way. TransformerLens rounds
        ``abs`` to 3 decimals; we return the exact value.

    Returns
    -------
    ndarray of float64, shape ``lead`` (a numpy scalar for one [n, n] pattern), or for a list
    or tuple of kinds a dict of kind name to such an array (duplicates dropped, order kept),
    each value identical, bit for bit, to the call with that kind alone.

    Every entry that enters the formula is read (one streaming pass per head, shared by every
    kind of a list: k kinds cost little more than one); NaN or inf there raises ValueError
    (zeroed columns are not read).
    """
    if not isinstance(measure, str):
        raise TypeError(f"measure: expected \"mul\" or \"abs\", got {measure!r}")
    names: Optional[list[str]] = None
    matrices = None
    if isinstance(detection, str):
        names = [detection]
    elif isinstance(detection, (list, tuple)) and any(isinstance(k, str) for k in detection):
        bad = [k for k in detection if not isinstance(k, str)]
        if bad:
            raise TypeError(f"detection: expected kind names (str) such as {KINDS[:3]}, or one array, got {type(bad[0]).__name__} among kind names")
        names = list(dict.fromkeys(detection))
    else:
        matrices = _detection_matrices(detection, patterns)
    scores = _core.detection_scores(
        kernel_array(as_float_array(patterns, "patterns", bfloat16=True)),
        names,
        matrices,
        as_tokens(tokens),
        measure,
        bool(exclude_bos),
        bool(exclude_current_token),
    )
    # numpy scalars for a single [n, n] pattern, like head_scores
    if names is None:
        return scores[()]
    per_kind: dict[str, np.ndarray] = {name: scores[k][()] for k, name in enumerate(names)}
    return per_kind[names[0]] if isinstance(detection, str) else per_kind


def _detection_matrices(detection: Any, patterns: Any) -> np.ndarray:
    """D as float64 with leading axes padded on the left, so it broadcasts like numpy's rules."""
    d = as_float_array(detection, "detection").astype(np.float64, copy=False)
    lead_ndim = np.ndim(patterns) - 2
    if d.ndim < 2 or d.ndim - 2 > max(lead_ndim, 0):
        raise ValueError(
            f"detection: expected shape (n, n) or (..., n, n) with at most {max(lead_ndim, 0)} leading axes, got shape {d.shape}"
        )
    return d.reshape((1,) * (lead_ndim - (d.ndim - 2)) + d.shape)
