"""HeadScores.group_kv (scores per key/value group) and HeadScores.select (heads by count,
fraction or threshold), against plain-Python loops (the bad inputs are in test_reliability.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import induct_fast as inf
from induct_fast import HeadScores

NAN = float("nan")


# -- group_kv ----------------------------------------------------------------------------------


def oracle_group(per_prompt: np.ndarray, n_kv: int, reduce: str) -> list:
    """[batch][layer][group] of the non-NaN scores of heads g*r .. g*r+r-1 reduced, NaN if none."""
    batch, layers, heads = per_prompt.shape
    r = heads // n_kv
    out = []
    for b in range(batch):
        out.append([])
        for l in range(layers):
            row = []
            for g in range(n_kv):
                values = [float(per_prompt[b, l, h]) for h in range(g * r, g * r + r) if not math.isnan(per_prompt[b, l, h])]
                row.append(NAN if not values else max(values) if reduce == "max" else sum(values) / len(values))
            out[-1].append(row)
    return out


@st.composite
def grouped_scores(draw):
    batch, layers, n_kv, r = draw(st.integers(0, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    values = st.one_of(st.just(NAN), st.floats(0.0, 1.0))
    arrays = {kind: draw(hnp.arrays(np.float64, (batch, layers, n_kv * r), elements=values)) for kind in ("induction", "entropy")}
    return arrays, n_kv


@settings(max_examples=150, deadline=None)
@given(data=grouped_scores(), reduce=st.sampled_from(["max", "mean"]))
def test_group_kv_reduces_each_group_of_query_heads(data, reduce):
    arrays, n_kv = data
    s = HeadScores(arrays, meta={"model": "m"})
    g = s.group_kv(n_kv, reduce=reduce)
    assert (g.batch, g.n_layers, g.n_heads, g.kinds) == (s.batch, s.n_layers, n_kv, s.kinds)
    for kind, values in arrays.items():
        np.testing.assert_allclose(g.per_prompt[kind], np.array(oracle_group(values, n_kv, reduce)).reshape(g.per_prompt[kind].shape), rtol=1e-12)
        # the grid is the mean over prompts of the groups, as for any HeadScores
        np.testing.assert_array_equal(g[kind], HeadScores({kind: g.per_prompt[kind]})[kind])
    assert g.meta == {"model": "m", "group_kv": {"n_kv_heads": n_kv, "heads_per_group": s.n_heads // n_kv, "reduce": reduce}}
    assert s.meta == {"model": "m"}  # the source is left as it was


def test_group_kv_worked_example_and_nan_rule():
    s = HeadScores({"induction": np.array([[[0.1, 0.9, NAN, NAN]], [[0.3, 0.5, NAN, 0.4]]])})
    g = s.group_kv(2)
    np.testing.assert_array_equal(g.per_prompt["induction"], [[[0.9, NAN]], [[0.5, 0.4]]])
    np.testing.assert_allclose(g["induction"], [[0.7, 0.4]])  # group 1 counts only the prompt where it is scored
    np.testing.assert_allclose(s.group_kv(2, reduce="mean").per_prompt["induction"], [[[0.5, NAN]], [[0.4, 0.4]]])
    np.testing.assert_array_equal(s.group_kv(4).per_prompt["induction"], s.per_prompt["induction"])  # one head per group
    np.testing.assert_allclose(s.group_kv(1).per_prompt["induction"], [[[0.9]], [[0.5]]])
    json.dumps(g.to_dict(per_prompt=True), allow_nan=False)  # the record is plain JSON
    assert "heads=2" in repr(g)


def test_group_kv_follows_the_kernels_grouped_query_convention():
    # scores_from_qk shares kv head h // r among query heads h: query heads that are copies of one
    # another within a group score alike, and group_kv then sees one value per group.
    rng = np.random.default_rng(3)
    n, d = 12, 8
    tokens = rng.integers(0, 4, (2, n))
    k = rng.standard_normal((2, n, 2, d))
    q = np.repeat(rng.standard_normal((2, n, 2, d)), 3, axis=2)  # heads 0,1,2 share q; 3,4,5 too
    per_prompt = inf.scores_from_qk(q, k, tokens, kinds=("induction",))["induction"]  # [batch, 6]
    assert np.allclose(per_prompt[:, :3], per_prompt[:, :1]) and np.allclose(per_prompt[:, 3:], per_prompt[:, 3:4])
    g = HeadScores({"induction": per_prompt[:, None]}).group_kv(2)
    np.testing.assert_allclose(g.per_prompt["induction"][:, 0], per_prompt[:, [0, 3]], rtol=1e-12)


def test_group_kv_refuses_to_group_twice():
    g = HeadScores({"induction": np.zeros((1, 1, 4))}).group_kv(2)
    with pytest.raises(ValueError, match="grouped already"):
        g.group_kv(1)


# -- select ------------------------------------------------------------------------------------


def oracle_ranking(grid: np.ndarray, largest: bool) -> list[tuple[int, int, float]]:
    """Non-NaN heads best first, ties in (layer, head) order."""
    heads = [(l, h, float(grid[l, h])) for l in range(grid.shape[0]) for h in range(grid.shape[1]) if not math.isnan(grid[l, h])]
    return sorted(heads, key=lambda x: ((-x[2] if largest else x[2]), x[0], x[1]))


@settings(max_examples=150, deadline=None)
@given(
    grid=hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 6)), elements=st.one_of(st.just(NAN), st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.floats(0, 1))),
    count=st.integers(0, 40),
    fraction=st.floats(0.0, 1.0),
    threshold=st.floats(-0.5, 1.5),
    largest=st.booleans(),
)
def test_select_by_count_fraction_threshold(grid, count, fraction, threshold, largest):
    s = HeadScores({"induction": grid[None]})
    ranked = oracle_ranking(grid, largest)
    heads = [(l, h) for l, h, _ in ranked]
    assert s.select("induction", count=count, largest=largest) == heads[:count]
    x = fraction * grid.size  # rounded up, unless within 1e-9 of an integer
    k = round(x) if abs(x - round(x)) <= 1e-9 else math.ceil(x)
    assert s.select("induction", fraction=fraction, largest=largest) == heads[:k]
    passes = [(l, h) for l, h, v in ranked if (v >= threshold if largest else v <= threshold)]
    assert s.select("induction", threshold=threshold, largest=largest) == passes
    assert all(isinstance(l, int) and isinstance(h, int) for l, h in heads)


def test_select_fractions_round_up_as_razor_attention_counts_heads():
    grid = np.arange(1024.0).reshape(32, 32)  # a 32 x 32 model, head (l, h) scoring 32 l + h
    s = HeadScores({"echo": grid[None]})
    top = s.select("echo", fraction=0.01)
    assert len(top) == 11 and top[0] == (31, 31) and top[-1] == (31, 21)  # ceil(10.24)
    assert len(s.select("echo", fraction=0.14)) == 144  # ceil(143.36)
    hundred = HeadScores({"echo": np.arange(100.0).reshape(1, 10, 10)})
    assert len(hundred.select("echo", fraction=0.14)) == 14  # 0.14 * 100 is 14.000000000000002 in floats
    assert len(hundred.select("echo", fraction=0.29)) == 29  # and 28.999999999999996
    assert hundred.select("echo", fraction=0.0) == [] and len(hundred.select("echo", fraction=1)) == 100
    assert len(hundred.select("echo", fraction=1e-6)) == 1


def test_select_leaves_nan_out_and_unions_are_sets():
    s = HeadScores({
        "duplicate_token": np.array([[[0.9, NAN], [0.1, 0.8]]]),
        "induction": np.array([[[0.2, 0.7], [NAN, 0.7]]]),
    })
    assert s.select("duplicate_token", count=10) == [(0, 0), (1, 1), (1, 0)]
    assert s.select("duplicate_token", threshold=-math.inf) == [(0, 0), (1, 1), (1, 0)]
    assert s.select("duplicate_token", threshold=math.inf) == []
    assert s.select("induction", count=2) == [(0, 1), (1, 1)]  # a tie: (layer, head) order
    assert s.select("induction", count=1, largest=False) == [(0, 0)]
    echo, induction = s.select("duplicate_token", count=1), s.select("induction", count=1)
    assert sorted(set(echo) | set(induction)) == [(0, 0), (0, 1)]
    with pytest.raises(KeyError, match="'bos' not scored"):
        s.select("bos", count=1)


def test_select_needs_exactly_one_rule():
    s = HeadScores({"induction": np.zeros((1, 2, 2))})
    with pytest.raises(ValueError, match=r"count, fraction, threshold: expected exactly one of them, got none"):
        s.select("induction")
    with pytest.raises(ValueError, match=r"got count=2, fraction=0.5"):
        s.select("induction", count=2, fraction=0.5)
