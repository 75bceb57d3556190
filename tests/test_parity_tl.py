"""Parity with TransformerLens ``head_detector`` on the reference fixture, and what the trained
models' heads are (DESIGN.md section 4; ../shared/fixtures/README.md)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import induct_fast as inf
import oracle

KEY = re.compile(
    r"^(?P<model>L\d+)_(?P<prompt>[a-z]+)_tl_(?P<kind>previous_token|duplicate_token|induction)"
    r"_(?P<measure>mul|abs)_bos(?P<bos>[01])_cur(?P<cur>[01])$"
)
# TransformerLens computes in float32 (mul) and rounds abs to 3 decimals.
TOLERANCE = {"mul": 1e-6, "abs": 6e-4}


def _tl_keys(fixture) -> list[str]:
    return sorted(k for k in fixture if KEY.match(k))


def test_fixture_has_every_kind_and_measure(fixture):
    keys = _tl_keys(fixture)
    assert len(keys) >= 12
    seen = {(m["kind"], m["measure"]) for m in map(KEY.match, keys)}
    assert seen == {(k, m) for k in ("previous_token", "duplicate_token", "induction") for m in ("mul", "abs")}
    # Keys that look like scores but do not parse would be silently skipped: refuse them.
    unparsed = [k for k in fixture if "_tl_" in k and k.split("_tl_")[1].split("_")[0] in ("previous", "duplicate", "induction") and not KEY.match(k)]
    assert unparsed == []


def test_detection_scores_match_transformerlens(fixture):
    failures = []
    for key in _tl_keys(fixture):
        m = KEY.match(key)
        prefix = f"{m['model']}_{m['prompt']}"
        patterns, tokens = fixture[f"{prefix}_patterns"], fixture[f"{prefix}_tokens"]
        expected = fixture[key]
        got = inf.detection_scores(
            patterns,
            m["kind"],
            tokens=tokens,
            measure=m["measure"],
            exclude_bos=m["bos"] == "1",
            exclude_current_token=m["cur"] == "1",
        )
        assert got.shape == expected.shape == patterns.shape[:-2]
        assert got.dtype == np.float64
        err = np.max(np.abs(got - expected))
        if not err <= TOLERANCE[m["measure"]]:
            failures.append(f"{key}: max abs error {err:.3g}")
    assert failures == []


@pytest.mark.parametrize("prefix", ["L1_rep", "L1_nat", "L2_rep", "L2_nat"])
def test_oracle_matches_transformerlens(fixture, prefix):
    """The oracle's detection formulas are the ones TransformerLens used (checks the oracle)."""
    patterns, tokens = fixture[f"{prefix}_patterns"][:2], fixture[f"{prefix}_tokens"][:2]
    for key in _tl_keys(fixture):
        if not key.startswith(prefix + "_"):
            continue
        m = KEY.match(key)
        expected = oracle.detection_scores(
            patterns, m["kind"], tokens, m["measure"], m["bos"] == "1", m["cur"] == "1"
        )
        np.testing.assert_allclose(expected, fixture[key][:2], rtol=0, atol=TOLERANCE[m["measure"]], err_msg=key)


@pytest.mark.parametrize("prefix", ["L1_rep", "L2_nat"])
@pytest.mark.parametrize("exclude_bos", [False, True])
def test_head_scores_on_fixture_match_oracle(fixture, prefix, exclude_bos):
    patterns, tokens = fixture[f"{prefix}_patterns"][:3], fixture[f"{prefix}_tokens"][:3]
    kinds = ("previous_token", "duplicate_token", "induction", "bos", "self", "entropy")
    offsets = (1, 24, 25)
    got = inf.head_scores(patterns, tokens, kinds=kinds, offsets=offsets, exclude_bos=exclude_bos)
    expected = oracle.head_scores(patterns, tokens, kinds=kinds, offsets=offsets, exclude_bos=exclude_bos)
    assert list(got) == list(expected)
    for kind in expected:
        np.testing.assert_allclose(got[kind], expected[kind], rtol=1e-12, atol=1e-14, equal_nan=True, err_msg=kind)


def test_l2_model_has_previous_token_and_induction_heads(fixture):
    """On repeated random tokens, L2 has a previous-token head in layer 0 and induction heads in
    layer 1 (values measured on the fixture: L0H2 prev ~0.97, every L1 head induction ~0.8)."""
    s = inf.head_scores(fixture["L2_rep_patterns"], fixture["L2_rep_tokens"])
    induction = s["induction"]  # [batch, layer, head]
    previous = s["previous_token"]
    mean_ind, mean_prev = induction.mean(axis=0), previous.mean(axis=0)

    layer, head = np.unravel_index(np.argmax(mean_ind), mean_ind.shape)
    assert layer == 1 and mean_ind[layer, head] > 0.7
    assert np.all(induction[:, 1] > 0.5), "every layer-1 head is an induction head on every prompt"
    assert np.all(induction[:, 0] < 0.1), "no layer-0 head can be an induction head"

    layer, head = np.unravel_index(np.argmax(mean_prev), mean_prev.shape)
    assert layer == 0 and mean_prev[layer, head] > 0.9
    assert np.all(previous[:, 1] < 0.1)

    # The same heads win on the "natural" prompts with repeated segments.
    s_nat = inf.head_scores(fixture["L2_nat_patterns"], fixture["L2_nat_tokens"])
    assert np.all(s_nat["induction"][:, 1] > 0.5) and np.all(s_nat["induction"][:, 0] < 0.1)
    assert np.argmax(s_nat["previous_token"].mean(axis=0)) == np.argmax(mean_prev)


def test_l1_model_has_no_induction_head(fixture):
    for prompt in ("rep", "nat"):
        s = inf.head_scores(fixture[f"L1_{prompt}_patterns"], fixture[f"L1_{prompt}_tokens"])
        assert np.all(s["induction"] < 0.1), prompt
        assert np.all(s["previous_token"] < 0.1), prompt


def test_induction_is_offset_on_repeated_half_of_rep_prompts(fixture):
    """rep prompts are BOS + 25 tokens repeated twice: on the second copy (queries 26..50), the
    induction target of a query whose token is unique within its block is key i - 24."""
    patterns, tokens = fixture["L2_rep_patterns"], fixture["L2_rep_tokens"]
    per_query = inf.head_scores(patterns, tokens, kinds=("induction",), offsets=(24,), per_query=True)
    period = 25
    assert np.array_equal(tokens[:, 1 : 1 + period], tokens[:, 1 + period :])
    for b in range(tokens.shape[0]):
        block = tokens[b, 1 : 1 + period]
        for k in range(period):
            if np.count_nonzero(block == block[k]) == 1 and block[k] != tokens[b, 0]:
                i = 1 + period + k
                np.testing.assert_array_equal(per_query["induction"][b, ..., i], per_query["offset_24"][b, ..., i])
