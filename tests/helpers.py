"""Test data: random attention patterns, token rows, and views of the same values with unusual
memory layouts (negative / non-unit strides, permuted axes), plus hypothesis strategies."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

FLOAT_DTYPES = (np.float16, np.float32, np.float64)
INT_DTYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64)
PATTERN_STYLES = ("softmax", "flat", "peaked", "bos_rows", "sparse", "unnormalised", "noncausal")
ALL_KINDS = ("previous_token", "duplicate_token", "induction", "bos", "self", "entropy")
TARGET_KINDS = ("previous_token", "duplicate_token", "induction", "bos", "self")


def random_patterns(rng: np.random.Generator, shape: tuple, style: str = "softmax", dtype=np.float64) -> np.ndarray:
    """Non-negative [*lead, n, n] patterns. Well conditioned on purpose: no row puts all but a
    sliver of its mass on one key (see test_scores for that regime)."""
    n = shape[-1]
    causal = np.tril(np.ones((n, n), dtype=bool))
    if style == "unnormalised":
        a = rng.uniform(0.0, 2.0, size=shape) * causal
    elif style == "noncausal":
        a = rng.random(size=shape)
        a /= np.maximum(a.sum(axis=-1, keepdims=True), 1e-300)
    else:
        scale = {"flat": 0.0, "peaked": 1.0}.get(style, 0.7)
        logits = rng.normal(size=shape) * scale
        if style == "peaked" and n > 1:
            # favour the previous token and the BOS a little, as trained heads do
            rows = np.arange(1, n)
            logits[..., rows, rows - 1] += 2.0
            logits[..., :, 0] += 1.0
        logits = np.where(causal, logits, -np.inf)
        a = np.exp(logits - logits.max(axis=-1, keepdims=True))
        if style == "sparse":
            a = a * (rng.random(size=shape) < 0.5)
            a[..., np.arange(n), np.arange(n)] += 0.25  # keep every row non-empty
        a /= a.sum(axis=-1, keepdims=True)
        if style == "bos_rows" and n > 0:
            # some rows entirely on key 0 (exclude_bos turns them into zero rows)
            onehot = rng.random(size=shape[:-1]) < 0.4
            a[onehot] = 0.0
            a[..., 0][onehot] = 1.0
    return a.astype(dtype)


def random_tokens(rng: np.random.Generator, shape: tuple, alphabet: int, dtype=np.int64, base: int = 0) -> np.ndarray:
    return (rng.integers(0, alphabet, size=shape) + base).astype(dtype)


def strided_view(arr: np.ndarray, steps, perm, fill=np.nan, readonly: bool = False) -> np.ndarray:
    """A view with the values of `arr` whose axis a has stride step steps[a] (negative: reversed)
    inside a larger buffer laid out in memory with axes in order `perm` (outermost first). The
    rest of the buffer holds `fill` (NaN), so a kernel that reads a wrong element fails loudly."""
    shape = arr.shape
    mem_shape = tuple(abs(steps[a]) * shape[a] + 1 for a in perm)
    big = np.full(mem_shape, fill, dtype=arr.dtype).transpose(np.argsort(perm))
    inner = tuple(slice(1, 1 + abs(k) * s, abs(k)) for k, s in zip(steps, shape))
    flip = tuple(slice(None, None, -1) if k < 0 else slice(None) for k in steps)
    view = big[inner]
    view[...] = arr[flip]
    view = view[flip]
    assert np.array_equal(view, arr, equal_nan=True)
    if readonly:
        view.flags.writeable = False
    return view


@st.composite
def layouts(draw, ndim: int):
    """(steps, perm, readonly) for :func:`strided_view`."""
    steps = tuple(draw(st.sampled_from((1, 1, 1, 2, -1, -2))) for _ in range(ndim))
    perm = tuple(draw(st.permutations(range(ndim))))
    readonly = draw(st.booleans())
    return steps, perm, readonly


@st.composite
def lead_shapes(draw, max_heads: int = 12):
    """Leading shapes: none, with empty axes, up to 3 axes and `max_heads` heads."""
    lead = tuple(draw(st.lists(st.sampled_from((1, 2, 3, 0, 2, 3, 1, 2, 3, 2)), min_size=0, max_size=3)))
    if int(np.prod(lead)) > max_heads:
        lead = lead[:1]
    return lead


# n = 1 and 2 are edge cases (no or one eligible query); most examples are longer
sequence_lengths = st.one_of(st.sampled_from((1, 2)), st.integers(3, 40), st.integers(8, 40), st.integers(16, 40))


class FakeDevice:
    """A torch.device stand-in: ``.type`` is "cpu", "cuda", ...; str() is the full spec."""

    def __init__(self, spec: str):
        self.type = spec.split(":")[0]
        self._spec = spec

    def __str__(self) -> str:
        return self._spec


class FakeTensor:
    """Mimics the torch.Tensor API that array intake uses (``device``, ``detach()``, ``numpy()``,
    plus ``shape``/``ndim``/``dtype`` and slicing), sharing memory with a numpy array the way a
    CPU tensor does. torch itself is not installed (several GB)."""

    def __init__(self, data: np.ndarray, device: str = "cpu"):
        self._data = data
        self.device = FakeDevice(device)
        self.numpy_calls = 0

    @property
    def shape(self) -> tuple:
        return self._data.shape

    @property
    def ndim(self) -> int:
        return self._data.ndim

    @property
    def dtype(self) -> str:
        return f"torch.{self._data.dtype}"

    def detach(self) -> "FakeTensor":
        return self

    def numpy(self) -> np.ndarray:
        if self.device.type != "cpu":
            raise TypeError(f"can't convert {self.device} device type tensor to numpy. Use Tensor.cpu() first.")
        self.numpy_calls += 1
        return self._data  # torch's .numpy() shares memory, so this must not copy either

    def __getitem__(self, index) -> "FakeTensor":
        return FakeTensor(self._data[index], str(self.device))

    def __len__(self) -> int:
        return len(self._data)
