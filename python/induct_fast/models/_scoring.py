"""What every live-model adapter shares: a layer's attention rules, and the scorer that turns one
layer's queries and keys into scores while the forward pass runs.

An adapter only knows where its family's q and k live and which rules its attention applies; it
hands each layer's (q, k, rules) to :class:`LayerScorer.score`, which scores them with the fused
kernel (:func:`induct_fast.scores_from_qk`) and keeps nothing but the ``[batch, head]`` results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from ..attention import scores_from_qk


@dataclass(frozen=True)
class AttentionRules:
    """How one layer turns q and k into attention, in :func:`induct_fast.scores_from_qk` terms.

    Attributes
    ----------
    scale : float or None
        Multiplier of q . k (None: 1 / sqrt(d_head)).
    softcap : float or None
        Logits become ``softcap * tanh(logit / softcap)``.
    window : int or None
        Sliding window: key j is visible to query i only when i - j < window.
    causal : bool
        Keys j > i are masked.
    """

    scale: Optional[float] = None
    softcap: Optional[float] = None
    window: Optional[int] = None
    causal: bool = True

    def options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`induct_fast.scores_from_qk` (unset options left out)."""
        options: dict[str, Any] = {"scale": self.scale, "causal": self.causal}
        if self.softcap is not None:
            options["softcap"] = self.softcap
        if self.window is not None:
            options["window"] = self.window
        return options


def is_transformer_lens(model: Any, class_name: str) -> bool:
    """``model`` is (a subclass of) TransformerLens's class ``class_name``, checked by name so that
    TransformerLens is never imported here."""
    return any(cls.__name__ == class_name and cls.__module__.startswith("transformer_lens") for cls in type(model).__mro__)


def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's malloc_trim, or None on other C libraries."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Hands memory freed by earlier layers back to the OS (glibc only).

    Why: the small result arrays each layer leaves behind land on top of the heap, after the
    large tensors the layer freed, and glibc returns only the top of its heap on its own; at long
    context that pins ~100 MB per scan that the model's plain forward would have returned.
    ``malloc_trim`` releases the free pages wherever they are (measured: it brings scan_model's
    peak back under the plain forward's on the Llama-shaped model at n = 16384)."""
    if _TRIM is not None:
        _TRIM(0)


class StopForward(Exception):
    """Raised inside the forward pass once the last layer is scored: nothing after it (the last
    MLP, the unembedding, the logits) is needed, so it is not run."""


def to_host(x: Any) -> Any:
    """A detached CPU tensor the kernels can read without a copy (bfloat16 too): a tensor on an
    accelerator is copied to host memory (one layer at a time)."""
    x = x.detach()
    if x.device.type != "cpu":
        x = x.to("cpu")
    return x


class LayerScorer:
    """Scores the layers of one forward pass over one batch of prompts.

    Parameters
    ----------
    n_layers : int
    tokens : ndarray of int64, shape (batch, n)
    attention_mask : ndarray of bool, shape (batch, n), or None
    names : list of str
        Kind names (offsets already spelled ``offset_<d>``).
    exclude_bos : bool
    on_layer : callable, optional
        Called after each layer is scored (progress bars).
    via : {"auto", "lse", "recompute"}
    measure : {"mass", "top1"}
    queries, keys : ndarray of bool, shape (batch, n), or None
        The spans to score (see :func:`induct_fast.head_scores`).
    """

    def __init__(
        self,
        n_layers: int,
        tokens: np.ndarray,
        attention_mask: Optional[np.ndarray],
        names: list[str],
        exclude_bos: bool,
        on_layer: Optional[Callable[[], None]] = None,
        via: str = "auto",
        measure: str = "mass",
        queries: Optional[np.ndarray] = None,
        keys: Optional[np.ndarray] = None,
    ):
        self.n_layers = n_layers
        self.tokens = tokens
        self.attention_mask = attention_mask
        self.names = names
        self.exclude_bos = exclude_bos
        self.on_layer = on_layer
        self.via = via
        self.measure = measure
        self.queries = queries
        self.keys = keys
        self.results: dict[int, dict[str, np.ndarray]] = {}
        self.routes: dict[int, str] = {}

    @property
    def wants_lse(self) -> bool:
        """Whether adapters should take each row's log-sum-exp from the model's attention.

        Not with exclude_bos: the model's normaliser includes key 0, the renormalised one not; not
        with top-1, which needs no normaliser."""
        return self.via != "recompute" and not self.exclude_bos and self.measure == "mass"

    def missing_lse(self, layer: int, why: str) -> None:
        """The model's LSE could not be had for ``layer``: fine under via="auto", an error under
        via="lse"."""
        if self.via == "lse":
            raise NotImplementedError(f"via: 'lse' was asked for, but layer {layer} {why}; use via='auto' or 'recompute'")

    def score(self, layer: int, q: Any, k: Any, rules: AttentionRules, layout: str, lse: Any = None) -> None:
        """Scores layer ``layer`` from its q and k (torch tensors in ``layout``, "bnhd" or "bhnd")
        and, when given, the log-sum-exp ``[batch, heads, n]`` of each row as the model's own
        attention computed it (then only target logits are formed); raises
        :class:`StopForward` once every layer is done."""
        if not 0 <= layer < self.n_layers:
            raise NotImplementedError(f"model: attention of layer {layer} was called, but the model has {self.n_layers} layers")
        if layer in self.results:
            raise NotImplementedError(
                f"model: the attention of layer {layer} ran twice in one forward pass (shared or recurrent layers are not supported)"
            )
        q, k = to_host(q), to_host(k)
        options = rules.options()
        if lse is not None:
            options["lse"] = to_host(lse)
        self.results[layer] = scores_from_qk(
            q,
            k,
            self.tokens,
            kinds=self.names,
            attention_mask=self.attention_mask,
            layout=layout,
            exclude_bos=self.exclude_bos,
            measure=self.measure,
            queries=self.queries,
            keys=self.keys,
            **options,
        )
        self.routes[layer] = "lse" if lse is not None else "recompute"
        del q, k, options  # this layer's queries and keys are not kept
        release_free_memory()
        if self.on_layer is not None:
            self.on_layer()
        if len(self.results) == self.n_layers:
            raise StopForward()

    def check_complete(self, model: Any, route: str) -> None:
        """Every layer was scored, else the family's attention does not run the way the adapter
        expects: an error naming the missing layers, never a partial result."""
        missing = [layer for layer in range(self.n_layers) if layer not in self.results]
        if missing:
            raise NotImplementedError(
                f"model: {type(model).__name__} did not run layers {missing} through {route}, so their queries "
                "and keys could not be scored; this architecture is not supported"
            )

    def per_prompt(self) -> dict[str, np.ndarray]:
        """{kind: [batch, layer, head]} of the scored layers."""
        return {name: np.stack([self.results[layer][name] for layer in range(self.n_layers)], axis=1) for name in self.names}
