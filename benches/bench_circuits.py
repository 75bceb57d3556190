"""Circuits from weights: composition scores against real TransformerLens, at GPT-2-small size and
at a 7B shape, and copying scores against TransformerLens's algorithm, in one run.

Composition, 12 layers x 12 heads, d_model 768, d_head 64: a randomly initialised (normal, std
0.02) attention-only ``HookedTransformer`` and its own ``all_composition_scores(mode)`` (float32
torch on the CPU, its threads) against ``induct_fast.composition_scores`` on the same float32
``model.W_Q / W_K / W_V / W_O`` tensors; max |diff| is against TransformerLens's scores. Each
figure is printed with its baseline: the TransformerLens time, and the float64 GEMM rate of
numpy's BLAS (a 2048 x 2048 product, measured at the start and again at the end) for our
GFLOP/s (2 flops per multiply-add counted from the plan composition_scores runs, see
``composition_macs``).

7B shape (32 layers x 32 heads, 8 kv heads, d_model 4096, d_head 128; float32 arrays, 5.4 GB,
or with ``--big-dtype bfloat16`` torch tensors, 2.7 GB): all three modes in one call, in a
process of its own (tests/composition_memory.py), with its peak resident memory beyond the
inputs. TransformerLens has no route that fits it (its
FactoredMatrix products of every pair are [1024, 1024, 128, 128] float32, 69 GB, before any SVD).
On 2 cores it takes minutes; ``--no-big`` skips it.

Copying scores, vocab 50257, random float64 weights: the baseline re-implements in numpy what
TransformerLens does (``W_E @ OV @ W_U`` as FactoredMatrix(W_E W_V, W_O W_U), eigenvalues of
(W_O W_U)(W_E W_V) per head, then Re(sum) / sum(abs)). This costs ~10 GFLOP per head, so it is
timed (best of 2) on the heads of ``--baseline-layers`` layers and extrapolated linearly to all
heads (its cost is exactly linear in the number of heads); the output says so.

induct_fast is timed as the best of ``--repeats`` runs, TransformerLens as the best of
``--tl-repeats``. Both use all cores, so on a shared machine the times move with the load;
compare figures of one run.

Run: ``python benches/bench_circuits.py`` (a few minutes on 2 cores, most of it the 7B shape).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

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


# ---- TransformerLens -----------------------------------------------------------------------------


def tl_model(L, H, d_model, d_head, seed=0):
    """A random attention-only HookedTransformer (weights normal, std 0.02)."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=L, d_model=d_model, n_ctx=32, d_head=d_head, n_heads=H, d_vocab=64, attn_only=True, device="cpu"
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    return model


def tl_composition_scores(model, mode):
    import torch

    with torch.no_grad():
        return model.all_composition_scores(mode).numpy()


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


def composition_macs(L, H, H_kv, d_model, d_head, modes):
    """Multiply-adds of one composition_scores call with `modes` (a string), counted from the plan
    it runs: the d_head x d_head cores S = B^T B (one per head or kv head of each side, ~8%), the
    U = S A^T strips, the per-head pieces and the contraction GEMMs."""
    from induct_fast import circuits

    n_modes = len(modes)
    N = (L - 1) * H
    n_wide = (L - 1) * (H + sum(H if m == "Q" else H_kv for m in modes))  # W_O; W_Q or W_K / W_V
    plan = circuits._plan(1 + n_modes, N, n_wide, d_model, d_head, circuits._WIDTH, circuits._WORK_BYTES)
    groups = circuits._right_groups(L - 1, H, N)
    core_heads = (L - 1) * (H_kv + sum(H_kv if m == "Q" else H for m in modes))  # left: W_V; Q: W_K; K: W_Q; V: W_O
    macs = core_heads * d_head * d_head * d_model
    for cs in range(0, d_model, plan.width):
        ce = min(cs + plan.width, d_model)
        c = ce - cs
        macs += (1 + n_modes) * N * d_head * d_head * c
        for r0 in range(0, ce, plan.height):
            area = (min(r0 + plan.height, ce) - r0) * c
            macs += (1 + n_modes) * N * d_head * area
            macs += sum(n_left * (rows.stop - rows.start) * n_modes * area for rows, n_left in groups)
    return macs


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


def gemm_rate(n=2048, repeats=3):
    """float64 GFLOP/s of numpy's BLAS on one n x n product (best of `repeats`)."""
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    _, seconds = _best_of(repeats, np.matmul, A, B)
    return 2 * n**3 / seconds / 1e9


def big_shape(dtype):
    """The 7B shape in a process of its own: {"seconds", "growth" (peak bytes), "inputs" (bytes)}."""
    script = Path(__file__).resolve().parents[1] / "tests" / "composition_memory.py"
    argv = [sys.executable, str(script), "32", "32", "8", "4096", "128", dtype, "QKV"]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"7B-shaped run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-head", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--baseline-layers", type=int, default=1, help="layers of heads timed for the TL copying baseline")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs for induct_fast")
    parser.add_argument("--tl-repeats", type=int, default=1, help="best of this many runs for TransformerLens")
    parser.add_argument("--no-big", action="store_true", help="skip the 7B shape")
    parser.add_argument("--big-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="7B-shape weights: float32 numpy arrays (5.4 GB) or bfloat16 torch tensors (2.7 GB)")
    parser.add_argument("--no-copying", action="store_true", help="skip the copying scores")
    args = parser.parse_args()
    L, H, dm, dh, V = args.layers, args.heads, args.d_model, args.d_head, args.vocab
    rate = gemm_rate()
    print(f"circuits: numpy {np.__version__}, induct_fast {inf.__version__}, threads {inf.get_num_threads()}; "
          f"float64 GEMM (numpy BLAS, 2048^3): {rate:.1f} GFLOP/s")

    model = tl_model(L, H, dm, dh)
    W = [getattr(model, f"W_{c}").detach() for c in "QKVO"]
    print(f"composition: L={L} H={H} d_model={dm} d_head={dh}, float32 torch weights of a HookedTransformer, "
          f"TransformerLens all_composition_scores (float32 torch, {__import__('torch').get_num_threads()} threads)")
    print(f"{'what':<34}{'induct_fast s':>14}{'TL s':>9}{'ratio':>9}{'GFLOP/s':>9}{'of GEMM':>9}  max |diff| vs TL")
    total_ours, total_tl = 0.0, 0.0
    for mode in ("Q", "K", "V"):
        ours, t_ours = _best_of(args.repeats, inf.composition_scores, *W, mode=mode)
        ref, t_tl = _best_of(args.tl_repeats, tl_composition_scores, model, mode)
        total_ours += t_ours
        total_tl += t_tl
        gflops = 2 * composition_macs(L, H, H, dm, dh, mode) / t_ours / 1e9
        diff = np.abs(ours - ref).max()
        print(f"{'composition_scores mode=' + mode:<34}{t_ours:>14.3f}{t_tl:>9.2f}{t_tl / t_ours:>8.1f}x"
              f"{gflops:>9.1f}{gflops / rate:>8.0%}  {diff:.1e}")
    both, t_all = _best_of(args.repeats, inf.composition_scores, *W, mode=("Q", "K", "V"))
    gflops = 2 * composition_macs(L, H, H, dm, dh, "QKV") / t_all / 1e9
    label = "composition_scores mode=(Q,K,V)"
    print(f"{label:<34}{t_all:>14.3f}{total_tl:>9.2f}{total_tl / t_all:>8.1f}x{gflops:>9.1f}{gflops / rate:>8.0%}"
          f"  (one call, shared left side; TL: its three calls)")
    print(f"work, composition, one mode: induct_fast {composition_macs(L, H, H, dm, dh, 'K') / 1e9:.1f} G multiply-adds "
          f"(all three in one call {composition_macs(L, H, H, dm, dh, 'QKV') / 1e9:.1f} G), "
          f"TL {(L * H) ** 2 * dh**2 * dm / 1e9:.1f} G + 4 SVDs of d_model x d_head per head")

    if not args.no_copying:
        W_Q, W_K, W_V, W_O, W_E, W_U = _weights(L, H, dm, dh, V, seed=0)
        ours, t_ours = _best_of(args.repeats, inf.copying_scores, W_E, W_V, W_O, W_U)
        layers = range(min(args.baseline_layers, L))
        ref, t_part = _best_of(2, tl_copying_scores, W_E, W_V, W_O, W_U, layers)
        t_tl = t_part * L / len(layers)
        diff = np.abs(ours[: len(layers)] - ref).max()
        print(f"{'copying_scores (float64, TL algorithm)':<34}{t_ours:>14.3f}{t_tl:>9.2f}{t_tl / t_ours:>8.1f}x{'':>18}  {diff:.1e}"
              f"  (TL timed on {len(layers) * H} of {L * H} heads: {t_part:.2f} s, x{L / len(layers):.0f})")
        ours_macs, tl_macs = copying_macs(L, H, dm, dh, V)
        print(f"work, copying scores: induct_fast {ours_macs / 1e9:.1f} G multiply-adds, TL {tl_macs / 1e9:.1f} G "
              f"({tl_macs / ours_macs:.1f}x)")

    if not args.no_big:
        big = big_shape(args.big_dtype)
        macs = composition_macs(32, 32, 8, 4096, 128, "QKV")
        gflops = 2 * macs / big["seconds"] / 1e9
        print(f"7B shape (32 x 32 heads, 8 kv heads, d_model 4096, d_head 128, {args.big_dtype}, "
              f"{big['inputs'] / 1e9:.2f} GB): modes Q, K, V in one call {big['seconds']:.0f} s "
              f"({macs / 1e12:.1f} T multiply-adds, {gflops:.1f} GFLOP/s, {gflops / rate:.0%} of GEMM), "
              f"peak memory beyond the inputs {big['growth'] / 2**30:.2f} GiB; TransformerLens: cannot run it")
    rate_end = gemm_rate()
    print(f"float64 GEMM again at the end: {rate_end:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
