"""``HeadScores``: the scores of every (layer, head) of a model, per kind, with ways to look at them.

Built by :func:`induct_fast.scan`; pandas and matplotlib are imported only by the methods that
need them (``to_frame``, ``plot``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from ._arrays import as_count


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
        batch, layers, heads = next(iter(self.per_prompt.values())).shape
        return batch, layers, heads

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

    def select(
        self,
        kind: str,
        *,
        count: Optional[int] = None,
        fraction: Optional[float] = None,
        threshold: Optional[float] = None,
        largest: bool = True,
    ) -> list[tuple[int, int]]:
        """The heads of ``kind`` to keep, by count, fraction or threshold (exactly one), best first.

        Parameters
        ----------
        kind : str
            A scored kind.
        count : int, optional
            The ``count`` best heads (>= 0).
        fraction : float, optional
            The best ``ceil(fraction * n_layers * n_heads)`` heads, fraction in [0, 1]: a fraction
            of all heads, rounded up, so any fraction > 0 keeps at least one head
            (RazorAttention's "top 1%" of a 32 x 32 model is 11 heads). A product within 1e-9 of
            an integer counts as that integer (0.14 of 100 heads is 14 heads, not 15).
        threshold : float, optional
            Every head whose score is ``>= threshold`` (``<=`` with ``largest=False``).
        largest : bool
            Best means largest (``False``: smallest, e.g. for ``entropy``).

        Returns
        -------
        list of (int, int)
            ``(layer, head)`` of the ``[layer, head]`` grid, best first, ties in (layer, head)
            order. NaN heads (no eligible query) are never selected, so a count or fraction may
            return fewer heads. Selections are plain lists: ``sorted(set(a) | set(b))`` is the
            union of two (in (layer, head) order), e.g. of two kinds.

        Raises
        ------
        ValueError
            Not exactly one of ``count``, ``fraction``, ``threshold``; a count < 0, a fraction
            outside [0, 1], a NaN fraction or threshold.
        TypeError
            A count that is not an integer, a fraction or threshold that is not a real number.
        KeyError
            ``kind`` not scored.

        Examples
        --------
        >>> s = HeadScores({"induction": np.array([[[0.1, 0.9, np.nan], [0.5, 0.9, 0.2]]])})
        >>> s.select("induction", count=2)
        [(0, 1), (1, 1)]
        >>> s.select("induction", fraction=0.5)          # ceil(0.5 * 6) = 3 heads
        [(0, 1), (1, 1), (1, 0)]
        >>> s.select("induction", threshold=0.2)
        [(0, 1), (1, 1), (1, 0), (1, 2)]
        """
        given = {name: value for name, value in (("count", count), ("fraction", fraction), ("threshold", threshold)) if value is not None}
        if len(given) != 1:
            got = ", ".join(f"{name}={value!r}" for name, value in given.items()) or "none"
            raise ValueError(f"count, fraction, threshold: expected exactly one of them, got {got}")
        ranked = [(layer, head, score) for layer, head, score in self.top(kind, None, largest=largest) if not math.isnan(score)]
        if count is not None:
            keep = as_count(count, "count", 0)
        elif fraction is not None:
            share = _real(fraction, "fraction")
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"fraction: expected a number in [0, 1], got {fraction!r}")
            keep = math.ceil(share * self.n_layers * self.n_heads - 1e-9)
        else:
            limit = _real(threshold, "threshold")
            keep = sum(1 for _, _, score in ranked if (score >= limit if largest else score <= limit))
        return [(layer, head) for layer, head, _ in ranked[:keep]]

    def group_kv(self, n_kv_heads: int, reduce: str = "max") -> HeadScores:
        """The scores per key/value group of a grouped-query model: one "head" per kv head.

        Query head ``h`` shares kv head ``h // r`` (``r = n_heads // n_kv_heads``, the Hugging
        Face / Llama convention), so group ``g`` is query heads ``g*r .. g*r + r - 1``. KV-cache
        methods keep or drop a kv head for all of its query heads; RazorAttention takes the
        largest score in each group.

        Parameters
        ----------
        n_kv_heads : int
            Key/value heads per layer (the config's ``num_key_value_heads``); divides ``n_heads``.
        reduce : {"max", "mean"}
            The group's score in each prompt: its best head's, or the mean of its heads'. NaN
            heads (no eligible query) are ignored; a group is NaN only where all its heads are.

        Returns
        -------
        HeadScores
            ``per_prompt`` of shape ``(batch, layer, n_kv_heads)``, each prompt's scores reduced
            over each group (every kind alike: ``"max"`` of ``entropy`` is its least focused
            head); the grid is then their mean over prompts as for any ``HeadScores``, i.e. with
            ``"max"`` the mean over prompts of the best head in each prompt (with one prompt,
            simply the best head's score). ``meta`` is carried over, plus ``meta["group_kv"] =
            {"n_kv_heads": ..., "heads_per_group": r, "reduce": ...}``.

        Raises
        ------
        ValueError
            ``n_kv_heads`` < 1, larger than ``n_heads`` or not a divisor of it; ``reduce``
            unknown; scores grouped already.
        TypeError
            ``n_kv_heads`` not an integer, ``reduce`` not a str.

        Examples
        --------
        >>> s = HeadScores({"induction": np.array([[[0.1, 0.9, np.nan, np.nan]], [[0.3, 0.5, np.nan, 0.4]]])})
        >>> g = s.group_kv(2)                      # groups (h0, h1) and (h2, h3)
        >>> g.per_prompt["induction"]
        array([[[0.9, nan]],
        <BLANKLINE>
               [[0.5, 0.4]]])
        >>> g["induction"]                         # mean over prompts, as always
        array([[0.7, 0.4]])
        >>> s.group_kv(2, reduce="mean")["induction"]
        array([[0.45, 0.4 ]])
        """
        n_kv_heads = as_count(n_kv_heads, "n_kv_heads", 1)
        if not isinstance(reduce, str):
            raise TypeError(f"reduce: expected \"max\" or \"mean\", got {reduce!r}")
        if reduce not in _GROUP_REDUCE:
            raise ValueError(f"reduce: expected \"max\" or \"mean\", got {reduce!r}")
        if n_kv_heads > self.n_heads or self.n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads: expected a divisor of n_heads={self.n_heads}, got {n_kv_heads}")
        if "group_kv" in self.meta:
            raise ValueError(f"n_kv_heads: these scores are grouped already ({self.meta['group_kv']}); group the ungrouped ones")
        size = self.n_heads // n_kv_heads
        grouped = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN groups stay NaN
            for kind, values in self.per_prompt.items():
                groups = values.reshape(self.batch, self.n_layers, n_kv_heads, size)
                grouped[kind] = _GROUP_REDUCE[reduce](groups, axis=-1)
        meta = {**self.meta, "group_kv": {"n_kv_heads": n_kv_heads, "heads_per_group": size, "reduce": reduce}}
        return HeadScores(grouped, meta)

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

    def plot(
        self,
        kind: Union[str, Sequence[str], None] = None,
        ax: Any = None,
        *,
        values: Optional[bool] = None,
        ncols: Optional[int] = None,
        title: Optional[str] = None,
    ) -> Any:
        """Heatmaps of the ``[layer, head]`` grids, one panel per kind, each with its own colour
        scale and unit.

        Parameters
        ----------
        kind : str or sequence of str, optional
            The kinds to draw (default: all).
        ax : matplotlib Axes or sequence of Axes, optional
            Where to draw, one Axes per kind. Without it a new ``matplotlib.figure.Figure`` is made
            (not registered with pyplot: nothing global changes, no backend is needed to save it;
            Jupyter displays it when returned).
        values : bool, optional
            Write each score in its cell (default: when a panel has at most 16 heads and 16
            layers).
        ncols : int, optional
            Panels per row (default: a near-square grid of panels, at most 4 per row, 3 for
            grids wider than 16 heads).
        title : str, optional
            A title over the figure (default: the shape and how many prompts were averaged).

        Returns
        -------
        matplotlib.figure.Figure
            ``fig.savefig("heads.png", dpi=150)`` writes it.

        Notes
        -----
        Attention-mass kinds (``previous_token``, ``induction``, ``bos``, ``offset_<d>``, ...)
        share a fixed 0-1 scale (viridis, yellow = strong), so panels compare. ``entropy`` is a
        different quantity, in nats, on its own scale from 0 to its largest value and its own
        colour map (magma reversed: focused, low-entropy heads are bright like strong heads in
        the other panels; the hue tells the panels apart). NaN cells (no eligible query) are light grey with a
        note under the panel; a panel that is NaN everywhere says so in its middle.
        """
        kinds = self._plot_kinds(kind)
        axes = self._plot_axes(kinds, ax, ncols)
        show = values if values is not None else (self.n_heads <= 16 and self.n_layers <= 16)
        for panel, name in zip(axes, kinds):
            scale = _scale(name, self.scores[name], self.meta)
            _heatmap(panel, self.scores[name], title=name, show_values=show, **scale)
        figure = axes[0].figure
        if ax is None:
            prompts = f"mean over {self.batch} prompt{'s' if self.batch != 1 else ''}"
            figure.suptitle(title if title is not None else f"{self.n_layers} layers x {self.n_heads} heads, {prompts}")
        return figure

    def _plot_kinds(self, kind: Union[str, Sequence[str], None]) -> list[str]:
        kinds = list(self.kinds) if kind is None else [kind] if isinstance(kind, str) else list(kind)
        for name in kinds:
            self[name]  # KeyError naming the available kinds
        if not kinds:
            raise ValueError("kind: expected at least one kind to plot")
        return kinds

    def _plot_axes(self, kinds: list[str], ax: Any, ncols: Optional[int]) -> list[Any]:
        if ax is None:
            Figure = _optional("matplotlib.figure", "HeadScores.plot", "matplotlib").Figure
            if ncols is None:
                ncols = min(3 if self.n_heads > 16 else 4, math.ceil(math.sqrt(len(kinds))))
            elif isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
                raise ValueError(f"ncols: expected a positive integer, got {ncols!r}")
            ncols = min(ncols, len(kinds))
            nrows = math.ceil(len(kinds) / ncols)
            # Cells of 0.32 in up to 16 x 16 heads, then panels of ~4.5 in (cells of at least 0.07 in),
            # plus room for labels and the colour bar.
            largest = max(self.n_heads, self.n_layers)
            cell = 0.32 if largest <= 16 else max(0.07, 4.5 / largest)
            width = max(2.4, cell * self.n_heads) + 1.6
            height = max(1.0, cell * self.n_layers) + 1.3
            fig = Figure(figsize=(width * ncols, height * nrows + 0.4), layout="constrained")
            grid = fig.subplots(nrows, ncols, squeeze=False)
            for extra in grid.ravel()[len(kinds):]:
                extra.set_axis_off()
            return list(grid.ravel()[: len(kinds)])
        axes = list(ax) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
        axes = list(np.ravel(np.asarray(axes, dtype=object)))
        if len(axes) != len(kinds):
            raise ValueError(f"ax: expected one Axes per kind ({len(kinds)}: {', '.join(kinds)}), got {len(axes)}")
        return axes

    # -- display -------------------------------------------------------------------------------

    def __repr__(self) -> str:
        prompts = f"mean over {self.batch} prompt{'s' if self.batch != 1 else ''}"
        lines = [
            f"HeadScores(batch={self.batch}, layers={self.n_layers}, heads={self.n_heads}, kinds=[{', '.join(self.kinds)}])",
            f"  strongest heads per kind, {prompts}:",
        ]
        labels = {kind: kind + (" (lowest first)" if kind == "entropy" else "") for kind in self.kinds}
        width = max(len(label) for label in labels.values())
        for kind in self.kinds:
            lines.append(f"    {labels[kind]:<{width}}  {self._summary(kind, 3)}")
        return "\n".join(lines)

    def _summary(self, kind: str, k: int) -> str:
        """The k strongest heads of `kind` (lowest entropy), skipping NaN; or why there are none."""
        best = [(layer, head, score) for layer, head, score in self.top(kind, k, largest=kind != "entropy") if not math.isnan(score)]
        if not best:
            return "no eligible query in any prompt (all NaN)"
        return "  ".join(f"L{layer}H{head} {_fmt(score, 3)}" for layer, head, score in best)

    def _repr_html_(self) -> str:
        """A compact heatmap table per kind for notebooks (no matplotlib needed): a row per layer,
        a cell per head coloured on the kind's scale, the score in the cell's tooltip."""
        import html

        prompts = f"mean over {self.batch} prompt{'s' if self.batch != 1 else ''}"
        small = self.n_heads <= 12
        size = "1.9em" if small else "0.8em" if self.n_heads <= 32 else "0.45em"
        style = (
            "<style>.ifhs{border-collapse:collapse;margin:0 1.2em 0.8em 0;font-size:11px;display:inline-table}"
            f".ifhs td{{width:{size};height:{size};padding:0;text-align:center;border:1px solid #fff;line-height:1}}"
            ".ifhs th{font-weight:normal;color:#555;padding:0 3px;font-size:10px}"
            ".ifhs caption{text-align:left;font-weight:bold;white-space:nowrap}</style>"
        )
        parts = [
            style,
            f"<div><b>HeadScores</b>: {self.n_layers} layers &times; {self.n_heads} heads, {prompts} "
            f"(hover a cell for its score; grey: NaN)</div><div>",
        ]
        for kind in self.kinds:
            grid = self.scores[kind]
            scale = _scale(kind, grid, self.meta)
            lo, hi = scale["vmin"], scale["vmax"]
            rows = []
            for layer in range(self.n_layers):
                cells = []
                for head in range(self.n_heads):
                    value = float(grid[layer, head])
                    if math.isnan(value):
                        cells.append(f'<td title="L{layer}H{head} nan" style="background:#ddd"></td>')
                        continue
                    t = 0.0 if hi <= lo else min(1.0, max(0.0, (value - lo) / (hi - lo)))
                    red, green, blue = _html_ramp(t, kind == "entropy")
                    colour = f"#{red:02x}{green:02x}{blue:02x}"
                    if small:  # the score in the cell, in ink that reads on its colour
                        ink = "#000" if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else "#fff"
                        cell_text, ink_style = f"{value:.2f}", f";color:{ink}"
                    else:
                        cell_text, ink_style = "", ""
                    cells.append(f'<td title="L{layer}H{head} {value:.4f}" style="background:{colour}{ink_style}">{cell_text}</td>')
                rows.append(f"<tr><th>L{layer}</th>{''.join(cells)}</tr>")
            heads = "".join(f"<th>{h}</th>" if small or h % 4 == 0 else "<th></th>" for h in range(self.n_heads))
            unit = html.escape(scale["label"])
            caption = f"{html.escape(kind)} <span style='font-weight:normal;color:#555'>({unit}; {lo:.2g} to {hi:.2g})</span>"
            parts.append(f'<table class="ifhs"><caption>{caption}</caption><tr><th></th>{heads}</tr>{"".join(rows)}</table>')
        parts.append("</div><pre style='font-size:11px'>" + html.escape(self.__repr__()) + "</pre>")
        return "".join(parts)


# -- drawing helpers (shared with the demo's figure) ------------------------------------------------

# Kinds that are not attention mass on a target set, and their scale.
_ENTROPY_LABEL = "entropy (nats; low = focused)"


def _scale(kind: str, grid: np.ndarray, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Colour scale of one kind: entropy on its own range, everything else attention mass on 0-1."""
    if kind == "entropy":
        finite = grid[np.isfinite(grid)]
        top = float(finite.max()) if finite.size else 1.0
        return {"vmin": 0.0, "vmax": top if top > 0 else 1.0, "cmap": "magma_r", "label": _ENTROPY_LABEL}
    if meta.get("measure") == "top1":
        return {"vmin": 0.0, "vmax": 1.0, "cmap": "viridis", "label": "fraction of queries whose top key is a target"}
    return {"vmin": 0.0, "vmax": 1.0, "cmap": "viridis", "label": "attention mass on targets"}


def _heatmap(
    ax: Any,
    grid: np.ndarray,
    *,
    title: str,
    vmin: float,
    vmax: float,
    cmap: str,
    label: str,
    show_values: bool,
    xlabel: str = "head",
    ylabel: str = "layer",
) -> None:
    """One labelled heatmap of a [rows, cols] grid with its colour bar; NaN cells light grey."""
    import matplotlib

    grid = np.asarray(grid, dtype=np.float64)
    colours = matplotlib.colormaps[cmap].with_extremes(bad="#dcdcdc")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=colours, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    rows, cols = grid.shape
    ax.set_xticks(_ticks(cols))
    ax.set_yticks(_ticks(rows))
    ax.tick_params(length=2, labelsize=8 if max(rows, cols) > 16 else 9)
    bar = ax.figure.colorbar(image, ax=ax, fraction=0.08, pad=0.02)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    missing = np.isnan(grid)
    if missing.all():
        ax.text(0.5, 0.5, "no eligible query\n(all NaN)", transform=ax.transAxes, ha="center", va="center", fontsize=10, color="#444")
    elif missing.any():
        ax.set_xlabel(f"{xlabel}   (grey: NaN, no eligible query)")
    if show_values and not missing.all():
        size = 8 if max(rows, cols) <= 8 else 6
        for (row, col), value in np.ndenumerate(grid):
            if math.isnan(value):
                continue
            red, green, blue, _ = image.cmap(image.norm(value))
            ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.55 else "white"
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=size, color=ink)


def _ticks(count: int) -> list[int]:
    """Tick positions: every index up to 16, else every 2nd, 4th, ... so labels never collide."""
    step = 1
    while count / step > 16:
        step *= 2
    return list(range(0, count, step))


def _html_ramp(t: float, entropy: bool) -> tuple[int, int, int]:
    """A colour for t in [0, 1]: white to dark blue for attention mass, dark to light orange for
    entropy (low entropy, the focused end, dark), with no matplotlib."""
    if entropy:
        start, end = (90, 20, 60), (253, 230, 200)
    else:
        start, end = (247, 251, 255), (8, 48, 107)
    return tuple(int(round(a + (b - a) * t)) for a, b in zip(start, end))  # type: ignore[return-value]


def _optional(module: str, feature: str, package: str) -> Any:
    """Imports an optional dependency, or says which package `feature` needs."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{feature} needs {package}: pip install {package}") from None


# How HeadScores.group_kv reduces each group of query heads (NaN heads ignored).
_GROUP_REDUCE: dict[str, Callable[..., np.ndarray]] = {"max": np.nanmax, "mean": np.nanmean}


def _real(value: Any, name: str) -> float:
    """A real number that is not NaN (infinities allowed), with errors naming `name`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name}: expected a number, got NaN")
    return float(value)


def _mean_over_prompts(values: np.ndarray) -> np.ndarray:
    """nanmean over axis 0 without the empty-slice warning (all-NaN heads stay NaN)."""
    if values.shape[0] == 0:
        return np.full(values.shape[1:], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean: np.ndarray = np.nanmean(values, axis=0)
    return mean


def _json_list(values: np.ndarray) -> list[Any]:
    """Nested lists of Python floats, NaN (and inf) as None, so json.dumps gives strict JSON."""
    nested: list[Any] = _finite_or_none(values.tolist())
    return nested


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_finite_or_none(v) for v in x]
    return x if math.isfinite(x) else None


def _fmt(value: float, digits: int) -> str:
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"
