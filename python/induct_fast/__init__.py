"""induct_fast: find and measure induction circuits in transformers, fast.

Scores over attention patterns (previous-token, duplicate-token, induction and more), exact
TransformerLens ``head_detector`` parity, attention patterns from q and k and the same scores
fused into the attention (long contexts never hold an n x n matrix), QK/OV circuits from the
weights; computed by a multi-threaded Rust core that releases the GIL. ``scan`` scores a whole
model from a cache, a tuple of layers, q/k or a file into a ``HeadScores``; ``token_losses`` and
``icl_score`` measure in-context learning. Importing the package needs only numpy (pandas,
matplotlib, dask, tqdm, safetensors are imported by the functions that use them;
``induct_fast.dask`` is a separate import).
"""

from ._core import __version__, get_num_threads
from .attention import attention_patterns, scores_from_qk
from .circuits import (
    CompositionBaseline,
    composition_baseline,
    composition_scores,
    copying_scores,
    ov_eigenvalues,
    positional_qk_scores,
)
from .scores import (
    DEFAULT_KINDS,
    KINDS,
    detection_scores,
    duplicate_token_scores,
    head_scores,
    induction_scores,
    offset_scores,
    previous_token_scores,
)
from .tokens import icl_score, repeated_tokens, token_losses
from . import probes
from .results import HeadScores
from .scan import scan
from .models import scan_model
from ._arrays import as_count as _as_count
from . import _core


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (>= 1) in every later call. Results do not depend on it."""
    n = _as_count(n, "n", 1)
    if n > 65536:
        raise ValueError(f"n: expected a number of threads in 1..=65536, got {n}")
    _core.set_num_threads(n)


__all__ = [
    "DEFAULT_KINDS",
    "HeadScores",
    "KINDS",
    "CompositionBaseline",
    "__version__",
    "attention_patterns",
    "composition_baseline",
    "composition_scores",
    "copying_scores",
    "detection_scores",
    "duplicate_token_scores",
    "get_num_threads",
    "head_scores",
    "icl_score",
    "induction_scores",
    "offset_scores",
    "ov_eigenvalues",
    "positional_qk_scores",
    "previous_token_scores",
    "probes",
    "repeated_tokens",
    "scan",
    "scan_model",
    "scores_from_qk",
    "set_num_threads",
    "token_losses",
]
