"""The ``induct-fast scan`` command, run as a subprocess: every output format, every file type,
clear one-line errors, and a large memory-mapped file scanned in a fraction of its size."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

import induct_fast as inf
from helpers import random_patterns, random_tokens

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BATCH, LAYERS, HEADS, N = 2, 3, 2, 8


def cli(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg", **(env or {}))
    result = subprocess.run([sys.executable, "-m", "induct_fast", *map(str, args)], capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}")
    return result


def fails(*args: str, status: int = 1, command: str = "scan", env: dict | None = None) -> str:
    """Runs a command that must fail with `status`, nothing on stdout and exactly one line on
    stderr, ``induct-fast <command>: error: ...`` (no traceback); returns that line."""
    result = cli(*args, check=False, env=env)
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"induct-fast {command}: error: "), lines[0]
    return lines[0]


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
    assert lines[0] == f"# mean over {BATCH} prompts of each head's score (nan: no prompt had an eligible query)"
    assert lines[1].split() == ["layer", "head", "previous_token", "duplicate_token", "induction", "offset_3"]
    assert len(lines) == 2 + LAYERS * HEADS
    assert out == cli("scan", root / "patterns.npy", "--tokens", root / "tokens.npy", "--offsets", "3", "--table").stdout
    cells = lines[2 + 1 * HEADS + 1].split()  # layer 1, head 1
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
    import matplotlib  # noqa: F401  (installed by make test: extras never skip there)
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
    import safetensors.numpy as st  # installed by make test: extras never skip there
    root, patterns, tokens, want = files
    path = tmp_path / "cache.safetensors"
    st.save_file({"patterns": patterns, "tokens": tokens}, path)
    data = json.loads(cli("scan", path, "--offsets", "3", "--json").stdout)
    np.testing.assert_allclose(np.array(data["scores"]["induction"], dtype=float), want["induction"], rtol=1e-15)


def test_progress_and_missing_tokens_notes_on_stderr(files):
    root = files[0]
    result = cli("scan", root / "patterns.npy")
    assert "3/3" in result.stderr
    note = result.stderr.splitlines()[-1]
    assert note == "induct-fast scan: note: no tokens (--tokens FILE[:KEY]), so only previous_token (and any --offsets) were scored"
    assert result.stdout.splitlines()[1].split() == ["layer", "head", "previous_token"]
    assert cli("scan", root / "patterns.npy", "--quiet").stderr == ""  # -q: no bar, no note
    assert cli("scan", root / "patterns.npy", "-q").stderr == ""


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
    assert "holds 2 arrays and none is named 'tokens'; name one as FILE:KEY" in fails("scan", root / "patterns.npy", "--tokens", tmp_path / "two.npz")


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


# -- issue 12: a newcomer's first hour ------------------------------------------------------------

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "attn_only_tl_reference.npz"


def test_python_dash_m_induct_fast_is_the_cli():
    result = subprocess.run([sys.executable, "-m", "induct_fast", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"induct-fast {inf.__version__}"


def test_tokens_file_colon_key_scans_the_projects_fixture():
    """--tokens FILE:KEY: the fixture's L2_rep patterns with its own L2_rep tokens."""
    assert FIXTURE.is_file(), f"the shared fixture is missing: {FIXTURE}"
    data = np.load(FIXTURE)
    want = inf.scan(data["L2_rep_patterns"], data["L2_rep_tokens"])
    out = cli("scan", FIXTURE, "--key", "L2_rep_patterns", "--tokens", f"{FIXTURE}:L2_rep_tokens", "--json", "-q").stdout
    got = json.loads(out)
    assert got["batch"] == 8 and got["shape"] == [2, 4]
    for kind in want.kinds:
        np.testing.assert_array_equal(np.array(got["scores"][kind], dtype=float), want[kind])
    # the same through Python: scan(path, key=...)
    again = inf.scan(FIXTURE, data["L2_rep_tokens"], key="L2_rep_patterns")
    for kind in want.kinds:
        np.testing.assert_array_equal(again.per_prompt[kind], want.per_prompt[kind])


def test_many_keys_without_key_suggest_key_and_stay_short():
    message = fails("scan", FIXTURE)
    assert "--key GLOB" in message and "'L2_rep_patterns' (8, 2, 4, 51, 51)" in message
    assert "L2_W_E" not in message.split("--key", 1)[1]  # only arrays that could be patterns are listed
    assert len(message) < 600, len(message)
    message = fails("scan", FIXTURE, "--key", "L2_rep_patterns", "--tokens", FIXTURE)
    assert f"--tokens {FIXTURE}:KEY" in message and "'L2_rep_tokens' (8, 51)" in message and len(message) < 600
    message = fails("scan", FIXTURE, "--key", "nothing*")
    assert "no array in" in message and "'L1_nat_patterns' (8, 1, 4, 64, 64)" in message and len(message) < 600
    assert "has no array 'nope'" in fails("scan", FIXTURE, "--key", "L2_rep_patterns", "--tokens", f"{FIXTURE}:nope")


@pytest.fixture(scope="module")
def tl_cache():
    """A real TransformerLens 3 model's cache, saved with np.savez (hook names as keys)."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    config = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=32, d_head=8, n_heads=4, d_vocab=50, act_fn="relu")
    model = HookedTransformer(config).eval()
    tokens = torch.from_numpy(inf.repeated_tokens(3, period=10, vocab_size=50, seed=0))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    arrays = {name: value.numpy() for name, value in cache.items()}
    return cache, arrays, tokens.numpy()


def test_saved_transformer_lens_cache_is_read_without_key(tl_cache, tmp_path):
    cache, arrays, tokens = tl_cache
    assert len(arrays) > 20  # embeddings, residuals, MLPs, ...: not only patterns
    np.savez(tmp_path / "cache.npz", **arrays)
    np.save(tmp_path / "tokens.npy", tokens)
    want = inf.scan(cache, tokens)
    got = json.loads(cli("scan", tmp_path / "cache.npz", "--tokens", tmp_path / "tokens.npy", "--json", "-q").stdout)
    assert got["shape"] == [2, 4] and got["batch"] == 3
    for kind in want.kinds:
        np.testing.assert_allclose(np.array(got["scores"][kind], dtype=float), want[kind], rtol=0, atol=1e-12)
    assert inf.files.open_patterns(tmp_path / "cache.npz").kind == "patterns"


def test_saved_cache_of_queries_and_keys_is_scored_from_q_and_k(tl_cache, tmp_path):
    cache, arrays, tokens = tl_cache
    qk = {name: value for name, value in arrays.items() if "pattern" not in name and "attn_scores" not in name}
    np.savez(tmp_path / "qk.npz", tokens=tokens, **qk)
    assert inf.files.open_patterns(tmp_path / "qk.npz").kind == "qk"
    want = inf.scan(cache, tokens)  # from the patterns
    got = json.loads(cli("scan", tmp_path / "qk.npz", "--json", "-q").stdout)
    for kind in want.kinds:
        np.testing.assert_allclose(np.array(got["scores"][kind], dtype=float), want[kind], atol=2e-6)


def test_per_prompt_output_in_every_format(files):
    root, _, _, want = files
    base = ("scan", root / "patterns.npy", "--tokens", root / "tokens.npy", "--offsets", "3", "--per-prompt", "-q")
    table = cli(*base).stdout.splitlines()
    assert table[0] == f"# every prompt's scores ({BATCH} prompts; nan: no eligible query in that prompt)"
    assert table[1].split() == ["prompt", "layer", "head", *want.kinds]
    assert len(table) == 2 + BATCH * LAYERS * HEADS
    rows = list(csv.DictReader(io.StringIO(cli(*base, "--csv").stdout)))
    assert len(rows) == BATCH * LAYERS * HEADS and list(rows[0])[:3] == ["prompt", "layer", "head"]
    for row in rows:
        p, layer, head = int(row["prompt"]), int(row["layer"]), int(row["head"])
        assert float(row["induction"]) == want.per_prompt["induction"][p, layer, head]
    data = json.loads(cli(*base, "--json").stdout)
    np.testing.assert_array_equal(np.array(data["per_prompt"]["induction"], dtype=float), want.per_prompt["induction"])


def test_demo_usage_and_environment_errors_are_one_line(tmp_path):
    message = fails("demo", "--seed", "-1", status=2, command="demo")
    assert "--seed: expected a non-negative integer, got -1" in message
    assert "expected a non-negative integer, got 'x'" in fails("demo", "--seed", "x", status=2, command="demo")
    message = fails("demo", "--plot", "/nonexistent/x.png", command="demo")
    assert message == "induct-fast demo: error: --plot /nonexistent/x.png: no such directory '/nonexistent'"
    assert "is a directory" in fails("demo", "--plot", tmp_path, command="demo")
    assert "expected a positive integer, got 0" in fails("scan", "x.npy", "--offsets", "0", status=2)
    assert "the following arguments are required" in fails("scan", status=2)


@pytest.mark.parametrize("command", ["demo", "scan"])
def test_a_closed_pipe_ends_quietly(command, files):
    """`induct-fast demo | head -3`: no BrokenPipeError traceback. A reader that leaves at once
    (`head -c 0` exits before the interpreter has started) makes the broken pipe certain: the
    command then ends with the shell's SIGPIPE status, 141, and nothing on stderr."""
    args = ["demo"] if command == "demo" else ["scan", str(files[0] / "patterns.npy"), "--per-prompt", "-q"]
    command_line = f"{shlex.quote(sys.executable)} -m induct_fast {' '.join(map(shlex.quote, args))}"
    for reader, statuses in (("head -3", ("0", "141")), ("head -c 0", ("141",))):
        script = f'{command_line} | {reader}; echo "status ${{PIPESTATUS[0]}}" >&2'
        result = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
        assert len(result.stdout.splitlines()) == (3 if reader == "head -3" else 0)
        *errors, status = result.stderr.splitlines()
        assert errors == [] and status.split()[1] in statuses, (reader, result.stderr)


def block_matplotlib(tmp_path) -> dict:
    """An environment in which `import matplotlib` fails, as it does where it is not installed."""
    fake = tmp_path / "no_mpl" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    return {"PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])}


def test_plot_without_matplotlib_fails_before_any_work(files, tmp_path):
    root = files[0]
    env = block_matplotlib(tmp_path)
    message = fails("scan", root / "patterns.npy", "--tokens", root / "tokens.npy", "--plot", tmp_path / "x.png", env=env)
    assert message == "induct-fast scan: error: --plot needs matplotlib: pip install matplotlib (or induct_fast[plot])"
    assert "--plot needs matplotlib" in fails("demo", "--plot", tmp_path / "x.png", env=env, command="demo")
    message = fails("scan", root / "patterns.npy", "--plot", "/nonexistent/x.png")
    assert "no such directory '/nonexistent'" in message


def test_file_errors_say_what_is_wrong(files, tmp_path):
    root, patterns, tokens, _ = files
    (tmp_path / "dir.npy").mkdir()
    assert fails("scan", tmp_path / "dir.npy").endswith("dir.npy: is a directory, expected a file")
    data = (root / "patterns.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[: len(data) // 2])
    message = fails("scan", tmp_path / "cut.npy")
    assert "cut.npy: truncated: its header describes float32 data of shape (2, 3, 2, 8, 8) (3072 bytes)" in message
    assert "mmap" not in message
    message = fails("scan", root / "patterns.npy", "--key", "x")
    assert "is a .npy file, which holds one array and no keys; drop the key (--key)" in message
    assert "(none)" not in message
    assert "is a .npy file, which holds one array and no keys" in fails("scan", root / "patterns.npy", "--tokens", f"{root / 'tokens.npy'}:x")


def test_no_tokens_note_is_not_printed_before_an_error_or_with_quiet(files, tmp_path):
    root = files[0]
    np.save(tmp_path / "short.npy", np.zeros((2, 3)))
    bad = fails("scan", tmp_path / "short.npy")  # fails() asserts the error is the only line
    assert "no tokens" not in bad
    assert cli("scan", root / "patterns.npy", "-q").stderr == ""


def test_nan_in_one_layer_of_a_file_names_its_layer(files, tmp_path):
    root, patterns, tokens, _ = files
    bad = patterns.copy()
    bad[1, 2, 1, 6, 5] = np.nan
    np.savez(tmp_path / "layers.npz", tokens=tokens, **{f"layer{l}": bad[:, l] for l in range(LAYERS)})
    message = fails("scan", tmp_path / "layers.npz", "-q")
    assert "got NaN at index (1, 2, 1, 6, 5) of the [batch, layer, ...] source" in message
    np.save(tmp_path / "stacked.npy", bad)
    assert "got NaN at index (1, 2, 1, 6, 5)" in fails("scan", tmp_path / "stacked.npy", "-q")
