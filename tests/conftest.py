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

def _transformer_lens_major() -> int | None:
    """TransformerLens's major version, from its metadata (importing it is slow), or None."""
    from importlib import metadata

    try:
        return int(metadata.version("transformer_lens").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return None


# TransformerLens 3 and 4 share the package name, so one process has one of them: tests/tl4
# (the 4.x TransformerBridge) runs in its own pytest process under TransformerLens 4 (the
# Makefile puts it first on PYTHONPATH) and is left out of a run under TransformerLens 3.
collect_ignore = [] if _transformer_lens_major() == 4 else ["tl4"]

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
