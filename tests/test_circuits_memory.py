"""composition_scores works in a fixed memory budget, whatever the number of heads: with the
budget set to 8 MiB, 4 and 8 layers of 32 heads (d_model 512, d_head 32, 8 kv heads, float32)
both grow peak resident memory by at most the budget plus a small allowance, far under the 84 MB
that float64 copies of the 8-layer weights alone would take (the earlier implementation held
those and more). Each run is a process of its own (tests/composition_memory.py), so neither
sees the other's memory or the test's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("composition_memory.py")
MiB = 1 << 20
BUDGET_MIB = 8
# Beyond the budget: the d_head x d_head cores (2 MB at 8 layers), the traces and scores
# (< 2 MB), conversion temporaries and the allocator's slack.
ALLOWANCE = 8 * MiB


def run(layers: int) -> dict:
    argv = [sys.executable, str(SCRIPT), str(layers), "32", "8", "512", "32", "float32", "K", str(BUDGET_MIB)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_composition_memory_is_bounded_by_its_budget_not_by_the_weights():
    small, large = run(4), run(8)
    float64_weights = 2 * large["inputs"]
    for result in (small, large):
        assert result["growth"] <= BUDGET_MIB * MiB + ALLOWANCE, result
    assert large["growth"] < float64_weights / 5, (large, float64_weights)
