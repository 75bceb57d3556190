"""Array intake shared by every public function: views without copies where numpy allows,
dtype checks with messages that name the argument. Kernels live in Rust; nothing here computes."""

from __future__ import annotations

import math
import numbers
import operator
import sys
from typing import Any, Optional

import numpy as np

_KERNEL_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

#: How a bfloat16 array travels inside the package. numpy has no bfloat16 (ml_dtypes, which JAX
#: uses, adds one; torch has its own), so the array is viewed as its raw 2-byte elements in this
#: one-field structured dtype: the same memory and strides, kept through slicing, transposes
#: and ``np.asarray``, and refused by every numpy arithmetic and cast (so never mistaken for
#: numbers). The extension takes it as ``("bfloat16", uint16 view)`` (:func:`kernel_array`) and
#: reads the bits as bfloat16 in place. Needs nothing beyond numpy.
BFLOAT16_BITS = np.dtype([("bfloat16", "V2")])


def is_bfloat16(dtype: np.dtype[Any]) -> bool:
    """An ml_dtypes ``bfloat16`` dtype, or the package's own :data:`BFLOAT16_BITS`."""
    if dtype == BFLOAT16_BITS:
        return True
    return dtype.kind == "V" and dtype.itemsize == 2 and dtype.names is None and dtype.name == "bfloat16"


def bfloat16_to_float32(arr: np.ndarray) -> np.ndarray:
    """A bfloat16 array (either form of :func:`is_bfloat16`) widened to float32, exactly: a
    bfloat16 is the upper half of a float32. A copy, for code that computes in numpy."""
    wide = arr.view(np.uint16).astype(np.uint32) << 16
    out: np.ndarray = wide.view(np.float32)
    return out


def kernel_array(arr: np.ndarray) -> Any:
    """What the extension takes for an array of :func:`as_float_array`: the array itself, or
    ``("bfloat16", bits)`` for bfloat16 (``bits`` a uint16 view, no copy)."""
    if arr.dtype == BFLOAT16_BITS:
        return ("bfloat16", arr.view(np.uint16))
    return arr


def _describe(x: Any) -> str:
    dtype = getattr(x, "dtype", None)
    return f"{type(x).__name__} of dtype {dtype}" if dtype is not None else type(x).__name__


def is_tensor(x: Any) -> bool:
    """A torch tensor, or an object with its array API (``device``, ``detach``, ``numpy``)."""
    if isinstance(x, np.ndarray):
        return False
    if type(x).__module__.split(".")[0] == "torch":
        return True
    return all(hasattr(x, attr) for attr in ("device", "detach", "numpy"))


def _from_torch(x: Any, name: str, bfloat16: bool = False) -> Any:
    """A CPU torch tensor as a numpy array without a copy; CUDA tensors are refused clearly.

    ``.numpy()`` shares the tensor's memory; where it refuses (tensors with lazy conjugate or
    negative bits, say), DLPack is tried, which also shares memory. bfloat16 has no numpy dtype:
    with ``bfloat16`` it is viewed as :data:`BFLOAT16_BITS` (the same memory), else widened to
    float32 (a copy).
    """
    device = getattr(x, "device", None)
    device_type = str(getattr(device, "type", device if device is not None else "cpu"))
    if device_type.split(":")[0] != "cpu":
        raise ValueError(f"{name}: expected a CPU tensor or array, got a tensor on {device}; move it with .cpu() first")
    x = x.detach()
    if str(getattr(x, "dtype", "")) == "torch.bfloat16":  # numpy has no bfloat16
        if not bfloat16:
            return x.float().numpy()
        import torch

        # A same-size dtype view reinterprets each element in place, whatever the strides.
        bits: np.ndarray = x.view(torch.int16).numpy().view(BFLOAT16_BITS)
        return bits
    try:
        return x.numpy()
    except (RuntimeError, TypeError) as exc:
        if not hasattr(x, "__dlpack__"):
            raise TypeError(f"{name}: could not view the tensor as a numpy array ({exc})") from None
        return np.from_dlpack(x)


def as_float_array(x: Any, name: str, *, integers: bool = True, bfloat16: bool = False) -> np.ndarray:
    """`x` as a native-endian float16/32/64 ndarray, a view whenever numpy can make one.

    bfloat16 (torch tensors, ml_dtypes arrays) comes back as a :data:`BFLOAT16_BITS` view with
    ``bfloat16`` (for the kernels, which read it natively: pass it on through
    :func:`kernel_array`), else widened to float32 (a copy, for numpy code). Integer and bool
    arrays are widened to float64 (a TypeError with ``integers=False``); other floats
    (float128) narrowed to float64. Complex, object, string and None inputs raise TypeError
    naming `name`.
    """
    # The common case first, and the same result as the checks below give it (x itself): every
    # call of a kernel passes here, and the full checks take microseconds, a real part of a
    # small stack's call. A dtype equal to one of _KERNEL_FLOATS is native.
    if type(x) is np.ndarray and x.dtype in _KERNEL_FLOATS and x.flags.aligned:
        return x
    if x is None:
        raise TypeError(f"{name}: expected a real numeric array, got None")
    if hasattr(x, "keys") and not hasattr(x, "__array__"):  # an ActivationCache, a dict, a ModelOutput
        raise TypeError(
            f"{name}: expected an array, got a {type(x).__name__}; use induct_fast.scan(...) to score a cache, "
            "a model output or a file"
        )
    if is_tensor(x):
        x = _from_torch(x, name, bfloat16)
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists, objects whose __array__ fails
        raise TypeError(f"{name}: expected a real numeric array, got {_describe(x)} ({exc})") from None
    if is_bfloat16(arr.dtype):
        if not bfloat16:
            return bfloat16_to_float32(arr)
        bits = arr.view(BFLOAT16_BITS)
        # The kernels read 2-byte elements: they must sit at even addresses (BFLOAT16_BITS itself
        # has alignment 1, so ask its uint16 view).
        return bits if bits.view(np.uint16).flags.aligned else bits.copy()
    kind = arr.dtype.kind
    if kind == "c":
        raise TypeError(f"{name}: expected a real numeric array, got complex dtype {arr.dtype}")
    if kind not in ("fiub" if integers else "f"):
        expected = "a real numeric array" if integers else "a real float array (bfloat16, float16/32/64)"
        raise TypeError(f"{name}: expected {expected}, got dtype {arr.dtype}")
    if kind != "f" or arr.dtype.newbyteorder("=") not in _KERNEL_FLOATS:
        return arr.astype(np.float64)
    if not arr.dtype.isnative:
        return arr.astype(arr.dtype.newbyteorder("="))
    if not arr.flags.aligned:  # the Rust side may only read aligned elements
        return arr.copy()
    return arr


def as_tokens(tokens: Any, name: str = "tokens") -> np.ndarray | None:
    """Token ids as a C-contiguous int64 array (they are small); any integer dtype is accepted."""
    if tokens is None:
        return None
    if is_tensor(tokens):
        tokens = _from_torch(tokens, name)
    arr = np.asarray(tokens)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array of token ids, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2):
        raise ValueError(f"{name}: expected shape (n,) or (batch, n), got shape {arr.shape}")
    arr = np.ascontiguousarray(arr.astype(np.int64, copy=False))
    return arr if arr.flags.aligned else arr.copy()


def as_count(value: Any, name: str, minimum: int) -> int:
    """A Python int >= minimum, with a TypeError/ValueError naming `name` otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an integer, got bool {value!r}")
    try:
        count = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}") from None
    if count < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {count}")
    return count


def as_key_mask(mask: Any, name: str = "attention_mask") -> np.ndarray | None:
    """A padding mask of 0/1 (or bool) key flags as a bool array, a view when it is bool already.

    1/True marks a real key, 0/False a padding key that no query attends to. Any other value
    (2, 0.5, NaN, an additive -inf mask) raises ValueError naming `name` and the first bad index.
    """
    return _position_flags(mask, name, "1 = real token, 0 = padding")


def as_span(span: Any, name: str) -> np.ndarray | None:
    """A span of positions (``queries=`` / ``keys=``): 0/1 or bool flags ``[n]`` or ``[batch, n]``
    as a bool array (1 = inside), checked like :func:`as_key_mask`."""
    return _position_flags(span, name, "1 = in the span, 0 = outside")


def as_measure(measure: Any) -> str:
    """``"mass"`` or ``"top1"`` (what a target kind measures), else a TypeError/ValueError."""
    if not isinstance(measure, str):
        raise TypeError(f'measure: expected "mass" or "top1", got {measure!r}')
    if measure not in ("mass", "top1"):
        raise ValueError(f'measure: expected "mass" or "top1", got {measure!r}')
    return measure


def _position_flags(mask: Any, name: str, meaning: str) -> np.ndarray | None:
    if mask is None:
        return None
    if type(mask).__module__.startswith("torch"):
        mask = _from_torch(mask, name)
    try:
        arr = np.asarray(mask)
    except ValueError as exc:  # ragged nested lists
        raise ValueError(f"{name}: expected an array of 0/1 flags ({meaning}), got {type(mask).__name__} ({exc})") from None
    if arr.ndim not in (1, 2):
        raise ValueError(f"{name}: expected shape (n,) or (batch, n) of 0/1 flags ({meaning}), got shape {arr.shape}")
    if arr.dtype.kind == "b":
        return arr
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name}: expected 0/1 or bool flags ({meaning}), got dtype {arr.dtype}")
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}: expected 0/1 flags ({meaning}), got {arr[index].item()!r} at index {index}")
    flags: np.ndarray = arr != 0
    return flags


def as_seed(seed: Any, name: str = "seed") -> Optional[int]:
    """None or an integer >= 0, as numpy's random generators take it."""
    return None if seed is None else as_count(seed, name, 0)


def as_scale(scale: Any, name: str = "scale") -> Optional[float]:
    """None or a finite real number (a logit scale)."""
    if scale is None:
        return None
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name}: expected a real number or None, got {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"{name}: expected a finite number or None, got {scale!r}")
    return float(scale)


def as_softcap(softcap: Any, name: str = "softcap") -> Optional[float]:
    """None or a finite real number > 0 (a logit soft cap, s -> softcap * tanh(s / softcap))."""
    if softcap is None:
        return None
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"{name}: expected a real number > 0 or None, got {softcap!r}")
    if not (math.isfinite(softcap) and float(softcap) > 0):
        raise ValueError(f"{name}: expected a finite number > 0 or None, got {softcap!r}")
    return float(softcap)


def as_window(window: Any, name: str = "window") -> Optional[int]:
    """None or an integer >= 1 (a sliding window); windows past the sequence mean no window, so
    huge ones are clipped to what the kernel's index type holds."""
    if window is None:
        return None
    return min(as_count(window, name, 1), sys.maxsize)
