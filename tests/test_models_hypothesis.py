"""Hypothesis over small real configs of the Llama (rotary, partial rotary through head_dim,
grouped-query, sliding window through Mistral) and GPT-2 (learned positions, per-layer scale)
adapters: scan_model on the default attention equals head_scores of the eager patterns, with
random padding on either side."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import induct_fast as inf
from models_helpers import KINDS, VOCAB, assert_scores_equal, eager_reference, torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (make test installs it)")

MODEL_SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def padded_prompts(draw, max_batch: int = 3):
    batch = draw(st.integers(1, max_batch))
    n = draw(st.integers(2, 24))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 8, size=(batch, n))  # a small alphabet: many repeats, so token kinds have targets
    mask = np.ones((batch, n), np.int64)
    for b in range(batch):
        left, right = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
        if draw(st.booleans()):
            mask[b, :min(left, n - 1)] = 0
        else:
            mask[b, n - min(right, n - 1):] = 0
    return ids, mask


@MODEL_SETTINGS
@given(
    prompts=padded_prompts(),
    layers=st.integers(1, 3),
    kv_heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([8, 16]),
    partial=st.sampled_from([1.0, 0.5, 0.25]),
    window=st.one_of(st.none(), st.integers(1, 12)),
    seed=st.integers(0, 1000),
)
def test_llama_family_configs(prompts, layers, kv_heads, head_dim, partial, window, seed):
    ids, mask = prompts
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=64, initializer_range=0.4,
    )
    if window is None:
        config = transformers.LlamaConfig(**common, partial_rotary_factor=partial)
        model = transformers.LlamaForCausalLM(config)
    else:  # Mistral: Llama with a sliding window on every layer
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=window))
    model.eval()
    got = inf.scan_model(model, ids, attention_mask=mask, kinds=KINDS)
    assert_scores_equal(got.per_prompt, eager_reference(model, ids, mask))


@MODEL_SETTINGS
@given(
    prompts=padded_prompts(),
    layers=st.integers(1, 3),
    heads=st.sampled_from([1, 2, 4]),
    inverse_layer=st.booleans(),
    scale_weights=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_gpt2_configs(prompts, layers, heads, inverse_layer, scale_weights, seed):
    ids, mask = prompts
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=heads, n_positions=64, initializer_range=0.4,
        scale_attn_by_inverse_layer_idx=inverse_layer, scale_attn_weights=scale_weights,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    got = inf.scan_model(model, ids, attention_mask=mask, kinds=KINDS)
    assert_scores_equal(got.per_prompt, eager_reference(model, ids, mask))
