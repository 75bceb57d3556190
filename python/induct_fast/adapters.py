"""What :func:`induct_fast.scan` can read: every supported source becomes a :class:`Layers`, a
stream of per-layer items that is consumed one layer at a time.

================================================  =============================================
source                                            read as
================================================  =============================================
array / CPU tensor ``[batch, layer, head, n, n]``  one stacked array (scored in a single call)
tuple/list of ``[batch, head, n, n]``              layers (Hugging Face ``output_attentions``)
object with ``.attentions`` (a model output)       its ``attentions`` tuple
TransformerLens ``ActivationCache`` or a dict      ``blocks.{l}.attn.hook_pattern`` per layer, else
                                                   ``hook_rot_q`` / ``hook_rot_k``, else ``hook_q`` /
                                                   ``hook_k`` (refused for a rotary cache model)
other ``cache["pattern", l]`` lookups              ``l = 0, 1, ...`` until KeyError / IndexError
``(q, k)`` of ``[batch, layer, n, heads, d_head]``  per-layer ``(q[:, l], k[:, l])``
``(qs, ks)``, two lists of ``[batch, n, heads, d]``  per-layer pairs
path / :class:`~induct_fast.files.PatternFile`     its layers, one at a time (``files`` module;
                                                   ``key=`` selects its arrays)
any other iterable                                 layers, as it yields them (generators too)
================================================  =============================================

Nothing here copies: arrays and tensors are viewed, layers are taken lazily, so a per-layer
source never has all its layers in memory at once unless it holds them itself.

Queries and keys of a cache that carries its model (TransformerLens caches do) are scored with
that model's rules: its attention scale (``attn_scale``, per-layer with
``scale_attn_by_inverse_layer_idx``), logit softcap and local-attention window, and the rotated
``hook_rot_q``/``hook_rot_k`` of a rotary model; the pre-rotary ``hook_q``/``hook_k`` of a rotary
model are refused (they are not what its attention uses). A plain dict has no model: its
``hook_q``/``hook_k`` are taken as the attention's own q and k, scored with ``qk_options``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from ._arrays import as_float_array, is_tensor
from .files import PatternFile

PATTERN_KEY = re.compile(r"^blocks\.(\d+)\.attn\.hook_pattern$")
Q_KEY = "blocks.{}.attn.hook_q"
K_KEY = "blocks.{}.attn.hook_k"
ROT_Q_KEY = "blocks.{}.attn.hook_rot_q"
ROT_K_KEY = "blocks.{}.attn.hook_rot_k"
NO_PATTERNS = (
    "source: the model output holds no attention patterns (its .attentions is {!r}): a model on sdpa "
    'attention returns none. Load it with attn_implementation="eager" and pass output_attentions=True, '
    "or score the live model without patterns: induct_fast.scan_model(model, tokens)"
)


@dataclass
class Layers:
    """A source as layers.

    Attributes
    ----------
    kind : {"patterns", "qk"}
        Items are pattern arrays ``[batch, head, n, n]`` (or ``[head, n, n]``), or ``(q, k)``
        pairs ``[batch, n, heads, d_head]``.
    items : iterable
        The per-layer items, produced lazily.
    n_layers : int or None
        The number of layers when known up front (for progress bars).
    stacked : array or None
        For a single ``[batch, layer, head, n, n]`` array: the array itself (``items`` is empty).
    tokens : ndarray or None
        Token ids that came with the source (a file's ``tokens`` entry).
    lazy : bool
        Items are functions that read their layer when called (files), so a consumer holds
        only the layer it is working on.
    rules : list of AttentionRules or None
        For ``qk`` items of a cache that carries its model: each layer's attention rules.
    prompts : (int, int) or None
        ``(batch, n)`` of every layer when known before reading any (files, from their headers),
        so that tokens are checked before the work starts.
    """

    kind: str
    items: Iterable[Any] = ()
    n_layers: Optional[int] = None
    stacked: Any = None
    tokens: Optional[np.ndarray] = None
    lazy: bool = False
    rules: Optional[list[Any]] = None
    prompts: Optional[tuple[int, int]] = None


def layers_of(source: Any, layer_axis: int = 1, key: Optional[str] = None) -> Layers:
    """The :class:`Layers` of any supported source (see the module docstring); ``layer_axis`` is
    the layer axis of a stacked array (1: ``[batch, layer, ...]``, 0: TransformerLens's
    ``stack_activation`` order ``[layer, batch, ...]``); ``key`` selects the layer arrays of a
    file given by its path (a glob, see :mod:`induct_fast.files`)."""
    if isinstance(source, (str, bytes, os.PathLike)):
        source = PatternFile(os.fsdecode(source), key)
    elif key is not None:
        raise TypeError(
            f"key: selects the arrays of a file given by its path; the source is a {type(source).__name__}, "
            "select its arrays before passing it"
        )
    if isinstance(source, PatternFile):
        shape = source.layer_shape
        prompts = (shape[0], shape[1] if source.kind == "qk" else shape[-1])
        return Layers(source.kind, source.loaders(), len(source), tokens=source.tokens, lazy=True, prompts=prompts)
    if _is_array(source):
        return _stacked(source, layer_axis)
    if isinstance(source, (tuple, list)):
        return _sequence(source, layer_axis)
    if hasattr(source, "attentions"):  # a transformers ModelOutput
        attentions = source.attentions
        if attentions is None or (isinstance(attentions, (tuple, list)) and not attentions):
            raise ValueError(NO_PATTERNS.format(attentions))
        if isinstance(attentions, (tuple, list)):
            return _sequence(attentions, layer_axis)
    if hasattr(source, "keys") and hasattr(source, "__getitem__"):
        return _keyed(source)
    if hasattr(source, "__getitem__"):
        first = _layer_zero(source)
        if first is not None:
            return Layers("patterns", _probe_layers(source, first))
    if isinstance(source, Iterable):
        return Layers("patterns", iter(source), _len_or_none(source))
    raise TypeError(
        "source: expected patterns [batch, layer, head, n, n], a tuple of per-layer patterns, an "
        f"ActivationCache, a (q, k) pair or a file path, got {type(source).__name__}"
    )


def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) or is_tensor(x) or hasattr(x, "__array_interface__") or hasattr(x, "__array__")


def _ndim(x: Any) -> Optional[int]:
    """ndim of an array or tensor without converting it; None for anything else."""
    ndim = getattr(x, "ndim", None)
    return ndim if isinstance(ndim, int) and _is_array(x) else None


def _layer_first(array: np.ndarray, layer_axis: int) -> np.ndarray:
    """A view with the layer axis second (``[batch, layer, ...]``)."""
    if layer_axis not in (0, 1):
        raise ValueError(f"layer_axis: expected 0 ([layer, batch, ...]) or 1 ([batch, layer, ...]), got {layer_axis!r}")
    return np.swapaxes(array, 0, 1) if layer_axis == 0 else array


def _stacked(source: Any, layer_axis: int = 1) -> Layers:
    array = as_float_array(source, "source", bfloat16=True)
    if array.ndim == 5:
        array = _layer_first(array, layer_axis)
    if array.ndim != 5:
        raise ValueError(
            "source: expected an array of shape (batch, layer, head, n, n), got shape "
            f"{array.shape}; pass one layer [batch, head, n, n] as a list ([patterns]) or add the batch axis"
        )
    return Layers("patterns", (), array.shape[1], stacked=array)


def _sequence(source: Any, layer_axis: int = 1) -> Layers:
    """A tuple/list: a (q, k) pair (two 5-d arrays, or two per-layer lists) or per-layer patterns."""
    if len(source) == 2:
        q, k = source
        if _ndim(q) == 5 and _ndim(k) == 5:
            return _qk_stacked(q, k, layer_axis)
        if isinstance(q, (tuple, list)) and isinstance(k, (tuple, list)):
            if len(q) != len(k):
                raise ValueError(f"source: expected as many q as k layers, got {len(q)} and {len(k)}")
            return Layers("qk", zip(q, k), len(q))
    return Layers("patterns", iter(source), len(source))


def _qk_stacked(q: Any, k: Any, layer_axis: int = 1) -> Layers:
    q = _layer_first(as_float_array(q, "q", bfloat16=True), layer_axis)
    k = _layer_first(as_float_array(k, "k", bfloat16=True), layer_axis)
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"k: expected the batch and layer axes of q, shape ({q.shape[0]}, {q.shape[1]}, n, heads, d_head), got shape {k.shape}"
        )
    n_layers = q.shape[1]
    return Layers("qk", ((q[:, layer], k[:, layer]) for layer in range(n_layers)), n_layers)


def _keyed(cache: Any) -> Layers:
    """A TransformerLens ActivationCache (or any mapping) by its hook names."""
    keys = [str(key) for key in cache.keys()]
    layers = sorted(int(m.group(1)) for m in map(PATTERN_KEY.match, keys) if m)
    if layers:
        _check_contiguous(layers, "blocks.{}.attn.hook_pattern")
        return Layers("patterns", (cache[f"blocks.{layer}.attn.hook_pattern"] for layer in layers), len(layers))
    key_set = set(keys)
    rotated = _count_layers(key_set, ROT_Q_KEY, ROT_K_KEY)
    plain = _count_layers(key_set, Q_KEY, K_KEY)
    if not (rotated or plain):
        shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
        raise ValueError(
            "source: expected a cache with attention patterns (keys 'blocks.{l}.attn.hook_pattern') or "
            f"queries and keys ('blocks.{{l}}.attn.hook_rot_q' / 'hook_rot_k', or 'hook_q' / 'hook_k'), got keys [{shown}]"
        )
    q_key, k_key, n_qk = (ROT_Q_KEY, ROT_K_KEY, rotated) if rotated else (Q_KEY, K_KEY, plain)
    rules = None
    model = getattr(cache, "model", None)
    if model is not None:
        from .models import cache_rules

        rules, rotary_hooks = cache_rules(model, n_qk)
        if rotary_hooks is not None and not rotated:
            raise ValueError(
                f"source: the cache's model ({type(model).__name__}) is rotary, and its attention uses the rotated "
                f"queries and keys {rotary_hooks[0].format('{l}')!r} / {rotary_hooks[1].format('{l}')!r}; the cache "
                "holds only the pre-rotary 'hook_q' / 'hook_k'. Cache the rot hooks "
                "(names_filter=lambda name: 'hook_rot' in name) or use induct_fast.scan_model(model, tokens)"
            )
    items = ((cache[q_key.format(layer)], cache[k_key.format(layer)]) for layer in range(n_qk))
    return Layers("qk", items, n_qk, rules=rules)


def _count_layers(keys: set[str], q_key: str, k_key: str) -> int:
    """How many layers 0, 1, ... have both keys."""
    n = 0
    while q_key.format(n) in keys and k_key.format(n) in keys:
        n += 1
    return n


def _check_contiguous(layers: list[int], pattern: str) -> None:
    missing = sorted(set(range(layers[-1] + 1)) - set(layers))
    if missing:
        raise ValueError(f"source: expected keys {pattern!r} for layers 0..{layers[-1]}, missing layer {missing[0]}")


def _layer_zero(cache: Any) -> Any:
    """``cache["pattern", 0]``, or None if the object does not answer such lookups."""
    try:
        return cache["pattern", 0]
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _probe_layers(cache: Any, first: Any) -> Iterator[Any]:
    """``cache["pattern", l]`` for l = 0, 1, ... until the cache has no such layer."""
    yield first
    del first  # do not pin layer 0 for the whole scan
    layer = 1
    while True:
        try:
            item = cache["pattern", layer]
        except (KeyError, IndexError):
            return
        yield item
        layer += 1


def _len_or_none(x: Any) -> Optional[int]:
    try:
        return len(x)
    except TypeError:
        return None
