"""Token sequences for probing heads."""

from __future__ import annotations

from typing import Optional

import numpy as np


def repeated_tokens(batch: int, period: int, vocab_size: int, *, seed: Optional[int] = None, bos: Optional[int] = 0) -> np.ndarray:
    """BOS followed by a random block of ``period`` tokens repeated twice.

    Returns
    -------
    ndarray of int64, shape (batch, 1 + 2 * period) (no leading BOS column if ``bos`` is None)

    Tokens of a block are drawn from ``range(vocab_size)`` without the BOS id, distinct within the
    block while the vocabulary allows it, so for every query of the repeated half the induction
    target is exactly offset ``period - 1`` and the duplicate-token target offset ``period``.
    """
    for name, value in (("batch", batch), ("period", period), ("vocab_size", vocab_size)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    rng = np.random.default_rng(seed)
    candidates = np.arange(vocab_size, dtype=np.int64)
    if bos is not None:
        candidates = candidates[candidates != bos]
    if candidates.size == 0:
        raise ValueError(f"vocab_size: expected room for tokens other than bos={bos}, got {vocab_size}")
    distinct = period <= candidates.size
    blocks = np.stack([rng.choice(candidates, size=period, replace=not distinct) for _ in range(batch)])
    parts = [blocks, blocks]
    if bos is not None:
        parts.insert(0, np.full((batch, 1), bos, dtype=np.int64))
    return np.concatenate(parts, axis=1)
