"""Type stubs for the Rust extension. Call the wrappers in induct_fast.scores instead: they
normalise dtypes and give friendly errors; these take prepared arrays only."""

from typing import Literal, Optional, Union

import numpy as np
import numpy.typing as npt
from typing_extensions import TypeAlias

# A float array: float16/32/64, or bfloat16 as ("bfloat16", its uint16 bit patterns), a view of
# the same memory (numpy has no bfloat16 dtype; induct_fast._arrays.kernel_array builds it).
_Floats: TypeAlias = Union[npt.NDArray[np.floating], tuple[Literal["bfloat16"], npt.NDArray[np.uint16]]]

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
    patterns: _Floats,
    tokens: Optional[npt.NDArray[np.int64]],
    kinds: list[str],
    exclude_bos: bool,
    per_query: bool,
    attention_mask: Optional[npt.NDArray[np.bool_]],
    measure: str = "mass",
    queries: Optional[npt.NDArray[np.bool_]] = None,
    keys: Optional[npt.NDArray[np.bool_]] = None,
) -> npt.NDArray[np.float64]:
    """[len(kinds), *lead, n] per-query scores, or [len(kinds), *lead] means; attention_mask
    [n] or [lead[0], n] (False = padding: neither query nor target); measure "mass" or "top1";
    queries / keys spans [n] or [lead[0], n] (False = outside)."""

def detection_scores(
    patterns: _Floats,
    kinds: Optional[list[str]],
    matrices: Optional[npt.NDArray[np.float64]],
    tokens: Optional[npt.NDArray[np.int64]],
    measure: str,
    exclude_bos: bool,
    exclude_current_token: bool,
) -> npt.NDArray[np.float64]:
    """TransformerLens head_detector scores: [len(kinds), *lead] against kind names (one pass for
    all), or [*lead] against explicit matrices."""

def attention_patterns(
    q: _Floats,
    k: _Floats,
    scale: Optional[float],
    causal: bool,
    attention_mask: Optional[npt.NDArray[np.bool_]],
    layout: str,
    softcap: Optional[float],
    window: Optional[int],
) -> npt.NDArray[np.floating]:
    """[*lead, n_heads, n, n] softmax of s = scale q.k (softcap * tanh(s / softcap) if given),
    keys j <= i (causal), i - j < window (if given) and attention_mask[j] (float32 for
    bfloat16/float16/32 input)."""

def scores_from_qk(
    q: _Floats,
    k: _Floats,
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
    lse: Optional[_Floats] = None,
    return_lse: bool = False,
    measure: str = "mass",
    queries: Optional[npt.NDArray[np.bool_]] = None,
    keys: Optional[npt.NDArray[np.bool_]] = None,
) -> Union[npt.NDArray[np.float64], tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]:
    """[len(kinds), *lead, n_heads, n] per-query scores, or [len(kinds), *lead, n_heads] means;
    padding positions (attention_mask False) are neither queries nor targets. With ``lse``
    ([*lead, n_heads, n], any float dtype) each row's normaliser is taken from it (unless
    ``entropy`` is asked for) and only target logits are computed; with ``return_lse`` the
    result is (scores, lse [*lead, n_heads, n] float64: the kernel's own, or ``lse`` as given).
    ``measure``, ``queries``, ``keys`` as in head_scores (top1: the argmax of the logits)."""

def token_losses(
    logits: _Floats,
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
