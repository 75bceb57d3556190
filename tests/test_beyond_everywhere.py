"""``measure``, ``copy`` and the ``queries`` / ``keys`` spans wherever a kind is accepted (DESIGN.md
section 12): scan (stacked arrays, per-layer lists, q/k pairs), scan_model on real Hugging Face
and TransformerLens models (random init) against head_scores of their own eager patterns, dask,
and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

import induct_fast as inf
from helpers import random_patterns, random_tokens
from models_helpers import assert_scores_equal, stacked, torch

KINDS = ("previous_token", "duplicate_token", "induction", "copy", "bos", "entropy")


def spans(rng: np.random.Generator, batch: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.random((batch, n)) < 0.7, rng.random((batch, n)) < 0.6


def case(seed: int = 0, batch: int = 3, layers: int = 2, heads: int = 4, n: int = 20):
    rng = np.random.default_rng(seed)
    patterns = random_patterns(rng, (batch, layers, heads, n, n)).astype(np.float32)
    tokens = random_tokens(rng, (batch, n), 5)
    return patterns, tokens, *spans(rng, batch, n)


@pytest.mark.parametrize("measure", ["mass", "top1"])
def test_scan_passes_measure_and_spans_to_every_source(measure):
    patterns, tokens, queries, keys = case()
    options = dict(kinds=KINDS, measure=measure, queries=queries, keys=keys)
    want = inf.head_scores(patterns, tokens, **options)
    for source in (patterns, [patterns[:, layer] for layer in range(2)]):
        for progress in (False, True):
            got = inf.scan(source, tokens, progress=progress, **options)
            assert_scores_equal(got.per_prompt, want, atol=0)


@pytest.mark.parametrize("measure", ["mass", "top1"])
def test_scan_of_queries_and_keys_passes_them_to_the_fused_kernel(measure):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 3, 16, 2, 8)).astype(np.float32)  # [batch, layer, n, heads, d]
    k = rng.standard_normal((2, 3, 16, 2, 8)).astype(np.float32)
    tokens = random_tokens(rng, (2, 16), 4)
    queries, keys = spans(rng, 2, 16)
    options = dict(kinds=KINDS, measure=measure, queries=queries, keys=keys)
    got = inf.scan((q, k), tokens, **options)
    want = inf.scores_from_qk(q, k, tokens, **options)
    assert_scores_equal(got.per_prompt, want, atol=0)


def test_dask_head_scores_take_measure_padding_and_spans():
    da = pytest.importorskip("dask.array", reason="dask is not installed (make test installs it)")
    import induct_fast.dask
    patterns, tokens, queries, keys = case(2, batch=4)
    mask = np.ones((4, 20), bool)
    mask[1, 15:] = False
    for measure in ("mass", "top1"):
        options = dict(kinds=KINDS, measure=measure, queries=queries, keys=keys, attention_mask=mask)
        lazy = inf.dask.head_scores(da.from_array(patterns, chunks=(2, 1, 4, 20, 20)), tokens, **options)
        assert_scores_equal({k: v.compute() for k, v in lazy.items()}, inf.head_scores(patterns, tokens, **options), atol=0)


def test_cli_scan_takes_measure_and_spans(tmp_path, capsys):
    from induct_fast.cli import main

    patterns, tokens, queries, keys = case(3)
    path = tmp_path / "probe.npz"
    np.savez(path, patterns=patterns, tokens=tokens, queries=queries, keys=keys)
    argv = [str(path), "--key", "patterns", "--kinds", "copy", "induction", "--measure", "top1"]
    argv += ["--queries", f"{path}:queries", "--keys", f"{path}:keys", "--json", "--quiet"]
    assert main(["scan", *argv]) == 0
    out = json.loads(capsys.readouterr().out)
    want = inf.scan(patterns, tokens, kinds=("copy", "induction"), measure="top1", queries=queries, keys=keys)
    for kind in ("copy", "induction"):
        got = np.array(out["scores"][kind], dtype=float)
        np.testing.assert_allclose(got, want[kind], atol=1e-12)
    assert main(["scan", str(path), "--key", "patterns", "--queries", f"{path}:nope"]) == 1
    assert "queries:" in capsys.readouterr().err


# --- live models -------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers", reason="transformers is not installed (make test installs it)")


def near_tie_share(patterns: np.ndarray, mask: np.ndarray, rtol: float = 1e-5) -> np.ndarray:
    """[batch, layer, head]: the share of real query rows whose two largest entries are within
    `rtol`: float32 rounding may order those keys differently in the logits and the patterns,
    so a top-1 mean may move by at most that share."""
    top2 = -np.sort(-patterns.astype(np.float64), axis=-1)[..., :2]
    ties = top2[..., 1] >= top2[..., 0] * (1 - rtol)
    real = mask.astype(bool)[:, None, None, :]
    return (ties & real).sum(-1) / np.maximum(real.sum(-1), 1)


def hf_model(family: str):
    torch.manual_seed(0)
    common = dict(vocab_size=97, max_position_embeddings=128, initializer_range=0.3, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()
    if family == "gemma2":  # softcap, sliding window, per-layer scale
        config = transformers.Gemma2Config(**common, head_dim=16, sliding_window=6, attn_logit_softcapping=5.0,
                                           query_pre_attn_scalar=24)
        return transformers.Gemma2ForCausalLM(config).eval()
    config = transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                     initializer_range=0.3)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_scan_model_measure_and_spans_equal_the_models_eager_patterns(family):
    model = hf_model(family)
    probe = inf.probes.needle(np.arange(40, 80), [5, 6, 7], depths=[0.0, 0.5, 1.0], question=[3], bos=1)
    ids = probe.tokens
    mask = np.ones_like(ids)
    mask[1, -2:] = 0  # right padding
    default = model.config._attn_implementation
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_attentions=True)
    model.set_attn_implementation(default)
    patterns = stacked(out.attentions)
    rng = np.random.default_rng(0)
    queries, keys = spans(rng, *ids.shape)
    kinds = ("previous_token", "copy", "induction", "bos")
    for measure in ("mass", "top1"):
        options = dict(kinds=kinds, attention_mask=mask, measure=measure, queries=queries, keys=keys)
        got = inf.scan_model(model, ids, batch_size=2, **options)
        want = inf.head_scores(patterns, ids, **options)
        atol = 2e-5 + (near_tie_share(patterns, mask) if measure == "top1" else 0)
        for kind in kinds:
            g, w = got.per_prompt[kind], want[kind]
            np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg=kind)
            assert (np.abs(g - w)[~np.isnan(w)] <= np.broadcast_to(atol, w.shape)[~np.isnan(w)]).all(), (kind, measure)
        if measure == "top1":  # needs no normaliser: the model's LSE is not taken
            assert got.meta["via"] == ["recompute"] * 2
        elif family == "llama":  # sdpa on CPU: the flash kernel's LSE
            assert got.meta["via"] == ["lse"] * 2
    # The retrieval probe itself: its spans, through scan_model, as the README recipe runs it.
    retrieval = inf.scan_model(model, ids, kinds="copy", measure="top1", queries=probe.queries, keys=probe.keys)
    reference = inf.head_scores(patterns[[0, 2]], ids[[0, 2]], kinds="copy", measure="top1",
                                queries=probe.queries[[0, 2]], keys=probe.keys[[0, 2]])["copy"]
    tie = near_tie_share(patterns[[0, 2]], np.ones_like(ids[[0, 2]]))
    assert (np.abs(retrieval.per_prompt["copy"][[0, 2]] - reference) <= tie + 1e-12).all()


def test_scan_model_refuses_top1_through_the_models_lse():
    model = hf_model("llama")
    with pytest.raises(ValueError, match="^via: 'lse' cannot be combined with measure='top1'"):
        inf.scan_model(model, np.zeros((1, 4), np.int64), measure="top1", via="lse")
    with pytest.raises(ValueError, match=r"^queries: expected shape \(4,\) or \(1, 4\) like tokens"):
        inf.scan_model(model, np.zeros((1, 4), np.int64), queries=np.ones(5, bool))


def test_transformer_lens_scan_model_takes_measure_and_spans():
    tl = pytest.importorskip("transformer_lens", reason="TransformerLens is not installed (make test installs it)")
    if not hasattr(tl, "HookedTransformer"):
        pytest.skip("TransformerLens 4 has no HookedTransformer (tests/tl4 covers the bridge)")
    torch.manual_seed(0)
    cfg = tl.HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=64, d_vocab=97,
                                     act_fn="gelu", positional_embedding_type="rotary", init_weights=True)
    model = tl.HookedTransformer(cfg).eval()
    probe = inf.probes.repeated(2, period=10, repeats=3, vocab_size=97, seed=0)
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.as_tensor(probe.tokens))
    patterns = np.stack([cache["pattern", layer].numpy() for layer in range(2)], axis=1)
    kinds = ("induction", "copy", "offset_9")
    for measure in ("mass", "top1"):
        options = dict(kinds=kinds, measure=measure, queries=probe.queries, keys=probe.keys)
        got = inf.scan_model(model, probe.tokens, **options)
        want = inf.head_scores(patterns, probe.tokens, **options)
        atol = 2e-5 + (near_tie_share(patterns, np.ones_like(probe.tokens)) if measure == "top1" else 0)
        for kind in kinds:
            assert (np.abs(got.per_prompt[kind] - want[kind]) <= atol).all(), (kind, measure)
