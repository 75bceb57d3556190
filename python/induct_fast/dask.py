"""Head scores over dask arrays: the same results as :func:`induct_fast.head_scores`, as lazy
dask arrays, computed block by block on any dask scheduler (threads, processes, or a
``distributed`` cluster), which is the way past one machine's memory.

Requires ``dask[array]`` (``pip install induct_fast[dask]``); importing :mod:`induct_fast` does not
import dask.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from ._arrays import as_key_mask, as_measure, as_span
from .scores import DEFAULT_KINDS, KindArg, OffsetArg, _kind_names


def head_scores(
    array: Any,
    tokens: Any = None,
    *,
    kinds: KindArg = DEFAULT_KINDS,
    offsets: OffsetArg = (),
    exclude_bos: bool = False,
    attention_mask: Any = None,
    measure: str = "mass",
    queries: Any = None,
    keys: Any = None,
) -> dict[str, Any]:
    """Lazy head scores of a chunked ``[*lead, n, n]`` dask array.

    Parameters
    ----------
    array : dask.array.Array, shape (*lead, n, n)
        Attention patterns chunked along the leading axes (e.g. ``[batch, layer, head, n, n]``
        with chunks ``(8, 1, -1, -1, -1)``). The last two axes must each be one chunk; if they
        are not, they are rechunked to one (every block then holds whole n x n matrices). Other
        array-likes are wrapped as a single chunk.
    tokens : array_like or dask array of int, shape (n,) or (lead[0], n), optional
        Token ids. ``[lead[0], n]`` tokens are rechunked to follow ``array``'s chunks of the
        first (batch) axis, so each block gets the token rows of its prompts.
    kinds, offsets, exclude_bos, measure
        As in :func:`induct_fast.head_scores`.
    attention_mask, queries, keys : array_like of 0/1, shape (n,) or (lead[0], n), optional
        Padding and spans, as in :func:`induct_fast.head_scores`; chunked like ``tokens``.

    Returns
    -------
    dict of str to dask.array.Array of float64, shape ``lead``
        One lazy array per kind, chunked like ``array``'s leading axes. All kinds come from one
        pass over each block (they share one task per block); ``dask.compute(*result.values())``
        computes them together.

    Examples
    --------
    >>> import dask.array as da, induct_fast.dask as ifd          # doctest: +SKIP
    >>> patterns = da.from_zarr("patterns.zarr")                  # doctest: +SKIP
    >>> scores = ifd.head_scores(patterns, tokens)               # doctest: +SKIP
    >>> scores["induction"].mean(axis=0).compute()               # doctest: +SKIP
    """
    import dask.array as da

    names = _kind_names(kinds, offsets)
    array = _whole_matrices(da.asarray(array))
    lead_ndim = array.ndim - 2
    lead = tuple(range(lead_ndim))
    matrix = (lead_ndim, lead_ndim + 1)  # indices of the query and key axes (contracted)
    kind_axis = lead_ndim + 2
    args: list[Any] = [array, lead + matrix]
    # Per-position arrays, [n] or [lead[0], n], each paired with the blocks of its prompts.
    positional = {
        "tokens": tokens,
        "attention_mask": as_key_mask(attention_mask),
        "queries": as_span(queries, "queries"),
        "keys": as_span(keys, "keys"),
    }
    present = tuple(name for name, value in positional.items() if value is not None)
    for name in present:
        rows = _rows_like(da, positional[name], array, name)
        # The position axis shares the key axis' index, so blocks pair up along it as well.
        args += [rows, ((0,) if rows.ndim == 2 else ()) + (matrix[1],)]
    stacked = da.blockwise(
        _block_scores,
        (kind_axis,) + lead,
        *args,
        new_axes={kind_axis: len(names)},
        concatenate=True,
        dtype=np.float64,
        meta=np.empty((0,) * (lead_ndim + 1), dtype=np.float64),
        names=tuple(names),
        options={"exclude_bos": bool(exclude_bos), "measure": as_measure(measure)},
        present=present,
    )
    return {name: stacked[i] for i, name in enumerate(names)}


def _whole_matrices(array: Any) -> Any:
    """`array` with its last two axes in one chunk each (a no-op when they already are)."""
    if array.ndim < 2:
        raise ValueError(f"array: expected shape (..., n, n) with at least 2 dimensions, got shape {array.shape}")
    if array.shape[-1] != array.shape[-2]:
        raise ValueError(f"array: expected square matrices in the last two axes (queries == keys), got shape {array.shape}")
    if len(array.chunks[-1]) > 1 or len(array.chunks[-2]) > 1:
        array = array.rechunk({array.ndim - 2: -1, array.ndim - 1: -1})
    return array


def _rows_like(da: Any, rows: Any, array: Any, name: str) -> Any:
    """Tokens (or 0/1 flags) as a dask array [n] or [lead[0], n] chunked like `array`'s first axis."""
    tokens = da.asarray(rows)
    if name == "tokens" and tokens.dtype.kind not in "iu":
        raise TypeError(f"tokens: expected an integer array of token ids, got dtype {tokens.dtype}")
    n = array.shape[-1]
    lead = array.shape[:-2]
    batch_ok = tokens.ndim == 1 or (tokens.ndim == 2 and len(lead) >= 1 and tokens.shape[0] == lead[0])
    if tokens.ndim not in (1, 2) or tokens.shape[-1] != n or not batch_ok:
        expected = f"({n},)" + (f" or ({lead[0]}, {n})" if lead else "")
        raise ValueError(f"{name}: expected shape {expected} to match the patterns {array.shape}, got shape {tokens.shape}")
    if tokens.ndim == 1:
        return tokens.rechunk(-1)
    return tokens.rechunk((array.chunks[0], -1))


def _block_scores(
    block: np.ndarray, *rest: np.ndarray, names: tuple[str, ...], options: dict[str, Any], present: tuple[str, ...]
) -> np.ndarray:
    """[kinds, *lead_block] scores of one block (runs on a worker); `rest` holds the block's rows
    of the per-position arrays named in `present`."""
    from .scores import head_scores

    arrays: dict[str, Any] = dict(zip(present, rest))
    scores = head_scores(block, kinds=list(names), **options, **arrays)
    return np.stack([np.asarray(scores[name], dtype=np.float64) for name in names])
