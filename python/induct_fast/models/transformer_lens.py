"""TransformerLens ``HookedTransformer`` (3.x): q and k from its hook points.

Where they live: ``blocks.{l}.attn.hook_rot_q`` / ``hook_rot_k`` for rotary models (after the
rotation, and after any q/k norm), else ``blocks.{l}.attn.hook_q`` / ``hook_k``, each
``[batch, n, heads, d_head]`` (keys ``[batch, n, n_key_value_heads, d_head]`` for grouped-query
attention). Rules (``AbstractAttention.calculate_attention_scores`` and ``apply_causal_mask``):
logits ``q.k / attn_scale`` (``attn_scale`` is ``cfg.attn_scale``, 1 without ``use_attn_scale``,
times ``l + 1`` with ``scale_attn_by_inverse_layer_idx``), then ``attn_scores_soft_cap``, the
causal mask (unless ``attention_dir`` is bidirectional), ``window_size`` on "local" layers and
the padding mask.

Refused by name: ALiBi and relative position biases, ``use_logn_attn``, attention sinks, and q/k
norms or clipping on a model without rotary embeddings (they are applied after ``hook_q``).
The same rules serve :func:`induct_fast.scan` on a cache that carries its model.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from ._scoring import AttentionRules, LayerScorer, StopForward, is_transformer_lens

QK_NORM_ARCHITECTURES = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def is_hooked_transformer(model: Any) -> bool:
    return is_transformer_lens(model, "HookedTransformer")


def n_layers(model: Any) -> int:
    return int(model.cfg.n_layers)


def is_rotary(cfg: Any) -> bool:
    return getattr(cfg, "positional_embedding_type", None) == "rotary"


def qk_hooks(cfg: Any, layer: int) -> tuple[str, str]:
    """Hook names of the queries and keys the attention of ``layer`` uses."""
    suffix = "rot_" if is_rotary(cfg) else ""
    return f"blocks.{layer}.attn.hook_{suffix}q", f"blocks.{layer}.attn.hook_{suffix}k"


def layer_rules(model: Any, layer: int) -> AttentionRules:
    """The rules of layer ``layer``'s attention; NotImplementedError for what the kernel lacks."""
    cfg = model.cfg
    position = getattr(cfg, "positional_embedding_type", "standard")
    if position in ("alibi", "relative_positional_bias"):
        raise NotImplementedError(f"model: positional_embedding_type {position!r} (a bias added to the logits) is not supported")
    for flag in ("use_logn_attn", "use_attention_sinks"):
        if getattr(cfg, flag, False):
            raise NotImplementedError(f"model: cfg.{flag} is not supported")
    if not is_rotary(cfg):
        arch = getattr(cfg, "original_architecture", None)
        if getattr(cfg, "use_qk_norm", False) or arch in QK_NORM_ARCHITECTURES or getattr(cfg, "clip_qkv", None) is not None:
            raise NotImplementedError(
                "model: q/k norms or clip_qkv without rotary embeddings are applied after hook_q/hook_k; not supported"
            )
    attn = model.blocks[layer].attn
    direction = getattr(attn, "_attention_dir_override", None) or getattr(cfg, "attention_dir", "causal")
    softcap = getattr(cfg, "attn_scores_soft_cap", None)
    window = cfg.window_size if getattr(attn, "attn_type", "global") == "local" else None
    return AttentionRules(
        scale=1.0 / float(attn.attn_scale),
        softcap=float(softcap) if softcap is not None and softcap > 0 else None,
        window=None if window is None else int(window),
        causal=direction == "causal",
    )


def run(model: Any, input_ids: Any, attention_mask: Any, scorer: LayerScorer, padding: Optional[np.ndarray]) -> None:
    """One forward pass with hooks on every layer's q and k (and, for the log-sum-exp, its masked
    and softcapped ``hook_attn_scores``); hooks are removed afterwards (by ``run_with_hooks``),
    also on error."""
    hooks = []
    for layer in range(n_layers(model)):
        rules = layer_rules(model, layer)
        q_name, k_name = qk_hooks(model.cfg, layer)
        names = {"q": q_name, "k": k_name}
        # Only when asked (via="lse"): torch's logsumexp over the logits TransformerLens forms
        # anyway measured slower than our kernel recomputing the rows (1.12 s vs 0.91 s for the
        # whole scan, 4 layers, 8 x 8 heads of n = 511, d_head 32), so "auto" recomputes.
        if scorer.via == "lse" and scorer.wants_lse:
            names["scores"] = f"blocks.{layer}.attn.hook_attn_scores"

        def score(q: Any, k: Any, scores: Any = None, layer: int = layer, rules: AttentionRules = rules) -> None:
            # TransformerLens forms every logit anyway; their log-sum-exp is one pass over them.
            lse = None if scores is None else scores.float().logsumexp(dim=-1)
            scorer.score(layer, q, k, rules, "bnhd", lse=lse)

        hooks.extend(joint_hooks(names, score))
    try:
        model.run_with_hooks(input_ids, attention_mask=attention_mask, fwd_hooks=hooks, return_type=None)
    except StopForward:
        pass
    scorer.check_complete(model, "its hook points " + ", ".join(qk_hooks(model.cfg, 0)).replace("0", "{l}"))


def joint_hooks(names: dict[str, str], score: Callable[..., None]) -> list[tuple[str, Callable[[Any, Any], None]]]:
    """Hooks on ``names`` (role -> hook name) that hold each tensor until every role of the layer
    has fired (in any order), then call ``score(**tensors)``."""
    held: dict[str, Any] = {}

    def keep(role: str) -> Callable[[Any, Any], None]:
        def hook(tensor: Any, hook: Any) -> None:
            held[role] = tensor
            if len(held) == len(names):
                tensors = dict(held)
                held.clear()
                score(**tensors)

        return hook

    return [(name, keep(role)) for role, name in names.items()]
