"""The scripts in examples/ run and reach their own assertions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script, args", [("find_induction_heads.py", []), ("long_context_scan.py", ["3000"])])
def test_example_runs(script, args):
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_example_and_demo_report_the_same_numbers():
    """examples/find_induction_heads.py and `induct-fast demo` measure the same model the same
    way: same tokens, baseline and loss windows, so the same loss and z-score."""
    import re

    from induct_fast.demo import demo_report

    out = subprocess.run([sys.executable, str(EXAMPLES / "find_induction_heads.py")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = demo_report()
    loss = re.search(r"first half ([\d.]+), repeated half ([\d.]+)", out.stdout)
    assert loss, out.stdout
    assert (float(loss[1]), float(loss[2])) == (round(report["loss_first_half"], 3), round(report["loss_second_half"], 3))
    z = re.search(r"z = (-?\d+)", out.stdout)
    assert z and int(z[1]) == round(report["k_composition_zscore"])
