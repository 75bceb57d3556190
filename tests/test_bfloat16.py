"""bfloat16 read natively (issue 13): torch bfloat16 tensors and ml_dtypes (JAX) bfloat16 numpy
arrays reach the kernels without a copy and score exactly like float32 arrays of the same values,
for every function that takes float arrays (head_scores, detection_scores, attention_patterns,
scores_from_qk with and without a given lse, token_losses, scan over caches), through strided and
non-contiguous views (hypothesis over shapes and strides); peak memory in a subprocess; errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="torch is not installed (make test installs it)")
ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is not installed (make test installs it)")

import induct_fast as inf  # noqa: E402
from induct_fast import _core  # noqa: E402
from induct_fast._arrays import BFLOAT16_BITS, as_float_array, kernel_array  # noqa: E402
from helpers import ALL_KINDS, TARGET_KINDS, layouts, lead_shapes, random_patterns, sequence_lengths, strided_view  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
MiB = 1 << 20


def narrow(a: np.ndarray) -> np.ndarray:
    """`a` rounded to bfloat16 and back: float32 values every bfloat16 array below holds exactly."""
    return np.asarray(a, np.float32).astype(BF16).astype(np.float32)


def forms(values: np.ndarray) -> dict[str, object]:
    """The float32 values as a torch bfloat16 tensor and as an ml_dtypes array."""
    assert np.array_equal(narrow(values), values, equal_nan=True)
    return {"torch": torch.from_numpy(np.ascontiguousarray(values)).to(torch.bfloat16), "ml_dtypes": values.astype(BF16)}


def as_f32(x) -> np.ndarray:
    """The float32 array of the same values as a bfloat16 tensor or array (a copy)."""
    return x.float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x).astype(np.float32)


def assert_same(got, want):
    """Equal to the bit (NaN where NaN), dicts of score arrays too."""
    if isinstance(got, dict):
        assert got.keys() == want.keys()
        for key in got:
            assert_same(got[key], want[key])
        return
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def patterns_and_tokens(lead=(2, 3), n=33, seed=0, style="softmax"):
    rng = np.random.default_rng(seed)
    patterns = narrow(random_patterns(rng, (*lead, n, n), style))
    tokens = rng.integers(0, 6, size=(lead[0], n) if lead else n)
    return patterns, tokens


def qk_values(shape_q, shape_k, seed=0):
    rng = np.random.default_rng(seed)
    return narrow(rng.standard_normal(shape_q)), narrow(rng.standard_normal(shape_k))


# ---------------------------------------------------------------------------------------------
# intake: views, not copies


@pytest.mark.parametrize("view", ["plain", "transpose", "slice"])
def test_torch_bfloat16_reaches_the_kernel_as_a_view(view):
    t = torch.randn(4, 6, 8).to(torch.bfloat16)
    v = {"plain": t, "transpose": t.transpose(0, 2), "slice": t[1:, ::2, 1:]}[view]
    bits = as_float_array(v, "x", bfloat16=True)
    assert bits.dtype == BFLOAT16_BITS and bits.shape == tuple(v.shape)
    tag, raw = kernel_array(bits)
    assert tag == "bfloat16" and raw.dtype == np.uint16
    assert raw.__array_interface__["data"][0] == v.data_ptr()
    assert raw.strides == tuple(2 * s for s in v.stride())
    np.testing.assert_array_equal(raw, v.view(torch.int16).numpy().view(np.uint16))


def test_ml_dtypes_reaches_the_kernel_as_a_view_and_numpy_code_gets_float32():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4).astype(BF16)[:, ::-1, 1:]
    bits = as_float_array(a, "x", bfloat16=True)
    assert bits.dtype == BFLOAT16_BITS and np.shares_memory(bits, a) and bits.strides == a.strides
    assert as_float_array(bits, "x", bfloat16=True) is not None  # the carrier is taken again as is
    # Without bfloat16=True (numpy code: circuits, icl_score) the values come back as float32.
    wide = as_float_array(a, "x")
    assert wide.dtype == np.float32 and np.array_equal(wide, a.astype(np.float32))
    wide_t = as_float_array(torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16), "x")
    assert wide_t.dtype == np.float32 and np.array_equal(wide_t, a.astype(np.float32))


def test_the_carrier_refuses_arithmetic_and_casts():
    bits = as_float_array(np.ones(3, BF16), "x", bfloat16=True)
    for op in (lambda: bits + 1, lambda: bits.astype(np.float64), lambda: np.asarray(bits, np.float32)):
        with pytest.raises((TypeError, ValueError)):
            op()


# ---------------------------------------------------------------------------------------------
# parity with float32 of the same values


@pytest.mark.parametrize("form", ["torch", "ml_dtypes"])
@pytest.mark.parametrize("per_query", [False, True])
def test_head_scores_equal_float32_of_the_same_values(form, per_query):
    patterns, tokens = patterns_and_tokens()
    x = forms(patterns)[form]
    mask = np.ones((2, 33), bool)
    mask[1, 30:] = False
    spans = {"queries": np.arange(33) > 10, "keys": np.arange(33) < 20}
    for options in ({}, {"exclude_bos": True}, {"attention_mask": mask}, {"measure": "top1"}, spans):
        got = inf.head_scores(x, tokens, kinds=ALL_KINDS + ("copy",), offsets=(1, 5), per_query=per_query, **options)
        want = inf.head_scores(patterns, tokens, kinds=ALL_KINDS + ("copy",), offsets=(1, 5), per_query=per_query, **options)
        assert_same(got, want)
    assert_same(inf.induction_scores(x, tokens), inf.induction_scores(patterns, tokens))
    assert_same(inf.offset_scores(x, 3, per_query=per_query), inf.offset_scores(patterns, 3, per_query=per_query))


@pytest.mark.parametrize("form", ["torch", "ml_dtypes"])
def test_detection_scores_equal_float32_of_the_same_values(form):
    patterns, tokens = patterns_and_tokens(style="unnormalised")
    x = forms(patterns)[form]
    D = np.random.default_rng(1).integers(0, 2, size=(3, 33, 33)).astype(np.float64)
    for detection in ("previous_token", "induction", D):
        for measure in ("mul", "abs"):
            for flags in ({}, {"exclude_bos": True, "exclude_current_token": True}):
                kw = dict(tokens=tokens, measure=measure, **flags)
                assert_same(inf.detection_scores(x, detection, **kw), inf.detection_scores(patterns, detection, **kw))


@pytest.mark.parametrize("form", ["torch", "ml_dtypes"])
def test_attention_patterns_are_float32_and_equal_float32_of_the_same_values(form):
    q, k = qk_values((2, 40, 4, 16), (2, 40, 2, 16))
    qb, kb = forms(q)[form], forms(k)[form]
    mask = np.ones((2, 40), bool)
    mask[0, :3] = False
    for options in ({}, {"softcap": 2.0, "window": 7}, {"causal": False, "attention_mask": mask, "scale": 0.3}):
        got = inf.attention_patterns(qb, kb, **options)
        assert got.dtype == np.float32  # as for float16: computed in float32
        assert_same(got, inf.attention_patterns(q, k, **options))
    # Hugging Face's [batch, heads, n, d]
    qt, kt = np.swapaxes(q, 1, 2), np.swapaxes(k, 1, 2)
    qbt = qb.transpose(1, 2) if form == "torch" else np.swapaxes(qb, 1, 2)
    kbt = kb.transpose(1, 2) if form == "torch" else np.swapaxes(kb, 1, 2)
    assert_same(inf.attention_patterns(qbt, kbt, layout="bhnd"), inf.attention_patterns(qt, kt, layout="bhnd"))


@pytest.mark.parametrize("form", ["torch", "ml_dtypes"])
def test_scores_from_qk_equal_float32_of_the_same_values(form):
    q, k = qk_values((2, 150, 4, 8), (2, 150, 1, 8), seed=2)
    tokens = np.random.default_rng(3).integers(0, 9, size=(2, 150))
    qb, kb = forms(q)[form], forms(k)[form]
    spans = {"queries": np.arange(150) > 40, "keys": np.arange(150) % 3 > 0}
    cases = ({}, {"per_query": True, "softcap": 3.0}, {"window": 20, "exclude_bos": True}, {"measure": "top1"}, spans)
    for options in cases:
        got = inf.scores_from_qk(qb, kb, tokens, kinds=ALL_KINDS + ("copy",), **options)
        assert_same(got, inf.scores_from_qk(q, k, tokens, kinds=ALL_KINDS + ("copy",), **options))
    scores, lse = inf.scores_from_qk(qb, kb, tokens, kinds=TARGET_KINDS, return_lse=True)
    want, want_lse = inf.scores_from_qk(q, k, tokens, kinds=TARGET_KINDS, return_lse=True)
    assert_same(scores, want)
    assert_same(lse, want_lse)
    # A given lse may be bfloat16 too (read natively, like q and k).
    lse_b = narrow(lse)
    given = forms(lse_b)[form]
    got = inf.scores_from_qk(qb, kb, tokens, kinds=TARGET_KINDS, lse=given, per_query=True)
    assert_same(got, inf.scores_from_qk(q, k, tokens, kinds=TARGET_KINDS, lse=lse_b, per_query=True))
    _, back = inf.scores_from_qk(qb, kb, tokens, kinds=TARGET_KINDS, lse=given, return_lse=True)
    assert_same(back, lse_b.astype(np.float64))


@pytest.mark.parametrize("form", ["torch", "ml_dtypes"])
def test_token_losses_equal_float32_of_the_same_values(form):
    rng = np.random.default_rng(4)
    logits = narrow(rng.standard_normal((3, 20, 300)) * 4)
    tokens = rng.integers(0, 300, size=(3, 20))
    x = forms(logits)[form]
    # Same values, same formula; a kernel may specialise float32 (so: equal to float64 rounding).
    np.testing.assert_allclose(inf.token_losses(x, tokens), inf.token_losses(logits, tokens), rtol=1e-12, atol=1e-12)
    # ml_dtypes: reversed vocabulary; torch: batch-minor memory (no negative strides in torch)
    strided = x[:, ::2, ::-1] if form == "ml_dtypes" else x.transpose(0, 1).contiguous().transpose(0, 1)[:, ::2]
    np.testing.assert_allclose(
        inf.token_losses(strided, tokens[:, ::2]), inf.token_losses(as_f32(strided), tokens[:, ::2]), rtol=1e-12, atol=1e-12
    )


def test_mixed_q_k_dtypes_are_promoted_and_the_extension_names_k():
    q, k = qk_values((1, 30, 2, 8), (1, 30, 2, 8), seed=5)
    qb = forms(q)["torch"]
    got = inf.attention_patterns(qb, k)  # bfloat16 with float32: float32 (as numpy/ml_dtypes promote)
    assert got.dtype == np.float32
    assert_same(got, inf.attention_patterns(q, k))
    assert inf.attention_patterns(qb, k.astype(np.float64)).dtype == np.float64
    assert_same(inf.scores_from_qk(q.astype(BF16), k.astype(np.float16), kinds="previous_token"), inf.scores_from_qk(q, k, kinds="previous_token"))
    # The extension itself takes one dtype for q and k and names k otherwise.
    bits = kernel_array(as_float_array(qb, "q", bfloat16=True))
    with pytest.raises(TypeError, match=r"k: expected the dtype of q \(bfloat16\), got float32"):
        _core.attention_patterns(bits, k, None, True, None, "bnhd", None, None)
    with pytest.raises(TypeError, match=r"k: expected the dtype of q \(float32\), got bfloat16"):
        _core.attention_patterns(q, bits, None, True, None, "bnhd", None, None)


# ---------------------------------------------------------------------------------------------
# strided and non-contiguous views


@pytest.mark.parametrize(
    "view",
    [
        lambda t: t.transpose(-1, -2),
        lambda t: t.transpose(0, 1),
        lambda t: t[:, 1:, 2:, 2:],
        lambda t: t[:, ::2],
        lambda t: t.permute(3, 2, 1, 0)[..., ::2, ::2],
    ],
)
def test_torch_views(view):
    patterns, _ = patterns_and_tokens(lead=(3, 4), n=20, seed=6)
    v = view(forms(patterns)["torch"])
    ref = as_f32(v)
    n = ref.shape[-1]
    tokens = np.random.default_rng(7).integers(0, 4, size=n)
    got = inf.head_scores(v, tokens, kinds=ALL_KINDS, per_query=True)
    assert_same(got, inf.head_scores(ref, tokens, kinds=ALL_KINDS, per_query=True))
    assert_same(inf.detection_scores(v, "induction", tokens=tokens), inf.detection_scores(ref, "induction", tokens=tokens))


@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_torch_qk_views(layout):
    q, k = qk_values((2, 4, 50, 16), (2, 2, 50, 16), seed=8)  # [batch, heads, n, d] in memory
    qb, kb = forms(q)["torch"], forms(k)["torch"]
    if layout == "bnhd":  # Hugging Face's tensors transposed to [batch, n, heads, d]: strided
        qb, kb = qb.transpose(1, 2), kb.transpose(1, 2)
    qv, kv = qb[..., ::2], kb[..., ::2]  # every other channel
    tokens = np.random.default_rng(9).integers(0, 5, size=50)
    got = inf.scores_from_qk(qv, kv, tokens, kinds=ALL_KINDS, layout=layout, per_query=True)
    assert_same(got, inf.scores_from_qk(as_f32(qv), as_f32(kv), tokens, kinds=ALL_KINDS, layout=layout, per_query=True))
    assert_same(inf.attention_patterns(qv, kv, layout=layout), inf.attention_patterns(as_f32(qv), as_f32(kv), layout=layout))


@settings(max_examples=60)
@given(data=st.data(), lead=lead_shapes(max_heads=6), n=sequence_lengths, kinds=st.sets(st.sampled_from(ALL_KINDS), min_size=1))
def test_hypothesis_patterns_over_shapes_and_strides(data, lead, n, kinds):
    """ml_dtypes arrays laid out anyhow (negative, non-unit, permuted strides, NaN between the
    elements) and torch transposes score like float32 of the same values."""
    kinds = tuple(sorted(kinds))
    seed = data.draw(st.integers(0, 2**16))
    patterns, _ = patterns_and_tokens(lead=lead, n=n, seed=seed, style=data.draw(st.sampled_from(("softmax", "sparse", "bos_rows"))))
    tokens = np.random.default_rng(seed).integers(0, 4, size=n)
    steps, perm, _ = data.draw(layouts(patterns.ndim))
    view = strided_view(patterns.astype(BF16), steps, perm)
    per_query = data.draw(st.booleans())
    want = inf.head_scores(patterns, tokens, kinds=kinds, per_query=per_query)
    assert_same(inf.head_scores(view, tokens, kinds=kinds, per_query=per_query), want)
    t = forms(patterns)["torch"]
    if t.ndim >= 3:
        t = t.transpose(0, -3).contiguous().transpose(0, -3)  # same values, permuted memory
    assert_same(inf.head_scores(t, tokens, kinds=kinds, per_query=per_query), want)
    if patterns.size:
        assert_same(inf.detection_scores(view, "previous_token"), inf.detection_scores(patterns, "previous_token"))


@settings(max_examples=40)
@given(data=st.data(), n=st.integers(1, 40), heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]), d=st.integers(1, 9))
def test_hypothesis_qk_over_shapes_and_strides(data, n, heads, d):
    seed = data.draw(st.integers(0, 2**16))
    q, k = qk_values((2, n, heads[0], d), (2, n, heads[1], d), seed=seed)
    tokens = np.random.default_rng(seed).integers(0, 4, size=n)
    steps_q, perm_q, _ = data.draw(layouts(4))
    steps_k, perm_k, _ = data.draw(layouts(4))
    qv, kv = strided_view(q.astype(BF16), steps_q, perm_q), strided_view(k.astype(BF16), steps_k, perm_k)
    # strided_view keeps the values: q[..., ::-1] is q reversed, read back in place.
    options = data.draw(st.sampled_from([{}, {"softcap": 2.0}, {"window": 3}, {"causal": False}]))
    got = inf.scores_from_qk(qv, kv, tokens, kinds=ALL_KINDS, per_query=True, **options)
    assert_same(got, inf.scores_from_qk(q, k, tokens, kinds=ALL_KINDS, per_query=True, **options))
    assert_same(inf.attention_patterns(qv, kv, **options), inf.attention_patterns(q, k, **options))


# ---------------------------------------------------------------------------------------------
# scan over caches


def test_scan_over_bfloat16_caches_equals_float32():
    patterns, tokens = patterns_and_tokens(lead=(2, 3, 4), n=24, seed=10)  # [batch, layer, head, n, n]
    stacked = forms(patterns)["torch"]
    want = inf.scan(patterns, tokens)
    assert_same(inf.scan(stacked, tokens).per_prompt, want.per_prompt)
    assert_same(inf.scan(patterns.astype(BF16), tokens).per_prompt, want.per_prompt)
    cache = {f"blocks.{layer}.attn.hook_pattern": stacked[:, layer] for layer in range(3)}
    assert_same(inf.scan(cache, tokens).per_prompt, want.per_prompt)
    assert_same(inf.scan([stacked[:, layer] for layer in range(3)], tokens).per_prompt, want.per_prompt)
    # q and k: [batch, layer, n, heads, d] stacked, and a hook_q / hook_k dict
    q, k = qk_values((2, 3, 24, 4, 8), (2, 3, 24, 2, 8), seed=11)
    qb, kb = forms(q)["torch"], forms(k)["torch"]
    want_qk = inf.scan((q, k), tokens).per_prompt
    assert_same(inf.scan((qb, kb), tokens).per_prompt, want_qk)
    hooks = {}
    for layer in range(3):
        hooks[f"blocks.{layer}.attn.hook_q"] = qb[:, layer]
        hooks[f"blocks.{layer}.attn.hook_k"] = kb[:, layer]
    assert_same(inf.scan(hooks, tokens).per_prompt, want_qk)


def test_bfloat16_safetensors_files_are_memory_mapped_and_score_like_float32(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    patterns, tokens = patterns_and_tokens(lead=(2, 3, 4), n=24, seed=12)
    stacked = forms(patterns)["torch"]
    want = inf.scan(patterns, tokens).per_prompt
    path = tmp_path / "cache.safetensors"
    layers = {f"blocks.{layer}.attn.hook_pattern": stacked[:, layer].contiguous() for layer in range(3)}
    safetensors_torch.save_file({**layers, "tokens": torch.from_numpy(tokens)}, path)
    assert_same(inf.scan(path).per_prompt, want)
    path = tmp_path / "stacked.safetensors"
    safetensors_torch.save_file({"patterns": stacked}, path)
    assert_same(inf.scan(path, tokens).per_prompt, want)
    layer = next(iter(inf.files.open_patterns(path)))
    assert isinstance(layer, np.memmap) and layer.dtype == BFLOAT16_BITS
    # Written by hand: a 3-byte tensor first puts the bfloat16 data at an odd offset (the
    # safetensors writer orders tensors by dtype size, so it never does), read via an aligned copy.
    data = stacked.contiguous().view(torch.int16).numpy().tobytes()
    header = {"odd": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}}
    header["patterns"] = {"dtype": "BF16", "shape": list(stacked.shape), "data_offsets": [3, 3 + len(data)]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"\0\0\0" + data)
    layer = next(iter(inf.files.open_patterns(path, key="patterns")))
    assert not layer.view(np.uint16).flags.aligned
    assert as_float_array(layer, "layer", bfloat16=True).view(np.uint16).flags.aligned
    assert_same(inf.scan(path, tokens, key="patterns").per_prompt, want)


def test_misaligned_bfloat16_arrays_are_copied_to_aligned_memory():
    values = narrow(np.linspace(-1, 1, 10))
    odd = np.zeros(2 * 10 + 1, np.uint8)[1:].view(BF16)  # numpy's buffer is aligned, so [1:] is not
    odd[...] = values.astype(BF16)
    assert not odd.view(np.uint16).flags.aligned
    bits = as_float_array(odd, "x", bfloat16=True)
    assert bits.view(np.uint16).flags.aligned and not np.shares_memory(bits, odd)
    np.testing.assert_array_equal(inf.token_losses(odd.reshape(2, 5), [0, 1]), inf.token_losses(values.reshape(2, 5), [0, 1]))


# ---------------------------------------------------------------------------------------------
# errors


def test_errors_name_the_argument_like_float32():
    patterns, tokens = patterns_and_tokens(lead=(2,), n=10)
    bad = patterns.copy()
    bad[1, 5, 4] = np.nan  # a previous-token entry: read
    for x in forms(bad).values():
        with pytest.raises(ValueError) as got:
            inf.head_scores(x, kinds="previous_token")
        with pytest.raises(ValueError) as want:
            inf.head_scores(bad, kinds="previous_token")
        assert str(got.value) == str(want.value) and str(got.value).startswith("patterns")
    q, k = qk_values((1, 6, 2, 4), (1, 6, 2, 4))
    k[0, 3, 1, 2] = np.inf
    with pytest.raises(ValueError, match=r"^k: expected finite values, got inf at index \(0, 3, 1, 2\)"):
        inf.scores_from_qk(forms(q)["torch"], forms(k)["torch"])
    logits = np.zeros((4, 5), np.float32)
    logits[1, 2] = -np.inf
    for x in forms(logits).values():
        with pytest.raises(ValueError, match="^logits"):
            inf.token_losses(x, [0, 1, 2, 3])


def test_unsupported_inputs_are_refused_by_name():
    with pytest.raises(TypeError, match=r"^patterns: expected .*float8_e4m3fn"):
        inf.head_scores(np.zeros((3, 3), ml_dtypes.float8_e4m3fn), kinds="self")
    with pytest.raises(TypeError, match=r"^lse: expected a real float array \(bfloat16, float16/32/64\)"):
        q = np.zeros((4, 1, 2), np.float32)
        inf.scores_from_qk(q, q, kinds="self", lse=np.zeros((1, 4), np.int32))
    # The extension's own tag check (the wrappers never send another).
    bits = np.zeros((3, 3), np.uint16)
    with pytest.raises(TypeError):
        _core.head_scores(("float8", bits), None, ["self"], False, False, None)
    with pytest.raises(TypeError):
        _core.head_scores(bits, None, ["self"], False, False, None)  # bare bits are not a float array


# ---------------------------------------------------------------------------------------------
# memory


def test_large_bfloat16_inputs_are_never_copied():
    """1.2 GB of bfloat16 patterns (torch, ml_dtypes, a transposed view): head_scores and
    detection_scores grow peak RSS by < 64 MiB (a float32 copy is 2.4 GB); scores_from_qk on
    160 MiB of q and k and token_losses on 128 MiB of logits likewise, while the old route
    (``.float()`` first) shows its 320 MiB copy. tests/bf16_memory.py measures in a process of
    its own."""
    script = Path(__file__).with_name("bf16_memory.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    jobs = json.loads(done.stdout.strip().splitlines()[-1])
    control = jobs.pop("widened_qk")
    assert control["growth"] > control["input"] * 3 // 2, control  # the measurement sees copies
    for name, job in jobs.items():
        assert job["input"] >= 128 * MiB, (name, job)
        assert job["growth"] < 64 * MiB, (name, job)
