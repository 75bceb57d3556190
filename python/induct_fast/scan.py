"""``scan``: one call from whatever holds a model's attention (or its queries and keys) to a
:class:`~induct_fast.results.HeadScores`, layer by layer."""

from __future__ import annotations

import re
import sys
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import numpy as np

from ._arrays import as_float_array, as_key_mask, as_measure, as_span, as_tokens
from .adapters import Layers, layers_of
from .results import HeadScores
from .scores import DEFAULT_KINDS, KindArg, OffsetArg, _kind_names, head_scores


def scan(
    source: Any,
    tokens: Any = None,
    *,
    kinds: KindArg = DEFAULT_KINDS,
    offsets: OffsetArg = (),
    exclude_bos: bool = False,
    attention_mask: Any = None,
    measure: str = "mass",
    queries: Any = None,
    keys: Any = None,
    layer_axis: int = 1,
    progress: bool = False,
    qk_options: Optional[Mapping[str, Any]] = None,
    key: Optional[str] = None,
) -> HeadScores:
    """Scores every head of a model, from its attention patterns or its queries and keys.

    Parameters
    ----------
    source
        Any of (see :mod:`induct_fast.adapters`):

        - patterns ``[batch, layer, head, n, n]``: numpy array, memmap or CPU torch tensor;
        - a tuple/list of per-layer patterns ``[batch, head, n, n]`` (Hugging Face
          ``output_attentions``; a model output with ``.attentions`` works too) or any iterable of
          them (a generator reading layers from disk);
        - a TransformerLens ``ActivationCache`` (or a dict) with ``blocks.{l}.attn.hook_pattern``,
          or with ``hook_rot_q``/``hook_rot_k`` (rotary models) or ``hook_q``/``hook_k`` only, scored
          with the cache model's attention scale, softcap and window; any object answering
          ``cache["pattern", l]``;
        - a ``(q, k)`` pair, each ``[batch, layer, n, heads, d_head]`` (or two per-layer lists of
          ``[batch, n, heads, d_head]``), scored by :func:`induct_fast.scores_from_qk` without
          ever forming an n x n matrix;
        - a path to a ``.npy``/``.npz``/``.safetensors`` file (see :mod:`induct_fast.files`),
          a saved TransformerLens cache (``np.savez(path, **cache)``) included.
    tokens : array_like of int, shape (n,) or (batch, n), optional
        Token ids; needed by ``duplicate_token``, ``induction`` and ``copy``. Defaults to the
        ``tokens`` entry of a file source.
    kinds, offsets, exclude_bos, measure, queries, keys
        As in :func:`induct_fast.head_scores` (spans ``[n]`` or ``[batch, n]``; for q/k sources
        ``measure="top1"`` is the argmax of the logits, as in :func:`induct_fast.scores_from_qk`).
    attention_mask : array_like of 0/1, shape (batch, n), optional
        1 for real tokens, 0 for padding: padding positions are neither queries nor targets (and,
        for q/k sources, never attended).
    layer_axis : {1, 0}
        Where a stacked array keeps its layers: 1 for ``[batch, layer, head, n, n]``, 0 for
        TransformerLens's ``cache.stack_activation("pattern")`` order ``[layer, batch, head, n, n]``.
    progress : bool
        Show a progress bar over layers on stderr (tqdm if installed, else a counter).
    qk_options : mapping, optional
        Extra keyword arguments for ``scores_from_qk`` (``scale``, ``softcap``, ``window``,
        ``layout``, ...); they override the rules read from a cache's model.
    key : str, optional
        For a file path: a glob selecting its layer arrays (``"blocks.*.attn.hook_pattern"``,
        ``"L2_rep_patterns"``), as ``induct-fast scan --key``.

    Returns
    -------
    HeadScores
        ``per_prompt[kind]`` of shape ``(batch, layer, head)``; ``scores[kind]`` (or
        ``result[kind]``) of shape ``(layer, head)``, the mean over prompts.

    Notes
    -----
    A stacked array is scored in one call (all heads in parallel; with ``progress=True`` one
    call per layer, so that the bar moves; the scores are the same). Every other source is read
    one layer at a time: each layer is scored and released before the next is taken, so memory
    holds one layer plus the ``[batch, layer, head]`` results. Layers must agree in shape.
    An error about an element of one layer (NaN, inf) names its index in the whole
    ``[batch, layer, ...]`` source, the layer axis included.
    """
    names = _kind_names(kinds, offsets)
    _check_kind_names(names)
    layers = layers_of(source, layer_axis, key)
    if tokens is None:
        tokens = layers.tokens
    tokens = as_tokens(tokens)
    mask = as_key_mask(attention_mask)
    # What every layer is scored with, patterns or q/k.
    common: dict[str, Any] = {
        "exclude_bos": exclude_bos,
        "attention_mask": mask,
        "measure": as_measure(measure),
        "queries": as_span(queries, "queries"),
        "keys": as_span(keys, "keys"),
    }
    if layers.prompts is not None:
        _check_tokens(tokens, *layers.prompts)
    if layers.stacked is not None:
        stacked = layers.stacked
        _check_tokens(tokens, stacked.shape[0], stacked.shape[-1])
        if not progress:
            return HeadScores(head_scores(stacked, tokens, kinds=names, **common))
        views = Layers("patterns", (stacked[:, layer] for layer in range(stacked.shape[1])), stacked.shape[1])
        per_layer = _score_layers(views, _pattern_scorer(tokens, names, common), progress)
        return HeadScores(_stack_layers(per_layer, names))
    if layers.kind == "qk":
        if qk_options is not None and not isinstance(qk_options, Mapping):
            raise TypeError(f"qk_options: expected a mapping of scores_from_qk keyword arguments, got {qk_options!r}")
        options = {**common, **dict(qk_options or {})}
        score = _qk_scorer(tokens, names, options, layers.rules)
    else:
        score = _pattern_scorer(tokens, names, common)
    return HeadScores(_stack_layers(_score_layers(layers, score, progress), names))


# The scores of one layer: {kind: [batch, head]}.
LayerScores = dict[str, np.ndarray]


def _score_layers(layers: Layers, score: Callable[[int, Any], LayerScores], progress: bool) -> Iterator[LayerScores]:
    """Scores of each layer in turn; a layer is released before the next one is read."""
    for index, item in enumerate(_progress(layers.items, layers.n_layers, progress)):
        # A lazy item is read here and referenced by `score` alone, so its memory (a file
        # layer's mapping) is released when `score` returns, before the next layer is read.
        try:
            result = score(index, item() if layers.lazy else item)
        except ValueError as exc:
            raise _with_layer(exc, index) from None
        yield result


_ELEMENT = re.compile(r"^(patterns|q|k): (.*) at index \((\d+), ([\d, ]+)\)$")


def _with_layer(exc: ValueError, layer: int) -> ValueError:
    """An error about element (b, ...) of one layer's array, restated as element (b, layer, ...)
    of the [batch, layer, ...] source (other errors are returned unchanged)."""
    message = str(exc)
    match = _ELEMENT.match(message)
    if match is None:
        return exc
    name, what, batch, rest = match.groups()
    return ValueError(f"{name}: {what} at index ({batch}, {layer}, {rest}) of the [batch, layer, ...] source")


def _stack_layers(per_layer: Iterable[LayerScores], names: list[str]) -> dict[str, np.ndarray]:
    """{kind: [batch, layer, head]} from per-layer {kind: [batch, head]}."""
    collected: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for result in per_layer:
        for name in names:
            collected[name].append(result[name])
    if not collected[names[0]]:
        raise ValueError("source: expected at least one layer, got none")
    return {name: np.stack(values, axis=1) for name, values in collected.items()}


def _pattern_scorer(tokens: Optional[np.ndarray], names: list[str], common: dict[str, Any]) -> Callable[[int, Any], LayerScores]:
    """Scores one layer of patterns [batch, head, n, n] ([head, n, n]: a batch of one) with the
    `common` options of head_scores, after checking it has the first layer's shape."""
    first: list[tuple[int, ...]] = []

    def score(index: int, layer: Any) -> LayerScores:
        array = as_float_array(layer, f"layer {index}", bfloat16=True)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4:
            raise ValueError(f"layer {index}: expected patterns of shape (batch, head, n, n), got shape {array.shape}")
        if not first:
            first.append(array.shape)
            _check_tokens(tokens, array.shape[0], array.shape[-1])
        elif array.shape != first[0]:
            raise ValueError(f"layer {index}: expected shape {first[0]} like layer 0, got shape {array.shape}")
        return head_scores(array, tokens, kinds=names, **common)

    return score


def _qk_scorer(
    tokens: Optional[np.ndarray], names: list[str], options: dict[str, Any], rules: Optional[list[Any]]
) -> Callable[[int, Any], LayerScores]:
    """Scores one layer's (q, k) through induct_fast.scores_from_qk, with that layer's rules (a
    cache model's) under the caller's options."""
    from .attention import scores_from_qk

    def score(index: int, pair: Any) -> LayerScores:
        q, k = pair
        layer_options = {**(rules[index].options() if rules is not None else {}), **options}
        result: LayerScores = scores_from_qk(q, k, tokens, kinds=names, **layer_options)
        for name in names:
            if np.ndim(result[name]) != 2:
                raise ValueError(
                    f"layer {index}: expected q and k of shape (batch, n, heads, d_head), so that scores are "
                    f"(batch, heads); got scores of shape {np.shape(result[name])}"
                )
        return result

    return score


def _check_kind_names(names: list[str]) -> None:
    """Unknown kind names fail before any layer is read (with the kernel's own message)."""
    from .scores import KINDS

    unknown = [name for name in names if name not in KINDS and not re.fullmatch(r"offset_\d+", name)]
    if unknown:
        tiny = np.tril(np.ones((1, 1, 2, 2)))
        head_scores(tiny, np.zeros(2, dtype=np.int64), kinds=unknown)


def _check_tokens(tokens: Optional[np.ndarray], batch: int, n: int) -> None:
    """Tokens are [n] or [batch, n] (or [1, n]) for patterns of `batch` prompts of length n."""
    if tokens is None:
        return
    fits = tokens.shape[-1] == n and (tokens.ndim == 1 or tokens.shape[0] in (1, batch))
    if not fits:
        raise ValueError(
            f"tokens: expected shape ({n},) or ({batch}, {n}) to match patterns of {batch} prompts "
            f"of {n} positions, got shape {tokens.shape}"
        )


def _progress(items: Iterable[Any], total: Optional[int], enabled: bool) -> Iterable[Any]:
    """`items`, with a progress bar on stderr when enabled: tqdm if installed, else a counter."""
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _counter(items, total)
    bar: Iterable[Any] = tqdm(items, total=total, desc="scan", unit="layer", file=sys.stderr)
    return bar


def _counter(items: Iterable[Any], total: Optional[int]) -> Iterator[Any]:
    of_total = f"/{total}" if total is not None else ""
    done = 0
    try:
        for item in items:
            yield item
            done += 1
            sys.stderr.write(f"\rscan: layer {done}{of_total}")
            sys.stderr.flush()
    finally:
        if done:
            sys.stderr.write("\n")
            sys.stderr.flush()
