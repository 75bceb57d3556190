"""Hugging Face causal LMs: q and k from transformers' attention interface.

Every modern transformers model calls ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
...)(module, query, key, value, attention_mask, scaling=..., sliding_window=..., softcap=...)``
with the queries and keys exactly as the attention uses them (after rotary embeddings, q/k norms,
partial rotary; ``[batch, heads, n, d_head]``, keys not yet repeated for grouped-query attention)
and the layer's rules as keywords. For the duration of a scan this adapter registers a wrapper of
the model's own implementation (``sdpa``, ``eager``, ...) under a name of its own, together with
that implementation's mask function (without it transformers would build no mask at all, and
padding would silently be ignored), and points the model's config at it. The wrapper scores the
layer, then calls the model's own function, so the forward pass is the model's.

Exactness is checked, not assumed: keywords the adapter does not know (attention sinks, position
biases, ...) raise ``NotImplementedError`` naming them, and the mask transformers built for a
layer is compared with the rules the kernel applies (causal, sliding window, padding) on every
query the scores use; a mismatch (a bidirectional prefix, chunked attention, an additive bias)
is an error. Models whose attention does not go through the interface (Bloom and its ALiBi) are
refused by name.
"""

from __future__ import annotations

import contextvars
import sys
from typing import Any, Callable, Optional

import numpy as np

from ._scoring import AttentionRules, LayerScorer, StopForward

# Families whose attention adds a position bias the kernel does not implement.
ALIBI_MODEL_TYPES = {"bloom", "mpt", "falcon_alibi", "baichuan", "jais"}

# Keywords of the attention call that are the layer's rules.
RULE_KEYWORDS = {"scaling", "softcap", "sliding_window", "is_causal", "dropout"}
# Keywords that do not change which keys a query sees or how logits are formed.
INERT_KEYWORDS = {
    "position_ids",
    "cache_position",
    "output_attentions",
    "output_hidden_states",
    "use_cache",
    "past_key_values",
    "cache",
    "return_dict",
    "position_embeddings",
    "layer_idx",
}

_ACTIVE: contextvars.ContextVar[Optional["_Session"]] = contextvars.ContextVar("induct_fast_hf_session", default=None)


def is_model(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def n_layers(model: Any) -> int:
    return int(model.config.get_text_config().num_hidden_layers)


def check_supported(model: Any) -> None:
    """Refuses, by name, models whose attention the kernel cannot reproduce."""
    config = model.config.get_text_config()
    model_type = getattr(config, "model_type", "")
    if model_type in ALIBI_MODEL_TYPES or getattr(config, "alibi", False):
        raise NotImplementedError(
            f"model: ALiBi position biases ({type(model).__name__}, model_type {model_type!r}) are not supported: "
            "the kernel scores softmax(scale * q.k) with causal, window and padding masks only"
        )
    if not type(model)._can_set_attn_implementation():
        raise NotImplementedError(
            f"model: {type(model).__name__} does not use transformers' attention interface, so its queries and keys "
            "cannot be taken as its attention uses them; this architecture is not supported"
        )
    implementation = config._attn_implementation
    if implementation == "eager" and getattr(config, "reorder_and_upcast_attn", False):
        # GPT-2 takes its own upcasting path on eager only; under another implementation name it
        # would run differently from the model's own forward.
        raise NotImplementedError("model: GPT-2's reorder_and_upcast_attn on eager attention is not supported (use sdpa)")
    if str(implementation).startswith("induct_fast"):
        raise NotImplementedError("model: scan_model is already running on this model (nested scans are not supported)")


def run(model: Any, input_ids: Any, attention_mask: Any, scorer: LayerScorer, padding: Optional[np.ndarray]) -> None:
    """One forward pass of ``model`` on ``input_ids`` [batch, n] with every layer scored by
    ``scorer``; the model's attention implementation is restored afterwards, also on error."""
    base = model.config.get_text_config()._attn_implementation or "eager"
    name = _register(base)
    saved = _implementations(model)
    session = _Session(scorer, padding)
    token = _ACTIVE.set(session)
    try:
        model.config._attn_implementation = name
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
    finally:
        _ACTIVE.reset(token)
        for config, value in saved:
            config._attn_implementation_internal = value
    scorer.check_complete(model, "transformers' attention interface")


def _implementations(model: Any) -> list[tuple[Any, Any]]:
    """(config, attention implementation) of every config the model's modules hold."""
    configs: dict[int, Any] = {}
    pending = [model.config] + [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
    while pending:
        config = pending.pop()
        if id(config) in configs:
            continue
        configs[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if sub is not None and hasattr(sub, "_attn_implementation"):
                pending.append(sub)
    return [(config, config._attn_implementation_internal) for config in configs.values()]


def _register(base: str) -> str:
    """The name of our wrapper of implementation ``base``, registered with base's mask function."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if base not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise NotImplementedError(f"model: attention implementation {base!r} is not supported (sdpa and eager are)")
    name = f"induct_fast_{base}"
    AttentionInterface.register(name, _wrapper(base))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def _base_function(base: str, module: Any) -> Callable[..., Any]:
    """The function the model itself would call: the registered implementation, or for "eager"
    the modeling file's own ``eager_attention_forward`` (transformers' default for it)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base != "eager" and base in ALL_ATTENTION_FUNCTIONS:
        registered: Callable[..., Any] = ALL_ATTENTION_FUNCTIONS[base]
        return registered
    function: Optional[Callable[..., Any]] = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if function is None:
        raise NotImplementedError(f"model: {type(module).__name__} has no eager attention function to wrap")
    return function


def _wrapper(base: str) -> Callable[..., Any]:
    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, *args: Any, **kwargs: Any) -> Any:
        session = _ACTIVE.get()
        function = _base_function(base, module)
        if session is None:  # another thread's pass, or after the scan: the model's own attention
            return function(module, query, key, value, attention_mask, *args, **kwargs)
        if args:
            raise NotImplementedError(f"model: {type(module).__name__} passes {len(args)} unnamed attention arguments")
        layer, rules = session.prepare(module, query, key, attention_mask, kwargs)
        scorer = session.scorer
        if not (scorer.wants_lse and base == "sdpa" and query.device.type == "cpu"):
            scorer.missing_lse(layer, f"runs {base!r} attention on {query.device.type} (the LSE comes from sdpa on CPU)")
            scorer.score(layer, query, key, rules, "bhnd")  # before the attention: the last layer's is then skipped
            return function(module, query, key, value, attention_mask, **kwargs)
        from ._flash import KeepLSE  # imports torch, which a model to scan has loaded already

        keep = KeepLSE()
        with keep:
            output = function(module, query, key, value, attention_mask, **kwargs)
        if keep.lse is None:
            scorer.missing_lse(layer, "did not call torch's flash kernel")
        scorer.score(layer, query, key, rules, "bhnd", lse=keep.lse)
        return output

    return attention


class _Session:
    """The scorer of one forward pass, and the masks already checked in it."""

    def __init__(self, scorer: LayerScorer, padding: Optional[np.ndarray]):
        self.scorer = scorer
        self.masks = MaskChecks(padding)
        self.calls = 0

    def prepare(self, module: Any, query: Any, key: Any, mask: Any, kwargs: dict[str, Any]) -> tuple[int, AttentionRules]:
        """The layer index and rules of one attention call, after checking its mask."""
        layer = getattr(module, "layer_idx", None)
        layer = self.calls if layer is None else int(layer)
        self.calls += 1
        rules = rules_of(module, kwargs, layer)
        n = int(query.shape[-2])
        if int(key.shape[-2]) != n:
            raise NotImplementedError(f"model: layer {layer} attends to {key.shape[-2]} keys from {n} queries (a cache or cross-attention)")
        self.masks.check(mask, rules, n, layer)
        return layer, rules


class MaskChecks:
    """:func:`check_mask` once per distinct (mask, rules) of a forward pass (layers share masks)."""

    def __init__(self, padding: Optional[np.ndarray]):
        self.padding = padding
        self.seen: dict[tuple[Any, ...], Any] = {}

    def check(self, mask: Any, rules: AttentionRules, n: int, layer: int) -> None:
        signature = (id(mask), rules.window, rules.causal)
        if signature not in self.seen:
            check_mask(mask, rules, self.padding, n, layer)
            self.seen[signature] = mask  # keeps the object alive, so its id stays unique


def rules_of(module: Any, kwargs: dict[str, Any], layer: int) -> AttentionRules:
    """The rules of one attention call, from its keywords (as the modeling file passes them)."""
    for name, value in kwargs.items():
        if name in RULE_KEYWORDS or name in INERT_KEYWORDS or value is None:
            continue
        raise NotImplementedError(
            f"model: layer {layer} ({type(module).__name__}) passes attention keyword {name!r}, which the kernel does not implement"
        )
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    scale = kwargs.get("scaling")
    softcap = kwargs.get("softcap")
    window = kwargs.get("sliding_window")
    return AttentionRules(
        scale=None if scale is None else float(scale),
        softcap=float(softcap) if softcap else None,
        window=int(window) if window else None,
        causal=bool(is_causal),
    )


def check_mask(mask: Any, rules: AttentionRules, padding: Optional[np.ndarray], n: int, layer: int) -> None:
    """Checks that the mask transformers built for a layer allows exactly the keys the kernel
    allows (causal, sliding window, padding keys), on every real query row.

    ``mask`` is None (sdpa's "causal, nothing else"), a bool tensor (True = attend) or a float
    tensor of 0 (attend) and the dtype's minimum (masked), of shape [batch | 1, 1, n, n].
    """
    import torch

    has_padding = padding is not None and not bool(padding.all())
    if mask is None:
        window_matters = rules.window is not None and rules.window < n
        if has_padding or window_matters:
            raise NotImplementedError(
                f"model: layer {layer} built no attention mask although the prompts have padding or a sliding window"
            )
        return
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != (n, n):
        raise NotImplementedError(
            f"model: layer {layer} uses an attention mask of type {type(mask).__name__} and shape "
            f"{tuple(getattr(mask, 'shape', ()))}; expected a [batch, 1, {n}, {n}] tensor"
        )
    positions = torch.arange(n, device=mask.device)
    pad = None if padding is None else torch.as_tensor(padding, device=mask.device)
    for b in range(mask.shape[0] if pad is None else pad.shape[0]):
        for start in range(0, n, 1024):
            rows = mask[min(b, mask.shape[0] - 1), 0, start : start + 1024]
            allowed = _allowed(rows, layer)
            i = positions[start : start + 1024, None]
            expected = torch.ones_like(allowed)
            if rules.causal:
                expected &= positions[None, :] <= i
            if rules.window is not None:
                expected &= i - positions[None, :] < rules.window
            real_rows: Any = slice(None)
            if pad is not None:
                expected &= pad[b][None, :]
                real_rows = pad[b][start : start + 1024]
            if not torch.equal(allowed[real_rows], expected[real_rows]):
                raise NotImplementedError(
                    f"model: the attention mask of layer {layer} differs from causal={rules.causal}, "
                    f"window={rules.window} and padding for prompt {b} (a bidirectional, chunked or custom mask is not supported)"
                )


def _allowed(rows: Any, layer: int) -> Any:
    """Which entries of mask rows let attention through."""
    import torch

    if rows.dtype == torch.bool:
        return rows
    allowed = rows == 0
    blocked = rows <= torch.finfo(rows.dtype).min / 2
    if not bool((allowed | blocked).all()):
        raise NotImplementedError(
            f"model: the attention mask of layer {layer} adds a bias to the logits (values other than 0 and -inf); not supported"
        )
    return allowed
