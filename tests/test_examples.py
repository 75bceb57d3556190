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


def readme_block(heading: str) -> str:
    """The first ```python block after `heading` in README.md."""
    text = (EXAMPLES.parent / "README.md").read_text()
    after = text[text.index(heading):]
    start = after.index("```python\n") + len("```python\n")
    return after[start:after.index("```", start)]


def test_readme_live_models_snippet_runs():
    """The README's scan_model example, as written (real transformers and TransformerLens models
    built from configs, nothing downloaded)."""
    code = readme_block("## Live models") + "\nassert scores.n_layers == 4 and scores.n_heads == 8\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
