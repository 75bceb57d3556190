"""The ``induct-fast scan`` command, run as a subprocess: every output format, every file type,
clear one-line errors, and a large memory-mapped file scanned in a fraction of its size."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import induct_fast as inf
from helpers import random_patterns, random_tokens

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BATCH, LAYERS, HEADS, N = 2, 3, 2, 8


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg")
    result = subprocess.run([sys.executable, "-m", "induct_fast.cli", *map(str, args)], capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}")
    return result


def fails(*args: str) -> str:
    """Runs a command that must fail with exit status 1 and one error line; returns the line."""
    result = cli(*args, check=False)
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("induct-fast scan: error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    rng = np.random.default_rng(21)
    root = tmp_path_factory.mktemp("cli")
    patterns = random_patterns(rng, (BATCH, LAYERS, HEADS, N, N), "peaked", np.float32)
    tokens = random_tokens(rng, (BATCH, N), alphabet=3)
    np.save(root / "patterns.npy", patterns)
    np.save(root / "tokens.npy", tokens)
    np.savetxt(root / "tokens.txt", tokens, fmt="%d")
    np.savez(root / "layers.npz", tokens=tokens, **{f"blocks.{l}.attn.hook_pattern": patterns[:, l] for l in range(LAYERS)})
    want = inf.scan(patterns, tokens, kinds=("previous_token", "duplicate_token", "induction"), offsets=(3,))
    return root, patterns, tokens, want


def test_table_is_the_default(files):
    root, _, _, want = files
    out = cli("scan", root / "patterns.npy", "--tokens", root / "tokens.npy", "--offsets", "3").stdout
    lines = out.splitlines()
    assert lines[0].split() == ["layer", "head", "previous_token", "duplicate_token", "induction", "offset_3"]
    assert len(lines) == 1 + LAYERS * HEADS
    assert out == cli("scan", root / "patterns.npy", "--tokens", root / "tokens.npy", "--offsets", "3", "--table").stdout
    cells = lines[1 + 1 * HEADS + 1].split()  # layer 1, head 1
    assert cells[:2] == ["1", "1"]
    assert float(cells[4]) == pytest.approx(want["induction"][1, 1], abs=5e-4)


def test_json(files):
    root, _, _, want = files
    out = cli("scan", root / "patterns.npy", "--tokens", root / "tokens.npy", "--offsets", "3", "--json", "-q").stdout
    data = json.loads(out)
    assert data["kinds"] == list(want.kinds) and data["shape"] == [LAYERS, HEADS] and data["batch"] == BATCH
    for kind in want.kinds:
        np.testing.assert_allclose(np.array(data["scores"][kind], dtype=float), want[kind], rtol=1e-15, equal_nan=True)


def test_csv(files):
    root, _, _, want = files
    out = cli("scan", root / "layers.npz", "--offsets", "3", "--csv").stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == LAYERS * HEADS
    assert list(rows[0]) == ["layer", "head", *want.kinds]
    for row in rows:
        layer, head = int(row["layer"]), int(row["head"])
        for kind in want.kinds:
            assert float(row[kind]) == want[kind][layer, head]  # repr round-trips exactly


def test_nan_is_an_empty_csv_field_and_json_null(tmp_path):
    # n = 2 with distinct tokens: no query has an earlier copy, so duplicate_token is NaN
    patterns = np.tril(np.ones((1, 1, 1, 2, 2))) / np.array([1.0, 2.0])[:, None]
    np.save(tmp_path / "p.npy", patterns)
    np.save(tmp_path / "t.npy", np.array([5, 6]))
    rows = list(csv.DictReader(io.StringIO(cli("scan", tmp_path / "p.npy", "--tokens", tmp_path / "t.npy", "--csv").stdout)))
    assert rows[0]["duplicate_token"] == "" and rows[0]["previous_token"] == "0.5"
    data = json.loads(cli("scan", tmp_path / "p.npy", "--tokens", tmp_path / "t.npy", "--json").stdout)
    assert data["scores"]["duplicate_token"] == [[None]]


def test_plot_writes_a_png(files, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed")
    root = files[0]
    png = tmp_path / "heads.png"
    cli("scan", root / "layers.npz", "--kinds", "induction,previous_token", "entropy", "--plot", png)
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_text_tokens_kinds_and_exclude_bos(files):
    root, patterns, tokens, _ = files
    out = cli("scan", root / "patterns.npy", "--tokens", root / "tokens.txt", "--kinds", "induction", "bos", "--exclude-bos", "--json")
    data = json.loads(out.stdout)
    want = inf.scan(patterns, tokens, kinds=("induction", "bos"), exclude_bos=True)
    np.testing.assert_allclose(np.array(data["scores"]["induction"], dtype=float), want["induction"], rtol=1e-15)
    assert data["scores"]["bos"] == [[None] * HEADS] * LAYERS


def test_safetensors(files, tmp_path):
    st = pytest.importorskip("safetensors.numpy", reason="safetensors is not installed")
    root, patterns, tokens, want = files
    path = tmp_path / "cache.safetensors"
    st.save_file({"patterns": patterns, "tokens": tokens}, path)
    data = json.loads(cli("scan", path, "--offsets", "3", "--json").stdout)
    np.testing.assert_allclose(np.array(data["scores"]["induction"], dtype=float), want["induction"], rtol=1e-15)


def test_progress_and_missing_tokens_notes_on_stderr(files):
    root = files[0]
    result = cli("scan", root / "patterns.npy")
    assert "3/3" in result.stderr and "no tokens" in result.stderr
    assert result.stdout.splitlines()[0].split() == ["layer", "head", "previous_token"]
    assert "3/3" not in cli("scan", root / "patterns.npy", "--quiet").stderr


def test_version_and_help():
    assert cli("--version").stdout.strip() == f"induct-fast {inf.__version__}"
    top = cli("--help").stdout
    assert "examples:" in top and "induct-fast scan patterns.npy" in top
    scan_help = cli("scan", "--help").stdout
    for text in ("--tokens", "--json", "--csv", "--table", "--plot", "--exclude-bos", "natural key order", "examples:"):
        assert text in scan_help


def test_usage_errors_exit_2(files):
    root = files[0]
    result = cli("scan", root / "patterns.npy", "--json", "--csv", check=False)
    assert result.returncode == 2 and "not allowed with" in result.stderr


def test_errors_are_one_clear_line(files, tmp_path):
    root, patterns, tokens, _ = files
    assert "missing.npy: no such file" in fails("scan", tmp_path / "missing.npy")
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    assert "bad.npy: not a readable .npy file" in fails("scan", tmp_path / "bad.npy")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    message = fails("scan", tmp_path / "bad.safetensors")
    assert "bad.safetensors" in message
    assert "no array in" in fails("scan", root / "layers.npz", "--key", "nothing*")
    np.savez(tmp_path / "mixed.npz", layer0=patterns[:, 0], layer1=patterns[:, 1, :1])
    assert "same shape; key 'layer0' is (2, 2, 8, 8), key 'layer1' is (2, 1, 8, 8)" in fails("scan", tmp_path / "mixed.npz")
    np.save(tmp_path / "short.npy", tokens[:, :5])
    assert "tokens: expected shape (8,) or (2, 8)" in fails("scan", root / "patterns.npy", "--tokens", tmp_path / "short.npy")
    assert "--kinds induction needs token ids" in fails("scan", root / "patterns.npy", "--kinds", "induction")
    assert "kinds: expected one of" in fails("scan", root / "patterns.npy", "--kinds", "nope")
    np.savez(tmp_path / "two.npz", a=tokens, b=tokens)
    assert "expected a key 'tokens' or a single array" in fails("scan", root / "patterns.npy", "--tokens", tmp_path / "two.npz")


LARGE_SHAPE = (2, 25, 2, 1000, 1000)  # float32: 400 MB


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB and forkserver exists on Linux")
def test_large_npy_is_scanned_in_a_fraction_of_its_size(tmp_path):
    """A 400 MB .npy is memory-mapped and streamed layer by layer: the scanning process's peak
    resident memory (ru_maxrss) stays far below the file size."""
    from peak_memory import run_cli

    path = tmp_path / "large.npy"
    batch, layers, heads, n, _ = LARGE_SHAPE
    head = np.tril(np.ones((n, n), dtype=np.float32))
    head /= head.sum(axis=1, keepdims=True)
    head[1:, :] *= 0.5
    head[np.arange(1, n), np.arange(n - 1)] += 0.5  # half of each row on the previous token
    tokens = inf.repeated_tokens(batch, period=n // 2, vocab_size=5000, seed=0)[:, :n]
    np.save(tmp_path / "tokens.npy", tokens)
    try:
        _write_large(path, head, LARGE_SHAPE)
        size = path.stat().st_size
        code, out, err, peak = run_cli(["scan", str(path), "--tokens", str(tmp_path / "tokens.npy"), "--json", "--quiet"])
        assert code == 0, err
        assert size > 400e6 and peak < 0.3 * size, f"peak RSS {peak / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"
        print(f"peak RSS of the scan: {peak / 1e6:.0f} MB for a {size / 1e6:.0f} MB file")
        data = json.loads(out)
        assert data["shape"] == [layers, heads] and data["batch"] == batch
        for kind in ("previous_token", "duplicate_token", "induction"):
            expected = np.mean([inf.head_scores(head, tokens[b])[kind] for b in range(batch)])
            np.testing.assert_allclose(np.array(data["scores"][kind], dtype=float), expected, rtol=1e-12)
        assert data["scores"]["previous_token"][0][0] == pytest.approx(0.5 + 0.5 * np.mean(1.0 / np.arange(2, n + 1)))
    finally:
        path.unlink(missing_ok=True)


def _write_large(path, head: np.ndarray, shape: tuple) -> None:
    """Writes the .npy with plain file writes (no mapping), so this process stays small."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(head.dtype), "fortran_order": False, "shape": shape})
        block = head.tobytes()
        for _ in range(int(np.prod(shape[:-2]))):
            f.write(block)
