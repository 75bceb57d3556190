"""Live models: :func:`scan_model` scores every head of a TransformerLens or Hugging Face model
during its own forward pass (DESIGN.md section 10).

One adapter per family knows where that family's queries and keys live and which rules its
attention applies; everything else (batching, the fused kernel, restoring the model) is shared:

========================================  ==================================================
model                                     adapter
========================================  ==================================================
TransformerLens ``HookedTransformer``     :mod:`.transformer_lens` (hook points)
TransformerLens ``TransformerBridge``     :mod:`.bridge` (hook points, rules of the HF module)
transformers ``PreTrainedModel``          :mod:`.huggingface` (the attention interface)
========================================  ==================================================
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any, Iterable, Optional

import numpy as np

from .._arrays import as_count, as_key_mask, as_measure, as_span, as_tokens
from ..results import HeadScores
from ..scores import DEFAULT_KINDS, KindArg, OffsetArg, _kind_names
from . import bridge, huggingface, transformer_lens
from ._scoring import AttentionRules, LayerScorer

__all__ = ["AttentionRules", "adapter_of", "cache_rules", "scan_model"]

VIA = ("auto", "lse", "recompute")


def adapter_of(model: Any) -> ModuleType:
    """The adapter module for ``model``; TypeError for anything that is not a supported model."""
    if transformer_lens.is_hooked_transformer(model):
        return transformer_lens
    if bridge.is_bridge(model):
        return bridge
    if huggingface.is_model(model):
        huggingface.check_supported(model)
        return huggingface
    raise TypeError(
        "model: expected a TransformerLens HookedTransformer or TransformerBridge, or a Hugging Face "
        f"PreTrainedModel, got {type(model).__module__}.{type(model).__name__}"
    )


def cache_rules(model: Any, n_layers: int) -> tuple[list[AttentionRules], Optional[tuple[str, str]]]:
    """For :func:`induct_fast.scan` on a TransformerLens cache that carries its model: the rules of
    each layer, and the ``(q, k)`` hook-name patterns (``{l}`` for the layer) that hold the
    queries and keys its attention uses (None: the model is not rotary, ``hook_q``/``hook_k``)."""
    if transformer_lens.is_hooked_transformer(model):
        rules = [transformer_lens.layer_rules(model, layer) for layer in range(n_layers)]
        rotary = transformer_lens.is_rotary(model.cfg)
    elif bridge.is_bridge(model):
        bridge.check_supported(model)
        rules = [bridge.layer_rules(model, layer) for layer in range(n_layers)]
        rotary = any("rot_q" in bridge.qk_hooks(model, layer)[0] for layer in range(n_layers))
    else:
        raise TypeError(f"cache.model: expected a HookedTransformer or TransformerBridge, got {type(model).__name__}")
    hooks = ("blocks.{}.attn.hook_rot_q", "blocks.{}.attn.hook_rot_k") if rotary else None
    return rules, hooks


def scan_model(
    model: Any,
    tokens: Any,
    *,
    kinds: KindArg = DEFAULT_KINDS,
    offsets: OffsetArg = (),
    exclude_bos: bool = False,
    attention_mask: Any = None,
    measure: str = "mass",
    queries: Any = None,
    keys: Any = None,
    batch_size: Optional[int] = None,
    progress: bool = False,
    via: str = "auto",
) -> HeadScores:
    """Scores every head of a live model while its own forward pass runs.

    For each layer, the queries and keys are taken exactly as that layer's attention uses them
    (after rotary embeddings, q/k norms and per-layer scales), scored with the layer's rules
    (causal mask, sliding window, logit softcap, grouped-query sharing, padding) by the fused
    kernel :func:`induct_fast.scores_from_qk`, and dropped before the next layer. No attention
    pattern is requested from the model, no n x n matrix is formed by us, and nothing after the
    last layer's attention (its MLP, the unembedding, the logits) is run.

    Parameters
    ----------
    model
        A TransformerLens ``HookedTransformer`` (3.x) or ``TransformerBridge`` (4.x), or a Hugging
        Face causal LM (``PreTrainedModel``) on its default attention (sdpa or eager).
    tokens : array_like of int, shape (batch, n) or (n,)
        Token ids (numpy or torch), passed to the model as they are (no BOS is added).
    kinds, offsets, exclude_bos
        As in :func:`induct_fast.head_scores`.
    attention_mask : array_like of 0/1, shape (batch, n), optional
        1 for real tokens, 0 for padding; passed to the model's forward, and padding positions are
        neither queries nor targets in the scores.
    measure : {"mass", "top1"}
        As in :func:`induct_fast.scores_from_qk`: ``top1`` is the argmax of each row's logits
        (no softmax; the model's LSE is not needed, so ``via="lse"`` is refused).
    queries, keys : array_like of 0/1, shape (n,) or (batch, n), optional
        Spans, as in :func:`induct_fast.head_scores` (a probe from :mod:`induct_fast.probes`
        carries them). They select what is scored, never what the model attends to.
    batch_size : int, optional
        Run the forward pass on at most this many prompts at a time (default: all at once).
    progress : bool
        A progress bar over layers and batches on stderr (tqdm if installed, else a counter).
    via : {"auto", "lse", "recompute"}
        Where each query row's normaliser (its log-sum-exp) comes from. ``"lse"``: from the
        model's own attention, so scoring forms only the target logits, O(n |T| d) per head:
        Hugging Face models on sdpa on CPU (torch's flash kernel returns it) and TransformerLens
        HookedTransformers (torch's logsumexp over the logits they form anyway);
        NotImplementedError elsewhere. ``"recompute"``: the fused kernel recomputes every row,
        O(n^2 d). ``"auto"`` (default): whichever is cheaper where we measured it, i.e. the flash
        kernel's LSE for Hugging Face on sdpa, recomputing for TransformerLens (torch's logsumexp
        pass is slower than our kernel) and everywhere else (always with ``exclude_bos``, whose
        normaliser leaves key 0 out).

    Returns
    -------
    HeadScores
        ``per_prompt[kind]`` of shape ``(batch, layer, head)``, ``scores[kind]`` their mean;
        ``meta["via"]`` says, per layer, ``"lse"`` or ``"recompute"``.

    Notes
    -----
    Exact: equal to :func:`induct_fast.head_scores` of the same model's eager patterns (to ~1e-6
    in float32). Memory: the model's own forward plus one layer's q and k (bfloat16 and float16
    are read as they are; a model on an accelerator has each layer's q and k copied to host
    memory and scored on the CPU). The model is put in eval mode with gradients off for the pass
    and left as it was (hooks removed, attention implementation and training mode restored), also
    on error.
    A feature the kernel does not implement (ALiBi, attention sinks, an attention mask other than
    causal + sliding window + padding, an unknown attention keyword) raises NotImplementedError
    naming it.

    Examples
    --------
    >>> from transformers import LlamaConfig, LlamaForCausalLM   # doctest: +SKIP
    >>> model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64,
    ...     intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> ids = induct_fast.repeated_tokens(4, period=20, vocab_size=100, seed=0)
    >>> induct_fast.scan_model(model, ids).top("induction", 3)
    """
    adapter = adapter_of(model)
    if via not in VIA:
        raise ValueError(f"via: expected one of {VIA}, got {via!r}")
    if via == "lse" and exclude_bos:
        raise ValueError("via: 'lse' cannot be combined with exclude_bos=True (the model's normaliser includes key 0)")
    measure = as_measure(measure)
    if via == "lse" and measure == "top1":
        raise ValueError("via: 'lse' cannot be combined with measure='top1' (the argmax of the logits needs no normaliser)")
    names = _kind_names(kinds, offsets)
    ids = _as_ids(tokens)
    mask = _as_mask(attention_mask, ids.shape)
    spans = {name: _as_span(span, name, ids.shape) for name, span in (("queries", queries), ("keys", keys))}
    size = ids.shape[0] if batch_size is None else as_count(batch_size, "batch_size", 1)
    n_layers = adapter.n_layers(model)
    starts = range(0, ids.shape[0], size)
    bar = _Progress(len(starts) * n_layers, progress)
    per_batch = []
    routes: list[str] = []
    try:
        with _inference(model):
            for start in starts:
                chunk = slice(start, start + size)
                chunk_mask = None if mask is None else mask[chunk]
                chunk_spans = {name: None if s is None else s[chunk] for name, s in spans.items()}
                scorer = LayerScorer(
                    n_layers, ids[chunk], chunk_mask, names, bool(exclude_bos), bar.step, via, measure, **chunk_spans
                )
                input_ids, torch_mask = _model_inputs(model, ids[chunk], chunk_mask)
                adapter.run(model, input_ids, torch_mask, scorer, chunk_mask)
                per_batch.append(scorer.per_prompt())
                routes = [scorer.routes[layer] for layer in range(n_layers)]
    finally:
        bar.close()
    meta = {"model": type(model).__name__, "via": routes}
    return HeadScores({name: np.concatenate([b[name] for b in per_batch], axis=0) for name in names}, meta)


def _as_ids(tokens: Any) -> np.ndarray:
    if hasattr(tokens, "detach") and hasattr(tokens, "cpu"):  # torch ids on an accelerator are fine here
        tokens = tokens.detach().cpu()
    ids = as_tokens(tokens)
    if ids is None:
        raise TypeError("tokens: expected token ids of shape (batch, n), got None")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"tokens: expected at least one prompt of at least one token, got shape {ids.shape}")
    return ids


def _as_mask(attention_mask: Any, shape: tuple[int, ...]) -> Optional[np.ndarray]:
    if hasattr(attention_mask, "detach") and hasattr(attention_mask, "cpu"):
        attention_mask = attention_mask.detach().cpu()
    mask = as_key_mask(attention_mask)
    if mask is None:
        return None
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != shape:
        raise ValueError(f"attention_mask: expected shape {shape} like tokens, got shape {mask.shape}")
    return np.ascontiguousarray(mask)


def _as_span(span: Any, name: str, shape: tuple[int, ...]) -> Optional[np.ndarray]:
    """A span `[batch, n]` (a shared `[n]` is repeated for every prompt, so batches can slice it)."""
    if hasattr(span, "detach") and hasattr(span, "cpu"):
        span = span.detach().cpu()
    flags = as_span(span, name)
    if flags is None:
        return None
    if flags.shape not in (shape, shape[1:]):
        raise ValueError(f"{name}: expected shape {shape[1:]} or {shape} like tokens, got shape {flags.shape}")
    return np.ascontiguousarray(np.broadcast_to(flags, shape))


def _device(model: Any) -> Any:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return "cpu"


def _model_inputs(model: Any, ids: np.ndarray, mask: Optional[np.ndarray]) -> tuple[Any, Any]:
    import torch

    device = _device(model)
    input_ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    torch_mask = None if mask is None else torch.as_tensor(mask.astype(np.int64), device=device)
    return input_ids, torch_mask


class _inference:
    """Eval mode and no gradients for the pass; the training flag is restored afterwards."""

    def __init__(self, model: Any):
        import torch

        self.model = model
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        for module, training in self.modes:
            module.training = training


class _Progress:
    """A bar over (batch, layer) steps: tqdm when installed, else a counter on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.bar: Any = None
        self.done = 0
        self.total = total
        self.enabled = enabled
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc="scan_model", unit="layer", file=sys.stderr)
            except ImportError:
                self.bar = None

    def step(self) -> None:
        if not self.enabled:
            return
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        else:
            sys.stderr.write(f"\rscan_model: layer {self.done}/{self.total}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done:
            sys.stderr.write("\n")
            sys.stderr.flush()
