"""Issue 12 ("a newcomer's first hour"): the small surprises that have no better home."""

from __future__ import annotations

import numpy as np

import induct_fast as inf
from induct_fast.demo import build_demo_model


def test_zscore_of_a_composition_matrix_is_nan_where_heads_cannot_compose():
    model = build_demo_model(seed=0)
    comp = inf.composition_scores(model.W_Q, model.W_K, model.W_V, model.W_O, mode="K")
    base = inf.composition_baseline(model.W_Q.shape[2], model.d_head)
    z = base.zscore(comp)
    assert z.shape == comp.shape
    assert np.isnan(z[1, :, 0, :]).all() and np.isnan(z[0, :, 0, :]).all() and np.isnan(z[1, :, 1, :]).all()
    np.testing.assert_array_equal(z[0, :, 1, :], (comp[0, :, 1, :] - base.mean) / base.std)
    assert z[0, 1, 1, 2] > 100  # the circuit
    assert float(base.zscore(0.0)) < 0 and np.isfinite(base.zscore(comp[0, 0, 0, 0]))  # a scalar is a scalar
