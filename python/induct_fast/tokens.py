"""Token sequences for probing heads, and the losses that show in-context learning."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _core
from ._arrays import as_count, as_float_array, as_tokens, kernel_array
from .probes import repeated


def repeated_tokens(batch: int, period: int, vocab_size: int, *, seed: Optional[int] = None, bos: Optional[int] = 0) -> np.ndarray:
    """BOS followed by a random block of ``period`` tokens repeated twice.

    The tokens of :func:`induct_fast.probes.repeated` with ``repeats=2``:
    ``repeated(batch, period, 2, vocab_size, seed=seed, bos=bos).tokens`` (that probe also
    gives the spans to score, and other numbers of repeats).

    Returns
    -------
    ndarray of int64, shape (batch, 1 + 2 * period) (no leading BOS column if ``bos`` is None)

    Tokens of a block are drawn from ``range(vocab_size)`` without the BOS id, distinct within the
    block while the vocabulary allows it, so for every query of the repeated half the induction
    target is exactly offset ``period - 1`` and the duplicate-token target offset ``period``.
    """
    return repeated(batch, period, 2, vocab_size, seed=seed, bos=bos).tokens


def token_losses(logits: Any, tokens: Any) -> np.ndarray:
    """Per-token cross-entropy of next-token predictions.

    ``loss[b, i] = logsumexp_v logits[b, i, v] - logits[b, i, tokens[b, i + 1]]``: the loss of
    predicting token i + 1 from the logits at position i (natural log, i.e. nats).

    Parameters
    ----------
    logits : array_like, shape (batch, n, vocab) or (n, vocab)
        bfloat16, float16, float32 or float64, any strides (C-contiguous input is read in place;
        CPU torch tensors, bfloat16 ones included, without a copy).
    tokens : array_like of int, shape (batch, n) or (n,)
        The token ids the logits were computed from; every id must lie in ``[0, vocab)``.

    Returns
    -------
    ndarray of float64, shape (batch, n - 1) or (n - 1,)

    Notes
    -----
    Computed in Rust, one streaming pass per row over the vocabulary with an online
    log-sum-exp (no ``[n, vocab]`` temporary), rows in parallel with the GIL released; sums in
    float64 whatever the input dtype (float32 and float16 rows are read as float32 lanes and
    widened in registers, each exp within 1.3e-15 relative). Raises
    ValueError for a NaN or inf logit in a row that is read (rows ``i < n - 1``), token ids out
    of range, or shapes that do not match.

    Examples
    --------
    >>> import numpy as np, induct_fast as ift
    >>> logits = np.zeros((1, 3, 4), dtype=np.float32)        # uniform over 4 tokens
    >>> np.round(ift.token_losses(logits, [[0, 1, 2]]), 4)     # log 4
    array([[1.3863, 1.3863]])
    """
    arr = as_float_array(logits, "logits", bfloat16=True)
    if arr.ndim not in (2, 3):  # before the tokens, whose expected shape follows from this one
        raise ValueError(f"logits: expected shape (n, vocab) or (batch, n, vocab), got shape {arr.shape}")
    if tokens is None:
        raise TypeError("tokens: expected an integer array of token ids, got None")
    raw = np.asarray(tokens)
    if raw.dtype == np.uint64 and raw.size and raw.max() > np.iinfo(np.int64).max:
        # int64 would wrap these ids to negative ones; report the id the caller gave.
        index = tuple(int(i) for i in np.unravel_index(int(raw.argmax()), raw.shape))
        raise ValueError(f"tokens: expected token ids in [0, vocab_size), got {raw[index]} at index {index}")
    ids = as_tokens(tokens, "tokens")
    assert ids is not None  # None was refused above
    return _core.token_losses(kernel_array(arr), ids)


def icl_score(losses: Any, early: int = 50, late: int = 500) -> float:
    """In-context learning score of Olsson et al. (2022), "In-context learning and induction heads".

    ``mean(losses[..., late]) - mean(losses[..., early])``: how much lower the loss is late in the
    context than early on, averaged over the batch. Negative means the model uses its context
    (the paper's models reach about -0.4 nats once induction heads form).

    Parameters
    ----------
    losses : array_like, shape (..., m)
        Per-token losses such as :func:`token_losses` returns, ``losses[..., i]`` being the loss of
        predicting token i + 1 from the first i + 1 tokens; leading axes (the batch) are averaged.
    early, late : int
        Positions along the last axis, ``0 <= early < late < m`` (the paper's 50 and 500 need
        ``m >= 501`` losses, i.e. sequences of at least 502 tokens).

    Returns
    -------
    float
    """
    values = as_float_array(losses, "losses")
    early = as_count(early, "early", 0)
    late = as_count(late, "late", 0)
    if late <= early:
        raise ValueError(f"early, late: expected early < late, got early={early}, late={late}")
    if values.ndim < 1:
        raise ValueError(f"losses: expected shape (..., m) with m > late={late}, got a scalar")
    m = values.shape[-1]
    if m <= late:
        raise ValueError(
            f"losses: expected at least late + 1 = {late + 1} positions along the last axis "
            f"(sequences of {late + 2} tokens), got shape {values.shape}; use a longer sequence or a smaller late"
        )
    if values[..., 0].size == 0:
        raise ValueError(f"losses: expected at least one sequence, got shape {values.shape}")
    late_loss = values[..., late].astype(np.float64).mean()
    early_loss = values[..., early].astype(np.float64).mean()
    return float(late_loss - early_loss)
