"""``HeadScores``: the scores of every (layer, head) of a model, per kind, with ways to look at them.

Built by :func:`induct_fast.scan`; pandas and matplotlib are imported only by the methods that
need them (``to_frame``, ``plot``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np


class HeadScores:
    """Scores per kind on a ``[layer, head]`` grid, from per-prompt scores ``[batch, layer, head]``.

    Parameters
    ----------
    per_prompt : mapping of str to array_like, each of shape (batch, layer, head)
        One array per kind (``head_scores`` output of a ``[batch, layer, head, n, n]`` stack).
        All kinds must share one shape.
    meta : mapping, optional
        How the scores were made (:func:`induct_fast.scan_model` records the model and, per
        layer, whether the row normalisers came from the model's own attention kernel).

    Attributes
    ----------
    per_prompt : dict of str to ndarray of float64, shape (batch, layer, head)
        The scores of every prompt.
    scores : dict of str to ndarray of float64, shape (layer, head)
        The mean over prompts, ``nanmean(per_prompt[kind], axis=0)``: a prompt where a head has no
        eligible query (NaN) does not count; NaN only where no prompt has one.
    kinds : tuple of str
    batch, n_layers, n_heads : int
    meta : dict
        As given (empty by default); included in :meth:`to_dict`.

    Examples
    --------
    >>> s = HeadScores({"induction": np.array([[[0.1, 0.9]], [[0.3, 0.7]]])})
    >>> s["induction"]
    array([[0.2, 0.8]])
    >>> s.top("induction", 1)
    [(0, 1, 0.8)]
    """

    def __init__(self, per_prompt: Mapping[str, Any], meta: Optional[Mapping[str, Any]] = None):
        if not isinstance(per_prompt, Mapping) or not per_prompt:
            raise ValueError(f"per_prompt: expected a non-empty mapping of kind -> [batch, layer, head] array, got {per_prompt!r}")
        arrays = {str(kind): np.asarray(values, dtype=np.float64) for kind, values in per_prompt.items()}
        first_kind, first = next(iter(arrays.items()))
        for kind, values in arrays.items():
            if values.ndim != 3 or values.shape != first.shape:
                raise ValueError(
                    f"per_prompt[{kind!r}]: expected shape (batch, layer, head) like {first_kind!r} {first.shape}, got shape {values.shape}"
                )
        self.per_prompt: dict[str, np.ndarray] = arrays
        self.meta: dict[str, Any] = dict(meta or {})
        self.scores: dict[str, np.ndarray] = {kind: _mean_over_prompts(v) for kind, v in arrays.items()}

    # -- shape and access ----------------------------------------------------------------------

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.scores)

    @property
    def batch(self) -> int:
        return self._shape[0]

    @property
    def n_layers(self) -> int:
        return self._shape[1]

    @property
    def n_heads(self) -> int:
        return self._shape[2]

    @property
    def _shape(self) -> tuple[int, int, int]:
        return next(iter(self.per_prompt.values())).shape  # type: ignore[return-value]

    def __getitem__(self, kind: str) -> np.ndarray:
        """The ``[layer, head]`` grid of ``kind``."""
        try:
            return self.scores[kind]
        except KeyError:
            raise KeyError(f"kind {kind!r} not scored; available: {', '.join(self.kinds)}") from None

    def __contains__(self, kind: object) -> bool:
        return kind in self.scores

    def __iter__(self) -> Iterator[str]:
        return iter(self.scores)

    def __len__(self) -> int:
        return len(self.scores)

    # -- rankings and exports ------------------------------------------------------------------

    def top(self, kind: str, k: Optional[int] = 10, *, largest: bool = True) -> list[tuple[int, int, float]]:
        """The ``k`` strongest heads of ``kind``, best first.

        Parameters
        ----------
        kind : str
            A scored kind.
        k : int or None
            How many heads (``None``: all ``n_layers * n_heads``).
        largest : bool
            Best means largest (``False``: smallest, e.g. for ``entropy``).

        Returns
        -------
        list of (int, int, float)
            ``(layer, head, score)`` of the ``[layer, head]`` grid; NaN scores come last, ties
            keep (layer, head) order.
        """
        grid = self[kind]
        flat = grid.ravel()
        key = -flat if largest else flat
        order = np.argsort(np.where(np.isnan(flat), np.inf, key), kind="stable")
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
                raise ValueError(f"k: expected a non-negative integer or None, got {k!r}")
            order = order[:k]
        return [(int(i // self.n_heads), int(i % self.n_heads), float(flat[i])) for i in order]

    def to_frame(self) -> Any:
        """The grids as a table (needs pandas).

        Returns
        -------
        pandas.DataFrame, shape (n_layers * n_heads, len(kinds))
            One row per (layer, head) (a MultiIndex named ``layer``, ``head``), one float64
            column per kind. ``df.reset_index()`` gives plain ``layer`` and ``head`` columns.
        """
        pd = _optional("pandas", "HeadScores.to_frame", "pandas")
        index = pd.MultiIndex.from_product([range(self.n_layers), range(self.n_heads)], names=["layer", "head"])
        return pd.DataFrame({kind: grid.ravel() for kind, grid in self.scores.items()}, index=index)

    def to_dict(self, *, per_prompt: bool = False) -> dict[str, Any]:
        """A JSON-serialisable summary (NaN becomes None).

        Parameters
        ----------
        per_prompt : bool
            Also include ``"per_prompt": {kind: [batch][layer][head]}``.

        Returns
        -------
        dict
            ``{"kinds": [...], "shape": [n_layers, n_heads], "batch": b,
            "scores": {kind: [[score per head] per layer]}}`` of plain lists, ints, floats and
            None; ``json.dumps(..., allow_nan=False)`` accepts it.
        """
        out: dict[str, Any] = {
            "kinds": list(self.kinds),
            "shape": [self.n_layers, self.n_heads],
            "batch": self.batch,
            "scores": {kind: _json_list(grid) for kind, grid in self.scores.items()},
        }
        if per_prompt:
            out["per_prompt"] = {kind: _json_list(values) for kind, values in self.per_prompt.items()}
        if self.meta:
            out["meta"] = self.meta
        return out

    def to_table(self, digits: int = 3) -> str:
        """An aligned text table: a header, then one line per (layer, head) with a column per
        kind, ``digits`` decimals, ``nan`` where a score is NaN."""
        width = max([8, digits + 4] + [len(kind) for kind in self.kinds])
        lines = ["layer  head  " + "  ".join(f"{kind:>{width}}" for kind in self.kinds)]
        for layer in range(self.n_layers):
            for head in range(self.n_heads):
                cells = (_fmt(self.scores[kind][layer, head], digits) for kind in self.kinds)
                lines.append(f"{layer:>5}  {head:>4}  " + "  ".join(f"{c:>{width}}" for c in cells))
        return "\n".join(lines)

    # -- plotting ------------------------------------------------------------------------------

    def plot(self, kind: Union[str, Sequence[str], None] = None, ax: Any = None) -> Any:
        """Heatmaps of the ``[layer, head]`` grids, one panel per kind.

        Parameters
        ----------
        kind : str or sequence of str, optional
            The kinds to draw (default: all).
        ax : matplotlib Axes or sequence of Axes, optional
            Where to draw, one Axes per kind. Without it a new ``matplotlib.figure.Figure`` is made
            (not registered with pyplot: nothing global changes, no backend is needed to save it;
            Jupyter displays it when returned).

        Returns
        -------
        matplotlib.figure.Figure
            ``fig.savefig("heads.png")`` writes it. Score kinds share the colour range [0, 1];
            ``entropy`` is scaled to its own range. NaN cells are left blank.
        """
        kinds = self._plot_kinds(kind)
        axes = self._plot_axes(kinds, ax)
        for panel, name in zip(axes, kinds):
            self._heatmap(panel, name)
        return axes[0].figure

    def _plot_kinds(self, kind: Union[str, Sequence[str], None]) -> list[str]:
        kinds = list(self.kinds) if kind is None else [kind] if isinstance(kind, str) else list(kind)
        for name in kinds:
            self[name]  # KeyError naming the available kinds
        if not kinds:
            raise ValueError("kind: expected at least one kind to plot")
        return kinds

    def _plot_axes(self, kinds: list[str], ax: Any) -> list[Any]:
        if ax is None:
            Figure = _optional("matplotlib.figure", "HeadScores.plot", "matplotlib").Figure
            cols = len(kinds)
            fig = Figure(figsize=(0.45 * self.n_heads * cols + 1.6 * cols + 0.5, 0.4 * self.n_layers + 1.6), layout="constrained")
            return list(np.atleast_1d(fig.subplots(1, cols, squeeze=False)[0]))
        axes = list(ax) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
        axes = list(np.ravel(np.asarray(axes, dtype=object)))
        if len(axes) != len(kinds):
            raise ValueError(f"ax: expected one Axes per kind ({len(kinds)}: {', '.join(kinds)}), got {len(axes)}")
        return axes

    def _heatmap(self, ax: Any, kind: str) -> None:
        grid = np.ma.masked_invalid(self.scores[kind])
        bounds = {} if kind == "entropy" else {"vmin": 0.0, "vmax": 1.0}
        image = ax.imshow(grid, cmap="viridis", aspect="auto", interpolation="nearest", **bounds)
        ax.set_title(kind)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(self.n_heads))
        ax.set_yticks(range(self.n_layers))
        ax.figure.colorbar(image, ax=ax)

    # -- display -------------------------------------------------------------------------------

    def __repr__(self) -> str:
        lines = [
            f"HeadScores(batch={self.batch}, layers={self.n_layers}, heads={self.n_heads}, kinds=[{', '.join(self.kinds)}])"
        ]
        width = max(len(kind) for kind in self.kinds)
        for kind in self.kinds:
            best = self.top(kind, 3, largest=kind != "entropy")
            cells = "  ".join(f"L{layer}H{head} {_fmt(score, 3)}" for layer, head, score in best)
            lines.append(f"  {kind:<{width}}  {cells}")
        return "\n".join(lines)


def _optional(module: str, feature: str, package: str) -> Any:
    """Imports an optional dependency, or says which package `feature` needs."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{feature} needs {package}: pip install {package}") from None


def _mean_over_prompts(values: np.ndarray) -> np.ndarray:
    """nanmean over axis 0 without the empty-slice warning (all-NaN heads stay NaN)."""
    if values.shape[0] == 0:
        return np.full(values.shape[1:], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=0)


def _json_list(values: np.ndarray) -> list:
    """Nested lists of Python floats, NaN (and inf) as None, so json.dumps gives strict JSON."""
    return _finite_or_none(values.tolist())


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_finite_or_none(v) for v in x]
    return x if math.isfinite(x) else None


def _fmt(value: float, digits: int) -> str:
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"
