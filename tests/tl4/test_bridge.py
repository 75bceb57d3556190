"""scan_model and scan on real TransformerLens 4.x TransformerBridges around Hugging Face models
built from configs (random init, an in-memory tokenizer; nothing downloaded).

TransformerLens 3 and 4 are both ``transformer_lens``, so this folder runs in a process of its
own with TransformerLens 4 first on the path (``make test`` does it; tests/conftest.py leaves the
folder out of a run under TransformerLens 3)."""

from __future__ import annotations

import numpy as np
import pytest

import induct_fast as inf
from models_helpers import KINDS, VOCAB, assert_scores_equal, prompts, reference_scores, stacked, torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (make test installs it)")
bridge_module = pytest.importorskip("transformer_lens.model_bridge", reason="TransformerLens 4 is not on the path")
TransformerBridge = bridge_module.TransformerBridge


def tokenizer():
    """A word-level tokenizer made in memory: the bridge wants one, and none may be downloaded."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    # Special tokens are all "w0" (id 0): the tokenizer splits words around special tokens, and no
    # other word starts with "w0".
    words = Tokenizer(WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    words.pre_tokenizer = Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="w0", bos_token="w0", eos_token="w0", pad_token="w0", add_bos_token=True
    )
    tok.init_kwargs["name_or_path"] = "in-memory"
    return tok


SMALL = dict(vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.3)
HF = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.3)
    ),
    "llama-gqa": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            **SMALL, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        )
    ),
    "mistral-window": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(
            **SMALL, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, sliding_window=7,
        )
    ),
    "gemma2-softcap": lambda: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(
            **SMALL, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=6, attn_logit_softcapping=5.0, query_pre_attn_scalar=24,
        )
    ),
}
NAMES = {"gpt2": "gpt2", "llama-gqa": "meta-llama/Llama-2-7b-hf", "mistral-window": "mistralai/Mistral-7B-v0.1", "gemma2-softcap": "google/gemma-2-2b"}


def bridge_of(family: str):
    torch.manual_seed(0)
    hf = HF[family]().eval()
    return TransformerBridge.boot_transformers(NAMES[family], hf_model=hf, tokenizer=tokenizer())


@pytest.mark.parametrize("family", sorted(HF))
def test_bridge_scan_model_equals_its_patterns_and_scan_of_its_cache(family):
    bridge = bridge_of(family)
    ids, mask = prompts(3)
    _, cache = bridge.run_with_cache(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
    want = reference_scores(stacked([cache["pattern", l] for l in range(bridge.cfg.n_layers)]), ids, mask)
    got = inf.scan_model(bridge, ids, attention_mask=mask, kinds=KINDS)
    assert_scores_equal(got.per_prompt, want)
    assert_scores_equal(inf.scan(cache, ids, kinds=KINDS, attention_mask=mask).per_prompt, want, atol=1e-12)
    qk = {k: v for k, v in cache.items() if "hook_q" in k or "hook_k" in k or "hook_rot" in k}
    qk_cache = type(cache)({k: qk[k] for k in qk if "pattern" not in k}, bridge)
    assert_scores_equal(inf.scan(qk_cache, ids, kinds=KINDS, attention_mask=mask).per_prompt, want)


def test_bridge_pre_rotary_cache_is_refused():
    bridge = bridge_of("llama-gqa")
    ids, _ = prompts(2, pad=False)
    _, cache = bridge.run_with_cache(torch.as_tensor(ids), names_filter=lambda n: n.endswith(("hook_q", "hook_k")))
    with pytest.raises(ValueError, match="hook_rot_q"):
        inf.scan(cache, ids)


def test_the_wrapped_model_is_refused_not_misread():
    """Once wrapped, the Hugging Face model's rotary attention is the bridge's own code and no
    longer calls transformers' attention interface: scanning it directly is an error."""
    bridge = bridge_of("llama-gqa")
    with pytest.raises(NotImplementedError, match="attention interface"):
        inf.scan_model(bridge.original_model, prompts(1, pad=False)[0])


def test_this_process_runs_transformer_lens_4():
    """make test runs this folder with TransformerLens 4 first on the path; say so if it did not."""
    from importlib import metadata

    import transformer_lens

    assert int(metadata.version("transformer_lens").split(".")[0]) == 4
    assert "tl4" in transformer_lens.__file__


def test_bridge_recomputes_and_refuses_via_lse():
    bridge = bridge_of("gpt2")
    ids, _ = prompts(2, pad=False)
    assert inf.scan_model(bridge, ids).meta["via"] == ["recompute", "recompute"]
    with pytest.raises(NotImplementedError, match="via: 'lse'"):
        inf.scan_model(bridge, ids, via="lse")


@pytest.mark.parametrize("family", ["llama-gqa", "gemma2-softcap"])
def test_bridge_scan_model_takes_measure_copy_and_spans(family):
    """top1 (the argmax of the logits) and spans through the bridge equal head_scores of its own
    patterns; top-1 up to rows whose two largest probabilities are within 1e-5 (float32 ties)."""
    bridge = bridge_of(family)
    ids, mask = prompts(3)
    _, cache = bridge.run_with_cache(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
    patterns = stacked([cache["pattern", l] for l in range(bridge.cfg.n_layers)])
    rng = np.random.default_rng(0)
    queries, keys = rng.random(ids.shape) < 0.7, rng.random(ids.shape) < 0.6
    top2 = -np.sort(-patterns.astype(np.float64), axis=-1)[..., :2]
    ties = (top2[..., 1] >= top2[..., 0] * (1 - 1e-5)).mean(-1)
    kinds = ("previous_token", "copy", "induction")
    for measure in ("mass", "top1"):
        options = dict(kinds=kinds, attention_mask=mask, measure=measure, queries=queries, keys=keys)
        got = inf.scan_model(bridge, ids, **options).per_prompt
        want = inf.head_scores(patterns, ids, **options)
        for kind in kinds:
            np.testing.assert_array_equal(np.isnan(got[kind]), np.isnan(want[kind]), err_msg=kind)
            slack = 2e-5 + (ties if measure == "top1" else 0)
            assert (np.nan_to_num(np.abs(got[kind] - want[kind])) <= slack).all(), (kind, measure)
