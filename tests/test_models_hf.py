"""scan_model on real Hugging Face models (random init from configs): equal to head_scores of
the same weights' eager patterns, with padded prompts, on each family's default attention."""

from __future__ import annotations

import numpy as np
import pytest

import induct_fast as inf
from models_helpers import KINDS, VOCAB, assert_scores_equal, eager_reference, prompts, torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (make test installs it)")

SMALL = dict(vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.3)


def llama(**kw):
    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SMALL, **cfg, **kw}))


def gpt2(**kw):
    cfg = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.3)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**cfg, **kw}))


def opt():
    cfg = dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64, init_std=0.3)
    return transformers.OPTForCausalLM(transformers.OPTConfig(**{**SMALL, **cfg}))


def neox():
    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25)
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**{**SMALL, **cfg}))


def phi():
    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, partial_rotary_factor=0.5)
    return transformers.PhiForCausalLM(transformers.PhiConfig(**{**SMALL, **cfg}))


def mistral():
    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=7)
    return transformers.MistralForCausalLM(transformers.MistralConfig(**{**SMALL, **cfg}))


def qwen2():
    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**SMALL, **cfg}))


def qwen3():
    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**SMALL, **cfg}))


def gemma2():
    cfg = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=6, attn_logit_softcapping=5.0, query_pre_attn_scalar=24,
    )
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**{**SMALL, **cfg}))


def gemma3():
    cfg = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=5, query_pre_attn_scalar=24, sliding_window_pattern=2,
    )
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**{**SMALL, **cfg}))


def olmo2():
    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**{**SMALL, **cfg}))


FAMILIES = {
    "gpt2": gpt2,
    "gpt2-inverse-layer-scale": lambda: gpt2(scale_attn_by_inverse_layer_idx=True),
    "opt": opt,
    "gpt-neox": neox,
    "phi": phi,
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "gemma2": gemma2,
    "gemma3": gemma3,
    "olmo2": olmo2,
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scan_model_equals_eager_patterns(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    default = model.config._attn_implementation
    ids, mask = prompts(3, period=9)
    got = inf.scan_model(model, ids, attention_mask=mask, kinds=KINDS)
    assert model.config._attn_implementation == default  # restored
    assert_scores_equal(got.per_prompt, eager_reference(model, ids, mask))


def test_rules_matter_so_the_comparison_can_fail():
    """The reference differs from plain causal attention for the windowed / softcapped families,
    so equality above shows the rules were applied."""
    torch.manual_seed(0)
    model = gemma2().eval()
    ids, mask = prompts(2, period=9, pad=False)
    want = eager_reference(model, ids, mask)
    got = inf.scan_model(model, ids, kinds=KINDS)
    assert_scores_equal(got.per_prompt, want)
    # The same prompts on a model whose window covers everything score differently.
    model.config.sliding_window = 4096
    for layer in model.model.layers:
        if getattr(layer.self_attn, "sliding_window", None):
            layer.self_attn.sliding_window = 4096
    wide = inf.scan_model(model, ids, kinds=KINDS)
    assert np.nanmax(np.abs(wide.per_prompt["previous_token"] - got.per_prompt["previous_token"])) > 1e-3


def test_batch_size_and_progress(capsys):
    torch.manual_seed(1)
    model = llama().eval()
    ids, mask = prompts(3)
    whole = inf.scan_model(model, ids, attention_mask=mask)
    split = inf.scan_model(model, ids, attention_mask=mask, batch_size=2, progress=True)
    assert_scores_equal(split.per_prompt, whole.per_prompt, atol=1e-12)
    assert "scan_model" in capsys.readouterr().err


def test_torch_inputs_offsets_and_exclude_bos():
    """In float64 (a float32 pattern loses digits in 1 - A[i, 0] when key 0 takes nearly all the
    mass, which the fused kernel avoids by leaving key 0 out of the softmax)."""
    torch.manual_seed(2)
    model = gpt2().eval().double()
    ids, mask = prompts(2)
    got = inf.scan_model(model, torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), offsets=(8,), exclude_bos=True)
    want = eager_reference(model, ids, mask, kinds=inf.DEFAULT_KINDS + ("offset_8",), exclude_bos=True)
    assert_scores_equal(got.per_prompt, want, atol=1e-9)


def test_model_is_restored_on_error_and_training_mode_kept():
    torch.manual_seed(3)
    model = llama()
    model.train()
    ids, _ = prompts(2, pad=False)
    with pytest.raises(ValueError, match="offset"):  # raised by the kernel inside the forward pass
        inf.scan_model(model, ids[:, :3], kinds=("offset_5",))
    assert model.training and model.config._attn_implementation == "sdpa"
    inf.scan_model(model, ids)
    assert model.training and all(m.training for m in model.modules())


def test_bfloat16_and_float16_models():
    torch.manual_seed(4)
    model = llama().eval()
    ids, mask = prompts(3)
    want = inf.scan_model(model, ids, attention_mask=mask, kinds=KINDS).per_prompt
    for dtype in (torch.bfloat16, torch.float16):
        got = inf.scan_model(model.to(dtype), ids, attention_mask=mask, kinds=KINDS).per_prompt
        reference = eager_reference(model, ids, mask)
        assert_scores_equal(got, reference, atol=2e-2)  # the model itself runs in low precision
        assert_scores_equal(got, want, atol=5e-2)
        model.float()


def test_alibi_is_refused_by_name():
    model = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(NotImplementedError, match="ALiBi"):
        inf.scan_model(model, np.zeros((1, 5), np.int64))


def test_unknown_attention_keyword_is_refused():
    """gpt-oss passes attention sinks (s_aux) to the attention function: refused by name."""
    cfg = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1, sliding_window=6,
    )
    model = transformers.GptOssForCausalLM(cfg).eval()
    with pytest.raises(NotImplementedError, match="s_aux"):
        inf.scan_model(model, np.arange(10)[None])
    assert model.config._attn_implementation == cfg._attn_implementation


def test_not_a_model_is_a_type_error():
    with pytest.raises(TypeError, match="model: expected"):
        inf.scan_model(object(), np.zeros((1, 4), np.int64))


def test_bad_mask_and_batch_size():
    model = gpt2().eval()
    ids, _ = prompts(2, pad=False)
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        inf.scan_model(model, ids, attention_mask=np.ones((2, 3)))
    with pytest.raises(ValueError, match="batch_size"):
        inf.scan_model(model, ids, batch_size=0)


def test_scan_of_an_sdpa_output_says_what_to_do():
    """A model on sdpa returns no attention patterns even when asked: the error names the ways out."""
    model = llama().eval()
    with torch.no_grad():
        out = model(torch.as_tensor(prompts(1, pad=False)[0]), output_attentions=True)
    assert not out.attentions
    with pytest.raises(ValueError, match='attn_implementation="eager".*scan_model'):
        inf.scan(out)


# -- the log-sum-exp from the model's own kernel (via="lse") --------------------------------------

SDPA_FAMILIES = sorted(f for f in FAMILIES if not f.startswith("gemma2"))  # Gemma-2 runs eager (softcap)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lse_route_equals_recomputing_the_rows(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    ids, mask = prompts(3, period=9)
    auto = inf.scan_model(model, ids, attention_mask=mask, kinds=KINDS)
    recomputed = inf.scan_model(model, ids, attention_mask=mask, kinds=KINDS, via="recompute")
    assert_scores_equal(auto.per_prompt, recomputed.per_prompt, atol=2e-5)
    expected = "recompute" if family == "gemma2" else "lse"
    assert auto.meta["via"] == [expected] * model.config.num_hidden_layers
    assert recomputed.meta["via"] == ["recompute"] * model.config.num_hidden_layers
    if family == "gemma2":
        with pytest.raises(NotImplementedError, match="via: 'lse'.*eager"):
            inf.scan_model(model, ids, via="lse")


@pytest.mark.parametrize("family", SDPA_FAMILIES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_keeping_the_lse_leaves_the_forward_pass_bit_identical(family, dtype):
    """KeepLSE runs sdpa as the flash kernel it dispatches to on CPU: the model's outputs do not
    change by a single bit, with and without padding."""
    from induct_fast.models._flash import KeepLSE

    torch.manual_seed(0)
    model = FAMILIES[family]().eval().to(getattr(torch, dtype))
    ids, mask = prompts(3, period=9)
    for m in (None, torch.as_tensor(mask)):
        with torch.no_grad():
            plain = model(torch.as_tensor(ids), attention_mask=m).logits
            with KeepLSE():
                kept = model(torch.as_tensor(ids), attention_mask=m).logits
        assert torch.equal(plain, kept)


def test_via_is_checked():
    model = llama().eval()
    ids, _ = prompts(2, pad=False)
    with pytest.raises(ValueError, match="via: expected one of"):
        inf.scan_model(model, ids, via="flash")
    with pytest.raises(ValueError, match="via: 'lse' cannot be combined with exclude_bos"):
        inf.scan_model(model, ids, via="lse", exclude_bos=True)
    assert inf.scan_model(model, ids, exclude_bos=True).meta["via"] == ["recompute", "recompute"]
