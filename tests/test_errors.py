"""Bad input raises ValueError or TypeError (exactly those types, never a pyo3 PanicException)
with a message that names the argument (DESIGN.md section 8)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import induct_fast as inf

N = 5
A = np.tril(np.ones((2, 3, N, N))) / np.arange(1, N + 1)[:, None]
T = np.array([1, 2, 1, 2, 1])
T2 = np.array([[1, 2, 1, 2, 1], [3, 3, 3, 4, 4]])


def with_value(value, i=3, j=2, dtype=np.float64, patterns=A):
    """Patterns with `value` at [..., i, j] of head (0, 1)."""
    p = patterns.astype(dtype)
    p[0, 1, i, j] = value
    return p


def check(call, exc_type, *names):
    with pytest.raises(BaseException) as info:
        call()
    assert type(info.value) is exc_type, f"{type(info.value).__module__}.{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    for name in names:
        if name.startswith("re:"):
            assert re.search(name[3:], message), f"{name[3:]!r} does not match {message!r}"
        else:
            assert name in message, f"{name!r} not in {message!r}"
    return message


CASES = {
    # patterns: shapes
    "patterns ndim 1": (lambda: inf.head_scores(np.ones(N), kinds="bos"), ValueError, "patterns", "(5,)"),
    "patterns ndim 0": (lambda: inf.head_scores(np.float64(1.0), kinds="bos"), ValueError, "patterns"),
    "patterns not square": (lambda: inf.head_scores(np.ones((2, N, N - 1)), kinds="bos"), ValueError, "patterns", "(2, 5, 4)"),
    "patterns not square, detection": (lambda: inf.detection_scores(np.ones((N, N + 1)), "bos"), ValueError, "patterns"),
    "patterns not square, offset": (lambda: inf.offset_scores(np.ones((N, N + 1)), 1), ValueError, "patterns"),
    # patterns: dtypes
    "patterns complex": (lambda: inf.head_scores(A.astype(np.complex128), T), TypeError, "patterns", "complex"),
    "patterns complex64, detection": (lambda: inf.detection_scores(A.astype(np.complex64), "bos"), TypeError, "patterns"),
    "patterns object": (lambda: inf.head_scores(A.astype(object), T), TypeError, "patterns", "object"),
    "patterns str": (lambda: inf.head_scores(np.full((N, N), "a"), kinds="bos"), TypeError, "patterns"),
    "patterns bytes": (lambda: inf.detection_scores(np.full((N, N), b"a"), "bos"), TypeError, "patterns"),
    "patterns datetime": (lambda: inf.head_scores(np.zeros((N, N), dtype="M8[s]"), kinds="bos"), TypeError, "patterns"),
    "patterns None": (lambda: inf.head_scores(None, T), TypeError, "patterns", "None"),
    "patterns None, detection": (lambda: inf.detection_scores(None, "bos"), TypeError, "patterns"),
    "patterns None, shortcut": (lambda: inf.previous_token_scores(None), TypeError, "patterns"),
    "patterns ragged": (lambda: inf.head_scores([[1.0], [1.0, 2.0]], kinds="bos"), TypeError, "patterns"),
    "patterns string": (lambda: inf.head_scores("patterns", kinds="bos"), TypeError, "patterns"),
    # patterns: non-finite entries that are read
    "NaN previous_token": (lambda: inf.head_scores(with_value(np.nan), kinds="previous_token"), ValueError, "patterns", "(0, 1, 3, 2)"),
    "inf previous_token": (lambda: inf.previous_token_scores(with_value(np.inf)), ValueError, "patterns", "inf"),
    "-inf offset": (lambda: inf.offset_scores(with_value(-np.inf, 3, 1), 2), ValueError, "patterns", "(0, 1, 3, 1)"),
    "NaN float32": (lambda: inf.head_scores(with_value(np.nan, dtype=np.float32), kinds="previous_token"), ValueError, "patterns"),
    "NaN float16": (lambda: inf.head_scores(with_value(np.nan, dtype=np.float16), kinds="previous_token"), ValueError, "patterns"),
    "inf float16": (lambda: inf.head_scores(with_value(np.inf, 3, 3, dtype=np.float16), kinds="self"), ValueError, "patterns"),
    "NaN bos": (lambda: inf.head_scores(with_value(np.nan, 3, 0), kinds="bos"), ValueError, "patterns"),
    "NaN on BOS with exclude_bos": (lambda: inf.head_scores(with_value(np.nan, 4, 0), kinds="self", exclude_bos=True), ValueError, "patterns"),
    "NaN duplicate": (lambda: inf.duplicate_token_scores(with_value(np.nan, 2, 0), T), ValueError, "patterns"),
    "NaN induction": (lambda: inf.induction_scores(with_value(np.nan, 2, 1), T), ValueError, "patterns"),
    "NaN entropy": (lambda: inf.head_scores(with_value(np.nan, 2, 4), kinds="entropy"), ValueError, "patterns"),
    "NaN detection": (lambda: inf.detection_scores(with_value(np.nan, 1, 4), "previous_token"), ValueError, "patterns"),
    "inf detection abs": (lambda: inf.detection_scores(with_value(np.inf, 4, 4), "bos", measure="abs"), ValueError, "patterns"),
    "-inf detection kept column": (lambda: inf.detection_scores(with_value(-np.inf, 4, 2), "bos", exclude_bos=True), ValueError, "patterns"),
    # tokens
    "tokens too short": (lambda: inf.head_scores(A, T[:4]), ValueError, "tokens", "(4,)"),
    "tokens too long": (lambda: inf.induction_scores(A, np.arange(N + 1)), ValueError, "tokens"),
    "tokens wrong length, unused": (lambda: inf.head_scores(A, T[:4], kinds="bos"), ValueError, "tokens"),
    "tokens wrong batch": (lambda: inf.head_scores(A, np.ones((3, N), dtype=int)), ValueError, "tokens", "(3,)"),
    "tokens batch for no lead": (lambda: inf.head_scores(A[0, 0], T2), ValueError, "tokens"),
    "tokens wrong length, 2-d": (lambda: inf.head_scores(A, T2[:, :4]), ValueError, "tokens"),
    "tokens ndim 3": (lambda: inf.head_scores(A, T2[:, None, :]), ValueError, "tokens", "(2, 1, 5)"),
    "tokens ndim 0": (lambda: inf.head_scores(A, np.int64(1)), ValueError, "tokens"),
    "tokens float": (lambda: inf.head_scores(A, T.astype(np.float64)), TypeError, "tokens", "float64"),
    "tokens float32, detection": (lambda: inf.detection_scores(A, "induction", tokens=T.astype(np.float32)), TypeError, "tokens"),
    "tokens bool": (lambda: inf.head_scores(A, T > 1), TypeError, "tokens"),
    "tokens complex": (lambda: inf.head_scores(A, T.astype(complex)), TypeError, "tokens"),
    "tokens str": (lambda: inf.head_scores(A, np.array(list("abcab"))), TypeError, "tokens"),
    "tokens object": (lambda: inf.head_scores(A, [1, 2, 3, 4, 2**70]), TypeError, "tokens"),
    "tokens wrong length, detection": (lambda: inf.detection_scores(A, "induction", tokens=T[:3]), ValueError, "tokens"),
    "tokens wrong length, detection positional": (lambda: inf.detection_scores(A, "bos", tokens=T[:3]), ValueError, "tokens"),
    "token kind without tokens": (lambda: inf.head_scores(A), ValueError, "tokens", "duplicate_token"),
    "induction without tokens": (lambda: inf.induction_scores(A, None), ValueError, "tokens", "induction"),
    "detection kind without tokens": (lambda: inf.detection_scores(A, "duplicate_token"), ValueError, "tokens"),
    # kinds and offsets
    "unknown kind": (lambda: inf.head_scores(A, T, kinds="inducton"), ValueError, "kinds", "inducton"),
    "unknown kind in list": (lambda: inf.head_scores(A, T, kinds=("induction", "prev")), ValueError, "kinds", "prev"),
    "kind not a string": (lambda: inf.head_scores(A, T, kinds=[1]), TypeError, "kinds"),
    "offset_0 kind": (lambda: inf.head_scores(A, T, kinds="offset_0"), ValueError, "offset"),
    "offset_n kind": (lambda: inf.head_scores(A, T, kinds=f"offset_{N}"), ValueError, "offset"),
    "offset_-1 kind": (lambda: inf.head_scores(A, T, kinds="offset_-1"), ValueError, "offset_-1"),
    "offset_x kind": (lambda: inf.head_scores(A, T, kinds="offset_x"), ValueError, "offset_x"),
    "offset 0": (lambda: inf.offset_scores(A, 0), ValueError, "offset", "0"),
    "offset n": (lambda: inf.offset_scores(A, N), ValueError, "offset", "5"),
    "offset -1": (lambda: inf.offset_scores(A, -1), ValueError, "offset", "-1"),
    "offset huge": (lambda: inf.offset_scores(A, 2**70), ValueError, "offset"),
    "offset float": (lambda: inf.offset_scores(A, 1.5), TypeError, "offset"),
    "offsets 0": (lambda: inf.head_scores(A, T, offsets=(1, 0)), ValueError, "offset"),
    "offsets n": (lambda: inf.head_scores(A, T, offsets=(N,)), ValueError, "offset"),
    "offsets -1": (lambda: inf.head_scores(A, T, offsets=(-1,)), ValueError, "offset"),
    "offset on n=1": (lambda: inf.offset_scores(np.ones((1, 1)), 1), ValueError, "offset"),
    "offset detection kind n": (lambda: inf.detection_scores(A, f"offset_{N}"), ValueError, "offset"),
    "offset detection kind 0": (lambda: inf.detection_scores(A, "offset_0"), ValueError, "offset"),
    # detection
    "detection unknown kind": (lambda: inf.detection_scores(A, "inducton", tokens=T), ValueError, "detection", "inducton"),
    "detection entropy": (lambda: inf.detection_scores(A, "entropy"), ValueError, "detection", "entropy"),
    "detection wrong n": (lambda: inf.detection_scores(A, np.eye(N - 1)), ValueError, "detection", "(4, 4)"),
    "detection not square": (lambda: inf.detection_scores(A, np.ones((N, N - 1))), ValueError, "detection"),
    "detection ndim 1": (lambda: inf.detection_scores(A, np.ones(N)), ValueError, "detection"),
    "detection ndim 0": (lambda: inf.detection_scores(A, np.float64(1.0)), ValueError, "detection"),
    "detection lead mismatch": (lambda: inf.detection_scores(A, np.ones((2, N, N))), ValueError, "detection"),
    "detection lead mismatch 2": (lambda: inf.detection_scores(A, np.ones((3, 3, N, N))), ValueError, "detection"),
    "detection more lead than patterns": (lambda: inf.detection_scores(A[0, 0], np.ones((2, N, N))), ValueError, "detection"),
    "detection NaN": (lambda: inf.detection_scores(A, np.where(np.eye(N) > 0, np.nan, 0.0)), ValueError, "detection"),
    "detection inf": (lambda: inf.detection_scores(A, np.full((3, N, N), np.inf)), ValueError, "detection"),
    "detection complex": (lambda: inf.detection_scores(A, np.eye(N) * 1j), TypeError, "detection"),
    "detection object": (lambda: inf.detection_scores(A, np.eye(N).astype(object)), TypeError, "detection"),
    "detection None": (lambda: inf.detection_scores(A, None), TypeError, "detection"),
    # attention_mask of head_scores
    "mask too short": (lambda: inf.head_scores(A, T, attention_mask=np.ones(N - 1)), ValueError, "attention_mask", "(5,) or (2, 5)", "got shape (4,)"),
    "mask wrong batch": (lambda: inf.head_scores(A, T, attention_mask=np.ones((3, N))), ValueError, "attention_mask", "got shape (3, 5)"),
    "mask batch for no lead": (lambda: inf.head_scores(A[0, 0], T, attention_mask=np.ones((2, N))), ValueError, "attention_mask"),
    "mask ndim 3": (lambda: inf.head_scores(A, T, attention_mask=np.ones((2, 3, N))), ValueError, "attention_mask", "(2, 3, 5)"),
    "mask ndim 0": (lambda: inf.head_scores(A, T, attention_mask=1), ValueError, "attention_mask"),
    "mask value 2": (lambda: inf.head_scores(A, T, attention_mask=np.full(N, 2)), ValueError, "attention_mask", "0/1", "2"),
    "mask NaN": (lambda: inf.head_scores(A, T, attention_mask=np.full(N, np.nan)), ValueError, "attention_mask"),
    "mask str": (lambda: inf.head_scores(A, T, attention_mask=np.full(N, "1")), TypeError, "attention_mask"),
    "mask complex": (lambda: inf.head_scores(A, T, attention_mask=np.ones(N, complex)), TypeError, "attention_mask"),
    "mask left padding with exclude_bos": (
        lambda: inf.head_scores(A, T, exclude_bos=True, attention_mask=np.array([[1] * N, [0] + [1] * (N - 1)])),
        ValueError, "exclude_bos", "attention_mask", "position 0 is padding in prompt 1", "pad on the right",
    ),
    "shared mask left padding with exclude_bos": (
        lambda: inf.head_scores(A, T, exclude_bos=True, attention_mask=np.array([0, 0, 1, 1, 1])),
        ValueError, "exclude_bos", "prompt 0",
    ),
    # measure
    "unknown measure": (lambda: inf.detection_scores(A, "bos", measure="MUL"), ValueError, "measure", "MUL"),
    "empty measure": (lambda: inf.detection_scores(A, np.eye(N), measure=""), ValueError, "measure"),
    # threads
    "set_num_threads(0)": (lambda: inf.set_num_threads(0), ValueError, "re:\\bn\\b", "0"),
    # repeated_tokens
    "repeated_tokens batch 0": (lambda: inf.repeated_tokens(0, 3, 10), ValueError, "batch"),
    "repeated_tokens period 0": (lambda: inf.repeated_tokens(1, 0, 10), ValueError, "period"),
    "repeated_tokens vocab 1 with bos": (lambda: inf.repeated_tokens(1, 3, 1), ValueError, "vocab_size"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_named_error(name):
    call, exc_type, *names = CASES[name]
    check(call, exc_type, *names)


# Options of the wrong type: DESIGN.md section 8 asks for a message naming the argument here too.
WRONG_TYPES = {
    "measure None": (lambda: inf.detection_scores(A, "bos", measure=None), TypeError, "measure"),
    "kinds None": (lambda: inf.head_scores(A, T, kinds=None), TypeError, "kinds"),
    "offsets bool": (lambda: inf.head_scores(A, T, offsets=True), TypeError, "offset"),
    "set_num_threads(1.5)": (lambda: inf.set_num_threads(1.5), TypeError, "re:\\bn\\b"),
    "set_num_threads(-1)": (lambda: inf.set_num_threads(-1), ValueError, "re:\\bn\\b"),
}


@pytest.mark.parametrize("name", list(WRONG_TYPES))
def test_options_of_wrong_type_raise_named_error(name):
    call, exc_type, *names = WRONG_TYPES[name]
    try:
        check(call, exc_type, *names)
    finally:
        inf.set_num_threads(inf.get_num_threads())


def test_nan_in_unread_entries_is_not_inspected():
    """Documented: positional and token kinds read O(n) entries; an unread NaN cannot change them."""
    p = with_value(np.nan, 1, 3)  # upper triangle: no target kind reads it
    got = inf.head_scores(p, T, kinds=("previous_token", "duplicate_token", "induction", "bos", "self"))
    ref = inf.head_scores(A, T, kinds=("previous_token", "duplicate_token", "induction", "bos", "self"))
    for kind in ref:
        np.testing.assert_array_equal(got[kind], ref[kind])
    # but entropy and detection read everything
    check(lambda: inf.head_scores(p, kinds="entropy"), ValueError, "patterns", "(0, 1, 1, 3)")
    check(lambda: inf.detection_scores(p, "previous_token"), ValueError, "patterns", "(0, 1, 1, 3)")


def test_errors_leave_inputs_untouched_and_library_usable():
    p = with_value(np.nan)
    before = p.copy()
    with pytest.raises(ValueError):
        inf.head_scores(p, T, kinds="previous_token")
    assert np.array_equal(p, before, equal_nan=True)
    # the pool survives errors raised inside it
    np.testing.assert_array_equal(inf.head_scores(A, T)["induction"], inf.head_scores(A.copy(), T.copy())["induction"])


def test_error_inside_parallel_blocks_is_reported_not_panicked():
    """A NaN deep in a long sequence (many 256-row blocks, several threads) is still one ValueError."""
    n = 700
    p = np.tril(np.ones((2, n, n), dtype=np.float32)) / np.arange(1, n + 1, dtype=np.float32)[:, None]
    p[1, 650, 649] = np.nan
    p[0, 300, 2] = np.inf
    message = check(lambda: inf.head_scores(p, kinds=("previous_token", "entropy")), ValueError, "patterns")
    assert "(1, 650, 649)" in message or "(0, 300, 2)" in message
    check(lambda: inf.detection_scores(p, "previous_token"), ValueError, "patterns")


# --------------------------------------------------------------------------- fuzzing the intake

from hypothesis import given, strategies as st  # noqa: E402

_KIND_NAMES = ("previous_token", "duplicate_token", "induction", "bos", "self", "entropy", "offset_1",
               "offset_3", "offset_0", "offset_99", "offset_", "offset_-2", "Induction", "", "offset_+2")
_DTYPES = ("f8", "f4", "f2", ">f8", "i4", "u1", "?", "c16", "O", "U2", "M8[s]")


@st.composite
def _arrays(draw, max_ndim=4):
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=max_ndim)))
    dtype = draw(st.sampled_from(_DTYPES))
    fill = draw(st.sampled_from((0.25, 1.0, float("nan"), float("inf"), 3)))
    with np.errstate(invalid="ignore"):  # nan/inf cast to integers
        return np.full(shape, fill if dtype not in ("U2", "M8[s]") else 1).astype(dtype)


@given(
    patterns=_arrays(),
    tokens=st.one_of(st.none(), _arrays(max_ndim=3)),
    kinds=st.lists(st.sampled_from(_KIND_NAMES), max_size=3),
    offsets=st.lists(st.integers(-2, 6), max_size=2),
    exclude_bos=st.booleans(),
    per_query=st.booleans(),
)
def test_fuzz_head_scores_raises_only_value_or_type_errors(patterns, tokens, kinds, offsets, exclude_bos, per_query):
    try:
        inf.head_scores(patterns, tokens, kinds=kinds, offsets=offsets, exclude_bos=exclude_bos, per_query=per_query)
    except (ValueError, TypeError) as exc:
        assert type(exc) in (ValueError, TypeError), type(exc)
        assert str(exc)
    except BaseException as exc:  # PanicException derives from BaseException
        raise AssertionError(f"{type(exc).__module__}.{type(exc).__name__}: {exc}") from exc


@given(
    patterns=_arrays(),
    detection=st.one_of(st.sampled_from(_KIND_NAMES), _arrays()),
    tokens=st.one_of(st.none(), _arrays(max_ndim=3)),
    measure=st.sampled_from(("mul", "abs", "max")),
    exclude_bos=st.booleans(),
    exclude_current_token=st.booleans(),
)
def test_fuzz_detection_scores_raises_only_value_or_type_errors(patterns, detection, tokens, measure, exclude_bos, exclude_current_token):
    try:
        inf.detection_scores(patterns, detection, tokens=tokens, measure=measure, exclude_bos=exclude_bos,
                             exclude_current_token=exclude_current_token)
    except (ValueError, TypeError) as exc:
        assert type(exc) in (ValueError, TypeError), type(exc)
        assert str(exc)
    except BaseException as exc:
        raise AssertionError(f"{type(exc).__module__}.{type(exc).__name__}: {exc}") from exc


def test_non_finite_in_zeroed_columns_is_not_read():
    """TransformerLens zeroes column 0 and the diagonal before comparing, so values there cannot
    change a score; detection_scores does not read (or reject) them."""
    p = with_value(-np.inf, 4, 0)
    p[0, 1, 3, 3] = np.nan
    clean = p.copy()
    clean[0, 1, :, 0] = 0.25
    clean[0, 1, 3, 3] = 0.25
    for measure in ("mul", "abs"):
        got = inf.detection_scores(p, "previous_token", measure=measure, exclude_bos=True, exclude_current_token=True)
        want = inf.detection_scores(clean, "previous_token", measure=measure, exclude_bos=True, exclude_current_token=True)
        np.testing.assert_array_equal(got, want)


def test_a_bare_integer_offset_is_one_offset():
    """offsets=3 is offsets=(3,) (issue: small surprises); a bool is still refused above."""
    assert inf.head_scores(A, T, offsets=3).keys() == inf.head_scores(A, T, offsets=(3,)).keys()
    np.testing.assert_array_equal(inf.head_scores(A, T, offsets=3)["offset_3"], inf.head_scores(A, T, offsets=(3,))["offset_3"])
