"""Long context without n x n memory: scan_model on one prompt of n = 16384 through a
Llama-shaped model (4 layers, d_model 256, 8 heads, 2 kv heads) grows peak resident memory by at
most what the model's own forward pass needs, plus 128 MiB. Each job runs in a fresh process
(tests/model_memory.py), so neither sees the other's memory; an n x n float32 pattern of one head
alone would be 1 GiB."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="torch is not installed (make test installs it)")
pytest.importorskip("transformers", reason="transformers is not installed (make test installs it)")

SCRIPT = Path(__file__).with_name("model_memory.py")
N = 16384
MiB = 1 << 20


def job(mode: str) -> dict:
    done = subprocess.run([sys.executable, str(SCRIPT), mode, str(N)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_scan_model_needs_no_more_memory_than_the_forward_pass():
    forward = job("forward")
    scan = job("scan_model")
    assert scan["growth"] <= forward["growth"] + 128 * MiB, (forward, scan)
    # Nowhere near one n x n pattern (8 heads of 1 GiB each in float32).
    assert scan["growth"] < N * N * 4 // 2
