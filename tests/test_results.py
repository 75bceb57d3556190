"""HeadScores: means over prompts, rankings, exports (pandas, JSON), text and PNG output."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

import induct_fast as inf
from induct_fast import HeadScores

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


@pytest.fixture
def scores() -> HeadScores:
    # batch 2, layers 2, heads 3
    induction = np.array([[[0.1, 0.2, 0.9], [0.5, NAN, 0.3]], [[0.3, 0.4, 0.7], [0.5, NAN, NAN]]])
    prev = np.array([[[0.8, 0.1, 0.0], [0.2, 0.2, 0.2]], [[0.6, 0.1, 0.0], [0.2, 0.4, 0.2]]])
    entropy = np.array([[[1.0, 2.0, 0.5], [3.0, 1.5, 2.5]], [[1.0, 2.0, 0.5], [3.0, 1.5, 2.5]]])
    return HeadScores({"induction": induction, "previous_token": prev, "entropy": entropy})


def test_grid_is_the_mean_over_prompts_ignoring_missing_ones(scores):
    assert scores.kinds == ("induction", "previous_token", "entropy")
    assert (scores.batch, scores.n_layers, scores.n_heads) == (2, 2, 3)
    grid = scores["induction"]
    assert grid.shape == (2, 3) and grid.dtype == np.float64
    np.testing.assert_allclose(grid, [[0.2, 0.3, 0.8], [0.5, NAN, 0.3]])  # NaN only with no prompt
    assert scores.per_prompt["induction"].shape == (2, 2, 3)
    assert "induction" in scores and "bos" not in scores and len(scores) == 3 and list(scores) == list(scores.kinds)
    with pytest.raises(KeyError, match="'bos' not scored; available: induction, previous_token, entropy"):
        scores["bos"]


def test_top_is_best_first_with_nan_last(scores):
    assert scores.top("induction", 2) == [(0, 2, pytest.approx(0.8)), (1, 0, 0.5)]
    ranked = scores.top("induction", None)
    assert len(ranked) == 6 and (ranked[-1][0], ranked[-1][1]) == (1, 1) and math.isnan(ranked[-1][2])
    assert [(l, h) for l, h, _ in ranked[:5]] == [(0, 2), (1, 0), (0, 1), (1, 2), (0, 0)]  # ties: (layer, head) order
    assert scores.top("entropy", 1, largest=False) == [(0, 2, 0.5)]
    assert scores.top("induction", 0) == []
    assert all(isinstance(v, float) and isinstance(l, int) for l, _, v in ranked)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="k: expected"):
            scores.top("induction", bad)


def test_to_frame_has_a_row_per_head_and_a_column_per_kind(scores):
    import pandas as pd  # installed by make test: extras never skip there
    df = scores.to_frame()
    assert list(df.columns) == ["induction", "previous_token", "entropy"]
    assert df.index.names == ["layer", "head"] and len(df) == 6
    assert df.loc[(0, 2), "induction"] == pytest.approx(0.8)
    assert math.isnan(df.loc[(1, 1), "induction"])
    flat = df.reset_index()
    assert list(flat.columns[:2]) == ["layer", "head"]
    assert isinstance(df, pd.DataFrame)


def test_to_dict_is_strict_json_with_nan_as_null(scores):
    d = scores.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back["kinds"] == ["induction", "previous_token", "entropy"]
    assert back["shape"] == [2, 3] and back["batch"] == 2
    assert back["scores"]["induction"][1][1] is None
    assert back["scores"]["induction"][0][2] == pytest.approx(0.8)
    assert "per_prompt" not in back
    full = json.loads(json.dumps(scores.to_dict(per_prompt=True), allow_nan=False))
    assert np.asarray(full["per_prompt"]["previous_token"]).shape == (2, 2, 3)
    assert full["per_prompt"]["induction"][1][1][2] is None


def test_table_and_repr_are_readable(scores):
    table = scores.to_table()
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "head", "induction", "previous_token", "entropy"]
    assert len(lines) == 1 + 6
    assert lines[5].split() == ["1", "1", "nan", "0.300", "1.500"]
    assert len({len(line) for line in lines}) == 1  # aligned
    text = repr(scores)
    lines = text.splitlines()
    assert lines[0] == "HeadScores(batch=2, layers=2, heads=3, kinds=[induction, previous_token, entropy])"
    assert lines[1] == "  strongest heads per kind, mean over 2 prompts:"
    assert lines[2].split()[:3] == ["induction", "L0H2", "0.800"]
    assert lines[4].split()[:5] == ["entropy", "(lowest", "first)", "L0H2", "0.500"]  # says how it is sorted


def test_repr_leaves_nan_heads_out_and_says_when_a_kind_has_none():
    nan_kind = np.full((2, 2, 3), NAN)
    some = np.array([[[0.5, NAN, NAN], [NAN, NAN, NAN]]] * 2)
    lines = repr(HeadScores({"bos": nan_kind, "induction": some})).splitlines()
    assert lines[2].split(None, 1) == ["bos", "no eligible query in any prompt (all NaN)"]
    assert lines[3].split() == ["induction", "L0H0", "0.500"]  # the one head with a score; no "nan" heads
    assert "nan" not in "\n".join(lines[2:])


def test_repr_html_is_a_compact_heatmap_table(scores):
    html = scores._repr_html_()
    assert html.count("<table") == 3 and html.count("<tr><th>L") == 3 * 2  # a table per kind, a row per layer
    assert 'title="L0H2 0.8000"' in html  # every cell's score in its tooltip
    assert 'title="L1H1 nan" style="background:#ddd"' in html  # NaN: grey
    assert "entropy (nats; low = focused)" in html and "attention mass on targets" in html
    assert "mean over 2 prompts" in html
    big = HeadScores({kind: np.random.default_rng(0).random((1, 32, 32)) for kind in ("a", "b", "c", "d", "e", "entropy")})
    page = big._repr_html_()
    assert page.count("<td") == 6 * 32 * 32 and len(page) < 400_000  # no text in cells at this size


def test_plot_scales_units_and_nan_panels():
    import matplotlib

    matplotlib.use("Agg")
    rng = np.random.default_rng(0)
    per_prompt = {kind: rng.random((2, 3, 4)) for kind in ("previous_token", "induction", "self")}
    per_prompt["bos"] = np.full((2, 3, 4), NAN)
    per_prompt["entropy"] = 3 * rng.random((2, 3, 4))
    per_prompt["induction"][:, 1, 2] = NAN
    fig = HeadScores(per_prompt).plot()
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == set(per_prompt)
    bars = {ax.get_ylabel(): ax for ax in fig.axes if not ax.get_title() and ax.get_ylabel()}
    assert "entropy (nats; low = focused)" in bars and "attention mass on targets" in bars
    images = {title: ax.images[0] for title, ax in panels.items()}
    assert images["induction"].get_clim() == (0.0, 1.0) and images["bos"].get_clim() == (0.0, 1.0)
    assert images["entropy"].get_clim() == (0.0, pytest.approx(np.nanmax(HeadScores(per_prompt)["entropy"])))
    assert images["entropy"].cmap.name != images["induction"].cmap.name  # its own colour map
    assert "no eligible query\n(all NaN)" in [t.get_text() for t in panels["bos"].texts]
    assert "grey: NaN" in panels["induction"].get_xlabel() and "grey" not in panels["self"].get_xlabel()
    assert len(panels["self"].texts) == 12  # values in the cells of small grids
    assert fig.get_suptitle() == "3 layers x 4 heads, mean over 2 prompts"
    assert len(HeadScores(per_prompt).plot(values=False).axes[0].texts) == 0


def test_plot_grid_stays_readable_at_32_by_32_heads_and_6_kinds():
    rng = np.random.default_rng(0)
    kinds = ("previous_token", "duplicate_token", "induction", "bos", "self", "entropy")
    fig = HeadScores({kind: rng.random((1, 32, 32)) for kind in kinds}).plot()
    width, height = fig.get_size_inches() * 100
    assert width <= 2000 and height <= 1400, (width, height)  # 3 x 2 panels at dpi 100
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 6 and all(len(ax.texts) == 0 for ax in panels)  # no values at this size
    assert len(panels[0].get_xticks()) <= 16  # tick labels never collide
    one_row = HeadScores({kind: rng.random((1, 4, 8)) for kind in kinds}).plot(ncols=6)
    assert len({round(ax.get_position().y0, 3) for ax in one_row.axes if ax.get_title()}) == 1


def test_plot_writes_a_png_with_one_panel_per_kind(scores, tmp_path):
    import matplotlib  # noqa: F401  (installed by make test: extras never skip there)
    fig = scores.plot()
    assert len([ax for ax in fig.axes if ax.get_title()]) == 3
    path = tmp_path / "heads.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    buf = io.BytesIO()
    scores.plot("induction").savefig(buf, format="png")
    assert buf.getvalue()[:8] == PNG_MAGIC


def test_plot_into_given_axes(scores):
    import matplotlib  # noqa: F401  (installed by make test: extras never skip there)
    from matplotlib.figure import Figure

    fig = Figure()
    axes = fig.subplots(1, 2)
    assert scores.plot(["induction", "entropy"], ax=axes) is fig
    assert [axes[0].get_title(), axes[1].get_title()] == ["induction", "entropy"]
    single = Figure().subplots()
    assert scores.plot("previous_token", ax=single) is single.figure
    with pytest.raises(ValueError, match="ax: expected one Axes per kind"):
        scores.plot(ax=single)
    with pytest.raises(KeyError, match="'nope' not scored"):
        scores.plot("nope")


def test_plot_does_not_touch_pyplot(scores):
    import matplotlib  # noqa: F401  (installed by make test: extras never skip there)
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    scores.plot()
    assert plt.get_fignums() == before


@pytest.mark.parametrize(
    "per_prompt, message",
    [
        ({}, "non-empty mapping"),
        ({"induction": np.zeros((2, 3))}, r"per_prompt\['induction'\]: expected shape \(batch, layer, head\)"),
        ({"a": np.zeros((2, 3, 4)), "b": np.zeros((2, 3, 5))}, r"per_prompt\['b'\].*like 'a' \(2, 3, 4\), got shape \(2, 3, 5\)"),
    ],
)
def test_bad_construction(per_prompt, message):
    with pytest.raises(ValueError, match=message):
        HeadScores(per_prompt)


def test_from_head_scores_of_a_stack():
    rng = np.random.default_rng(0)
    patterns = rng.random((2, 3, 4, 6, 6))
    tokens = rng.integers(0, 3, size=(2, 6))
    result = HeadScores(inf.head_scores(patterns, tokens))
    assert result.per_prompt["induction"].shape == (2, 3, 4)
    assert result["previous_token"].shape == (3, 4)


def test_missing_optional_packages_are_named(scores, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pandas", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="HeadScores.to_frame needs pandas: pip install pandas"):
        scores.to_frame()
    with pytest.raises(ImportError, match="HeadScores.plot needs matplotlib"):
        scores.plot()
