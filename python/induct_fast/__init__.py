"""induct_fast: find and measure induction circuits in transformers, fast.

Scores over attention patterns (previous-token, duplicate-token, induction and more), exact
TransformerLens ``head_detector`` parity, computed by a multi-threaded Rust core that releases the
GIL. Importing the package needs only numpy.
"""

from ._core import __version__, get_num_threads, set_num_threads
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
from .tokens import repeated_tokens

__all__ = [
    "DEFAULT_KINDS",
    "KINDS",
    "CompositionBaseline",
    "__version__",
    "composition_baseline",
    "composition_scores",
    "copying_scores",
    "detection_scores",
    "duplicate_token_scores",
    "get_num_threads",
    "head_scores",
    "induction_scores",
    "offset_scores",
    "ov_eigenvalues",
    "positional_qk_scores",
    "previous_token_scores",
    "repeated_tokens",
    "set_num_threads",
]
