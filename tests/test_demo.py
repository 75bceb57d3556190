"""The hand-built demo model: every detector finds its heads, its circuit stands out from chance in
the weights, its loss drops on the repeat, and ``induct-fast demo`` reports all of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import induct_fast as inf
from induct_fast import demo

PERIOD = 18


@pytest.fixture(scope="module")
def model():
    return demo.build_demo_model(seed=0)


@pytest.fixture(scope="module")
def run(model):
    tokens = inf.repeated_tokens(6, PERIOD, model.vocab_size, seed=11)
    logits, patterns = model.run(tokens)
    return tokens, logits, patterns


def _argmax(scores):
    return tuple(int(i) for i in np.unravel_index(np.nanargmax(scores), scores.shape))


def test_shapes_and_patterns_are_causal_softmax(model, run):
    tokens, logits, patterns = run
    n = tokens.shape[1]
    assert logits.shape == (6, n, model.vocab_size)
    assert patterns.shape == (6, 2, 4, n, n)
    np.testing.assert_allclose(patterns.sum(axis=-1), 1.0, atol=1e-12)
    assert np.all(np.triu(patterns, k=1) == 0)


@pytest.mark.parametrize("kind", demo.KINDS)
def test_head_scores_find_each_role(model, run, kind):
    tokens, _, patterns = run
    scores = inf.head_scores(patterns, tokens, kinds=(kind,))[kind].mean(axis=0)
    role = model.roles[kind]
    assert _argmax(scores) == role
    assert scores[role] > 0.99
    others = np.delete(scores.ravel(), np.ravel_multi_index(role, scores.shape))
    assert others.max() < 0.2


@pytest.mark.parametrize("kind", demo.KINDS)
@pytest.mark.parametrize("measure", ["mul", "abs"])
def test_transformer_lens_detectors_find_each_role(model, run, kind, measure):
    tokens, _, patterns = run
    scores = inf.detection_scores(patterns, kind, tokens=tokens, measure=measure).mean(axis=0)
    assert _argmax(scores) == model.roles[kind]


def test_offset_kinds_agree_on_the_repeated_half(model, run):
    """On a block of P tokens repeated twice, per query in the repeated half, induction is
    offset P-1 and duplicate-token offset P (the offset kinds also count earlier queries)."""
    tokens, _, patterns = run
    kinds = ("induction", "duplicate_token")
    scores = inf.head_scores(patterns, tokens, kinds=kinds, offsets=(PERIOD - 1, PERIOD), per_query=True)
    late = slice(PERIOD + 1, None)
    np.testing.assert_allclose(scores["induction"][..., late], scores[f"offset_{PERIOD - 1}"][..., late], atol=1e-12)
    np.testing.assert_allclose(scores["duplicate_token"][..., late], scores[f"offset_{PERIOD}"][..., late], atol=1e-12)


def test_k_composition_far_above_chance(model):
    k = inf.composition_scores(model.W_Q, model.W_K, model.W_V, model.W_O, mode="K")
    base = inf.composition_baseline(model.W_Q.shape[2], model.d_head, n=300, seed=1)
    (l0, h0), (l1, h1) = model.roles["previous_token"], model.roles["induction"]
    circuit = k[l0, h0, l1, h1]
    np.testing.assert_allclose(circuit, 1 / np.sqrt(model.vocab_size), rtol=1e-3)  # rank-vocab identity map
    assert circuit > 4 * base.mean and base.zscore(circuit) > 50
    assert _argmax(k[0, :, 1, :]) == (h0, h1)
    # Q- and V-composition of the circuit are not what it uses: at chance or below.
    for mode in "QV":
        other = inf.composition_scores(model.W_Q, model.W_K, model.W_V, model.W_O, mode=mode)
        assert other[l0, h0, l1, h1] < base.mean + 5 * base.std


def test_induction_head_copies_and_previous_token_head_writes_elsewhere(model):
    copying = inf.copying_scores(model.W_E, model.W_V, model.W_O, model.W_U)
    assert copying[model.roles["induction"]] > 0.99
    assert abs(copying[model.roles["previous_token"]]) < 0.5
    eig = inf.ov_eigenvalues(model.W_E, model.W_V, model.W_O, model.W_U)[model.roles["induction"]]
    np.testing.assert_allclose(eig[: model.vocab_size].real, 10.0, rtol=0.05)  # W_U's copy logit, per token


def test_positional_qk_finds_the_previous_token_head(model):
    scores = inf.positional_qk_scores(model.W_pos, model.W_Q, model.W_K)
    assert _argmax(scores) == model.roles["previous_token"] and scores[model.roles["previous_token"]] > 0.99


def test_loss_drops_on_the_repeat(run):
    tokens, logits, _ = run
    loss = inf.token_losses(logits, tokens)
    assert loss.shape == (6, 2 * PERIOD)
    first, second = loss[:, :PERIOD].mean(), loss[:, PERIOD + 1 :].mean()
    assert first > np.log(20) * 0.8 and second < 0.05
    assert first - second > 2.0


def test_bad_tokens_and_sizes(model):
    with pytest.raises(ValueError, match="tokens"):
        model.run(np.zeros((1, model.n_ctx + 1), dtype=np.int64))
    with pytest.raises(ValueError, match="tokens"):
        model.run(np.full((1, 4), model.vocab_size))
    with pytest.raises(ValueError, match="d_head"):
        demo.build_demo_model(d_head=8)


def test_report_is_json_ready_and_consistent():
    report = demo.demo_report(seed=3)
    json.dumps(report, allow_nan=False)
    assert report["previous_token_head"] == [0, 1] and report["induction_head"] == [1, 2]
    assert report["icl_loss_drop"] == pytest.approx(report["loss_first_half"] - report["loss_second_half"])
    assert "K-composition L0H1 -> L1H2" in demo.format_report(report)


def _cli(*args, **kwargs):
    """`induct-fast demo ARGS` in a subprocess, importing the same induct_fast as this test."""
    path = [str(Path(inf.__file__).parents[1]), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    command = [sys.executable, "-m", "induct_fast.cli", "demo", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, **kwargs)


def test_cli_demo_json():
    start = time.perf_counter()
    done = _cli("--json", timeout=120)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    keys = ("previous_token_head", "induction_head", "k_composition", "k_composition_baseline", "copying_scores", "icl_loss_drop")
    assert set(keys) <= set(report)
    assert report["previous_token_head"] == [0, 1]
    assert report["induction_head"] == [1, 2]
    assert report["k_composition"] > 4 * report["k_composition_baseline"]
    assert np.array(report["copying_scores"]).shape == (2, 4)
    assert report["icl_loss_drop"] > 2.0
    assert elapsed < 10  # < 2 s on an idle machine; generous for shared CI


def test_cli_demo_text_and_plot(tmp_path):
    import matplotlib  # noqa: F401  (installed by make test: extras never skip there)
    path = tmp_path / "demo.png"
    done = _cli("--plot", str(path), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "previous_token" in done.stdout and "K-composition" in done.stdout and "in-context drop" in done.stdout
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ImportError, match="matplotlib"):
        demo.plot_report(demo.demo_report(), str(tmp_path / "x.png"))


def test_block_losses_cover_the_same_positions_the_first_time_and_on_the_repeat():
    losses = np.arange(2 * 36, dtype=float).reshape(2, 36)  # period 18: [batch, 2 * period]
    first, repeat = demo.block_losses(losses, 18)
    assert first == losses[:, 1:18].mean() and repeat == losses[:, 19:].mean()
    with pytest.raises(ValueError, match=r"losses: expected shape \(batch, 36\) for period 18"):
        demo.block_losses(losses[:, :-1], 18)


def test_report_plot_has_a_title_units_and_readable_values(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    made = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (made.append(self), original(self, *a, **k)))
    demo.plot_report(demo.demo_report(), str(tmp_path / "demo.png"))
    (fig,) = made
    assert fig.get_suptitle().startswith("induct-fast demo: hand-built 2-layer")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels][-1] == "next-token loss"
    for ax in panels[:-1]:
        colours = {t.get_color() for t in ax.texts}
        assert ax.texts and colours <= {"black", "white"}  # no grey text on coloured cells
    bars = [ax.get_ylabel() for ax in fig.axes if not ax.get_title()]
    assert "copying score (-1 to 1)" in bars and any(b.startswith("K-composition (chance") for b in bars)
    for ax in panels[:-1]:  # colour bars as tall as their maps
        bar = next(b for b in fig.axes if not b.get_title() and abs(b.get_position().y0 - ax.get_position().y0) < 0.02)
        assert abs(bar.get_position().height - ax.get_position().height) < 0.02


def test_queries_and_keys_give_the_patterns_scores(model):
    tokens = inf.repeated_tokens(4, 18, model.vocab_size, seed=3)
    _, patterns = model.run(tokens)
    q, k = model.queries_and_keys(tokens)
    assert q.shape == k.shape == (4, model.n_layers, tokens.shape[1], model.n_heads, model.d_head)
    np.testing.assert_allclose(inf.attention_patterns(q[:, 1], k[:, 1]), patterns[:, 1], atol=1e-12)
    from_qk, from_patterns = inf.scan((q, k), tokens), inf.scan(patterns, tokens)
    for kind in from_patterns.kinds:
        np.testing.assert_allclose(from_qk[kind], from_patterns[kind], atol=1e-9)
