"""Circuits from weights at GPT-2-small size against TransformerLens's algorithm, in one run.

Sizes: 12 layers x 12 heads, d_model 768, d_head 64, vocab 50257, random float64 weights (both
sides compute in float64, so the ratio compares algorithms, not precisions).

The baseline re-implements in numpy what TransformerLens does:
- ``all_composition_scores(mode)``: left = OV and right = QK / QK.T / OV as FactoredMatrix; each
  is collapsed through its SVD (SVD of both factors, then of the small middle matrix, exactly
  FactoredMatrix.svd), then every [d_head, d_model] @ [d_model, d_head] pair product and its
  Frobenius norm, masked to left layer < right layer. TransformerLens rebuilds ``model.OV`` on
  every call, so each mode pays for its own SVDs here too. The pair products are run in chunks
  of left layers (same arithmetic, bounded memory).
- copying scores: ``W_E @ OV @ W_U`` as FactoredMatrix(W_E W_V, W_O W_U), eigenvalues of
  (W_O W_U)(W_E W_V) per head, then Re(sum) / sum(abs). This costs ~10 GFLOP per head, so it is
  timed (best of 2) on the heads of ``--baseline-layers`` layers and extrapolated linearly to
  all heads (its cost is exactly linear in the number of heads); the output says so.

induct_fast is timed as the best of ``--repeats`` runs, the TransformerLens algorithm once per
composition mode. Both use numpy's BLAS on all cores, so on a shared machine the ratios move with
the load; the multiply-add counts printed last do not.

Run: ``python benches/bench_circuits.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import induct_fast as inf


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def _best_of(repeats, fn, *args, **kwargs):
    result, best = None, float("inf")
    for _ in range(repeats):
        result, seconds = _timed(fn, *args, **kwargs)
        best = min(best, seconds)
    return result, best


# ---- TransformerLens's algorithm, in numpy -----------------------------------------------------


def _factored_svd(A, B):
    """FactoredMatrix(A, B).svd(): U, S, Vh of A @ B from the SVDs of A, B and their middle."""
    Ua, Sa, Vha = np.linalg.svd(A, full_matrices=False)
    Ub, Sb, Vhb = np.linalg.svd(B, full_matrices=False)
    middle = Sa[..., :, None] * Vha @ Ub * Sb[..., None, :]
    Um, Sm, Vhm = np.linalg.svd(middle)
    return Ua @ Um, Sm, Vhm @ Vhb


def _tl_right(mode, W_Q, W_K, W_V, W_O):
    """The right FactoredMatrix (A, B) of all_composition_scores: QK, QK.T or OV."""
    if mode == "Q":
        return W_Q, np.swapaxes(W_K, -1, -2)
    if mode == "K":
        return W_K, np.swapaxes(W_Q, -1, -2)
    return W_V, W_O


def tl_composition_scores(W_Q, W_K, W_V, W_O, mode, chunk_layers=2):
    """TransformerLens's all_composition_scores(mode), step for step."""
    L, H = W_Q.shape[:2]
    _, S_l, Vh_l = _factored_svd(W_V, W_O)
    left = S_l[..., :, None] * Vh_l  # collapse_l: [L, H, d_head, d_model]
    U_r, S_r, _ = _factored_svd(*_tl_right(mode, W_Q, W_K, W_V, W_O))
    right = U_r * S_r[..., None, :]  # collapse_r: [L, H, d_model, d_head]
    l_norms = np.linalg.norm(left, axis=(-2, -1))
    r_norms = np.linalg.norm(right, axis=(-2, -1))
    scores = np.empty((L, H, L, H))
    for l0 in range(0, L, chunk_layers):
        pairs = left[l0 : l0 + chunk_layers, :, None, None] @ right[None, None]
        scores[l0 : l0 + chunk_layers] = np.linalg.norm(pairs, axis=(-2, -1))
    scores /= l_norms[:, :, None, None] * r_norms[None, None]
    mask = np.arange(L)[:, None, None, None] < np.arange(L)[None, None, :, None]
    return np.where(mask, scores, 0.0)


def tl_copying_scores(W_E, W_V, W_O, W_U, layers):
    """Copying scores of the heads of `layers` through FactoredMatrix(W_E W_V, W_O W_U).eigenvalues."""
    out = []
    for layer in layers:
        A = W_E @ W_V[layer]  # [H, vocab, d_head]
        B = W_O[layer] @ W_U  # [H, d_head, vocab]
        eig = np.linalg.eigvals(B @ A)
        out.append(eig.sum(-1).real / np.abs(eig).sum(-1))
    return np.stack(out)


# ---- work counts (multiply-adds), to read the ratios against ---------------------------------------


def composition_macs(L, H, d_model, d_head):
    """(induct_fast, TL) multiply-adds of one mode; TL's SVDs are not counted."""
    from induct_fast import circuits

    packed = sum(circuits._row_length(r, d_model) for r in circuits._block_rows(d_model, circuits._BLOCK))
    n = (L - 1) * H
    pairs = sum((rows.stop - rows.start) * n_left for rows, n_left in circuits._right_groups(L - 1, H, n))
    ours = packed * (2 * n * d_head + pairs)
    tl = (L * H) ** 2 * d_head**2 * d_model
    return ours, tl


def copying_macs(L, H, d_model, d_head, vocab):
    """(induct_fast, TL) multiply-adds: W_U W_E once vs W_E W_V and W_O W_U per head."""
    n = L * H
    ours = d_model**2 * vocab + n * d_head * d_model**2 + n * d_head**2 * d_model
    tl = n * (2 * vocab * d_model * d_head + d_head**2 * vocab)
    return ours, tl


# ---- benchmark ---------------------------------------------------------------------------------


def _weights(L, H, d_model, d_head, vocab, seed):
    rng = np.random.default_rng(seed)
    s = d_model**-0.5
    W_Q, W_K, W_V = (rng.normal(0, s, (L, H, d_model, d_head)) for _ in range(3))
    W_O = rng.normal(0, d_head**-0.5, (L, H, d_head, d_model))
    W_E = rng.normal(0, 1.0, (vocab, d_model))
    W_U = rng.normal(0, s, (d_model, vocab))
    return W_Q, W_K, W_V, W_O, W_E, W_U


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-head", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--baseline-layers", type=int, default=1, help="layers of heads timed for the TL copying baseline")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs for induct_fast")
    args = parser.parse_args()
    L, H, dm, dh, V = args.layers, args.heads, args.d_model, args.d_head, args.vocab
    W_Q, W_K, W_V, W_O, W_E, W_U = _weights(L, H, dm, dh, V, seed=0)
    print(f"circuits: L={L} H={H} d_model={dm} d_head={dh} vocab={V}, float64 weights, "
          f"numpy {np.__version__}, induct_fast {inf.__version__}, threads {inf.get_num_threads()}")
    print(f"{'what':<34}{'induct_fast s':>14}{'TL algorithm s':>16}{'ratio':>9}  max |diff|")

    total_ours, total_tl = 0.0, 0.0
    for mode in ("Q", "K", "V"):
        ours, t_ours = _best_of(args.repeats, inf.composition_scores, W_Q, W_K, W_V, W_O, mode=mode)
        ref, t_tl = _timed(tl_composition_scores, W_Q, W_K, W_V, W_O, mode)
        total_ours += t_ours
        total_tl += t_tl
        diff = np.abs(ours - ref).max()
        print(f"{'composition_scores mode=' + mode:<34}{t_ours:>14.3f}{t_tl:>16.2f}{t_tl / t_ours:>8.1f}x  {diff:.1e}")
    both, t_all = _best_of(args.repeats, inf.composition_scores, W_Q, W_K, W_V, W_O, mode=("Q", "K", "V"))
    label = "composition_scores mode=(Q,K,V)"
    print(f"{label:<34}{t_all:>14.3f}{total_tl:>16.2f}{total_tl / t_all:>8.1f}x  (one call, shared left side)")

    ours, t_ours = _best_of(args.repeats, inf.copying_scores, W_E, W_V, W_O, W_U)
    layers = range(min(args.baseline_layers, L))
    ref, t_part = _best_of(2, tl_copying_scores, W_E, W_V, W_O, W_U, layers)
    t_tl = t_part * L / len(layers)
    diff = np.abs(ours[: len(layers)] - ref).max()
    print(f"{'copying_scores':<34}{t_ours:>14.3f}{t_tl:>16.2f}{t_tl / t_ours:>8.1f}x  {diff:.1e}"
          f"  (TL timed on {len(layers) * H} of {L * H} heads: {t_part:.2f} s, x{L / len(layers):.0f})")
    total_ours += t_ours
    total_tl += t_tl
    label = "all three modes + copying"
    print(f"{label:<34}{total_ours:>14.3f}{total_tl:>16.2f}{total_tl / total_ours:>8.1f}x  (separate calls)")
    shared = t_all + t_ours
    print(f"{'  same, modes in one call':<34}{shared:>14.3f}{total_tl:>16.2f}{total_tl / shared:>8.1f}x")
    for name, (ours_macs, tl_macs), note in (
        ("composition, one mode", composition_macs(L, H, dm, dh), " + 4 SVDs of d_model x d_head per head"),
        ("copying scores", copying_macs(L, H, dm, dh, V), ""),
    ):
        print(f"work, {name}: induct_fast {ours_macs / 1e9:.1f} G multiply-adds, TL {tl_macs / 1e9:.1f} G{note} "
              f"({tl_macs / ours_macs:.1f}x)")


if __name__ == "__main__":
    main()
