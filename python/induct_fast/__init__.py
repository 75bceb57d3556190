"""induct_fast: find and measure induction circuits in transformers, fast.

Scores over attention patterns (previous-token, duplicate-token, induction and more), exact
TransformerLens ``head_detector`` parity, attention patterns from q and k, and the same scores
fused into the attention so that long contexts never hold an n x n matrix; computed by a
multi-threaded Rust core that releases the GIL. Importing the package needs only numpy.
"""

from ._core import __version__, get_num_threads, set_num_threads
from .attention import attention_patterns, scores_from_qk
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
from .tokens import repeated_tokens

__all__ = [
    "DEFAULT_KINDS",
    "KINDS",
    "__version__",
    "attention_patterns",
    "detection_scores",
    "duplicate_token_scores",
    "get_num_threads",
    "head_scores",
    "induction_scores",
    "offset_scores",
    "previous_token_scores",
    "repeated_tokens",
    "scores_from_qk",
    "set_num_threads",
]
