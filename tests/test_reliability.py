"""Reliability: every bad input gets a clear error, nothing is lost, many threads agree.

DESIGN.md section 8 over the whole public API (test_errors.py covers the pattern-score functions;
this file covers everything else), plus:

1. a table of bad inputs to every other public function: exactly ValueError or TypeError (never
   pyo3's PanicException, a BaseException), a message naming the argument, inputs untouched;
   empty inputs (0 heads, batch 0) give empty results;
2. unusual memory layouts (read-only, big-endian, negative strides, Fortran order, zero-stride
   broadcasts, memory maps) give the same results as a C-contiguous copy;
3. eight Python threads at once, and 1 vs 2 pool threads, give bit-identical results;
4. views with more than 2**31 elements (zero strides) index correctly;
5. a hypothesis fuzz of the kernels' intake: documented shapes or ValueError/TypeError, never
   anything else. ``INDUCT_FAST_FUZZ_EXAMPLES=20000 HYPOTHESIS_PROFILE=dev`` searches harder.
"""

from __future__ import annotations

import os
import re
import threading
import types
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import induct_fast as inf

ALL_KINDS = ("previous_token", "duplicate_token", "induction", "bos", "self", "entropy")


# =================================================================================================
# Shared helpers: snapshots of every array an argument holds, and the "named error" check
# =================================================================================================


def _arrays_in(value: Any) -> list[np.ndarray]:
    """Every numpy array inside `value` (nested tuples, lists and dict values included)."""
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, (tuple, list)):
        return [a for item in value for a in _arrays_in(item)]
    if isinstance(value, dict):
        return [a for item in value.values() for a in _arrays_in(item)]
    return []


def _fingerprint(a: np.ndarray) -> tuple:
    """Dtype, shape, strides, flags and exact contents (bytes, NaN payloads included)."""
    if a.dtype.kind == "O":
        contents: Any = tuple(repr(x) for x in a.ravel(order="K"))
    else:
        contents = np.ascontiguousarray(a).tobytes()
    return (a.dtype.str, a.shape, a.strides, a.flags.writeable, contents)


def snapshot(*values: Any) -> list[tuple]:
    return [_fingerprint(a) for v in values for a in _arrays_in(v)]


def assert_named_error(exc: BaseException, names) -> str:
    """exc is exactly ValueError or TypeError and its message names every one of `names`
    (plain substrings, or regular expressions prefixed "re:")."""
    kind = f"{type(exc).__module__}.{type(exc).__name__}"
    assert type(exc) in (ValueError, TypeError), f"{kind} (expected ValueError or TypeError): {exc}"
    message = str(exc)
    for name in (names,) if isinstance(names, str) else names:
        if name.startswith("re:"):
            assert re.search(name[3:], message), f"{kind}: /{name[3:]}/ not in message {message!r}"
        else:
            assert name in message, f"{kind}: {name!r} not named in message {message!r}"
    return message


@pytest.fixture
def restore_threads():
    before = inf.get_num_threads()
    yield
    inf.set_num_threads(before)


# =================================================================================================
# 1. Bad input to every public function that is not a pattern-score function
# =================================================================================================

_rng = np.random.default_rng(2024)
B, N, H, KV, D = 2, 6, 4, 2, 8
Q = _rng.standard_normal((B, N, H, D)).astype(np.float32)
K = _rng.standard_normal((B, N, KV, D)).astype(np.float32)
TOKENS = _rng.integers(0, 3, (B, N))
MASK = np.ones((B, N), dtype=np.int64)
LSE = inf.scores_from_qk(Q, K, TOKENS, return_lse=True)[1]  # [B, H, N]

NL, NH, DM, DH = 2, 4, 8, 2  # layers, heads, d_model, d_head of the weights
W_Q = _rng.standard_normal((NL, NH, DM, DH))
W_K = _rng.standard_normal((NL, 2, DM, DH))  # grouped-query: 2 kv heads for 4 heads
W_V = _rng.standard_normal((NL, 2, DM, DH))
W_O = _rng.standard_normal((NL, NH, DH, DM))
W_E = _rng.standard_normal((10, DM))
W_U = _rng.standard_normal((DM, 10))
W_POS = _rng.standard_normal((5, DM))

VOCAB = 7
LOGITS = _rng.standard_normal((B, N, VOCAB))
LOGIT_TOKENS = _rng.integers(0, VOCAB, (B, N))

PATTERNS = np.tril(np.ones((B, 3, NH, N, N))) / np.arange(1, N + 1)[:, None]  # [batch, layer, head, n, n]
SCORES = inf.HeadScores({"induction": _rng.random((B, 3, NH))})  # 3 layers of 4 heads


def put(a: np.ndarray, index, value, dtype=None) -> np.ndarray:
    """A copy of `a` (as `dtype`) with `value` at `index`."""
    b = np.array(a, dtype=dtype if dtype is not None else a.dtype, copy=True)
    b[index] = value
    return b


class Row(NamedTuple):
    fn: Callable
    args: tuple
    kwargs: dict
    names: Any  # str or tuple of str that the message must contain


def row(fn, *args, names, **kwargs) -> Row:
    return Row(fn, args, kwargs, names)


def _qk_rows() -> dict[str, Row]:
    """Bad q/k/options, each run through attention_patterns and scores_from_qk."""
    ragged = [[[[0.0] * D] * H] * N, [[[0.0] * D] * H] * (N - 1)]
    bad = {
        "q ndim 2": ((Q[0, :, 0], K[0, :, 0]), {}, "q"),
        "q 0-d": ((np.float32(1.0), K), {}, "q"),
        "k fewer axes than q": ((Q, K[0]), {}, "k"),
        "k leading axes differ": ((Q, np.concatenate([K, K])), {}, "k"),
        "d_head mismatch": ((Q, K[..., :4]), {}, "k"),
        "length mismatch": ((Q, K[:, :5]), {}, "k"),
        "kv heads do not divide heads": ((Q, np.ones((B, N, 3, D), np.float32)), {}, "k"),
        "more kv heads than heads": ((Q, np.ones((B, N, 8, D), np.float32)), {}, "k"),
        "zero kv heads for 4 heads": ((Q, np.ones((B, N, 0, D), np.float32)), {}, "k"),
        "d_head 0": ((Q[..., :0], K[..., :0]), {}, "q"),
        "unknown layout": ((Q, K), {"layout": "BNHD"}, "layout"),
        "layout None": ((Q, K), {"layout": None}, "layout"),
        "layout bhnd on bnhd arrays": ((Q, K), {"layout": "bhnd"}, "k"),
        "scale NaN": ((Q, K), {"scale": float("nan")}, "scale"),
        "scale inf": ((Q, K), {"scale": float("inf")}, "scale"),
        "scale -inf float32": ((Q, K), {"scale": np.float32("-inf")}, "scale"),
        "scale overflows float32": ((Q, K), {"scale": 1e300}, "scale"),
        "scale str": ((Q, K), {"scale": "0.5"}, "scale"),
        "scale complex": ((Q, K), {"scale": 0.5j}, "scale"),
        "scale bool": ((Q, K), {"scale": True}, "scale"),
        "scale array": ((Q, K), {"scale": np.array([0.5, 0.5])}, "scale"),
        "mask too short": ((Q, K), {"attention_mask": MASK[:, :5]}, "attention_mask"),
        "mask wrong batch": ((Q, K), {"attention_mask": np.ones((3, N))}, "attention_mask"),
        "mask 3-d": ((Q, K), {"attention_mask": MASK[..., None]}, "attention_mask"),
        "mask value 2": ((Q, K), {"attention_mask": put(MASK, (1, 2), 2)}, "attention_mask"),
        "mask NaN": ((Q, K), {"attention_mask": put(MASK, (0, 3), np.nan, float)}, "attention_mask"),
        "mask additive -inf": ((Q, K), {"attention_mask": put(MASK * 0.0, (0, 0), -np.inf)}, "attention_mask"),
        "mask str": ((Q, K), {"attention_mask": np.full((B, N), "1")}, "attention_mask"),
        "mask complex": ((Q, K), {"attention_mask": MASK.astype(complex)}, "attention_mask"),
        "mask object": ((Q, K), {"attention_mask": MASK.astype(object)}, "attention_mask"),
        # Regression (fixed): a 0-d mask reaches the Rust binding as a numpy bool scalar:
        # TypeError "'bool' object is not an instance of 'ndarray'" (no argument named)
        "mask 0-d": ((Q, K), {"attention_mask": 1}, "attention_mask"),
        # Regression (fixed): numpy's own ValueError ("setting an array element with a sequence...") leaks out
        "mask ragged list": ((Q, K), {"attention_mask": [[1] * N, [1] * (N - 1)]}, "attention_mask"),
        "q complex": ((Q.astype(np.complex64), K), {}, "q"),
        "k complex": ((Q, K.astype(np.complex128)), {}, "k"),
        "q object": ((Q.astype(object), K), {}, "q"),
        "q str": ((np.full(Q.shape, "a"), K), {}, "q"),
        "q datetime": ((np.zeros(Q.shape, "M8[s]"), K), {}, "q"),
        "q None": ((None, K), {}, "q"),
        "k None": ((Q, None), {}, "k"),
        "q ragged list": ((ragged, K), {}, "q"),
        "q NaN": ((put(Q, (1, 2, 3, 4), np.nan), K), {}, "q"),
        "k inf": ((Q, put(K, (0, 5, 1, 0), np.inf)), {}, "k"),
        "q -inf float16": ((put(Q, (0, 0, 0, 0), -np.inf, np.float16), K.astype(np.float16)), {}, "q"),
        "logits overflow float32": ((Q * np.float32(1e20), K * np.float32(1e20)), {}, "q"),
    }
    rows = {}
    for (name, ((q, k), kwargs, names)) in bad.items():
        rows[f"attention_patterns: {name}"] = row(inf.attention_patterns, q, k, names=names, **kwargs)
        # with tokens, so that every default kind is computable and the row tests q/k/options
        rows[f"scores_from_qk: {name}"] = row(inf.scores_from_qk, q, k, names=names, tokens=TOKENS, **kwargs)
    return rows


BAD = {
    **_qk_rows(),
    # --- scores_from_qk: tokens, kinds, offsets
    "scores_from_qk: tokens too short": row(inf.scores_from_qk, Q, K, TOKENS[:, :5], names="tokens"),
    "scores_from_qk: tokens wrong batch": row(inf.scores_from_qk, Q, K, np.zeros((3, N), int), names="tokens"),
    "scores_from_qk: tokens 3-d": row(inf.scores_from_qk, Q, K, TOKENS[None], names="tokens"),
    "scores_from_qk: tokens float": row(inf.scores_from_qk, Q, K, TOKENS.astype(float), names="tokens"),
    "scores_from_qk: tokens bool": row(inf.scores_from_qk, Q, K, TOKENS > 0, names="tokens"),
    "scores_from_qk: induction without tokens": row(inf.scores_from_qk, Q, K, kinds="induction", names="tokens"),
    "scores_from_qk: unknown kind": row(inf.scores_from_qk, Q, K, TOKENS, kinds="inducton", names="kinds"),
    "scores_from_qk: kinds None": row(inf.scores_from_qk, Q, K, TOKENS, kinds=None, names="kinds"),
    "scores_from_qk: offset n": row(inf.scores_from_qk, Q, K, kinds=(), offsets=(N,), names="offset"),
    "scores_from_qk: offset 0": row(inf.scores_from_qk, Q, K, kinds=(), offsets=(0,), names="offset"),
    "scores_from_qk: offsets str": row(inf.scores_from_qk, Q, K, kinds=(), offsets="3", names="offset"),
    # --- scores_from_qk: lse, return_lse (a row's log-sum-exp in and out, DESIGN.md section 11)
    "scores_from_qk: lse one row short": row(inf.scores_from_qk, Q, K, TOKENS, lse=LSE[..., 1:], names=("lse", "(2, 4, 6)", "(2, 4, 5)")),
    "scores_from_qk: lse without the heads axis": row(inf.scores_from_qk, Q, K, TOKENS, lse=LSE[:, 0], names=("lse", "(2, 6)")),
    "scores_from_qk: lse in the layout of q": row(inf.scores_from_qk, Q, K, TOKENS, lse=LSE.transpose(0, 2, 1), names="lse"),
    "scores_from_qk: lse 0-d": row(inf.scores_from_qk, Q, K, TOKENS, lse=np.float64(0.0), names="lse"),
    "scores_from_qk: lse NaN in a scored row": row(inf.scores_from_qk, Q, K, TOKENS, lse=put(LSE, (1, 2, 3), np.nan), names=("lse", "NaN", "(1, 2, 3)")),
    "scores_from_qk: lse -inf in a scored row": row(inf.scores_from_qk, Q, K, TOKENS, lse=put(LSE, (0, 1, 5), -np.inf, np.float32), names=("lse", "-inf", "(0, 1, 5)")),
    "scores_from_qk: lse NaN with entropy": row(inf.scores_from_qk, Q, K, TOKENS, kinds="entropy", lse=put(LSE, (0, 0, 1), np.nan), names="lse"),
    "scores_from_qk: lse far below the logits": row(inf.scores_from_qk, Q, K, TOKENS, lse=LSE - 1e4, names=("lse", "overflow")),
    "scores_from_qk: lse int": row(inf.scores_from_qk, Q, K, TOKENS, lse=LSE.astype(np.int64), names="lse"),
    "scores_from_qk: lse bool": row(inf.scores_from_qk, Q, K, TOKENS, lse=LSE > 0, names="lse"),
    "scores_from_qk: lse complex": row(inf.scores_from_qk, Q, K, TOKENS, lse=LSE.astype(np.complex64), names="lse"),
    "scores_from_qk: lse str": row(inf.scores_from_qk, Q, K, TOKENS, lse=np.full(LSE.shape, "0"), names="lse"),
    "scores_from_qk: lse object": row(inf.scores_from_qk, Q, K, TOKENS, lse=LSE.astype(object), names="lse"),
    "scores_from_qk: lse ragged list": row(inf.scores_from_qk, Q, K, TOKENS, lse=[[0.0] * N, [0.0] * (N - 1)], names="lse"),
    "scores_from_qk: lse with exclude_bos": row(inf.scores_from_qk, Q, K, TOKENS, lse=LSE, exclude_bos=True, names=("lse", "exclude_bos")),
    "scores_from_qk: return_lse with exclude_bos": row(inf.scores_from_qk, Q, K, TOKENS, return_lse=True, exclude_bos=True, names=("return_lse", "exclude_bos")),
    # --- composition_scores
    "composition_scores: W_K fewer layers": row(inf.composition_scores, W_Q, W_K[:1], W_V, W_O, names="W_K"),
    "composition_scores: W_O fewer heads": row(inf.composition_scores, W_Q, W_K, W_V, W_O[:, :3], names="W_O"),
    "composition_scores: W_O d_model mismatch": row(inf.composition_scores, W_Q, W_K, W_V, W_O[..., :7], names="W_O"),
    "composition_scores: W_V d_head mismatch": row(inf.composition_scores, W_Q, W_K, W_V[..., :1], W_O, names="W_V"),
    "composition_scores: W_V d_model mismatch": row(inf.composition_scores, W_Q, W_K, W_V[:, :, :7], W_O, names="W_V"),
    "composition_scores: W_K kv heads do not divide": row(inf.composition_scores, W_Q, np.ones((NL, 3, DM, DH)), W_V, W_O, names="W_K"),
    "composition_scores: W_Q 3-d": row(inf.composition_scores, W_Q[0], W_K, W_V, W_O, names="W_Q"),
    "composition_scores: unknown mode": row(inf.composition_scores, W_Q, W_K, W_V, W_O, mode="O", names="mode"),
    "composition_scores: mode None": row(inf.composition_scores, W_Q, W_K, W_V, W_O, mode=None, names="mode"),
    "composition_scores: mode with a non-str": row(inf.composition_scores, W_Q, W_K, W_V, W_O, mode=["K", 1], names="mode"),
    "composition_scores: empty mode": row(inf.composition_scores, W_Q, W_K, W_V, W_O, mode=(), names="mode"),
    "composition_scores: int weights": row(inf.composition_scores, W_Q.astype(np.int64), W_K, W_V, W_O, names="W_Q"),
    "composition_scores: bool weights": row(inf.composition_scores, W_Q, W_K > 0, W_V, W_O, names="W_K"),
    "composition_scores: complex weights": row(inf.composition_scores, W_Q, W_K, W_V, W_O.astype(complex), names="W_O"),
    "composition_scores: object weights": row(inf.composition_scores, W_Q, W_K, W_V.astype(object), W_O, names="W_V"),
    "composition_scores: None weights": row(inf.composition_scores, None, W_K, W_V, W_O, names="W_Q"),
    "composition_scores: NaN weights": row(inf.composition_scores, W_Q, W_K, W_V, put(W_O, (1, 2, 1, 3), np.nan), names="W_O"),
    "composition_scores: inf weights": row(inf.composition_scores, put(W_Q, (0, 0, 0, 0), np.inf), W_K, W_V, W_O, names="W_Q"),
    "composition_scores: -inf float32 weights": row(inf.composition_scores, W_Q, W_K, put(W_V, (1, 1, 7, 1), -np.inf, np.float32), W_O, names="W_V"),
    # --- ov_eigenvalues / copying_scores
    "ov_eigenvalues: W_E d_model mismatch": row(inf.ov_eigenvalues, W_E[:, :7], W_V, W_O, W_U, names="W_E"),
    "ov_eigenvalues: W_U vocab mismatch": row(inf.ov_eigenvalues, W_E, W_V, W_O, W_U[:, :9], names="W_U"),
    "ov_eigenvalues: W_U d_model mismatch": row(inf.ov_eigenvalues, W_E, W_V, W_O, W_U[:7], names="W_U"),
    "ov_eigenvalues: W_V fewer layers": row(inf.ov_eigenvalues, W_E, W_V[:1], W_O, W_U, names="W_V"),
    "ov_eigenvalues: W_V d_head mismatch": row(inf.ov_eigenvalues, W_E, W_V[..., :1], W_O, W_U, names="W_V"),
    "ov_eigenvalues: W_E 3-d": row(inf.ov_eigenvalues, W_E[None], W_V, W_O, W_U, names="W_E"),
    "ov_eigenvalues: W_E NaN": row(inf.ov_eigenvalues, put(W_E, (3, 3), np.nan), W_V, W_O, W_U, names="W_E"),
    "ov_eigenvalues: W_U complex": row(inf.ov_eigenvalues, W_E, W_V, W_O, W_U * 1j, names="W_U"),
    "copying_scores: W_O 3-d": row(inf.copying_scores, W_E, W_V, W_O[0], W_U, names="W_O"),
    "copying_scores: W_U int": row(inf.copying_scores, W_E, W_V, W_O, W_U.astype(np.int32), names="W_U"),
    "copying_scores: W_U inf": row(inf.copying_scores, W_E, W_V, W_O, put(W_U, (0, 9), np.inf), names="W_U"),
    "copying_scores: W_V kv heads do not divide": row(inf.copying_scores, W_E, np.ones((NL, 3, DM, DH)), W_O, W_U, names="W_V"),
    # --- positional_qk_scores
    "positional_qk_scores: W_pos d_model mismatch": row(inf.positional_qk_scores, W_POS[:, :7], W_Q, W_K, names="W_pos"),
    "positional_qk_scores: W_pos 1-d": row(inf.positional_qk_scores, W_POS[0], W_Q, W_K, names="W_pos"),
    "positional_qk_scores: W_K d_head mismatch": row(inf.positional_qk_scores, W_POS, W_Q, W_K[..., :1], names="W_K"),
    "positional_qk_scores: W_K fewer layers": row(inf.positional_qk_scores, W_POS, W_Q, W_K[:1], names="W_K"),
    "positional_qk_scores: W_pos NaN": row(inf.positional_qk_scores, put(W_POS, (2, 2), np.nan), W_Q, W_K, names="W_pos"),
    "positional_qk_scores: n_positions 1": row(inf.positional_qk_scores, W_POS, W_Q, W_K, n_positions=1, names="n_positions"),
    "positional_qk_scores: n_positions > n_ctx": row(inf.positional_qk_scores, W_POS, W_Q, W_K, n_positions=6, names="n_positions"),
    "positional_qk_scores: n_positions float": row(inf.positional_qk_scores, W_POS, W_Q, W_K, n_positions=2.0, names="n_positions"),
    # Regression (fixed): W_pos of one position: "n_positions: expected an integer in 2..1, got None" (names an
    # argument the caller did not pass, not W_pos)
    "positional_qk_scores: W_pos of one position": row(inf.positional_qk_scores, W_POS[:1], W_Q, W_K, names="W_pos"),
    # Regression (fixed): scale is not checked at all: NaN/inf give all-NaN scores silently, "2" is accepted as
    # 2.0, "a" raises float()'s ValueError and 1j float()'s TypeError, neither naming scale
    "positional_qk_scores: scale NaN": row(inf.positional_qk_scores, W_POS, W_Q, W_K, scale=float("nan"), names="scale"),
    "positional_qk_scores: scale inf": row(inf.positional_qk_scores, W_POS, W_Q, W_K, scale=float("inf"), names="scale"),
    "positional_qk_scores: scale str": row(inf.positional_qk_scores, W_POS, W_Q, W_K, scale="a", names="scale"),
    "positional_qk_scores: scale numeric str": row(inf.positional_qk_scores, W_POS, W_Q, W_K, scale="2", names="scale"),
    "positional_qk_scores: scale complex": row(inf.positional_qk_scores, W_POS, W_Q, W_K, scale=1j, names="scale"),
    # --- composition_baseline
    "composition_baseline: d_model 0": row(inf.composition_baseline, 0, 4, names="d_model"),
    "composition_baseline: d_head -1": row(inf.composition_baseline, 8, -1, names="d_head"),
    "composition_baseline: n 0": row(inf.composition_baseline, 8, 4, n=0, names="re:\\bn\\b"),
    "composition_baseline: n True": row(inf.composition_baseline, 8, 4, n=True, names="re:\\bn\\b"),
    "composition_baseline: d_model 2.5": row(inf.composition_baseline, 2.5, 4, names="d_model"),
    "composition_baseline: d_model str": row(inf.composition_baseline, "8", 4, names="d_model"),
    "composition_baseline: d_head None": row(inf.composition_baseline, 8, None, names="d_head"),
    # Regression (fixed): seed goes straight to np.random.default_rng: "SeedSequence expects int or sequence of
    # ints for entropy not a" / "expected non-negative integer", seed never named
    "composition_baseline: seed str": row(inf.composition_baseline, 8, 4, n=2, seed="a", names="seed"),
    "composition_baseline: seed -1": row(inf.composition_baseline, 8, 4, n=2, seed=-1, names="seed"),
    # --- token_losses
    "token_losses: float tokens": row(inf.token_losses, LOGITS, LOGIT_TOKENS.astype(float), names="tokens"),
    "token_losses: bool tokens": row(inf.token_losses, LOGITS, LOGIT_TOKENS > 3, names="tokens"),
    "token_losses: str tokens": row(inf.token_losses, LOGITS, LOGIT_TOKENS.astype(str), names="tokens"),
    "token_losses: negative id": row(inf.token_losses, LOGITS, put(LOGIT_TOKENS, (1, 3), -1), names=("tokens", "-1", "(1, 3)")),
    "token_losses: id == vocab": row(inf.token_losses, LOGITS, put(LOGIT_TOKENS, (0, 5), VOCAB), names=("tokens", "7", "(0, 5)")),
    "token_losses: id 2**40": row(inf.token_losses, LOGITS, put(LOGIT_TOKENS, (0, 1), 2**40), names="tokens"),
    "token_losses: id >= vocab in the unbatched form": row(inf.token_losses, LOGITS[0], put(LOGIT_TOKENS[0], 4, 99), names=("tokens", "99")),
    "token_losses: tokens too short": row(inf.token_losses, LOGITS, LOGIT_TOKENS[:, :5], names="tokens"),
    "token_losses: tokens wrong batch": row(inf.token_losses, LOGITS, LOGIT_TOKENS[:1], names="tokens"),
    "token_losses: tokens 1-d for batched logits": row(inf.token_losses, LOGITS, LOGIT_TOKENS[0], names="tokens"),
    "token_losses: tokens 3-d": row(inf.token_losses, LOGITS, LOGIT_TOKENS[None], names="tokens"),
    "token_losses: tokens 0-d": row(inf.token_losses, LOGITS, np.int64(1), names="tokens"),
    # Regression (fixed): tokens=None reaches the binding: TypeError "'None' is not an instance of 'ndarray'"
    "token_losses: tokens None": row(inf.token_losses, LOGITS, None, names="tokens"),
    "token_losses: logits 1-d": row(inf.token_losses, LOGITS[0, 0], LOGIT_TOKENS[0], names="logits"),
    "token_losses: logits 4-d": row(inf.token_losses, LOGITS[None], LOGIT_TOKENS[None], names="logits"),
    "token_losses: empty vocabulary": row(inf.token_losses, LOGITS[..., :0], LOGIT_TOKENS, names="logits"),
    "token_losses: NaN logit": row(inf.token_losses, put(LOGITS, (1, 2, 3), np.nan), LOGIT_TOKENS, names=("logits", "(1, 2, 3)")),
    "token_losses: inf logit": row(inf.token_losses, put(LOGITS, (0, 0, 6), np.inf), LOGIT_TOKENS, names="logits"),
    "token_losses: -inf float16 logit": row(inf.token_losses, put(LOGITS, (0, 4, 0), -np.inf, np.float16), LOGIT_TOKENS, names="logits"),
    "token_losses: complex logits": row(inf.token_losses, LOGITS.astype(np.complex64), LOGIT_TOKENS, names="logits"),
    "token_losses: object logits": row(inf.token_losses, LOGITS.astype(object), LOGIT_TOKENS, names="logits"),
    "token_losses: str logits": row(inf.token_losses, LOGITS.astype(str), LOGIT_TOKENS, names="logits"),
    "token_losses: logits None": row(inf.token_losses, None, LOGIT_TOKENS, names="logits"),
    # --- icl_score
    "icl_score: too short for the defaults": row(inf.icl_score, np.zeros((2, 100)), names=("losses", "501")),
    "icl_score: late == m": row(inf.icl_score, np.zeros((2, 20)), early=1, late=20, names="losses"),
    "icl_score: early == late": row(inf.icl_score, np.zeros((2, 20)), early=5, late=5, names="early"),
    "icl_score: early -1": row(inf.icl_score, np.zeros((2, 20)), early=-1, late=5, names="early"),
    "icl_score: late float": row(inf.icl_score, np.zeros((2, 20)), early=1, late=5.5, names="late"),
    "icl_score: late str": row(inf.icl_score, np.zeros((2, 20)), early=1, late="5", names="late"),
    "icl_score: complex losses": row(inf.icl_score, np.zeros((2, 600), complex), names="losses"),
    "icl_score: losses None": row(inf.icl_score, None, names="losses"),
    "icl_score: scalar losses": row(inf.icl_score, np.float64(1.0), early=0, late=1, names="losses"),
    "icl_score: no sequences": row(inf.icl_score, np.zeros((0, 20)), early=1, late=5, names="losses"),
    # --- repeated_tokens
    "repeated_tokens: period 0": row(inf.repeated_tokens, 2, 0, 10, names="period"),
    "repeated_tokens: vocab 1 with bos": row(inf.repeated_tokens, 2, 3, 1, names="vocab_size"),
    "repeated_tokens: vocab 0": row(inf.repeated_tokens, 2, 3, 0, names="vocab_size"),
    "repeated_tokens: batch -1": row(inf.repeated_tokens, -1, 3, 10, names="batch"),
    "repeated_tokens: batch 0": row(inf.repeated_tokens, 0, 3, 10, names="batch"),
    "repeated_tokens: batch 1.5": row(inf.repeated_tokens, 1.5, 3, 10, names="batch"),
    "repeated_tokens: batch str": row(inf.repeated_tokens, "2", 3, 10, names="batch"),
    # Regression (fixed): these fall through to int()/numpy with messages that do not name the argument
    # ("int() argument must be ... not 'NoneType'", "an integer is required", "cannot convert
    # float NaN to integer"), and vocab_size=inf raises OverflowError, which is not a ValueError
    "repeated_tokens: batch None": row(inf.repeated_tokens, None, 3, 10, names="batch"),
    "repeated_tokens: batch True": row(inf.repeated_tokens, True, 3, 10, names="batch"),
    "repeated_tokens: vocab NaN": row(inf.repeated_tokens, 2, 3, float("nan"), names="vocab_size"),
    "repeated_tokens: vocab inf": row(inf.repeated_tokens, 2, 3, float("inf"), names="vocab_size"),
    "repeated_tokens: seed str": row(inf.repeated_tokens, 2, 3, 10, seed="a", names="seed"),
    "repeated_tokens: bos str": row(inf.repeated_tokens, 2, 3, 10, bos="a", names="bos"),
    # Regression (fixed): bos=1.5 is accepted: the BOS column becomes 1 while the blocks may contain 1 too
    "repeated_tokens: bos 1.5": row(inf.repeated_tokens, 2, 3, 10, bos=1.5, names="bos"),
    # --- probes.repeated (shares its intake with repeated_tokens) and probes.needle
    "probes.repeated: repeats 1": row(inf.probes.repeated, 2, 3, 1, 10, names="repeats"),
    "probes.repeated: repeats 2.0": row(inf.probes.repeated, 2, 3, 2.0, 10, names="repeats"),
    "probes.repeated: repeats None": row(inf.probes.repeated, 2, 3, None, 10, names="repeats"),
    "probes.repeated: period 0": row(inf.probes.repeated, 2, 0, 4, 10, names="period"),
    "probes.repeated: vocab 1 with bos": row(inf.probes.repeated, 2, 3, 4, 1, names="vocab_size"),
    "probes.repeated: seed -1": row(inf.probes.repeated, 2, 3, 4, 10, seed=-1, names="seed"),
    "probes.repeated: bos -1": row(inf.probes.repeated, 2, 3, 4, 10, bos=-1, names="bos"),
    "probes.needle: haystack empty": row(inf.probes.needle, [], [1, 2], [0.5], names="haystack"),
    "probes.needle: haystack 2-d": row(inf.probes.needle, np.ones((2, 3), int), [1, 2], [0.5], names="haystack"),
    "probes.needle: haystack float": row(inf.probes.needle, np.ones(5), [1, 2], [0.5], names="haystack"),
    "probes.needle: haystack str": row(inf.probes.needle, "the hay", [1, 2], [0.5], names="haystack"),
    "probes.needle: haystack None": row(inf.probes.needle, None, [1, 2], [0.5], names="haystack"),
    "probes.needle: haystack negative id": row(inf.probes.needle, [3, -1, 4], [1, 2], [0.5], names=("haystack", "-1", "index 1")),
    "probes.needle: haystack id 2**64 - 1": row(inf.probes.needle, np.array([3, 2**64 - 1], np.uint64), [1], [0.5], names=("haystack", "18446744073709551615")),
    "probes.needle: haystack ragged": row(inf.probes.needle, [[1, 2], [3]], [1, 2], [0.5], names="haystack"),
    "probes.needle: needle empty": row(inf.probes.needle, [5, 6], [], [0.5], names="needle"),
    "probes.needle: needle bool": row(inf.probes.needle, [5, 6], np.array([True]), [0.5], names="needle"),
    "probes.needle: needle scalar": row(inf.probes.needle, [5, 6], 7, [0.5], names="needle"),
    "probes.needle: question float": row(inf.probes.needle, [5, 6], [7], [0.5], question=[1.5], names="question"),
    "probes.needle: depth 1.5": row(inf.probes.needle, [5, 6], [7], [0.5, 1.5], names=("depths", "1.5", "index 1")),
    "probes.needle: depth -0.1": row(inf.probes.needle, [5, 6], [7], -0.1, names="depths"),
    "probes.needle: depth NaN": row(inf.probes.needle, [5, 6], [7], [float("nan")], names="depths"),
    "probes.needle: depths empty": row(inf.probes.needle, [5, 6], [7], [], names="depths"),
    "probes.needle: depths 2-d": row(inf.probes.needle, [5, 6], [7], [[0.5]], names="depths"),
    "probes.needle: depths str": row(inf.probes.needle, [5, 6], [7], "0.5", names="depths"),
    "probes.needle: depths bool": row(inf.probes.needle, [5, 6], [7], [True], names="depths"),
    "probes.needle: depths None": row(inf.probes.needle, [5, 6], [7], None, names="depths"),
    "probes.needle: bos -1": row(inf.probes.needle, [5, 6], [7], [0.5], bos=-1, names="bos"),
    "probes.needle: bos 1.0": row(inf.probes.needle, [5, 6], [7], [0.5], bos=1.0, names="bos"),
    # --- HeadScores.group_kv and HeadScores.select
    "HeadScores.group_kv: 3 kv heads for 4 heads": row(SCORES.group_kv, 3, names=("n_kv_heads", "4", "3")),
    "HeadScores.group_kv: more kv heads than heads": row(SCORES.group_kv, 8, names="n_kv_heads"),
    "HeadScores.group_kv: 0 kv heads": row(SCORES.group_kv, 0, names="n_kv_heads"),
    "HeadScores.group_kv: kv heads 2.0": row(SCORES.group_kv, 2.0, names="n_kv_heads"),
    "HeadScores.group_kv: kv heads None": row(SCORES.group_kv, None, names="n_kv_heads"),
    "HeadScores.group_kv: unknown reduce": row(SCORES.group_kv, 2, reduce="min", names=("reduce", "min")),
    "HeadScores.group_kv: reduce None": row(SCORES.group_kv, 2, reduce=None, names="reduce"),
    "HeadScores.group_kv: grouped twice": row(SCORES.group_kv(2).group_kv, 1, names=("n_kv_heads", "grouped already")),
    "HeadScores.select: no rule": row(SCORES.select, "induction", names=("count", "fraction", "threshold")),
    "HeadScores.select: two rules": row(SCORES.select, "induction", count=1, threshold=0.5, names=("count=1", "threshold=0.5")),
    "HeadScores.select: count -1": row(SCORES.select, "induction", count=-1, names="count"),
    "HeadScores.select: count 1.5": row(SCORES.select, "induction", count=1.5, names="count"),
    "HeadScores.select: count True": row(SCORES.select, "induction", count=True, names="count"),
    "HeadScores.select: fraction 1.5": row(SCORES.select, "induction", fraction=1.5, names=("fraction", "1.5")),
    "HeadScores.select: fraction -0.1": row(SCORES.select, "induction", fraction=-0.1, names="fraction"),
    "HeadScores.select: fraction NaN": row(SCORES.select, "induction", fraction=float("nan"), names="fraction"),
    "HeadScores.select: fraction str": row(SCORES.select, "induction", fraction="0.1", names="fraction"),
    "HeadScores.select: fraction True": row(SCORES.select, "induction", fraction=True, names="fraction"),
    "HeadScores.select: threshold NaN": row(SCORES.select, "induction", threshold=np.float32("nan"), names="threshold"),
    "HeadScores.select: threshold array": row(SCORES.select, "induction", threshold=np.array([0.5]), names="threshold"),
    "HeadScores.select: threshold complex": row(SCORES.select, "induction", threshold=0.5j, names="threshold"),
    # --- scan
    # --- measure and spans (DESIGN.md section 12), wherever a kind is accepted
    "head_scores: measure max": row(inf.head_scores, PATTERNS, TOKENS, measure="max", names="measure"),
    "head_scores: measure None": row(inf.head_scores, PATTERNS, TOKENS, measure=None, names="measure"),
    "head_scores: queries too short": row(inf.head_scores, PATTERNS, TOKENS, queries=np.ones(N - 1), names="queries"),
    "head_scores: keys value 2": row(inf.head_scores, PATTERNS, TOKENS, keys=put(MASK, (0, 1), 2), names="keys"),
    "head_scores: keys wrong batch": row(inf.head_scores, PATTERNS, TOKENS, keys=np.ones((B + 1, N)), names="keys"),
    "head_scores: queries str": row(inf.head_scores, PATTERNS, TOKENS, queries=np.full(N, "1"), names="queries"),
    "head_scores: copy without tokens": row(inf.head_scores, PATTERNS, kinds="copy", names="tokens"),
    "scores_from_qk: measure top2": row(inf.scores_from_qk, Q, K, TOKENS, measure="top2", names="measure"),
    "scores_from_qk: queries 3-d": row(inf.scores_from_qk, Q, K, TOKENS, queries=MASK[..., None], names="queries"),
    "scores_from_qk: keys NaN": row(inf.scores_from_qk, Q, K, TOKENS, keys=put(MASK, (1, 1), np.nan, float), names="keys"),
    "scan: measure 1": row(inf.scan, PATTERNS, TOKENS, measure=1, names="measure"),
    "scan: queries of other prompts": row(inf.scan, PATTERNS, TOKENS, queries=np.ones((B + 1, N)), names="queries"),
    "scan: int source": row(inf.scan, 42, TOKENS, names="source"),
    "scan: layer_axis 2": row(inf.scan, PATTERNS, TOKENS, layer_axis=2, names="layer_axis"),
    "scan: attention_mask of other prompts": row(inf.scan, PATTERNS, TOKENS, attention_mask=np.ones((B + 1, N)), names="attention_mask"),
    "scan: model output without attentions (sdpa)": row(inf.scan, types.SimpleNamespace(attentions=()), TOKENS, names="source"),
    "scan_model: not a model": row(inf.scan_model, object(), TOKENS, names="model"),
    "scan_model: an array as the model": row(inf.scan_model, PATTERNS, TOKENS, names="model"),
    "scan: None source": row(inf.scan, None, TOKENS, names="source"),
    "scan: 4-d array": row(inf.scan, PATTERNS[:, 0], TOKENS, names="source"),
    "scan: 6-d array": row(inf.scan, PATTERNS[None], TOKENS, names="source"),
    "scan: complex array": row(inf.scan, PATTERNS.astype(complex), TOKENS, names="source"),
    "scan: no layers": row(inf.scan, [], TOKENS, names="source"),
    "scan: cache without pattern keys": row(inf.scan, {"blocks.0.hook_resid_pre": PATTERNS[:, 0]}, TOKENS, names="source"),
    "scan: cache missing a layer": row(
        inf.scan, {"blocks.0.attn.hook_pattern": PATTERNS[:, 0], "blocks.2.attn.hook_pattern": PATTERNS[:, 2]}, TOKENS, names="source"
    ),
    "scan: layer length mismatch": row(inf.scan, [PATTERNS[:, 0], PATTERNS[:, 1, :, :5, :5]], TOKENS, names="layer 1"),
    "scan: layer heads mismatch": row(inf.scan, [PATTERNS[:, 0], PATTERNS[:, 1, :, :2]], TOKENS, names="layer 1"),
    "scan: layer batch mismatch": row(inf.scan, (PATTERNS[:, 0], PATTERNS[:1, 1], PATTERNS[:, 2]), TOKENS, names="layer 1"),
    "scan: layer None": row(inf.scan, [PATTERNS[:, 0], None, PATTERNS[:, 2]], TOKENS, names="layer 1"),
    "scan: layer 2-d": row(inf.scan, [PATTERNS[0, 0, 0]], kinds="previous_token", names="layer 0"),
    "scan: layer str": row(inf.scan, [np.full((B, NH, N, N), "x")], TOKENS, names="layer 0"),
    "scan: tokens length mismatch, stacked": row(inf.scan, PATTERNS, TOKENS[:, :5], names="tokens"),
    "scan: tokens batch mismatch, per layer": row(inf.scan, list(PATTERNS.swapaxes(0, 1)), np.zeros((3, N), int), names="tokens"),
    "scan: tokens float": row(inf.scan, PATTERNS, TOKENS.astype(float), names="tokens"),
    "scan: tokens 3-d": row(inf.scan, PATTERNS, TOKENS[None], names="tokens"),
    "scan: token kinds without tokens": row(inf.scan, PATTERNS, names="tokens"),
    "scan: unknown kind": row(inf.scan, PATTERNS, TOKENS, kinds="inducton", names="kinds"),
    "scan: offset n": row(inf.scan, PATTERNS, TOKENS, offsets=(N,), names="offset"),
    "scan: q/k layers mismatch": row(inf.scan, (np.zeros((B, 3, N, H, D)), np.zeros((B, 2, N, H, D))), TOKENS, names="k"),
    "scan: q/k d_head mismatch": row(inf.scan, (np.zeros((B, 3, N, H, D)), np.zeros((B, 3, N, H, 4))), TOKENS, names="k"),
    "scan: q/k lists of different lengths": row(inf.scan, ([Q] * 3, [K] * 2), TOKENS, names="source"),
    "scan: qk_options with a bad scale": row(inf.scan, (Q[:, None], K[:, None]), TOKENS, qk_options={"scale": "x"}, names="scale"),
    # Regression (fixed): qk_options=3 raises TypeError "'int' object is not iterable" (qk_options not named)
    "scan: qk_options not a mapping": row(inf.scan, (Q[:, None], K[:, None]), TOKENS, qk_options=3, names="qk_options"),
    # --- set_num_threads
    "set_num_threads(0)": row(inf.set_num_threads, 0, names="re:\\bn\\b"),
    "set_num_threads(-1)": row(inf.set_num_threads, -1, names="re:\\bn\\b"),
    "set_num_threads(1.5)": row(inf.set_num_threads, 1.5, names="re:\\bn\\b"),
    "set_num_threads('2')": row(inf.set_num_threads, "2", names="re:\\bn\\b"),
    "set_num_threads(None)": row(inf.set_num_threads, None, names="re:\\bn\\b"),
    "set_num_threads(True)": row(inf.set_num_threads, True, names="re:\\bn\\b"),
    "set_num_threads(np.float64(2.0))": row(inf.set_num_threads, np.float64(2.0), names="re:\\bn\\b"),
    "set_num_threads(2**70)": row(inf.set_num_threads, 2**70, names="re:\\bn\\b"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_a_named_error_and_leaves_inputs_untouched(name, restore_threads):
    r = BAD[name]
    before = snapshot(r.args, r.kwargs)
    threads = inf.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the float32 overflow rows
        try:
            r.fn(*r.args, **r.kwargs)
        except BaseException as exc:  # pyo3's PanicException derives from BaseException
            assert_named_error(exc, r.names)
        else:
            pytest.fail(f"{name}: no exception raised")
    assert snapshot(r.args, r.kwargs) == before, f"{name}: an input array was modified"
    assert inf.get_num_threads() == threads  # a refused set_num_threads changes nothing


def test_the_table_covers_every_public_function_but_the_pattern_scores():
    covered = {r.fn for r in BAD.values()}
    exported = {getattr(inf, name) for name in inf.__all__ if callable(getattr(inf, name))}
    pattern_scores = {  # covered by test_errors.py
        inf.head_scores, inf.previous_token_scores, inf.duplicate_token_scores,
        inf.induction_scores, inf.offset_scores, inf.detection_scores,
    }
    others = {inf.HeadScores, inf.CompositionBaseline, inf.get_num_threads}  # result types; no arguments
    assert exported - pattern_scores - others - covered == set()
    assert len(BAD) >= 40


# -- empty inputs are results, not errors ---------------------------------------------------------

EMPTY = {
    "attention_patterns, batch 0": (lambda: inf.attention_patterns(Q[:0], K[:0]), (0, H, N, N)),
    "attention_patterns, batch 0 with a mask": (lambda: inf.attention_patterns(Q[:0], K[:0], attention_mask=MASK[:0]), (0, H, N, N)),
    "attention_patterns, n 0": (lambda: inf.attention_patterns(Q[:, :0], K[:, :0]), (B, H, 0, 0)),
    "attention_patterns, 0 query heads": (lambda: inf.attention_patterns(Q[:, :, :0], K), (B, 0, N, N)),
    # Regression (fixed): 0 heads and 0 kv heads (q[:, :, :0], k[:, :, :0]) raise "k: expected a number of kv
    # heads >= 1 that divides q's 0 heads", although 0 query heads with 2 kv heads work
    "attention_patterns, 0 heads and 0 kv heads": (lambda: inf.attention_patterns(Q[:, :, :0], K[:, :, :0]), (B, 0, N, N)),
    "scores_from_qk, batch 0": (lambda: inf.scores_from_qk(Q[:0], K[:0], TOKENS[:0]), (0, H)),
    "scores_from_qk, batch 0 per query": (lambda: inf.scores_from_qk(Q[:0], K[:0], TOKENS[:0], per_query=True), (0, H, N)),
    "scores_from_qk, n 0 per query": (lambda: inf.scores_from_qk(Q[:, :0], K[:, :0], TOKENS[:, :0], per_query=True), (B, H, 0)),
    "scores_from_qk, 0 heads and 0 kv heads": (lambda: inf.scores_from_qk(Q[:, :, :0], K[:, :, :0], TOKENS), (B, 0)),
    "token_losses, batch 0": (lambda: inf.token_losses(LOGITS[:0], LOGIT_TOKENS[:0]), (0, N - 1)),
    "token_losses, one position": (lambda: inf.token_losses(LOGITS[:, :1], LOGIT_TOKENS[:, :1]), (B, 0)),
    "token_losses, no positions, unbatched": (lambda: inf.token_losses(LOGITS[0, :0], LOGIT_TOKENS[0, :0]), (0,)),
    "head_scores, 0 heads": (lambda: inf.head_scores(PATTERNS[:, :, :0], TOKENS), (B, 3, 0)),
    "head_scores, batch 0": (lambda: inf.head_scores(PATTERNS[:0], TOKENS[:0], per_query=True), (0, 3, NH, N)),
    "detection_scores, 0 heads": (lambda: inf.detection_scores(PATTERNS[:, :, :0], "induction", tokens=TOKENS), (B, 3, 0)),
    "detection_scores, batch 0": (lambda: inf.detection_scores(PATTERNS[:0], np.eye(N)), (0, 3, NH)),
    "scan, batch 0": (lambda: inf.scan(PATTERNS[:0], TOKENS[:0]).per_prompt, (0, 3, NH)),
    "scan, 0 heads per layer": (lambda: inf.scan(list(PATTERNS[:, :, :0].swapaxes(0, 1)), TOKENS).per_prompt, (B, 3, 0)),
}


@pytest.mark.parametrize("name", list(EMPTY))
def test_empty_inputs_give_empty_results(name):
    call, shape = EMPTY[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" either
        result = call()
    values = result.values() if isinstance(result, dict) else [result]
    for value in values:
        assert isinstance(value, np.ndarray) and value.shape == shape, (np.shape(value), shape)
        assert value.dtype in (np.float32, np.float64)


# =================================================================================================
# 2. Memory layouts: the same values in any layout give the same results
# =================================================================================================

LAYOUTS = ("readonly", "big-endian", "negative-strides", "fortran", "broadcast", "memmap", "strided")


def relayout(x: np.ndarray, layout: str, path) -> tuple[np.ndarray, np.ndarray]:
    """(view, reference): `view` holds its values in `layout`; `reference` is a C-contiguous,
    native-endian, writeable copy of the same values."""
    if layout == "broadcast":  # zero strides on the first axis: every index reads index 0
        view = np.broadcast_to(x[:1], x.shape)
        assert view.strides[0] == 0
        return view, np.array(view, copy=True)
    if layout == "readonly":
        view = x.copy()
        view.setflags(write=False)
    elif layout == "big-endian":
        view = x.astype(x.dtype.newbyteorder(">"))
        assert (x.dtype.itemsize == 1 or not view.dtype.isnative) and np.array_equal(view, x)
    elif layout == "negative-strides":
        view = np.flip(np.flip(x).copy())
        assert all(s < 0 for s, n in zip(view.strides, view.shape) if n > 1)
    elif layout == "fortran":
        view = np.asfortranarray(x)
        assert view.flags.f_contiguous and not view.flags.c_contiguous
    elif layout == "memmap":
        np.save(path, x)
        view = np.load(path, mmap_mode="r")
        assert isinstance(view, np.memmap) and not view.flags.writeable
    else:  # "strided": every axis stepped by 2 in a buffer whose axes are in reverse order
        big = np.zeros(tuple(2 * s + 1 for s in x.shape[::-1]), x.dtype).T
        view = big[tuple(slice(1, None, 2) for _ in x.shape)]
        view[...] = x
        view.setflags(write=False)
    assert np.array_equal(view, x)
    return view, np.ascontiguousarray(x)


def _qk_case(dtype):
    rng = np.random.default_rng(11)
    q = rng.standard_normal((3, 300, 4, 16)).astype(dtype)
    k = rng.standard_normal((3, 300, 2, 16)).astype(dtype)
    tokens = rng.integers(0, 6, (3, 300))
    mask = np.ones((3, 300), dtype=np.int8)
    mask[1, :7] = 0
    return q, k, tokens, mask


def _as_list(result) -> list[np.ndarray]:
    return [np.asarray(v) for v in (result.values() if isinstance(result, dict) else [result])]


def assert_bit_identical(got, want):
    got, want = _as_list(got), _as_list(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert g.tobytes() == w.tobytes(), f"max |diff| = {np.nanmax(np.abs(g - w))}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_attention_patterns_in_any_layout(layout, dtype, tmp_path):
    q, k, _, mask = _qk_case(dtype)
    qv, qr = relayout(q, layout, tmp_path / "q.npy")
    kv, kr = relayout(k, layout, tmp_path / "k.npy")
    mv, mr = relayout(mask, layout, tmp_path / "m.npy")
    want = inf.attention_patterns(qr, kr, attention_mask=mr)
    assert_bit_identical(inf.attention_patterns(qv, kv, attention_mask=mv), want)
    # the Hugging Face layout of the same views
    got = inf.attention_patterns(qv.swapaxes(1, 2), kv.swapaxes(1, 2), attention_mask=mv, layout="bhnd")
    assert_bit_identical(got, want)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_scores_from_qk_in_any_layout(layout, dtype, tmp_path):
    q, k, tokens, mask = _qk_case(dtype)
    qv, qr = relayout(q, layout, tmp_path / "q.npy")
    kv, kr = relayout(k, layout, tmp_path / "k.npy")
    tv, tr = relayout(tokens, layout, tmp_path / "t.npy")
    mv, mr = relayout(mask, layout, tmp_path / "m.npy")
    for mask_v, mask_r, options in ((mv, mr, {"per_query": True}), (None, None, {"exclude_bos": True})):
        want = inf.scores_from_qk(qr, kr, tr, kinds=ALL_KINDS, offsets=(3,), attention_mask=mask_r, **options)
        got = inf.scores_from_qk(qv, kv, tv, kinds=ALL_KINDS, offsets=(3,), attention_mask=mask_v, **options)
        assert_bit_identical(got, want)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_token_losses_in_any_layout(layout, dtype, tmp_path):
    rng = np.random.default_rng(12)
    logits = (rng.standard_normal((3, 40, 1500)) * 4).astype(dtype)  # two vocabulary chunks
    tokens = rng.integers(0, 1500, (3, 40)).astype(np.int32)
    lv, lr = relayout(logits, layout, tmp_path / "l.npy")
    tv, tr = relayout(tokens, layout, tmp_path / "t.npy")
    assert_bit_identical(inf.token_losses(lv, tv), inf.token_losses(lr, tr))
    assert_bit_identical(inf.token_losses(lv[1], tv[1]), inf.token_losses(lr[1], tr[1]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_composition_scores_in_any_layout(layout, tmp_path):
    rng = np.random.default_rng(13)
    weights = [
        rng.standard_normal((3, 4, 24, 6)).astype(np.float32),  # W_Q
        rng.standard_normal((3, 2, 24, 6)).astype(np.float32),  # W_K (grouped-query)
        rng.standard_normal((3, 2, 24, 6)).astype(np.float32),  # W_V
        rng.standard_normal((3, 4, 6, 24)).astype(np.float32),  # W_O
    ]
    pairs = [relayout(w, layout, tmp_path / f"w{i}.npy") for i, w in enumerate(weights)]
    views, refs = [p[0] for p in pairs], [p[1] for p in pairs]
    got = inf.composition_scores(*views, mode=("Q", "K", "V"))
    want = inf.composition_scores(*refs, mode=("Q", "K", "V"))
    for mode in "QKV":
        np.testing.assert_allclose(got[mode], want[mode], rtol=1e-12, atol=1e-12, err_msg=mode)
    W_E = rng.standard_normal((30, 24)).astype(np.float32)
    ev, er = relayout(W_E, layout, tmp_path / "e.npy")
    np.testing.assert_allclose(
        inf.copying_scores(ev, views[2], views[3], ev.T), inf.copying_scores(er, refs[2], refs[3], er.T), rtol=1e-12, atol=1e-12
    )


# =================================================================================================
# 3. Threads: concurrent Python threads and any pool size give bit-identical results
# =================================================================================================


@pytest.fixture(scope="module")
def workload():
    rng = np.random.default_rng(21)
    q = rng.standard_normal((2, 520, 4, 32)).astype(np.float32)  # three 256-row blocks
    k = rng.standard_normal((2, 520, 2, 32)).astype(np.float32)
    tokens = rng.integers(0, 8, (2, 520))
    mask = np.ones((2, 520), bool)
    mask[0, :5] = False
    logits = (rng.standard_normal((2, 300, 2100)) * 3).astype(np.float32)  # three vocabulary chunks
    logit_tokens = rng.integers(0, 2100, (2, 300))
    patterns = inf.attention_patterns(q, k)  # [2, 4, 520, 520] float32
    return q, k, tokens, mask, logits, logit_tokens, patterns


def _calls(q, k, tokens, mask, logits, logit_tokens, patterns) -> list[Callable[[], Any]]:
    return [
        lambda: inf.attention_patterns(q, k, attention_mask=mask),
        lambda: inf.scores_from_qk(q, k, tokens, kinds=ALL_KINDS, offsets=(7,), per_query=True),
        # right padding (reversed mask): exclude_bos refuses a padding position 0
        lambda: inf.scores_from_qk(q, k, tokens, kinds=ALL_KINDS, exclude_bos=True, attention_mask=mask[:, ::-1]),
        lambda: inf.token_losses(logits, logit_tokens),
        lambda: inf.head_scores(patterns, tokens, kinds=ALL_KINDS, offsets=(7,)),
        lambda: inf.token_losses(logits[1, ::-1], logit_tokens[1, ::-1]),
        lambda: inf.attention_patterns(q[:, ::2], k[:, ::2], layout="bnhd", scale=0.3),
    ]


def test_eight_python_threads_agree_with_a_serial_run(workload, restore_threads):
    inf.set_num_threads(2)
    calls = _calls(*workload)
    serial = [call() for call in calls]
    barrier = threading.Barrier(8)

    def work(t: int):
        # half the threads share the caller's arrays, half their own copies; each starts at a
        # different call, so different kernels run at the same moment
        mine = calls if t % 2 else _calls(*(np.array(x, copy=True) for x in workload))
        barrier.wait()
        out = {}
        for r in range(2 * len(mine)):
            i = (t + r) % len(mine)
            out.setdefault(i, []).append(mine[i]())
        return out

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(8)))
    for out in results:
        for i, runs in out.items():
            for got in runs:
                assert_bit_identical(got, serial[i])


def test_one_and_two_pool_threads_are_bit_identical(workload, restore_threads):
    calls = _calls(*workload)
    runs = {}
    for threads in (1, 2, 1):
        inf.set_num_threads(threads)
        assert inf.get_num_threads() == threads
        runs.setdefault(threads, []).append([call() for call in calls])
    for results in runs[2] + runs[1][1:]:
        for got, want in zip(results, runs[1][0]):
            assert_bit_identical(got, want)


# =================================================================================================
# 4. More than 2**31 elements (zero-stride views: no memory behind them)
# =================================================================================================


def test_broadcast_heads_past_32_bit_indexing():
    rng = np.random.default_rng(31)
    n = 48
    A = np.tril(rng.random((n, n)))
    A /= A.sum(axis=-1, keepdims=True)
    view = np.broadcast_to(A, (2**12, 2**8, n, n))  # 2**20 heads of one pattern
    assert view.size > 2**31 and view.strides[:2] == (0, 0)
    for got, want in (
        (inf.offset_scores(view, 5), inf.offset_scores(A, 5)),
        (inf.previous_token_scores(view), inf.previous_token_scores(A)),
    ):
        assert got.shape == (2**12, 2**8) and got.dtype == np.float64
        assert np.all(got == want), (np.unique(got), want)


def test_broadcast_rows_past_32_bit_indexing_in_one_head():
    """One n x n head with n = 2**16: row i * n + column passes 2**31 (and 2**32) within a head."""
    rng = np.random.default_rng(32)
    n = 2**16
    v = rng.random(n)
    view = np.broadcast_to(v, (3, n, n))  # 3 * 2**32 elements, every row is v
    assert view.size > 2**33
    s = inf.head_scores(view, kinds=("previous_token", "bos", "self"), offsets=(1000,))
    np.testing.assert_allclose(s["previous_token"], np.full(3, v[:-1].mean()), rtol=1e-12)
    np.testing.assert_allclose(s["self"], np.full(3, v[1:].mean()), rtol=1e-12)
    np.testing.assert_allclose(s["offset_1000"], np.full(3, v[:-1000].mean()), rtol=1e-12)
    np.testing.assert_allclose(s["bos"], np.full(3, v[0]), rtol=1e-12)  # a mean of n - 1 copies
    per_query = inf.previous_token_scores(view[:1], per_query=True)
    assert per_query.shape == (1, n) and np.isnan(per_query[0, 0])
    np.testing.assert_array_equal(per_query[0, 1:], v[:-1])
    # a float32 view too, and the same positions through detection-free offset_scores
    v32 = v.astype(np.float32)
    got = inf.offset_scores(np.broadcast_to(v32, (n, n)), n - 1, per_query=True)
    assert got[n - 1] == np.float64(v32[0]) and np.isnan(got[: n - 1]).all()


BIG = os.environ.get("INDUCT_FAST_BIG_TESTS") == "1"


@pytest.mark.skipif(not BIG, reason="reads >= 2**31 entries (3-4 s on 2 cores): set INDUCT_FAST_BIG_TESTS=1")
def test_lead_times_n_past_2_31_rows_and_logits():
    """Leading product * n > 2**31 (head_scores) and > 2**31 logits (token_losses). Every row or
    logit here must be read, so these cost seconds, not milliseconds: opt-in only."""
    rng = np.random.default_rng(33)
    n = 2**16
    v = rng.random(n).astype(np.float32)
    view = np.broadcast_to(v, (2**15 + 1, n, n))  # (2**15 + 1) * n > 2**31 query rows
    got = inf.previous_token_scores(view)
    assert got.shape == (2**15 + 1,) and np.all(got == inf.previous_token_scores(view[0]))
    vocab = 2**20
    row = rng.standard_normal(vocab).astype(np.float32)
    batch = 2**10 + 1
    logits = np.broadcast_to(row, (batch, 2, vocab))  # > 2**31 logits, 2**30 of them read
    assert logits.size > 2**31
    tokens = np.stack([np.zeros(batch, np.int64), rng.integers(0, vocab, batch)], axis=1)
    x = row.astype(np.float64)
    want = x.max() + np.log(np.exp(x - x.max()).sum()) - x[tokens[:, 1]]
    np.testing.assert_allclose(inf.token_losses(logits, tokens)[:, 0], want, rtol=1e-12)


# =================================================================================================
# 5. Fuzzing the intake of the kernels
# =================================================================================================

FUZZ_EXAMPLES = int(os.environ.get("INDUCT_FAST_FUZZ_EXAMPLES", "200"))
SPECIALS = (np.nan, np.inf, -np.inf, 1e300, -1e300, 1e30, -1e30, 65504.0, 1e-310, -0.0, -2.0, 0.0, 1.0)
# Mostly kernel floats (any byte order), sometimes widened integers/bools, rarely refused types.
FUZZ_DTYPES = ("f8",) * 4 + ("f4",) * 4 + ("f2", ">f4", ">f8", ">f2", "i4", "u1", "?") + ("i8", "c16", "c8", "O", "U3", "M8[s]")
FLOAT_DTYPES = ("f8", "f4", "f2", ">f4")
TOKEN_DTYPES = ("i8",) * 8 + ("i4", "u1", "i2", "u8", ">i8", "u4", "u2") + ("f8", "?", "O", "c8")
FUZZ_LAYOUTS = ("c",) * 4 + ("fortran", "reversed", "stepped", "transposed", "broadcast", "readonly", "unaligned")


def sometimes(draw, percent: int) -> bool:
    return draw(st.integers(0, 99)) < percent


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dtype.kind in "iuM":
            values = np.nan_to_num(values, nan=0, posinf=2**62, neginf=-(2**62))
            values = np.clip(values, -(2**62), 2**62)
        if dtype.kind == "M":
            values = values.astype(np.int64)
        return np.asarray(np.asarray(values).astype(dtype))


@st.composite
def fuzz_layout(draw, arr: np.ndarray) -> np.ndarray:
    """The values of `arr` (or a broadcast of part of them) in a drawn memory layout."""
    layout = draw(st.sampled_from(FUZZ_LAYOUTS))
    shape, ndim = arr.shape, arr.ndim
    if ndim == 0 and layout != "readonly":  # np.flip and friends return scalars of 0-d arrays
        return arr
    if layout == "fortran":
        return np.asfortranarray(arr)
    if layout == "reversed":
        return np.flip(np.flip(arr).copy())
    if layout == "stepped" and ndim:
        big = np.zeros(tuple(2 * s for s in shape), arr.dtype)
        view = big[tuple(slice(None, None, 2) for _ in shape)]
        view[...] = arr
        return view
    if layout == "transposed" and ndim > 1:
        perm = draw(st.permutations(range(ndim)))
        return np.ascontiguousarray(arr.transpose(perm)).transpose(np.argsort(perm))
    if layout == "broadcast" and ndim and arr.size:
        axis = draw(st.integers(0, ndim - 1))
        return np.broadcast_to(np.take(arr, [0], axis=axis), shape)
    if layout == "readonly":
        arr = arr.copy()
        arr.setflags(write=False)
        return arr
    if layout == "unaligned" and arr.dtype.kind not in "OU" and arr.dtype.itemsize > 1:
        buffer = np.zeros(arr.nbytes + 1, np.uint8)
        view = buffer[1:].view(arr.dtype).reshape(shape)
        view[...] = arr
        return view
    return arr


@st.composite
def fuzz_arrays(draw, shape: tuple, dtypes=FUZZ_DTYPES, scale: float = 1.0, specials: int = 30) -> np.ndarray:
    """Arrays of `shape` in any dtype and layout: modest values, in `specials` percent of the
    arrays one to three special ones (NaN, +-inf, huge, subnormal, negative zero)."""
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = np.asarray(rng.standard_normal(shape) * scale)
    if sometimes(draw, 60):
        values = np.abs(values)  # pattern-like: non-negative
    if values.size and sometimes(draw, specials):
        for _ in range(draw(st.integers(1, 3))):
            values.flat[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from(SPECIALS))
    return draw(fuzz_layout(_cast(values, dtype)))


@st.composite
def fuzz_tokens(draw, batch: int | None, n: int, high: int = 4, none: int = 10):
    """Token ids: mostly [n] or [batch, n] ids in [0, high) of an integer dtype; sometimes None,
    other shapes, other dtypes, negative or huge ids."""
    if sometimes(draw, none):
        return None
    if sometimes(draw, 8):
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    elif batch is None or sometimes(draw, 25):
        shape = (n,)
    else:
        shape = (batch, n)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.integers(0, max(high, 1), shape).astype(np.float64)
    if values.size and sometimes(draw, 8):
        values.flat[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from((-1, high, 2**40, 2**62, -(2**62))))
    dtype = np.dtype(draw(st.sampled_from(TOKEN_DTYPES)))
    return draw(fuzz_layout(_cast(values, dtype)))


def _lead(draw, max_size: int = 12) -> tuple:
    lead = tuple(draw(st.lists(st.sampled_from((1, 2, 3, 2, 0)), max_size=3)))
    return lead if int(np.prod(lead)) <= max_size else lead[:1]


def _names(kinds, offsets) -> list[str]:
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    return list(dict.fromkeys([*kinds, *(f"offset_{d}" for d in offsets)]))


BAD_KINDS = ("offset_0", "offset_99", "Induction", "offset_x", "", "offset_-1", "entropy ")


@st.composite
def fuzz_kinds(draw, n: int):
    """(kinds, offsets): mostly valid names and offsets in 1..n-1."""
    valid = ALL_KINDS + tuple(f"offset_{d}" for d in range(1, min(n, 4)))
    kind = st.sampled_from(valid) if not sometimes(draw, 10) else st.sampled_from(BAD_KINDS)
    kinds = draw(st.one_of(kind, st.lists(kind, max_size=4)))
    if sometimes(draw, 10):
        offsets = draw(st.lists(st.integers(-1, n + 1), max_size=2))
    else:
        offsets = draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=2)) if n > 1 else []
    return kinds, offsets


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        flags = "".join(f for f, on in (("C", value.flags.c_contiguous), ("F", value.flags.f_contiguous),
                                        ("W", value.flags.writeable), ("A", value.flags.aligned)) if on)
        body = np.array2string(value, threshold=40, edgeitems=2) if value.dtype.kind != "O" else repr(value.ravel()[:6])
        return f"array(shape={value.shape}, dtype={value.dtype.str}, strides={value.strides}, flags={flags}, {body})"
    return repr(value)


class Case:
    """One call: fn(*args, **kwargs); `check` validates a result, `params` are the names an
    error message may name. The repr shows dtypes, strides and flags of every array."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, check: Callable[[Any], None], params: tuple):
        self.fn, self.args, self.kwargs, self.check, self.params = fn, args, kwargs, check, params

    def _repr_pretty_(self, p, cycle) -> None:  # hypothesis' pretty printer
        p.text(repr(self))

    def __repr__(self) -> str:
        parts = [_describe(a) for a in self.args] + [f"{k}={_describe(v)}" for k, v in self.kwargs.items()]
        return f"{self.fn.__name__}({', '.join(parts)})"


def _check_scores(result, names, shape):
    assert isinstance(result, dict) and list(result) == names, (list(result), names)
    for name, value in result.items():
        assert isinstance(value, (np.ndarray, np.float64)), (name, type(value))
        assert np.shape(value) == shape and np.asarray(value).dtype == np.float64, (name, np.shape(value), shape)


def _pattern_shape(draw, lead, n):
    if sometimes(draw, 8):
        return draw(st.sampled_from([(), (n,), lead + (n, n + 1), lead + (n + 1, n)]))
    return lead + (n, n)


@st.composite
def head_scores_cases(draw) -> Case:
    lead, n = _lead(draw), draw(st.integers(0, 10))
    patterns = draw(fuzz_arrays(_pattern_shape(draw, lead, n)))
    tokens = draw(fuzz_tokens(lead[0] if lead else None, n, high=draw(st.integers(1, 5))))
    kinds, offsets = draw(fuzz_kinds(n))
    per_query = draw(st.booleans())

    def check(result):
        lead_shape = np.shape(patterns)[:-2]
        _check_scores(result, _names(kinds, offsets), lead_shape + ((n,) if per_query else ()))

    kwargs = dict(kinds=kinds, offsets=offsets, exclude_bos=draw(st.booleans()), per_query=per_query)
    return Case(inf.head_scores, (patterns, tokens), kwargs, check, ("patterns", "tokens", "kinds", "offset"))


@st.composite
def detection_cases(draw) -> Case:
    lead, n = _lead(draw), draw(st.integers(0, 8))
    patterns = draw(fuzz_arrays(_pattern_shape(draw, lead, n), specials=20))
    if draw(st.booleans()):
        kinds, _ = draw(fuzz_kinds(n))
        detection = kinds if isinstance(kinds, str) else (kinds[0] if kinds else "induction")
    else:
        d_lead = lead[len(lead) - draw(st.integers(0, len(lead))):]
        d_shape = (n, n) if not sometimes(draw, 10) else draw(st.sampled_from([(n,), (5,) + (n, n), (n, n + 1)]))
        d_shape = d_lead + d_shape if sometimes(draw, 50) else d_shape
        detection = draw(fuzz_arrays(d_shape, specials=5))
    tokens = draw(fuzz_tokens(lead[0] if lead else None, n))

    def check(result):
        assert isinstance(result, (np.ndarray, np.float64)), type(result)
        assert np.shape(result) == np.shape(patterns)[:-2] and np.asarray(result).dtype == np.float64

    kwargs = dict(
        tokens=tokens,
        measure=draw(st.sampled_from(("mul", "abs") * 5 + ("max",))),
        exclude_bos=draw(st.booleans()),
        exclude_current_token=draw(st.booleans()),
    )
    return Case(inf.detection_scores, (patterns, detection), kwargs, check, ("patterns", "detection", "tokens", "measure", "offset"))


@st.composite
def _qk_inputs(draw):
    lead = tuple(draw(st.lists(st.sampled_from((1, 2, 3, 0)), max_size=2)))
    n = draw(st.integers(0, 9))
    heads = draw(st.sampled_from((1, 2, 4, 4, 3)))
    kv = draw(st.sampled_from((1, heads, heads))) if not sometimes(draw, 8) else draw(st.sampled_from((0, 2, 3, 8)))
    d = draw(st.sampled_from((1, 3, 4, 8, 16))) if not sometimes(draw, 5) else 0
    layout = draw(st.sampled_from(("bnhd", "bhnd"))) if not sometimes(draw, 3) else "xyz"

    def shape(h, length=n, dim=d, lead_=lead):
        return lead_ + ((h, length, dim) if layout == "bhnd" else (length, h, dim))

    k_shape = shape(kv)
    if sometimes(draw, 8):
        k_shape = draw(st.sampled_from([shape(kv, n + 1), shape(kv, dim=d + 1), shape(kv, lead_=lead + (2,)), shape(kv)[1:]]))
    dtypes = FUZZ_DTYPES if sometimes(draw, 30) else FLOAT_DTYPES
    q = draw(fuzz_arrays(shape(heads), dtypes, specials=10))
    k = draw(fuzz_arrays(k_shape, dtypes, specials=10))
    if sometimes(draw, 80):
        scale = None
    else:
        scale = draw(st.one_of(st.floats(-4, 4), st.sampled_from((0.0, np.nan, np.inf, 1e30, 1e300, "0.5", True, 1j))))
    if sometimes(draw, 60):
        mask = None
    else:
        m_shape = draw(st.sampled_from([(n,), ((lead[0] if lead else 1), n)]))
        if sometimes(draw, 10):
            m_shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        m_values = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 2, m_shape).astype(np.float64)
        if sometimes(draw, 60):
            m_values[...] = 1.0  # mostly real keys, a few padding ones
            if m_values.size:
                m_values.flat[draw(st.integers(0, m_values.size - 1))] = 0.0
        if m_values.size and sometimes(draw, 10):
            m_values.flat[0] = draw(st.sampled_from((2.0, -1.0, np.nan, -np.inf, 0.5)))
        m_dtype = np.dtype(draw(st.sampled_from(("?", "i8", "u1", "f4", "f8", "?", "O", "U1"))))
        mask = draw(fuzz_layout(_cast(m_values, m_dtype)))
    options = dict(scale=scale, causal=draw(st.booleans()), attention_mask=mask, layout=layout)
    return q, k, options, lead, heads, n


def _f32_kernel(x) -> bool:
    return isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.dtype.itemsize <= 4


QK_PARAMS = ("q", "k", "scale", "attention_mask", "layout", "tokens", "kinds", "offset")


@st.composite
def attention_cases(draw) -> Case:
    q, k, options, lead, heads, n = draw(_qk_inputs())

    def check(result):
        assert isinstance(result, np.ndarray) and result.shape == lead + (heads, n, n), result.shape
        assert result.dtype == (np.float32 if _f32_kernel(q) and _f32_kernel(k) else np.float64), result.dtype
        # finite q and k (the call succeeded) give finite probabilities; rows sum to 1 or are empty
        assert np.isfinite(result).all() and (result >= 0).all() and (result <= 1).all()
        sums = result.astype(np.float64).sum(axis=-1)
        tol = 1e-5 if result.dtype == np.float32 else 1e-12
        assert np.all((np.abs(sums - 1) <= tol) | (sums == 0)), sums

    return Case(inf.attention_patterns, (q, k), options, check, QK_PARAMS)


@st.composite
def qk_scores_cases(draw) -> Case:
    q, k, options, lead, heads, n = draw(_qk_inputs())
    tokens = draw(fuzz_tokens(lead[0] if lead else None, n, none=20))
    kinds, offsets = draw(fuzz_kinds(n))
    per_query = draw(st.booleans())

    def check(result):
        names = _names(kinds, offsets)
        _check_scores(result, names, lead + (heads,) + ((n,) if per_query else ()))
        for name, value in result.items():  # attention masses are in [0, 1], entropies in [0, log n]
            value = np.asarray(value)[~np.isnan(value)]
            top = np.log(max(n, 1)) if name == "entropy" else 1.0
            assert np.all((value >= -1e-9) & (value <= top + 1e-6)), (name, value)

    kwargs = dict(tokens=tokens, kinds=kinds, offsets=offsets, exclude_bos=draw(st.booleans()), per_query=per_query, **options)
    return Case(inf.scores_from_qk, (q, k), kwargs, check, QK_PARAMS)


@st.composite
def losses_cases(draw) -> Case:
    batched = draw(st.booleans())
    batch, n = draw(st.integers(0, 3)), draw(st.integers(0, 6))
    vocab = draw(st.sampled_from((1, 2, 5, 9, 33, 1025))) if not sometimes(draw, 3) else 0
    shape = ((batch,) if batched else ()) + (n, vocab)
    if sometimes(draw, 5):
        shape = draw(st.sampled_from([(vocab,), (1,) + shape]))
    logits = draw(fuzz_arrays(shape, scale=draw(st.sampled_from((1.0, 30.0, 1e4))), specials=15))
    tokens = draw(fuzz_tokens(batch if batched else None, n, high=vocab, none=3))

    def check(result):
        want = np.shape(logits)[:-2] + (max(np.shape(logits)[-2] - 1, 0),)
        assert isinstance(result, np.ndarray) and result.shape == want and result.dtype == np.float64, (result.shape, want)
        assert np.isfinite(result).all() and (result >= 0).all(), result  # lse >= max >= the target logit

    return Case(inf.token_losses, (logits, tokens), {}, check, ("logits", "tokens"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=st.one_of(head_scores_cases(), detection_cases(), attention_cases(), qk_scores_cases(), losses_cases()))
def test_fuzz_kernels_return_documented_shapes_or_raise_value_or_type_error(case):
    before = snapshot(case.args, case.kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            result = case.fn(*case.args, **case.kwargs)
        except BaseException as exc:  # PanicException derives from BaseException
            assert_named_error(exc, ())
            # some argument is named, in the message or (pyo3 argument conversion) in a note; the
            # table above holds the message itself to naming the argument
            text = " ".join([str(exc), *getattr(exc, "__notes__", [])])
            assert any(re.search(rf"\b{p}", text) for p in case.params), f"no argument named in {text!r}"
            event(f"{case.fn.__name__}: {type(exc).__name__}")
        else:
            case.check(result)
            event(f"{case.fn.__name__}: returned")
    assert snapshot(case.args, case.kwargs) == before, "an input array was modified"


# =================================================================================================
# Regression tests for bugs found while writing this file, beyond the table rows marked
# "Regression" (each failed before its fix)
# =================================================================================================


def _assert_finite_or_truthful_error(call, patterns) -> None:
    """For all-finite input: a finite result, or a ValueError naming patterns that does not claim
    a finite entry is the non-finite one ("expected finite values, got 0 at index ...")."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = call()
    except BaseException as exc:
        message = assert_named_error(exc, "patterns")
        blamed = re.search(r"got (\S+) at index \(([\d, ]*)\)", message)
        if blamed:
            value, index = float(blamed.group(1)), tuple(int(i) for i in blamed.group(2).split(","))
            assert not np.isfinite(value), f"a finite entry is blamed: {message[:40]}...{message[-60:]}"
            assert np.asarray(patterns)[index] == value or np.isnan(value)
    else:
        for value in _as_list(result):
            assert np.isfinite(value).all(), f"finite input, non-finite result {value}"


OVERFLOW_CASES = {
    # the sum of the previous-token masses overflows: the message blamed "0 at index (1, 2, 0, 0)"
    "previous_token": (lambda A: inf.previous_token_scores(A), (1, 2, 4, 3), (1, 2, 5, 4)),
    # a row sum overflows: the message blamed "0 at index (1, 2, 4, 0)"
    "detection mul": (lambda A: inf.detection_scores(A, "previous_token"), (1, 2, 4, 3), (1, 2, 4, 2)),
    # -sum A log A overflows: the score was -inf, silently
    "entropy": (lambda A: inf.head_scores(A, kinds="entropy")["entropy"], (1, 2, 4, 3), (1, 2, 4, 2)),
}


@pytest.mark.parametrize("name", list(OVERFLOW_CASES))
def test_finite_patterns_whose_sums_overflow(name):
    """DESIGN.md section 8: never a silent wrong answer, and a message that tells the truth."""
    call, *where = OVERFLOW_CASES[name]
    A = np.zeros((2, 3, 6, 6))
    for index in where:
        A[index] = 1e308
    _assert_finite_or_truthful_error(lambda: call(A), A)


def test_finite_detection_matrices_whose_products_overflow():
    """A finite D = 1e308 gave inf (mul) and -inf (abs) without a word."""
    A = np.tril(np.ones((5, 5))) / np.arange(1, 6)[:, None]
    D = np.full((5, 5), 1e308)
    for measure in ("mul", "abs"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                got = inf.detection_scores(A, D, measure=measure)
        except BaseException as exc:
            assert_named_error(exc, "detection")
        else:
            assert np.isfinite(got), (measure, got)


def test_token_losses_reports_the_id_it_was_given():
    """uint64 ids >= 2**63 wrap to negative int64 in as_tokens, so the message showed "got -1"."""
    tokens = np.zeros((2, 3), np.uint64)
    tokens[1, 2] = 2**64 - 1
    with pytest.raises(ValueError) as info:
        inf.token_losses(np.zeros((2, 3, 5)), tokens)
    assert_named_error(info.value, ("tokens", "(1, 2)", str(2**64 - 1)))


@pytest.mark.parametrize("argument", ["batch", "period", "vocab_size"])
def test_repeated_tokens_integral_floats_work_like_ints_or_are_named(argument):
    """vocab_size=10.0 works like 10, but batch=2.0 and period=2.0 raised numpy's TypeErrors
    ("'float' object cannot be interpreted as an integer", "expected a sequence of integers or a
    single integer, got '2.0'"), naming no argument."""
    ints = dict(batch=2, period=3, vocab_size=10)
    floats = {**ints, argument: float(ints[argument])}
    try:
        got = inf.repeated_tokens(**floats, seed=0)
    except BaseException as exc:
        assert_named_error(exc, argument)
    else:
        np.testing.assert_array_equal(got, inf.repeated_tokens(**ints, seed=0))


def test_repeated_tokens_does_not_allocate_the_vocabulary():
    """np.arange(vocab_size) of candidates: vocab_size=2**50 raised MemoryError (8 PiB) for a
    [2, 7] result, an exception type section 8 does not allow (2**40 asks for 8 TiB)."""
    vocab = 2**50
    tokens = inf.repeated_tokens(2, 3, vocab, seed=0)
    assert tokens.shape == (2, 7) and (tokens[:, 0] == 0).all()
    blocks = tokens[:, 1:4]
    assert (blocks > 0).all() and (blocks < vocab).all() and (tokens[:, 4:] == blocks).all()
    assert all(len(set(b)) == 3 for b in blocks.tolist())


def test_circuits_of_huge_finite_weights_are_not_nan():
    """Composition scores are invariant to scaling any weight, but float64 weights of about
    1e77 (all four) or 1e160 (one) overflowed the Gram products and gave all-NaN scores (with
    RuntimeWarnings only); positional_qk_scores of W_pos * 1e160 gave NaN where softmax has a
    hard-max limit. Either a finite answer or a ValueError naming the weight."""
    want = inf.composition_scores(W_Q, W_K, W_V, W_O)
    for s in (1e80, 1e-80):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                got = inf.composition_scores(W_Q * s, W_K * s, W_V * s, W_O * s)
        except BaseException as exc:
            assert_named_error(exc, "re:W_[QKVO]")
        else:
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=f"weights * {s}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = inf.positional_qk_scores(W_POS * 1e160, W_Q, W_K)
    except BaseException as exc:
        assert_named_error(exc, "W_pos")
    else:
        assert np.isfinite(got).all() and ((got >= 0) & (got <= 1)).all(), got


def test_fused_scores_of_huge_logits_keep_every_mass_at_most_one():
    """scores_from_qk takes A[i, j] = exp(s_ij - lse_i), lse_i = m_i + log(sum_j exp(s_ij - m_i)):
    once |lse_i| is ~1e16 its log(sum) part is below one ulp and vanishes, so every target
    gets mass ~1. With q = k = ones(1, 5, 1, 1), scale 1e18 (accepted: finite), tokens
    [0, 3, 3, 0, 3]: attention_patterns is uniform and head_scores of it gives previous_token
    0.3208, duplicate_token 0.3278; scores_from_qk gave 1.0 and 1.3333 (a mass > 1). The error
    grows with |logits|: 4e-6 at scale 1e12, 9e-4 at 1e14, 0.15 at 1e16 (float32 input too)."""
    tokens = np.array([0, 3, 3, 0, 3])
    kinds = ("previous_token", "duplicate_token", "entropy")
    for dtype in (np.float64, np.float32):
        q = np.ones((1, 5, 1, 1), dtype)
        for scale in (1e14, 1e18):
            want = inf.head_scores(inf.attention_patterns(q, q, scale=scale), tokens, kinds=kinds)
            try:
                got = inf.scores_from_qk(q, q, tokens, kinds=kinds, scale=scale)
            except BaseException as exc:  # refusing such logits would be fine too
                assert_named_error(exc, "re:\\b(q|k|scale)\\b")
            else:
                for kind in kinds:
                    np.testing.assert_allclose(got[kind], want[kind], rtol=0, atol=1e-5, err_msg=f"{kind}, {dtype.__name__}, scale {scale}")
