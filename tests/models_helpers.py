"""Shared pieces of the live-model tests: small models built from configs (random init, nothing
downloaded), prompts with padding, and the reference scores from the model's own eager patterns."""

from __future__ import annotations

import numpy as np
import pytest

import induct_fast as inf

torch = pytest.importorskip("torch", reason="torch is not installed (make test installs it)")

KINDS = ("previous_token", "duplicate_token", "induction", "bos", "entropy")
VOCAB = 97


def prompts(batch: int = 3, period: int = 9, pad: bool = True, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Repeated random tokens (BOS 0 + period x 2), with a right-padded prompt and, when there are
    3 or more prompts, a left-padded one."""
    ids = inf.repeated_tokens(batch, period, VOCAB, seed=seed)
    mask = np.ones_like(ids)
    if pad and batch >= 2:
        mask[1, -4:] = 0
    if pad and batch >= 3:
        mask[2, :3] = 0
    return ids, mask


def assert_scores_equal(got: dict, want: dict, atol: float = 2e-5) -> None:
    """Same kinds, same NaN positions (queries not eligible), values within atol."""
    assert set(got) == set(want)
    for kind in want:
        g, w = np.asarray(got[kind]), np.asarray(want[kind])
        assert g.shape == w.shape, kind
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg=kind)
        np.testing.assert_allclose(g, w, rtol=0, atol=atol, err_msg=kind)


def stacked(attentions) -> np.ndarray:
    """[batch, layer, head, n, n] from per-layer tensors (float32, float64 kept)."""
    layers = [a.detach() if a.dtype == torch.float64 else a.detach().float() for a in attentions]
    return torch.stack(layers, dim=1).numpy()


def reference_scores(patterns: np.ndarray, ids: np.ndarray, mask, kinds=KINDS, **kw) -> dict:
    return inf.head_scores(patterns, ids, kinds=kinds, attention_mask=mask, **kw)


def eager_reference(model, ids: np.ndarray, mask, kinds=KINDS, **kw) -> dict:
    """head_scores of a Hugging Face model's own eager patterns (output_attentions) on the same
    inputs; the model's attention implementation is restored afterwards."""
    default = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_attentions=True)
    finally:
        model.set_attn_implementation(default)
    return reference_scores(stacked(out.attentions), ids, mask, kinds, **kw)
