"""A two-layer attention-only transformer with an induction circuit, built by hand.

No training and no download: the weights are written down from the mechanism of DESIGN.md
section 1. The residual stream (d_model = 512) is split into one-hot subspaces

=========  ===================  =====================================================
subspace   written by           holds, at position i
=========  ===================  =====================================================
``tok``    W_E                  the token t[i]
``pos``    W_pos                the position i
``prev``   L0 previous-token    t[i-1], "the token before me"
``dup``    L0 duplicate-token   t[i] again, if it occurred before (read by nothing)
``out``    L1 induction         the token it predicts comes next; W_U reads only this
=========  ===================  =====================================================

and the rest is free space that the distractor heads (N(0, 0.05^2) weights: L0H0, L0H2, L1H0,
L1H1, L1H3) write noise into. The circuit:

- L0H1, previous-token head: QK over positions only (query i matches key i-1 with logit 12);
  OV copies the attended token from ``tok`` into ``prev``.
- L0H3, duplicate-token head: query t[i] matches key t[j] (logit 12), minus a positional
  penalty on j == i; OV writes into ``dup``.
- L1H2, induction head: query reads t[i] from ``tok``, key reads t[j-1] from ``prev``: it
  attends to the token after an earlier copy of t[i] (K-composition with L0H1); OV copies that
  token into ``out``, and W_U turns ``out`` into logits, so on the repeated half of
  ``A B ... A`` the model predicts B.

``python -m induct_fast demo`` (or ``induct-fast demo``) runs it on repeated random tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .attention import attention_patterns

PREVIOUS_TOKEN_HEAD = (0, 1)
DUPLICATE_TOKEN_HEAD = (0, 3)
INDUCTION_HEAD = (1, 2)

KINDS = ("previous_token", "duplicate_token", "induction")

_LOGIT = 12.0  # attention logit of a match, after the 1/sqrt(d_head) scale
_UNEMBED = 10.0  # logit of the copied token
_DISTRACTOR_STD = 0.05  # std of the distractor heads' weights
_UNEMBED_NOISE = 0.02  # std of W_U's small random part (keeps every head's OV spectrum non-trivial)


@dataclass(frozen=True)
class DemoModel:
    """Weights in TransformerLens layout, and which head plays which role.

    Attributes
    ----------
    W_E : ndarray, shape (vocab, d_model)
    W_pos : ndarray, shape (n_ctx, d_model)
    W_Q, W_K, W_V : ndarray, shape (n_layers, n_heads, d_model, d_head)
    W_O : ndarray, shape (n_layers, n_heads, d_head, d_model)
    W_U : ndarray, shape (d_model, vocab)
    roles : dict of str to (layer, head)
        ``previous_token``, ``duplicate_token`` and ``induction``; every other head is a
        distractor.
    """

    W_E: np.ndarray
    W_pos: np.ndarray
    W_Q: np.ndarray
    W_K: np.ndarray
    W_V: np.ndarray
    W_O: np.ndarray
    W_U: np.ndarray
    roles: Dict[str, Tuple[int, int]] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.W_Q.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.W_Q.shape[1])

    @property
    def d_head(self) -> int:
        return int(self.W_Q.shape[3])

    @property
    def vocab_size(self) -> int:
        return int(self.W_E.shape[0])

    @property
    def n_ctx(self) -> int:
        return int(self.W_pos.shape[0])

    def run(self, tokens: Any) -> Tuple[np.ndarray, np.ndarray]:
        """Forward pass.

        Parameters
        ----------
        tokens : array_like of int, shape (batch, n), n <= n_ctx

        Returns
        -------
        logits : ndarray, shape (batch, n, vocab)
        patterns : ndarray, shape (batch, n_layers, n_heads, n, n)
            Attention patterns, query rows and key columns.
        """
        logits, patterns, _, _ = self._forward(tokens)
        return logits, patterns

    def queries_and_keys(self, tokens: Any) -> Tuple[np.ndarray, np.ndarray]:
        """Each layer's queries and keys on ``tokens``, as its attention uses them.

        Returns
        -------
        q, k : ndarray, shape (batch, n_layers, n, n_heads, d_head)
            The layout ``scan((q, k))`` reads (per layer, TransformerLens's ``hook_q``/``hook_k``);
            ``scores_from_qk(q[:, l], k[:, l], tokens, scale=1 / sqrt(d_head))`` gives layer l's
            scores without its n x n patterns (1 / sqrt(d_head) is also the default scale).
        """
        _, _, q, k = self._forward(tokens)
        return q, k

    def _forward(self, tokens: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """logits, patterns [batch, layer, head, n, n], q and k [batch, layer, n, head, d_head]."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= self.n_ctx:
            raise ValueError(f"tokens: expected shape (batch, n) with n <= {self.n_ctx}, got {tokens.shape}")
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ValueError(f"tokens: expected ids in 0..{self.vocab_size - 1}, got {tokens.min()}..{tokens.max()}")
        resid = self.W_E[tokens] + self.W_pos[: tokens.shape[1]]
        patterns, queries, keys = [], [], []
        for layer in range(self.n_layers):
            q = np.einsum("bnd,hde->bnhe", resid, self.W_Q[layer])
            k = np.einsum("bnd,hde->bnhe", resid, self.W_K[layer])
            v = np.einsum("bnd,hde->bnhe", resid, self.W_V[layer])
            pattern = attention_patterns(q, k, scale=1.0 / math.sqrt(self.d_head))
            z = np.einsum("bhij,bjhe->bihe", pattern, v)
            resid = resid + np.einsum("bihe,hed->bid", z, self.W_O[layer])
            patterns.append(pattern)
            queries.append(q)
            keys.append(k)
        logits: np.ndarray = resid @ self.W_U
        return logits, np.stack(patterns, axis=1), np.stack(queries, axis=1), np.stack(keys, axis=1)


# --------------------------------------------------------------------------------------------
# Building the weights
# --------------------------------------------------------------------------------------------


class _Layout:
    """Offsets of the residual subspaces: tok, pos, prev, dup, out (each one-hot), then free."""

    def __init__(self, vocab: int, n_ctx: int):
        self.tok = 0
        self.pos = vocab
        self.prev = vocab + n_ctx
        self.dup = self.prev + vocab
        self.out = self.dup + vocab
        self.used = self.out + vocab


# W_Q, W_K, W_V [d_model, d_head] and W_O [d_head, d_model] of one head.
_Head = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _previous_token_head(L: _Layout, vocab: int, n_ctx: int, d: int, d_head: int) -> _Head:
    """QK: query i -> slot i, key j -> slot j+1, so only key i-1 matches; OV: tok -> prev."""
    W_Q, W_K, W_V, W_O = _empty_head(d, d_head)
    strength = _LOGIT * math.sqrt(d_head)
    i = np.arange(n_ctx - 1)
    W_Q[L.pos + i + 1, i + 1] = 1.0
    W_K[L.pos + i, i + 1] = strength
    _copy(W_V, W_O, L.tok, L.prev, vocab)
    return W_Q, W_K, W_V, W_O


def _duplicate_token_head(L: _Layout, vocab: int, n_ctx: int, d: int, d_head: int) -> _Head:
    """QK: same token +logit, same position -2 logit (no self-match); OV: tok -> dup."""
    W_Q, W_K, W_V, W_O = _empty_head(d, d_head)
    strength = _LOGIT * math.sqrt(d_head)
    v, p = np.arange(vocab), np.arange(n_ctx)
    W_Q[L.tok + v, v] = 1.0
    W_K[L.tok + v, v] = strength
    W_Q[L.pos + p, vocab + p] = 1.0
    W_K[L.pos + p, vocab + p] = -2.0 * strength
    _copy(W_V, W_O, L.tok, L.dup, vocab)
    return W_Q, W_K, W_V, W_O


def _induction_head(L: _Layout, vocab: int, d: int, d_head: int) -> _Head:
    """QK: query reads t[i] from tok, key reads t[j-1] from prev (K-composition); OV: tok -> out."""
    W_Q, W_K, W_V, W_O = _empty_head(d, d_head)
    v = np.arange(vocab)
    W_Q[L.tok + v, v] = _LOGIT * math.sqrt(d_head)
    W_K[L.prev + v, v] = 1.0
    _copy(W_V, W_O, L.tok, L.out, vocab)
    return W_Q, W_K, W_V, W_O


def _empty_head(d: int, d_head: int) -> _Head:
    return np.zeros((d, d_head)), np.zeros((d, d_head)), np.zeros((d, d_head)), np.zeros((d_head, d))


def _copy(W_V: np.ndarray, W_O: np.ndarray, src: int, dst: int, vocab: int) -> None:
    """OV = identity from subspace `src` to subspace `dst` (through head slots 0..vocab-1)."""
    v = np.arange(vocab)
    W_V[src + v, v] = 1.0
    W_O[v, dst + v] = 1.0


def build_demo_model(
    seed: int = 0, *, vocab_size: int = 24, n_ctx: int = 40, d_model: int = 512, d_head: int = 64, n_heads: int = 4
) -> DemoModel:
    """The hand-built two-layer induction model (see the module docstring).

    Parameters
    ----------
    seed : int
        Seed of the distractor heads' random weights and of W_U's small noise.
    vocab_size, n_ctx, d_model, d_head, n_heads : int
        Sizes; need d_head >= vocab_size + n_ctx, d_model >= 4 vocab_size + n_ctx, n_heads >= 4.

    Returns
    -------
    DemoModel
        Layer 0: previous-token head at (0, 1), duplicate-token head at (0, 3); layer 1:
        induction head at (1, 2); all other heads are distractors with N(0, 0.05^2) weights.

    Notes
    -----
    A structured circuit of rank r has composition score 1/sqrt(r) (here r = vocab_size, so
    about 0.2), while random heads score about 1/sqrt(d_model) (0.044): the spare residual
    dimensions are what make the circuit stand out.
    """
    L = _Layout(vocab_size, n_ctx)
    if d_head < vocab_size + n_ctx or d_model < L.used or n_heads < 4:
        raise ValueError(
            f"sizes: expected d_head >= {vocab_size + n_ctx}, d_model >= {L.used}, n_heads >= 4, "
            f"got d_head={d_head}, d_model={d_model}, n_heads={n_heads}"
        )
    rng = np.random.default_rng(seed)
    shape = (2, n_heads, d_model, d_head)
    W_Q, W_K, W_V = (rng.normal(0.0, _DISTRACTOR_STD, shape) for _ in range(3))
    W_O = rng.normal(0.0, _DISTRACTOR_STD, (2, n_heads, d_head, d_model))
    heads = {
        PREVIOUS_TOKEN_HEAD: _previous_token_head(L, vocab_size, n_ctx, d_model, d_head),
        DUPLICATE_TOKEN_HEAD: _duplicate_token_head(L, vocab_size, n_ctx, d_model, d_head),
        INDUCTION_HEAD: _induction_head(L, vocab_size, d_model, d_head),
    }
    for (layer, head), (q, k, v, o) in heads.items():
        W_Q[layer, head], W_K[layer, head], W_V[layer, head], W_O[layer, head] = q, k, v, o
    W_E = np.zeros((vocab_size, d_model))
    W_E[np.arange(vocab_size), L.tok + np.arange(vocab_size)] = 1.0
    W_pos = np.zeros((n_ctx, d_model))
    W_pos[np.arange(n_ctx), L.pos + np.arange(n_ctx)] = 1.0
    W_U = rng.normal(0.0, _UNEMBED_NOISE, (d_model, vocab_size))
    W_U[L.out + np.arange(vocab_size), np.arange(vocab_size)] += _UNEMBED
    roles = {"previous_token": PREVIOUS_TOKEN_HEAD, "duplicate_token": DUPLICATE_TOKEN_HEAD, "induction": INDUCTION_HEAD}
    return DemoModel(W_E, W_pos, W_Q, W_K, W_V, W_O, W_U, roles)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _argmax_head(scores: np.ndarray) -> Tuple[int, int]:
    layer, head = np.unravel_index(int(np.nanargmax(scores)), scores.shape)
    return int(layer), int(head)


def block_losses(losses: np.ndarray, period: int) -> Tuple[float, float]:
    """Mean loss on the first block and on its repeat, over the same block positions.

    ``losses`` is ``token_losses`` of ``repeated_tokens(batch, period, ...)`` (BOS, a block of
    ``period`` tokens, the block again): ``losses[:, i]`` predicts token i + 1. Both means cover
    block positions 1 .. period - 1, predicted by ``losses[:, 1:period]`` the first time and by
    ``losses[:, period + 1:]`` on the repeat. Position 0 is left out of both: the block's first
    token follows BOS the first time and the block's last token on the repeat, a pair seen nowhere
    before, so no in-context mechanism can predict it.
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[1] != 2 * period:
        raise ValueError(f"losses: expected shape (batch, {2 * period}) for period {period}, got {losses.shape}")
    return float(losses[:, 1:period].mean()), float(losses[:, period + 1 :].mean())


def demo_report(seed: int = 0, *, batch: int = 8, period: int = 18, baseline_samples: int = 500) -> Dict[str, Any]:
    """Run the demo model on repeated random tokens and measure its heads and circuit.

    Parameters
    ----------
    seed : int
        Seed of the model's random parts and of the tokens.
    batch, period : int
        ``repeated_tokens(batch, period, vocab)``: BOS then a random block of ``period`` tokens
        twice, n = 2 period + 1 <= n_ctx.
    baseline_samples : int
        Random pairs for the composition baseline (``composition_baseline``'s default, seeded
        with ``seed``).

    Returns
    -------
    dict
        JSON-ready: ``head_scores`` ({kind: [L][H]}, batch mean of :func:`head_scores`), the
        detected ``previous_token_head``, ``duplicate_token_head`` and ``induction_head``
        ([layer, head], argmax of each score), ``k_composition`` (K-composition score of the
        detected previous-token -> induction pair), ``k_composition_baseline`` (mean chance
        score) with ``k_composition_baseline_std`` and ``k_composition_zscore``,
        ``copying_scores`` ([L][H]), ``loss_first_half`` / ``loss_second_half`` (mean
        per-token loss on the first block / on its repeat, over the same block positions, see
        :func:`block_losses`) and ``icl_loss_drop`` (first minus second).
    """
    import induct_fast as ift

    model = build_demo_model(seed)
    tokens = ift.repeated_tokens(batch, period, model.vocab_size, seed=seed)
    logits, patterns = model.run(tokens)
    scores = {k: v.mean(axis=0) for k, v in ift.head_scores(patterns, tokens, kinds=KINDS).items()}
    found = {kind: _argmax_head(scores[kind]) for kind in KINDS}
    k_comp = ift.composition_scores(model.W_Q, model.W_K, model.W_V, model.W_O, mode="K")
    baseline = ift.composition_baseline(model.W_Q.shape[2], model.d_head, n=baseline_samples, seed=seed)
    prev, ind = found["previous_token"], found["induction"]
    k_score = float(k_comp[prev[0], prev[1], ind[0], ind[1]])
    copying = ift.copying_scores(model.W_E, model.W_V, model.W_O, model.W_U)
    loss = ift.token_losses(logits, tokens)
    first, second = block_losses(loss, period)
    return {
        "model": {"n_layers": model.n_layers, "n_heads": model.n_heads, "d_model": model.W_Q.shape[2],
                  "d_head": model.d_head, "vocab_size": model.vocab_size, "n_ctx": model.n_ctx},
        "tokens_shape": list(tokens.shape),
        "head_scores": {kind: scores[kind].tolist() for kind in KINDS},
        "previous_token_head": list(prev),
        "duplicate_token_head": list(found["duplicate_token"]),
        "induction_head": list(ind),
        "k_composition": k_score,
        "k_composition_baseline": baseline.mean,
        "k_composition_baseline_std": baseline.std,
        "k_composition_zscore": float(baseline.zscore(k_score)),
        "k_composition_matrix": k_comp[0, :, 1, :].tolist(),
        "copying_scores": copying.tolist(),
        "loss_first_half": first,
        "loss_second_half": second,
        "icl_loss_drop": first - second,
        # mean loss at each block position 1 .. period - 1, the first time and on the repeat
        "block_loss_first": loss[:, 1:period].mean(axis=0).tolist(),
        "block_loss_repeat": loss[:, period + 1 :].mean(axis=0).tolist(),
    }


def format_report(report: Dict[str, Any]) -> str:
    """The report as the human-readable text ``induct-fast demo`` prints."""
    m = report["model"]
    lines = [
        f"hand-built 2-layer attention-only model: {m['n_heads']} heads/layer, d_model {m['d_model']}, "
        f"d_head {m['d_head']}, vocab {m['vocab_size']}",
        f"run on repeated random tokens {tuple(report['tokens_shape'])} (BOS + a block repeated twice)",
        "",
        "layer head " + "".join(f"{k:>17}" for k in KINDS) + f"{'copying':>10}",
    ]
    roles = {tuple(report[f"{k}_head"]): k for k in KINDS}
    for layer in range(m["n_layers"]):
        for head in range(m["n_heads"]):
            values = "".join(f"{report['head_scores'][k][layer][head]:>17.3f}" for k in KINDS)
            role = roles.get((layer, head), "")
            lines.append(f"{layer:>5} {head:>4} {values}{report['copying_scores'][layer][head]:>10.3f}  {role}".rstrip())
    prev, ind = report["previous_token_head"], report["induction_head"]
    lines += [
        "",
        f"K-composition L{prev[0]}H{prev[1]} -> L{ind[0]}H{ind[1]}: {report['k_composition']:.3f}   "
        f"random baseline {report['k_composition_baseline']:.3f} +- {report['k_composition_baseline_std']:.3f} "
        f"(z = {report['k_composition_zscore']:.0f})",
        f"mean loss: first half {report['loss_first_half']:.3f}, repeated half {report['loss_second_half']:.3f}, "
        f"in-context drop {report['icl_loss_drop']:.3f} nats",
    ]
    return "\n".join(lines)


def plot_report(report: Dict[str, Any], path: str) -> None:
    """One figure to `path`: the head scores, the L0 -> L1 K-composition (with its chance level)
    and the copying scores, every cell labelled, each panel on its own scale with its unit."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib (or induct_fast[plot])") from None
    from .results import _heatmap

    k_comp = np.array(report["k_composition_matrix"], dtype=float)
    mass: Dict[str, Any] = {"vmin": 0.0, "vmax": 1.0, "cmap": "viridis", "label": "attention mass on targets"}
    panels = [(kind.replace("_", " ") + " score", np.array(report["head_scores"][kind], dtype=float), mass, "head", "layer") for kind in KINDS]
    chance = report["k_composition_baseline"]
    comp: Dict[str, Any] = {"vmin": 0.0, "vmax": max(float(np.nanmax(k_comp)), 2 * chance), "cmap": "cividis",
            "label": f"K-composition (chance {chance:.3f})"}
    panels.append(("K-composition L0 -> L1", k_comp, comp, "L1 head (reader)", "L0 head (writer)"))
    copying: Dict[str, Any] = {"vmin": -1.0, "vmax": 1.0, "cmap": "RdBu", "label": "copying score (-1 to 1)"}
    panels.append(("OV copying score", np.array(report["copying_scores"], dtype=float), copying, "head", "layer"))
    m = report["model"]
    fig = Figure(figsize=(13.5, 6.2), layout="constrained")
    fig.suptitle(
        f"induct-fast demo: hand-built {m['n_layers']}-layer attention-only model on repeated random tokens "
        f"{tuple(report['tokens_shape'])}; in-context loss drop {report['icl_loss_drop']:.2f} nats"
    )
    axes = fig.subplots(2, 3).ravel()
    for ax, (title, values, scale, xlabel, ylabel) in zip(axes, panels):
        _heatmap(ax, values, title=title, show_values=True, xlabel=xlabel, ylabel=ylabel, **scale)
    loss_ax = axes[-1]
    positions = np.arange(1, len(report["block_loss_first"]) + 1)
    loss_ax.plot(positions, report["block_loss_first"], "o-", ms=3, label=f"first block (mean {report['loss_first_half']:.2f})")
    loss_ax.plot(positions, report["block_loss_repeat"], "o-", ms=3, label=f"repeat (mean {report['loss_second_half']:.2f})")
    loss_ax.set(title="next-token loss", xlabel="position in the block", ylabel="loss (nats)", ylim=(0, None))
    loss_ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def _json_safe(value: Any) -> Any:
    """NaN / inf become null so that the output is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def run_demo(*, seed: int = 0, as_json: bool = False, plot: Optional[str] = None) -> int:
    """What ``induct-fast demo`` does: print the report (text or JSON), optionally plot it."""
    report = demo_report(seed)
    if plot:
        plot_report(report, plot)
    print(json.dumps(_json_safe(report)) if as_json else format_report(report))
    if plot and not as_json:
        print(f"heatmaps written to {plot}")
    return 0
