"""Probe prompts: token ids together with the spans of queries and keys to score on them.

Each probe returns a :class:`Probe` ``(tokens, queries, keys)``, ready for
``scan_model(model, probe.tokens, queries=probe.queries, keys=probe.keys)`` (or
``head_scores``, ``scores_from_qk``, ``scan``): ``queries`` are the positions whose scores count,
``keys`` the positions a target may lie at (DESIGN.md section 12).

- :func:`repeated`: a random block of tokens seen ``repeats`` times (Olsson et al. 2022: 25
  tokens x 4; RazorAttention: 2500 x 4), scored from the first repeat on.
- :func:`needle`: a needle inserted into a haystack at several depths and repeated as the answer
  (needle in a haystack; the retrieval score of Wu et al. 2024 with the kind ``copy``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np

from ._arrays import as_count, as_seed


class Probe(NamedTuple):
    """Token ids and the spans to score on them; unpacks as ``tokens, queries, keys = probe``.

    Attributes
    ----------
    tokens : ndarray of int64, shape (batch, n)
    queries : ndarray of bool, shape (batch, n)
        True at the query positions to score (all others are not eligible).
    keys : ndarray of bool, shape (batch, n)
        True at the key positions targets may lie at (all others are dropped from every target
        set; the argmax of ``measure="top1"`` still ranges over every key).
    """

    tokens: np.ndarray
    queries: np.ndarray
    keys: np.ndarray


def repeated(
    batch: int, period: int, repeats: int, vocab_size: int, *, seed: Optional[int] = None, bos: Optional[int] = 0
) -> Probe:
    """BOS, then a random block of ``period`` tokens seen ``repeats`` times in a row.

    Olsson et al. (2022) score prefix matching on 25 random tokens repeated 4 times;
    RazorAttention (Tang et al. 2024) finds echo and induction heads on 2500 random tokens
    repeated 4 times after a BOS.

    Parameters
    ----------
    batch : int
        Prompts (>= 1), each with its own random block.
    period : int
        Tokens in the block (>= 1).
    repeats : int
        How many times the block occurs (>= 2: the first occurrence, then the repeats).
    vocab_size : int
        Tokens are drawn from ``range(vocab_size)`` without ``bos``, distinct within a block while
        the vocabulary allows it (``period <= vocab_size - 1`` with a BOS in the vocabulary).
    seed : int, optional
        Seed of numpy's ``default_rng`` (None: fresh randomness).
    bos : int or None
        Token id at position 0 (default 0); None: no BOS column.

    Returns
    -------
    Probe
        ``tokens`` int64 ``(batch, o + repeats * period)`` with ``o = 1`` with a BOS, else 0: the
        block occupies positions ``o + r * period .. o + (r + 1) * period - 1`` for
        ``r = 0 .. repeats - 1``. ``queries`` is True from the first repeat on
        (``i >= o + period``), where the block's earlier occurrences make induction, echo
        (duplicate-token) and copying predictable; ``keys`` is True everywhere.

    Notes
    -----
    With distinct tokens in the block, query ``i`` of repeat ``r >= 1`` has its induction targets
    at ``i - period + 1, i - 2 * period + 1, ...`` and its duplicate-token targets at
    ``i - period, i - 2 * period, ...``: offsets ``period - 1`` and ``period`` and their
    multiples. ``repeats=2`` gives exactly :func:`induct_fast.repeated_tokens` (same seed, same
    tokens): that function is ``repeated(batch, period, 2, vocab_size, seed=seed, bos=bos).tokens``.

    Examples
    --------
    >>> p = repeated(batch=1, period=3, repeats=3, vocab_size=10, seed=0)
    >>> p.tokens.shape, p.tokens[0, 1:4].tolist() == p.tokens[0, 4:7].tolist() == p.tokens[0, 7:].tolist()
    ((1, 10), True)
    >>> p.queries.astype(int)
    array([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1]])
    """
    batch, period, vocab_size = (as_count(v, name, 1) for v, name in ((batch, "batch"), (period, "period"), (vocab_size, "vocab_size")))
    repeats = as_count(repeats, "repeats", 2)
    if bos is not None:
        bos = as_count(bos, "bos", 0)
    n_candidates = vocab_size - int(bos is not None and bos < vocab_size)
    if n_candidates == 0:
        raise ValueError(f"vocab_size: expected room for tokens other than bos={bos}, got {vocab_size}")
    rng = np.random.default_rng(as_seed(seed))
    # Draw from range(n_candidates) (O(period) memory whatever the vocabulary), then step over
    # the BOS id.
    distinct = period <= n_candidates
    blocks = np.stack([rng.choice(n_candidates, size=period, replace=not distinct) for _ in range(batch)]).astype(np.int64)
    if bos is not None:
        blocks[blocks >= bos] += 1
    parts = [blocks] * repeats
    if bos is not None:
        parts.insert(0, np.full((batch, 1), bos, dtype=np.int64))
    tokens = np.concatenate(parts, axis=1)
    first_repeat = int(bos is not None) + period
    queries = np.zeros(tokens.shape, dtype=bool)
    queries[:, first_repeat:] = True
    return Probe(tokens, queries, np.ones(tokens.shape, dtype=bool))


def needle(
    haystack: Any,
    needle: Any,
    depths: Union[float, Sequence[float], np.ndarray],
    *,
    question: Any = None,
    bos: Optional[int] = None,
) -> Probe:
    """A needle hidden in a haystack at each depth, then repeated as the (teacher-forced) answer.

    Row ``b`` is ``[bos] + haystack[:p] + needle + haystack[p:] + question + needle`` with
    ``p = floor(depths[b] * len(haystack) + 0.5)`` (the nearest gap between haystack tokens,
    halves rounded up): one prompt per depth, all of one length.

    Parameters
    ----------
    haystack : array_like of int, shape (h,)
        Token ids of the context, h >= 1 (without BOS: pass that as ``bos``, so that depth 0
        puts the needle right after it).
    needle : array_like of int, shape (m,)
        Token ids of the fact to retrieve, m >= 1.
    depths : float or sequence of float in [0, 1]
        Where the needle goes, as a fraction of the haystack (0: before it, 1: after it); one
        prompt per depth.
    question : array_like of int, shape (q,), optional
        Token ids between the haystack and the answer (a question, "The answer is:"); q >= 0.
    bos : int, optional
        Token id at position 0 (default: none).

    Returns
    -------
    Probe
        ``tokens`` int64 ``(len(depths), n)`` with ``n = o + h + m + q + m`` (``o = 1`` with a
        BOS); ``keys`` True at the needle in the haystack, positions ``o + p .. o + p + m - 1``;
        ``queries`` True at the ``m`` positions that predict the answer tokens: the answer starts
        at ``a = n - m`` and, with the kind ``copy`` (query ``i`` predicts token ``i + 1``),
        answer token ``k`` is predicted by query ``a - 1 + k``, so the queries are
        ``a - 1 .. n - 2``: the last prompt token and every answer token but the last.

    Notes
    -----
    With ``kinds="copy", measure="top1"`` a query counts when its most attended key is a needle
    position holding the token the query predicts: the retrieval score of Wu et al. (2024),
    teacher-forced (the answer is given, not generated), the fraction of needle tokens a head
    copies, averaged over depths by :class:`induct_fast.HeadScores`.

    Examples
    --------
    Haystack ``[10, 11, 12, 13]``, needle ``[7, 8]``, depth 0.5 (p = 2), question ``[99]``, BOS 1:

    >>> p = needle([10, 11, 12, 13], [7, 8], [0.5], question=[99], bos=1)
    >>> p.tokens                                   # positions 0..9
    array([[ 1, 10, 11,  7,  8, 12, 13, 99,  7,  8]])
    >>> np.flatnonzero(p.keys[0]), np.flatnonzero(p.queries[0])
    (array([3, 4]), array([7, 8]))

    Query 7 (``99``) predicts token 8 (``7``), found at key 3; query 8 (``7``) predicts token 9
    (``8``), found at key 4.
    """
    hay = _token_ids(haystack, "haystack", minimum_length=1)
    pin = _token_ids(needle, "needle", minimum_length=1)
    ask = _token_ids(question, "question", minimum_length=0) if question is not None else np.zeros(0, dtype=np.int64)
    at = _depths(depths)
    head = np.zeros(0, dtype=np.int64) if bos is None else np.array([as_count(bos, "bos", 0)], dtype=np.int64)
    o, h, m = head.size, hay.size, pin.size
    n = o + h + m + ask.size + m
    tokens = np.empty((at.size, n), dtype=np.int64)
    queries = np.zeros((at.size, n), dtype=bool)
    keys = np.zeros((at.size, n), dtype=bool)
    queries[:, n - m - 1 : n - 1] = True
    for row, depth in enumerate(at):
        p = math.floor(depth * h + 0.5)
        tokens[row] = np.concatenate([head, hay[:p], pin, hay[p:], ask, pin])
        keys[row, o + p : o + p + m] = True
    return Probe(tokens, queries, keys)


def _token_ids(value: Any, name: str, *, minimum_length: int) -> np.ndarray:
    """A 1-D sequence of token ids (>= 0) as int64, with errors naming `name`."""
    if value is None or isinstance(value, (str, bytes)):
        raise TypeError(f"{name}: expected a 1-D sequence of integer token ids, got {type(value).__name__}")
    try:
        raw = np.asarray(value)
    except Exception as exc:  # ragged lists, objects whose __array__ fails
        raise TypeError(f"{name}: expected a 1-D sequence of integer token ids, got {type(value).__name__} ({exc})") from None
    if raw.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of token ids, got shape {raw.shape}")
    if raw.size == 0 and raw.dtype.kind == "f":  # [] is float64 to numpy
        raw = raw.astype(np.int64)
    if raw.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer token ids, got dtype {raw.dtype}")
    if raw.size < minimum_length:
        raise ValueError(f"{name}: expected at least {minimum_length} token, got none")
    if raw.size and (raw.min() < 0 or raw.max() > np.iinfo(np.int64).max):
        index = int(raw.argmin()) if raw.min() < 0 else int(raw.argmax())
        raise ValueError(f"{name}: expected token ids in [0, 2**63), got {raw[index]} at index {index}")
    return raw.astype(np.int64)


def _depths(depths: Any) -> np.ndarray:
    """Depths as a 1-D float64 array of values in [0, 1] (a single number is one depth)."""
    if depths is None or isinstance(depths, (str, bytes)):
        raise TypeError(f"depths: expected a sequence of numbers in [0, 1], got {type(depths).__name__}")
    values = [depths] if isinstance(depths, numbers.Number) else depths
    try:
        raw = np.asarray(values)
    except Exception as exc:
        raise TypeError(f"depths: expected a sequence of numbers in [0, 1], got {type(depths).__name__} ({exc})") from None
    if raw.dtype.kind not in "iuf":
        raise TypeError(f"depths: expected numbers in [0, 1], got dtype {raw.dtype}")
    if raw.ndim != 1 or raw.size == 0:
        raise ValueError(f"depths: expected a non-empty 1-D sequence of numbers in [0, 1], got shape {raw.shape}")
    at = raw.astype(np.float64)
    bad = ~((at >= 0.0) & (at <= 1.0))  # NaN included
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(f"depths: expected numbers in [0, 1], got {raw[index].item()!r} at index {index}")
    return at
