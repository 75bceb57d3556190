"""TransformerLens ``TransformerBridge`` (4.x): q and k from the bridge's hook points, rules from
the Hugging Face attention module it wraps, checked against the mask that module receives.

The bridge runs a Hugging Face model with its attention forced to eager and re-implements rotary
attention itself (``PositionEmbeddingsAttentionBridge``), so transformers' attention interface is
not always called; its hooks are. Where they live: ``blocks.{l}.attn.hook_rot_q`` /
``hook_rot_k`` when the layer has them (rotary models, after the rotation and q/k norms), else
``blocks.{l}.attn.hook_q`` / ``hook_k``; all ``[batch, n, heads, d_head]``. Rules: the wrapped
module's ``scaling``, ``attn_logit_softcapping``, ``is_causal`` and sliding window (its
``sliding_window``, else its config's, as Mistral passes it); the 4-d mask the bridge's attention
is called with is compared with them on every real query (as in :mod:`.huggingface`), so a layer
whose mask is not causal + window + padding is an error, never a guess.

Memory: the bridge computes eager patterns in its own forward (an n x n matrix per layer). Its
``original_model`` no longer runs through transformers' attention interface once wrapped (it is
refused); for long contexts load the Hugging Face model on its own and score that.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import huggingface
from ._scoring import AttentionRules, LayerScorer, StopForward, is_transformer_lens
from .transformer_lens import joint_hooks


def is_bridge(model: Any) -> bool:
    return is_transformer_lens(model, "TransformerBridge")


def n_layers(model: Any) -> int:
    return int(model.cfg.n_layers)


def qk_hooks(model: Any, layer: int) -> tuple[str, str]:
    prefix = f"blocks.{layer}.attn.hook_"
    names = model.hook_dict
    if prefix + "rot_q" in names and prefix + "rot_k" in names:
        return prefix + "rot_q", prefix + "rot_k"
    if prefix + "q" in names and prefix + "k" in names:
        return prefix + "q", prefix + "k"
    raise NotImplementedError(f"model: the bridge has no q/k hook points for layer {layer} ({prefix}q, {prefix}k)")


def check_supported(model: Any) -> None:
    """Refuses, by name, bridges around Hugging Face models the kernel cannot reproduce (once per
    scan, not per layer)."""
    huggingface_model = getattr(model, "original_model", None)
    if huggingface_model is not None:
        huggingface.check_supported(huggingface_model)


def layer_rules(model: Any, layer: int) -> AttentionRules:
    """Rules from the Hugging Face attention module that layer ``layer`` wraps (after
    :func:`check_supported`)."""
    config = getattr(model.cfg, "original_architecture", None)
    attn = model.blocks[layer].attn
    hf = getattr(attn, "original_component", None)
    if hf is None:
        raise NotImplementedError(f"model: layer {layer} of the bridge ({config}) wraps no attention module")
    for name in ("s_aux", "sinks", "position_bias", "alibi"):
        if getattr(hf, name, None) is not None:
            raise NotImplementedError(f"model: layer {layer} has attention {name!r}, which the kernel does not implement")
    softcap = getattr(hf, "attn_logit_softcapping", None)
    if hasattr(hf, "sliding_window"):
        window = hf.sliding_window
    else:
        window = getattr(getattr(hf, "config", None), "sliding_window", None)
    scale = getattr(hf, "scaling", None)
    return AttentionRules(
        scale=None if scale is None else float(scale),
        softcap=float(softcap) if softcap else None,
        window=int(window) if window else None,
        causal=bool(getattr(hf, "is_causal", True)),
    )


def run(model: Any, input_ids: Any, attention_mask: Any, scorer: LayerScorer, padding: Optional[np.ndarray]) -> None:
    """One forward pass with hooks on every layer's q and k, and pre-hooks that catch the mask
    each attention module is called with; all removed afterwards, also on error."""
    # The bridge's hook_attn_scores holds patterns for some families (it fires on what the wrapped
    # module returns), so the log-sum-exp is never taken from it: rows are recomputed.
    scorer.missing_lse(0, "belongs to a TransformerBridge, whose hooks give no log-sum-exp")
    check_supported(model)
    masks: dict[int, Any] = {}
    checks = huggingface.MaskChecks(padding)
    hooks, handles = [], []
    for layer in range(n_layers(model)):
        rules = layer_rules(model, layer)

        def score(q: Any, k: Any, layer: int = layer, rules: AttentionRules = rules) -> None:
            checks.check(masks.get(layer), rules, int(q.shape[1]), layer)
            scorer.score(layer, q, k, rules, "bnhd")

        q_name, k_name = qk_hooks(model, layer)
        hooks.extend(joint_hooks({"q": q_name, "k": k_name}, score))
        handles.append(model.blocks[layer].attn.register_forward_pre_hook(_catch_mask(masks, layer), with_kwargs=True))
    try:
        model.run_with_hooks(input_ids, attention_mask=attention_mask, fwd_hooks=hooks, return_type=None)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    scorer.check_complete(model, "its q/k hook points")


def _catch_mask(masks: dict[int, Any], layer: int) -> Any:
    def pre_hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        masks[layer] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    return pre_hook
