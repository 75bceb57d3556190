"""Type stubs for the Rust extension. Call the wrappers in induct_fast.scores instead: they
normalise dtypes and give friendly errors; these take prepared arrays only."""

from typing import Optional, Union

import numpy as np
import numpy.typing as npt

__all__ = [
    "head_scores",
    "detection_scores",
    "attention_patterns",
    "scores_from_qk",
    "token_losses",
    "batched_matmul",
    "contract",
    "set_num_threads",
    "get_num_threads",
    "__version__",
]

__version__: str

def head_scores(
    patterns: npt.NDArray[np.floating],
    tokens: Optional[npt.NDArray[np.int64]],
    kinds: list[str],
    exclude_bos: bool,
    per_query: bool,
    attention_mask: Optional[npt.NDArray[np.bool_]],
) -> npt.NDArray[np.float64]:
    """[len(kinds), *lead, n] per-query scores, or [len(kinds), *lead] means; attention_mask
    [n] or [lead[0], n] (False = padding: neither query nor target)."""

def detection_scores(
    patterns: npt.NDArray[np.floating],
    kind: Optional[str],
    matrices: Optional[npt.NDArray[np.float64]],
    tokens: Optional[npt.NDArray[np.int64]],
    measure: str,
    exclude_bos: bool,
    exclude_current_token: bool,
) -> npt.NDArray[np.float64]:
    """[*lead] TransformerLens head_detector scores against a kind or explicit matrices."""

def attention_patterns(
    q: npt.NDArray[np.floating],
    k: npt.NDArray[np.floating],
    scale: Optional[float],
    causal: bool,
    attention_mask: Optional[npt.NDArray[np.bool_]],
    layout: str,
    softcap: Optional[float],
    window: Optional[int],
) -> npt.NDArray[np.floating]:
    """[*lead, n_heads, n, n] softmax of s = scale q.k (softcap * tanh(s / softcap) if given),
    keys j <= i (causal), i - j < window (if given) and attention_mask[j] (float32 for
    float16/32 input)."""

def scores_from_qk(
    q: npt.NDArray[np.floating],
    k: npt.NDArray[np.floating],
    tokens: Optional[npt.NDArray[np.int64]],
    kinds: list[str],
    scale: Optional[float],
    causal: bool,
    attention_mask: Optional[npt.NDArray[np.bool_]],
    layout: str,
    exclude_bos: bool,
    per_query: bool,
    softcap: Optional[float],
    window: Optional[int],
    lse: Optional[npt.NDArray[np.floating]] = None,
    return_lse: bool = False,
) -> Union[npt.NDArray[np.float64], tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]:
    """[len(kinds), *lead, n_heads, n] per-query scores, or [len(kinds), *lead, n_heads] means;
    padding positions (attention_mask False) are neither queries nor targets. With ``lse``
    ([*lead, n_heads, n], float16/32/64) each row's normaliser is taken from it (unless
    ``entropy`` is asked for) and only target logits are computed; with ``return_lse`` the
    result is (scores, lse [*lead, n_heads, n] float64: the kernel's own, or ``lse`` as given)."""

def token_losses(
    logits: npt.NDArray[np.floating],
    tokens: npt.NDArray[np.int64],
) -> npt.NDArray[np.float64]:
    """[*lead, n - 1] cross-entropy of tokens[..., 1:] under logits[..., :-1, :]; logits
    [*lead, n, vocab] with lead () or (batch,), tokens [*lead, n] in [0, vocab)."""

def batched_matmul(
    a: npt.NDArray[np.float64], b: npt.NDArray[np.float64], out: npt.NDArray[np.float64], accumulate: bool
) -> None: ...
def contract(g: npt.NDArray[np.float64], k: npt.NDArray[np.float64], out: npt.NDArray[np.float64]) -> None: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
