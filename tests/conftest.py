"""Shared fixtures and the hypothesis profiles of the suite."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Plots are written to files only: never open a window, never need a display.
os.environ.setdefault("MPLBACKEND", "Agg")

# tests/ on sys.path so every test module can `import oracle` however pytest is invoked.
sys.path.insert(0, str(Path(__file__).resolve().parent))

FIXTURE_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "attn_only_tl_reference.npz"

# "ci" (the default) keeps the whole suite well under a minute on 2 cores and is reproducible;
# "dev" searches harder: HYPOTHESIS_PROFILE=dev pytest tests/
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=300,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=1000,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def fixture() -> dict[str, np.ndarray]:
    """The TransformerLens reference arrays (../shared/fixtures/attn_only_tl_reference.npz)."""
    if not FIXTURE_PATH.is_file():
        pytest.skip(f"TransformerLens reference fixture not found at {FIXTURE_PATH}")
    with np.load(FIXTURE_PATH) as npz:
        return {key: npz[key] for key in npz.files}
