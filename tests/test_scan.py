"""scan(): every source type gives the scores of head_scores on the stacked patterns (and of the
oracle), layer by layer; torch-like tensors without a copy; clear errors for bad sources."""

from __future__ import annotations

import json
import subprocess
import sys
import weakref

import numpy as np
import pytest

import induct_fast as inf
import oracle
from helpers import FakeTensor, random_patterns, random_tokens

scan_module = sys.modules["induct_fast.scan"]
files_module = sys.modules["induct_fast.files"]

KINDS = ("previous_token", "duplicate_token", "induction", "entropy")
OFFSETS = (2,)
BATCH, LAYERS, HEADS, N = 2, 3, 4, 9


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    patterns = random_patterns(rng, (BATCH, LAYERS, HEADS, N, N), "peaked", np.float32)
    tokens = random_tokens(rng, (BATCH, N), alphabet=4)
    want = inf.head_scores(patterns, tokens, kinds=KINDS, offsets=OFFSETS)
    return patterns, tokens, want


def assert_matches(result, want):
    assert isinstance(result, inf.HeadScores)
    assert result.kinds == tuple(want)
    for kind, values in want.items():
        np.testing.assert_array_equal(result.per_prompt[kind], values, err_msg=kind)


def run(source, tokens, **kwargs):
    return inf.scan(source, tokens, kinds=KINDS, offsets=OFFSETS, **kwargs)


# -- sources ---------------------------------------------------------------------------------


def test_stacked_array_matches_head_scores_and_the_oracle(data):
    patterns, tokens, want = data
    result = run(patterns, tokens)
    assert_matches(result, want)
    slow = oracle.head_scores(patterns, tokens, kinds=KINDS, offsets=OFFSETS)
    for kind in want:
        np.testing.assert_allclose(result.per_prompt[kind], slow[kind], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(result[kind], slow[kind].mean(axis=0), rtol=1e-12, atol=1e-12)


def test_hugging_face_tuple_list_and_generator_of_layers(data):
    patterns, tokens, want = data
    layers = tuple(patterns[:, layer] for layer in range(LAYERS))
    assert_matches(run(layers, tokens), want)
    assert_matches(run(list(layers), tokens), want)
    assert_matches(run((layer for layer in layers), tokens), want)

    class ModelOutput:  # transformers' output object with output_attentions=True
        attentions = layers

    assert_matches(run(ModelOutput(), tokens), want)


def test_layers_without_a_batch_axis_are_one_prompt(data):
    patterns, tokens, want = data
    result = run([patterns[0, layer] for layer in range(LAYERS)], tokens[0])
    for kind in want:
        np.testing.assert_array_equal(result.per_prompt[kind], want[kind][:1])


class FakeActivationCache:
    """Mimics transformer_lens.ActivationCache: hook names as keys, ``cache["pattern", l]``."""

    def __init__(self, tensors: dict):
        self.cache_dict = tensors

    def keys(self):
        return self.cache_dict.keys()

    def __getitem__(self, key):
        if isinstance(key, tuple):
            name, layer = key
            key = f"blocks.{layer}.attn.hook_{name}"
        return self.cache_dict[key]

    def __iter__(self):
        return iter(self.cache_dict)

    def __len__(self):
        return len(self.cache_dict)


def test_transformer_lens_cache_in_layer_order(data):
    rng = np.random.default_rng(3)
    patterns = random_patterns(rng, (2, 12, 2, 6, 6), "softmax")
    tokens = random_tokens(rng, (2, 6), alphabet=3)
    tensors = {f"blocks.{l}.hook_resid_pre": np.zeros((2, 6, 8)) for l in range(12)}
    # keys in an order where string sorting would put layer 10 before layer 2
    for layer in sorted(range(12), key=str):
        tensors[f"blocks.{layer}.attn.hook_pattern"] = patterns[:, layer]
    want = inf.head_scores(patterns, tokens, kinds=KINDS)
    for source in (FakeActivationCache(tensors), tensors):
        result = inf.scan(source, tokens, kinds=KINDS)
        for kind in KINDS:
            np.testing.assert_array_equal(result.per_prompt[kind], want[kind])


def test_cache_answering_only_pattern_lookups(data):
    patterns, tokens, want = data

    class LookupOnly:
        calls = []

        def __getitem__(self, key):
            name, layer = key
            self.calls.append(layer)
            if name != "pattern" or layer >= LAYERS:
                raise KeyError(key)
            return patterns[:, layer]

    source = LookupOnly()
    assert_matches(run(source, tokens), want)
    assert source.calls == [0, 1, 2, 3]


def test_torch_like_tensors_are_viewed_not_copied(data, monkeypatch):
    patterns, tokens, want = data
    seen = []
    real = scan_module.head_scores

    def spy(array, *args, **kwargs):
        seen.append(array)
        return real(array, *args, **kwargs)

    monkeypatch.setattr(scan_module, "head_scores", spy)
    tensor = FakeTensor(patterns)
    assert_matches(run(tensor, FakeTensor(tokens)), want)
    assert tensor.numpy_calls == 1 and np.shares_memory(seen[-1], patterns)
    layers = tuple(FakeTensor(patterns[:, layer]) for layer in range(LAYERS))
    assert_matches(run(layers, tokens), want)
    assert all(np.shares_memory(a, patterns) for a in seen[-LAYERS:])


def test_cuda_tensors_get_a_clear_error(data):
    patterns, tokens, _ = data
    with pytest.raises(ValueError, match=r"source: expected a CPU tensor.*cuda:0.*\.cpu\(\)"):
        inf.scan(FakeTensor(patterns, device="cuda:0"), tokens)
    layers = [FakeTensor(patterns[:, 0]), FakeTensor(patterns[:, 1], device="cuda:0")]
    with pytest.raises(ValueError, match=r"layer 1: expected a CPU tensor.*\.cpu\(\)"):
        inf.scan(layers, tokens)


def test_real_torch_tensors():
    import torch  # installed by make test: extras never skip there
    rng = np.random.default_rng(0)
    patterns = random_patterns(rng, (1, 2, 2, 5, 5), "softmax", np.float32)
    want = inf.head_scores(patterns, kinds=("previous_token",))
    result = inf.scan(tuple(torch.from_numpy(patterns[:, l]) for l in range(2)), kinds=("previous_token",))
    np.testing.assert_array_equal(result.per_prompt["previous_token"], want["previous_token"])


# -- (q, k) ----------------------------------------------------------------------------------


def patterns_from_qk(q, k):
    """Causal softmax(q k^T / sqrt(d)) for q, k [batch, n, heads, d] -> [batch, heads, n, n]."""
    q, k = np.asarray(q, dtype=np.float64), np.asarray(k, dtype=np.float64)
    logits = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1])
    n = q.shape[1]
    logits = np.where(np.tril(np.ones((n, n), dtype=bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def qk():
    rng = np.random.default_rng(5)
    q = rng.normal(size=(BATCH, LAYERS, N, HEADS, 3))
    k = rng.normal(size=(BATCH, LAYERS, N, HEADS, 3))
    patterns = np.stack([patterns_from_qk(q[:, l], k[:, l]) for l in range(LAYERS)], axis=1)
    tokens = random_tokens(rng, (BATCH, N), alphabet=4)
    return q, k, tokens, inf.head_scores(patterns, tokens, kinds=KINDS, offsets=OFFSETS, exclude_bos=True)


def assert_close(result, want):
    """The fused scores_from_qk computes the same scores along another rounding path."""
    assert result.kinds == tuple(want)
    for kind, values in want.items():
        np.testing.assert_allclose(result.per_prompt[kind], values, rtol=1e-9, atol=1e-12, err_msg=kind)


def test_qk_pair_is_scored_layer_by_layer(qk):
    """(q, k) sources go through the fused scores_from_qk and agree with the patterns' scores."""
    q, k, tokens, want = qk
    assert_close(run((q, k), tokens, exclude_bos=True, qk_options={"scale": None}), want)
    per_layer = ([q[:, l] for l in range(LAYERS)], [k[:, l] for l in range(LAYERS)])
    assert_close(run(per_layer, tokens, exclude_bos=True), want)
    tensors = {f"blocks.{l}.attn.hook_q": q[:, l] for l in range(LAYERS)}
    tensors.update({f"blocks.{l}.attn.hook_k": k[:, l] for l in range(LAYERS)})
    assert_close(run(FakeActivationCache(tensors), tokens, exclude_bos=True), want)
    assert_close(run((FakeTensor(q), FakeTensor(k)), tokens, exclude_bos=True), want)


def test_qk_shape_errors(qk):
    q, k, tokens, _ = qk
    with pytest.raises(ValueError, match=r"k: expected the batch and layer axes of q"):
        inf.scan((q, k[:, :2]), tokens)
    with pytest.raises(ValueError, match=r"as many q as k layers, got 3 and 2"):
        inf.scan((list(q.swapaxes(0, 1)), list(k.swapaxes(0, 1))[:2]), tokens)


# -- files -----------------------------------------------------------------------------------


def test_files_in_every_layout(data, tmp_path):
    patterns, tokens, want = data
    np.save(tmp_path / "stacked.npy", patterns)
    np.save(tmp_path / "fortran.npy", np.asfortranarray(patterns))
    per_layer = {f"layer{l}": patterns[:, l] for l in range(LAYERS)}
    np.savez(tmp_path / "layers.npz", tokens=tokens, **per_layer)
    np.savez_compressed(tmp_path / "compressed.npz", **per_layer)
    np.savez(tmp_path / "stacked.npz", patterns=patterns, tokens=tokens)
    np.savez_compressed(tmp_path / "stacked_compressed.npz", patterns=patterns)
    for name in ("stacked.npy", "fortran.npy", "layers.npz", "compressed.npz", "stacked.npz", "stacked_compressed.npz"):
        assert_matches(run(tmp_path / name, tokens), want)
    # the file's own tokens are used when none are given
    assert_matches(run(str(tmp_path / "layers.npz"), None), want)
    assert_matches(run(inf.files.open_patterns(tmp_path / "stacked.npz"), None), want)


def test_uncompressed_npz_members_are_memory_mapped(data, tmp_path):
    patterns, _, _ = data
    np.savez(tmp_path / "stacked.npz", patterns=patterns)
    layer = next(iter(inf.files.open_patterns(tmp_path / "stacked.npz")))
    assert isinstance(layer.base, np.memmap) or isinstance(layer, np.memmap)
    np.testing.assert_array_equal(layer, patterns[:, 0])


def test_safetensors_file(data, tmp_path):
    import safetensors.numpy as st  # installed by make test: extras never skip there
    patterns, tokens, want = data
    st.save_file({f"blocks.{l}.attn.hook_pattern": np.ascontiguousarray(patterns[:, l]) for l in range(LAYERS)}, tmp_path / "l.safetensors")
    st.save_file({"patterns": patterns, "tokens": tokens}, tmp_path / "s.safetensors")
    assert_matches(run(tmp_path / "l.safetensors", tokens), want)
    assert_matches(run(tmp_path / "s.safetensors", None), want)


def test_file_layers_are_read_one_at_a_time(data, tmp_path, monkeypatch):
    patterns, tokens, want = data
    np.savez(tmp_path / "layers.npz", **{f"layer{l}": patterns[:, l] for l in range(LAYERS)})
    alive, peak = [0], [0]
    real_read = files_module._NpzReader.read

    def tracked_read(self, key, layer):
        array = real_read(self, key, layer)
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(array, lambda: alive.__setitem__(0, alive[0] - 1))
        return array

    monkeypatch.setattr(files_module._NpzReader, "read", tracked_read)
    assert_matches(run(tmp_path / "layers.npz", tokens, progress=True), want)
    assert peak[0] == 1 and alive[0] == 0


def test_progress_on_stderr(data, capsys, monkeypatch):
    patterns, tokens, _ = data
    layers = [patterns[:, l] for l in range(LAYERS)]
    inf.scan(layers, tokens, progress=True)
    assert "3/3" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    inf.scan(layers, tokens, progress=True)
    assert "scan: layer 3/3" in capsys.readouterr().err
    inf.scan(layers, tokens)
    assert capsys.readouterr().err == ""


# -- errors ----------------------------------------------------------------------------------


def test_layers_of_different_shapes(data):
    patterns, tokens, _ = data
    layers = [patterns[:, 0], patterns[:, 1, :2]]
    with pytest.raises(ValueError, match=r"layer 1: expected shape \(2, 4, 9, 9\) like layer 0, got shape \(2, 2, 9, 9\)"):
        inf.scan(layers, tokens)
    with pytest.raises(ValueError, match=r"layer 0: expected patterns of shape \(batch, head, n, n\), got shape \(9, 9\)"):
        inf.scan([patterns[0, 0, 0]], kinds="previous_token")


@pytest.mark.parametrize("bad_tokens", [np.zeros(8, dtype=int), np.zeros((3, 9), dtype=int), np.zeros((2, 10), dtype=int)])
def test_tokens_that_do_not_match_the_patterns(data, bad_tokens):
    patterns, _, _ = data
    message = r"tokens: expected shape \(9,\) or \(2, 9\) to match patterns of 2 prompts of 9 positions"
    with pytest.raises(ValueError, match=message):
        inf.scan(patterns, bad_tokens)
    with pytest.raises(ValueError, match=message):
        inf.scan([patterns[:, 0]], bad_tokens)


def test_token_kinds_need_tokens(data):
    patterns, _, _ = data
    with pytest.raises(ValueError, match="tokens"):
        inf.scan(patterns)
    assert inf.scan(patterns, kinds="previous_token").kinds == ("previous_token",)


@pytest.mark.parametrize(
    "source, error, message",
    [
        ((), ValueError, "source: expected at least one layer, got none"),
        (np.zeros((2, 3, 4, 4)), ValueError, r"source: expected an array of shape \(batch, layer, head, n, n\), got shape \(2, 3, 4, 4\)"),
        (42, TypeError, "source: expected patterns"),
        ({"blocks.0.hook_resid_pre": 1}, ValueError, r"'blocks.\{l\}.attn.hook_pattern'.*got keys \[blocks.0.hook_resid_pre\]"),
        ({"blocks.0.attn.hook_pattern": 1, "blocks.2.attn.hook_pattern": 1}, ValueError, "missing layer 1"),
    ],
)
def test_bad_sources(source, error, message):
    with pytest.raises(error, match=message):
        inf.scan(source, kinds="previous_token")


def test_bad_files(tmp_path, data):
    patterns, _, _ = data
    with pytest.raises(FileNotFoundError, match="no such file"):
        inf.scan(tmp_path / "missing.npy")
    (tmp_path / "garbage.npy").write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match="garbage.npy: not a readable .npy file"):
        inf.scan(tmp_path / "garbage.npy")
    (tmp_path / "garbage.npz").write_bytes(b"PK not a zip")
    with pytest.raises(ValueError, match="garbage.npz: not a readable .npz file"):
        inf.scan(tmp_path / "garbage.npz")
    (tmp_path / "p.h5").write_bytes(b"")
    with pytest.raises(ValueError, match=r"expected a file ending in .npy, .npz, .safetensors, got '.h5'"):
        inf.scan(tmp_path / "p.h5")
    np.savez(tmp_path / "mixed.npz", layer0=patterns[:, 0], layer1=patterns[:, 1, :, :5, :5])
    with pytest.raises(ValueError, match=r"same shape; key 'layer0' is \(2, 4, 9, 9\), key 'layer1' is \(2, 4, 5, 5\)"):
        inf.scan(tmp_path / "mixed.npz", kinds="previous_token")
    np.savez(tmp_path / "two_stacks.npz", a=patterns, b=patterns)
    with pytest.raises(ValueError, match=r"one stacked array .* got key 'a' of shape"):
        inf.scan(tmp_path / "two_stacks.npz", kinds="previous_token")
    with pytest.raises(ValueError, match=r"key: no array in .*mixed.npz matches 'blocks\.\*'; arrays of a fitting shape: 'layer0' \(2, 4, 9, 9\), 'layer1'"):
        inf.files.open_patterns(tmp_path / "mixed.npz", key="blocks.*")
    np.save(tmp_path / "objects.npy", np.array([None, 1], dtype=object))
    with pytest.raises(ValueError, match="objects.npy: not a readable .npy file"):
        inf.scan(tmp_path / "objects.npy")


def test_natural_key_order():
    keys = ["layer10", "layer2", "layer1", "blocks.11.attn", "blocks.3.attn"]
    assert sorted(keys, key=inf.files.natural_key) == ["blocks.3.attn", "blocks.11.attn", "layer1", "layer2", "layer10"]


# -- import hygiene ----------------------------------------------------------------------------


def test_import_loads_nothing_beyond_numpy():
    code = (
        "import sys, json; import induct_fast; "
        "std = getattr(sys, 'stdlib_module_names', None); "
        "top = {m.split('.')[0] for m in sys.modules}; "
        "print(json.dumps(sorted(top - set(std) if std else top)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    third_party = set(json.loads(out)) - {"induct_fast", "numpy", "__main__", "_distutils_hack"}
    assert not third_party, third_party
    for optional in ("pandas", "matplotlib", "dask", "distributed", "torch", "tqdm", "safetensors"):
        assert optional not in json.loads(out)


# -- issue 12 ----------------------------------------------------------------------------------


def test_nan_in_a_per_layer_source_names_the_layer_axis(data, tmp_path):
    """NaN at [3, 1, 2, 30, 29] of the whole source is reported at that index, not (3, 2, 30, 29)."""
    patterns, tokens, _ = data
    bad = patterns.copy()
    bad[1, 2, 3, 7, 6] = np.nan
    layers = tuple(bad[:, layer] for layer in range(LAYERS))
    message = r"patterns: expected finite values, got NaN at index \(1, 2, 3, 7, 6\) of the \[batch, layer, \.\.\.\] source"
    with pytest.raises(ValueError, match=message):
        run(layers, tokens)
    np.savez(tmp_path / "layers.npz", **{f"layer{l}": layers[l] for l in range(LAYERS)})
    with pytest.raises(ValueError, match=message):
        run(tmp_path / "layers.npz", tokens)
    with pytest.raises(ValueError, match=r"got NaN at index \(1, 2, 3, 7, 6\)$"):
        run(bad, tokens)  # one stacked array: the kernel's own index
    with pytest.raises(ValueError, match=r"got NaN at index \(1, 2, 3, 7, 6\)"):
        run(bad, tokens, progress=True)


def test_nan_in_per_layer_queries_names_the_layer_axis():
    q = np.random.default_rng(0).normal(size=(2, 3, 6, 2, 4))
    q[1, 2, 3, 1, 0] = np.inf
    with pytest.raises(ValueError, match=r"q: expected finite values, got inf at index \(1, 2, 3, 1, 0\) of the \[batch"):
        inf.scan(([q[:, l] for l in range(3)], [q[:, l] for l in range(3)]), kinds="previous_token")


def test_stacked_patterns_with_progress_show_a_bar_and_the_same_scores(data, capsys, monkeypatch):
    patterns, tokens, want = data
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # the plain counter
    assert_matches(run(patterns, tokens, progress=True), want)
    assert f"scan: layer {LAYERS}/{LAYERS}" in capsys.readouterr().err


def test_scan_a_path_with_key(data, tmp_path):
    patterns, tokens, want = data
    np.savez(tmp_path / "mixed.npz", tokens=tokens, mine=patterns, other=np.zeros((3, 4)))
    assert_matches(run(tmp_path / "mixed.npz", None, key="mine"), want)
    assert_matches(run(str(tmp_path / "mixed.npz"), None, key="mi*"), want)
    with pytest.raises(ValueError, match="key: no array in .* matches 'nope'"):
        run(tmp_path / "mixed.npz", None, key="nope")
    with pytest.raises(TypeError, match="key: selects the arrays of a file given by its path; the source is a ndarray"):
        run(patterns, tokens, key="mine")
