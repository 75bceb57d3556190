"""scan_model and scan on real TransformerLens 3.x HookedTransformers (random init from configs):
equal to head_scores of the model's own patterns (``hook_pattern``) and to scan of its cache."""

from __future__ import annotations

import numpy as np
import pytest

import induct_fast as inf
from models_helpers import KINDS, VOCAB, assert_scores_equal, prompts, reference_scores, stacked, torch

transformer_lens = pytest.importorskip("transformer_lens", reason="TransformerLens is not installed (make test installs it)")
if not hasattr(transformer_lens, "HookedTransformer"):
    pytest.skip("TransformerLens 4.x: its bridge is tested by tests/tl4 (make test runs them)", allow_module_level=True)
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

BASE = dict(n_layers=2, d_model=64, n_ctx=64, d_head=16, n_heads=4, d_vocab=VOCAB, act_fn="gelu", initializer_range=0.3)

VARIANTS = {
    "learned-positions": {},
    "rotary": dict(positional_embedding_type="rotary", rotary_dim=16),
    "partial-rotary-gqa": dict(positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2),
    "no-attn-scale": dict(use_attn_scale=False, initializer_range=0.05),
    "attn-scale": dict(attn_scale=2.5),
    "inverse-layer-idx": dict(scale_attn_by_inverse_layer_idx=True),
    "softcap": dict(attn_scores_soft_cap=3.0, initializer_range=0.6),
    "local-window": dict(attn_types=["global", "local"], window_size=5, positional_embedding_type="rotary", rotary_dim=16),
}


def model_of(variant: str) -> "HookedTransformer":
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(**{**BASE, **VARIANTS[variant]})
    return HookedTransformer(cfg).eval()


def own_patterns(model, ids, mask) -> np.ndarray:
    """[batch, layer, head, n, n] from the model's hook_pattern."""
    _, cache = model.run_with_cache(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
    return stacked([cache["pattern", layer] for layer in range(model.cfg.n_layers)])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_scan_model_equals_the_models_patterns(variant):
    model = model_of(variant)
    ids, mask = prompts(3)
    got = inf.scan_model(model, ids, attention_mask=mask, kinds=KINDS)
    want = reference_scores(own_patterns(model, ids, mask), ids, mask)
    assert_scores_equal(got.per_prompt, want)
    assert not model.hook_dict["blocks.0.attn.hook_k"].fwd_hooks  # hooks removed


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_scan_of_a_qk_cache_uses_the_models_rules(variant):
    model = model_of(variant)
    ids, mask = prompts(3)
    _, cache = model.run_with_cache(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), names_filter=lambda n: "hook_q" in n or "hook_k" in n or "hook_rot" in n)
    want = reference_scores(own_patterns(model, ids, mask), ids, mask)
    if model.cfg.positional_embedding_type == "rotary":
        only_pre_rotary = {k: v for k, v in cache.items() if "hook_rot" not in k}
        pre = transformer_lens.ActivationCache(only_pre_rotary, model)
        with pytest.raises(ValueError, match="hook_rot_q"):
            inf.scan(pre, ids, attention_mask=mask)
    got = inf.scan(cache, ids, kinds=KINDS, attention_mask=mask)
    assert_scores_equal(got.per_prompt, want)


def test_scan_of_a_pattern_cache_and_stack_activation_order():
    model = model_of("rotary")
    ids, mask = prompts(3)
    _, cache = model.run_with_cache(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
    want = reference_scores(own_patterns(model, ids, mask), ids, mask)
    assert_scores_equal(inf.scan(cache, ids, kinds=KINDS, attention_mask=mask).per_prompt, want, atol=1e-12)
    layer_first = cache.stack_activation("pattern")  # [layer, batch, head, n, n]
    got = inf.scan(layer_first, ids, kinds=KINDS, attention_mask=mask, layer_axis=0)
    assert_scores_equal(got.per_prompt, want, atol=1e-12)
    # Read with the default layer axis, the same array is another (wrong) thing: it must differ.
    swapped = inf.scan(layer_first[:, :2], ids[:2], kinds=KINDS)
    assert swapped.per_prompt["previous_token"].shape == (2, 2, 4)


def test_without_the_mask_padding_changes_the_scores():
    """The padded prompts score differently when padding is not declared, so the equality above
    depends on attention_mask being honoured."""
    model = model_of("learned-positions")
    ids, mask = prompts(3)
    with_mask = inf.scan_model(model, ids, attention_mask=mask)
    without = inf.scan(own_patterns(model, ids, mask), ids)
    assert np.nanmax(np.abs(with_mask.per_prompt["previous_token"] - without.per_prompt["previous_token"])) > 1e-3


def test_hooks_are_removed_on_error():
    model = model_of("rotary")
    ids, _ = prompts(2, pad=False)
    with pytest.raises(ValueError, match="offset"):  # raised by the kernel inside the forward pass
        inf.scan_model(model, ids[:, :4], offsets=(7,))
    assert not any(hook.fwd_hooks for hook in model.hook_dict.values())
    assert_scores_equal(inf.scan_model(model, ids).per_prompt, inf.scan_model(model, ids).per_prompt, atol=0)


def test_head_scores_of_a_cache_points_to_scan():
    model = model_of("learned-positions")
    _, cache = model.run_with_cache(torch.as_tensor(prompts(1, pad=False)[0]))
    with pytest.raises(TypeError, match="ActivationCache.*scan"):
        inf.head_scores(cache)


def test_fixture_model_through_scan_model(fixture):
    """The shared fixture's trained two-layer model, loaded into a real HookedTransformer: its
    induction heads and TransformerLens's own patterns agree with scan_model."""
    f = fixture
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=64, n_ctx=64, d_head=16, n_heads=4, d_vocab=96, attn_only=True, normalization_type=None
    )
    model = HookedTransformer(cfg).eval()
    state = model.state_dict()
    for name in ("W_E", "W_pos", "W_U", "b_U"):
        key = {"W_E": "embed.W_E", "W_pos": "pos_embed.W_pos", "W_U": "unembed.W_U", "b_U": "unembed.b_U"}[name]
        state[key] = torch.as_tensor(f[f"L2_{name}"])
    for layer in range(2):
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"):
            state[f"blocks.{layer}.attn.{name}"] = torch.as_tensor(f[f"L2_{name}"][layer])
        state[f"blocks.{layer}.attn.b_O"] = torch.as_tensor(f["L2_b_O"][layer])
    model.load_state_dict(state)
    ids = f["L2_rep_tokens"]
    got = inf.scan_model(model, ids, kinds=KINDS)
    want = inf.head_scores(f["L2_rep_patterns"], ids, kinds=KINDS)
    assert_scores_equal(got.per_prompt, want)
    assert got.top("induction", 1)[0][0] == 1  # the induction head is in layer 1


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lse_from_the_models_logits_equals_recomputing(variant):
    model = model_of(variant)
    ids, mask = prompts(3)
    from_logits = inf.scan_model(model, ids, attention_mask=mask, kinds=KINDS, via="lse")
    assert from_logits.meta["via"] == ["lse", "lse"]
    recomputed = inf.scan_model(model, ids, attention_mask=mask, kinds=KINDS, via="recompute")
    assert recomputed.meta["via"] == ["recompute", "recompute"]
    assert inf.scan_model(model, ids, kinds=KINDS).meta["via"] == ["recompute", "recompute"]  # auto: the cheaper
    assert_scores_equal(from_logits.per_prompt, recomputed.per_prompt, atol=2e-5)
