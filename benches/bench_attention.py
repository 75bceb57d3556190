"""Benchmark of the fused scores_from_qk against numpy and against attention_patterns + head_scores.

Run: python benches/bench_attention.py [--quick] [--lse-only | --options-only | --headline-only | --bf16-only]

1. n = 2048, 12 heads, d_head 64, batch 1 (float32): scores (previous_token, duplicate_token,
   induction) by
   - numpy as a user would write it: BLAS matmul, causal masked softmax, the diagonal for
     previous_token and 0/1 target matrices for duplicate_token and induction;
   - induct_fast.attention_patterns + induct_fast.head_scores;
   - induct_fast.scores_from_qk (fused, no n x n matrix).
   Prints times, ratios, and the GFLOP/s of the fused kernel against numpy's float32 matmul rate
   measured in the same run.
2. One head, n = 1k, 4k, 16k: time and peak-memory growth of scores_from_qk (each n in a fresh
   subprocess, so the high-water mark is its own), next to the size the pattern would take.
3. The kernel options, one head, d_head 64: window=4096 at n = 16384 against no window (the
   fused kernel skips key tiles before every window: expect about n / (window + 128) / 2 faster
   than causal), and softcap=50 against none at n = 4096 (one scalar tanh per logit).
4. A given log-sum-exp (DESIGN.md section 11), one head, d_head 64, float32, repeated random
   tokens, kinds previous_token, duplicate_token, induction, at n = 4096, 16384, 65536:
   scores_from_qk without lse (the full O(n^2) pass), with return_lse=True (the same pass, its
   lse kept), and with lse= that lse as float32 (what a flash kernel hands over: only the target
   logits, O(n |T|)); the ratio without / with. Under --quick the full pass at 65536 (~2-4 s)
   is skipped.
5. bfloat16 q and k (torch tensors, as a bf16 model's cache holds them), n = 2048, 12 heads,
   d_head 64: scores_from_qk on bf16 against float32 of the same values and against the route
   before issue 13 (``.float()`` first), without and with a given lse (where only target
   logits are computed, so converting the heads to float32 weighs most).

Every timing is the best of 5 rounds that run all candidates in turn (the machine may be shared,
and this way load from other processes falls on every candidate alike). Part 1 is repeated in a
subprocess with BLAS and induct_fast limited to one thread each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

import induct_fast as inf

KINDS = ("previous_token", "duplicate_token", "induction")


def best_times(candidates, rounds=5):
    """Best time of each candidate over `rounds` rounds that run every candidate once in turn,
    so that load from other processes falls on all of them alike."""
    for fn in candidates.values():
        fn()  # warm up (threads, page faults of a first allocation)
    best = {name: float("inf") for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def numpy_scores(q, k, tokens):
    """The scores as a user would write them in numpy (float32, q/k [1, n, H, d])."""
    n, d = q.shape[1], q.shape[3]
    qh = q[0].transpose(1, 0, 2)  # [H, n, d]
    kh = k[0].transpose(1, 0, 2)
    s = qh @ kh.transpose(0, 2, 1) / np.float32(np.sqrt(d))  # [H, n, n]
    s[:, np.triu(np.ones((n, n), bool), 1)] = -np.inf
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s, out=s)
    p /= p.sum(axis=-1, keepdims=True)
    t = tokens[0]
    earlier = np.tril(np.ones((n, n), bool), -1)
    duplicate = (t[:, None] == t[None, :]) & earlier  # j < i, same token
    induction = np.zeros((n, n), bool)  # j - 1 < i and t[j - 1] == t[i]
    induction[:, 1:] = (t[:, None] == t[None, :-1]) & np.tril(np.ones((n, n - 1), bool), -1)
    out = {"previous_token": np.diagonal(p, offset=-1, axis1=1, axis2=2).mean(axis=-1)}
    for name, targets in (("duplicate_token", duplicate), ("induction", induction)):
        eligible = targets.any(axis=-1)
        eligible[0] = False
        out[name] = (p * targets).sum(axis=-1)[:, eligible].mean(axis=-1)
    return {name: v[None] for name, v in out.items()}


def causal_flops(n, heads, d):
    """Multiply-adds x 2 of the q.k entries a causal head needs (j <= i)."""
    return 2.0 * heads * d * n * (n + 1) / 2


def mib(nbytes):
    return nbytes / 2**20


def headline(n=2048, heads=12, d=64, rounds=5):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, n, heads, d), dtype=np.float32)
    k = rng.standard_normal((1, n, heads, d), dtype=np.float32)
    tokens = inf.repeated_tokens(1, n // 2, 50_000, seed=0)[:, :n]  # BOS + a block seen twice
    blas = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    print(f"== scores of {heads} heads, n = {n}, d_head = {d}, batch 1, float32, induct_fast {inf.get_num_threads()} threads, BLAS threads {blas} ==")
    print(f"q, k: {q.shape} each {mib(q.nbytes):.1f} MiB; patterns [1, {heads}, {n}, {n}] would be {mib(4 * heads * n * n):.0f} MiB")

    fused = inf.scores_from_qk(q, k, tokens, kinds=KINDS)
    via_patterns = inf.head_scores(inf.attention_patterns(q, k), tokens, kinds=KINDS)
    reference = numpy_scores(q, k, tokens)
    for kind in KINDS:
        diff = max(np.abs(fused[kind] - reference[kind]).max(), np.abs(fused[kind] - via_patterns[kind]).max())
        print(f"  {kind:16s} mean over heads {fused[kind].mean():.4f}  max |fused - others| {diff:.1e}")

    qh = np.ascontiguousarray(q[0].transpose(1, 0, 2))
    kt = np.ascontiguousarray(k[0].transpose(1, 2, 0))
    t = best_times(
        {
            "numpy": lambda: numpy_scores(q, k, tokens),
            "two_step": lambda: inf.head_scores(inf.attention_patterns(q, k), tokens, kinds=KINDS),
            "patterns": lambda: inf.attention_patterns(q, k),
            "fused": lambda: inf.scores_from_qk(q, k, tokens, kinds=KINDS),
            "sgemm": lambda: qh @ kt,
        },
        rounds,
    )
    t_numpy, t_two_step, t_patterns, t_fused, t_sgemm = (t[name] for name in ("numpy", "two_step", "patterns", "fused", "sgemm"))
    sgemm_rate = 2.0 * heads * n * n * d / t_sgemm / 1e9
    fused_rate = causal_flops(n, heads, d) / t_fused / 1e9

    print(f"numpy (matmul, masked softmax, target matrices) {t_numpy * 1e3:8.1f} ms")
    print(f"attention_patterns + head_scores                {t_two_step * 1e3:8.1f} ms  (attention_patterns alone {t_patterns * 1e3:.1f} ms)")
    print(f"scores_from_qk (fused)                          {t_fused * 1e3:8.1f} ms")
    print(f"ratio numpy / fused:                            {t_numpy / t_fused:8.1f}x  (target >= 10x)")
    print(f"ratio attention_patterns + head_scores / fused: {t_two_step / t_fused:8.1f}x")
    print(
        f"fused: {fused_rate:.1f} GFLOP/s of causal q.k work against numpy float32 matmul "
        f"[{heads}, {n}, {d}] @ [{heads}, {d}, {n}] at {sgemm_rate:.1f} GFLOP/s ({fused_rate / sgemm_rate:.2f} of it)"
    )


PROBE = """
import json, sys, time
import numpy as np, induct_fast as inf

def peak_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

n, d = int(sys.argv[1]), 64
rng = np.random.default_rng(0)
q = rng.standard_normal((n, 1, d), dtype=np.float32)
k = rng.standard_normal((n, 1, d), dtype=np.float32)
tokens = rng.integers(0, 5000, size=n)
kinds = ("previous_token", "duplicate_token", "induction")
inf.scores_from_qk(q[:256], k[:256], tokens[:256], kinds=kinds)
before = peak_kib()
t = time.perf_counter()
inf.scores_from_qk(q, k, tokens, kinds=kinds)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "grown_kib": peak_kib() - before}))
"""


def scaling(sizes=(1024, 4096, 16384), d=64):
    print(f"\n== one head, d_head = {d}: scores_from_qk as n grows (fresh process per n) ==")
    print(f"{'n':>6} {'time':>10} {'x prev':>7} {'peak RSS growth':>16} {'pattern would be':>17} {'GFLOP/s':>8}")
    previous = None
    for n in sizes:
        out = subprocess.run([sys.executable, "-c", PROBE, str(n)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        growth = "" if previous is None else f"{r['seconds'] / previous:6.1f}x"
        rate = causal_flops(n, 1, d) / r["seconds"] / 1e9
        print(f"{n:>6} {r['seconds'] * 1e3:>8.1f}ms {growth:>7} {r['grown_kib'] / 1024:>12.1f} MiB {mib(4 * n * n):>13.0f} MiB {rate:>8.1f}")
        previous = r["seconds"]
    print("time grows as n^2 (x16 per 4x n); memory stays flat: O(threads x tile) + O(n)")


def options(d=64):
    print(f"\n== kernel options, one head, d_head = {d}, float32: scores_from_qk ==")
    rng = np.random.default_rng(0)

    def case(n):
        q = rng.standard_normal((n, 1, d), dtype=np.float32)
        k = rng.standard_normal((n, 1, d), dtype=np.float32)
        return q, k, rng.integers(0, 5000, size=n)

    q, k, tokens = case(16384)
    t = best_times(
        {
            "none": lambda: inf.scores_from_qk(q, k, tokens, kinds=KINDS),
            "window": lambda: inf.scores_from_qk(q, k, tokens, kinds=KINDS, window=4096),
        },
        rounds=3,
    )
    print(f"n = 16384, no window    {t['none'] * 1e3:8.1f} ms")
    print(f"n = 16384, window=4096  {t['window'] * 1e3:8.1f} ms   ratio no window / window {t['none'] / t['window']:.2f}x")
    q, k, tokens = case(4096)
    t = best_times(
        {
            "none": lambda: inf.scores_from_qk(q, k, tokens, kinds=KINDS),
            "softcap": lambda: inf.scores_from_qk(q, k, tokens, kinds=KINDS, softcap=50.0),
        },
    )
    print(f"n = 4096, no softcap    {t['none'] * 1e3:8.1f} ms")
    print(f"n = 4096, softcap=50    {t['softcap'] * 1e3:8.1f} ms   ratio softcap / none {t['softcap'] / t['none']:.2f}x")


def given_lse(sizes=(4096, 16384, 65536), d=64, quick=False):
    print(f"\n== a given log-sum-exp, one head, d_head = {d}, float32, repeated random tokens: scores_from_qk ==")
    print(f"{'n':>6} {'without lse':>12} {'return_lse':>12} {'with lse':>10} {'ratio':>9}  max |with - without|")
    rng = np.random.default_rng(0)
    for n in sizes:
        q = rng.standard_normal((n, 1, d), dtype=np.float32)
        k = rng.standard_normal((n, 1, d), dtype=np.float32)
        tokens = inf.repeated_tokens(1, n // 2, 1_000_000, seed=0)[0, :n]  # BOS + a block seen twice
        full = quick and n > 16384
        exact, lse = inf.scores_from_qk(q, k, tokens, kinds=KINDS, return_lse=True)
        lse32 = lse.astype(np.float32)  # as a float32 flash kernel returns it
        # The cheap call gets many rounds of its own; the full passes run in turn, fewer at 64k.
        t = best_times({"with": lambda: inf.scores_from_qk(q, k, tokens, kinds=KINDS, lse=lse32)}, rounds=10)
        if not full:
            candidates = {
                "without": lambda: inf.scores_from_qk(q, k, tokens, kinds=KINDS),
                "return_lse": lambda: inf.scores_from_qk(q, k, tokens, kinds=KINDS, return_lse=True),
            }
            t.update(best_times(candidates, rounds=3 if n <= 16384 else 1))
        got = inf.scores_from_qk(q, k, tokens, kinds=KINDS, lse=lse32)
        diff = max(float(np.abs(got[kind] - exact[kind]).max()) for kind in KINDS)
        if full:
            print(f"{n:>6} {'(skipped)':>12} {'(skipped)':>12} {t['with'] * 1e3:>8.2f}ms {'':>9}  {diff:.1e}")
        else:
            ratio = t["without"] / t["with"]
            print(
                f"{n:>6} {t['without'] * 1e3:>10.1f}ms {t['return_lse'] * 1e3:>10.1f}ms {t['with'] * 1e3:>8.2f}ms "
                f"{ratio:>8.0f}x  {diff:.1e}"
            )
    print("without lse grows as n^2, with lse as n |T|: the ratio grows about as n")


def bfloat16(n=2048, heads=12, d=64, rounds=5):
    try:
        import torch
    except ImportError:
        print("\n(bfloat16 skipped: torch is not installed)")
        return
    print(f"\n== bfloat16 q, k (torch), {heads} heads, n = {n}, d_head = {d}: scores_from_qk ==")
    gen = torch.Generator().manual_seed(0)
    q16 = torch.randn((1, n, heads, d), generator=gen).to(torch.bfloat16)
    k16 = torch.randn((1, n, heads, d), generator=gen).to(torch.bfloat16)
    q32, k32 = q16.float(), k16.float()
    tokens = inf.repeated_tokens(1, n // 2, 50_000, seed=0)[:, :n]
    want, lse = inf.scores_from_qk(q32, k32, tokens, kinds=KINDS, return_lse=True)
    got = inf.scores_from_qk(q16, k16, tokens, kinds=KINDS)
    assert all(np.array_equal(got[kind], want[kind]) for kind in KINDS), "bf16 differs from float32 of the same values"
    t = best_times(
        {
            "bf16": lambda: inf.scores_from_qk(q16, k16, tokens, kinds=KINDS),
            "f32": lambda: inf.scores_from_qk(q32, k32, tokens, kinds=KINDS),
            "old": lambda: inf.scores_from_qk(q16.float(), k16.float(), tokens, kinds=KINDS),
            "bf16_lse": lambda: inf.scores_from_qk(q16, k16, tokens, kinds=KINDS, lse=lse),
            "f32_lse": lambda: inf.scores_from_qk(q32, k32, tokens, kinds=KINDS, lse=lse),
            "old_lse": lambda: inf.scores_from_qk(q16.float(), k16.float(), tokens, kinds=KINDS, lse=lse),
        },
        rounds,
    )
    for suffix, what in (("", "full pass"), ("_lse", "given lse")):
        bf, f32, old = t["bf16" + suffix], t["f32" + suffix], t["old" + suffix]
        print(
            f"{what:10s} bf16 {bf * 1e3:8.2f} ms  float32 {f32 * 1e3:8.2f} ms ({bf / f32:.2f}x)  "
            f".float() first {old * 1e3:8.2f} ms ({old / bf:.2f}x bf16)"
        )


ONE_CORE = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "INDUCT_FAST_NUM_THREADS": "1"}


def main():
    quick = "--quick" in sys.argv
    if "--options-only" in sys.argv:
        options()
        return
    if "--lse-only" in sys.argv:
        given_lse(quick=quick)
        return
    if "--bf16-only" in sys.argv:
        bfloat16(rounds=2 if quick else 5)
        return
    if "--headline-only" in sys.argv:
        headline(rounds=2 if quick else 5)
        return
    headline(rounds=2 if quick else 5)
    print("\n(the same on one core: BLAS and induct_fast limited to 1 thread, less sensitive to other load)")
    args = [sys.executable, __file__, "--headline-only"] + (["--quick"] if quick else [])
    subprocess.run(args, env={**os.environ, **ONE_CORE}, check=True)
    scaling(sizes=(1024, 4096) if quick else (1024, 4096, 16384))
    options()
    given_lse(quick=quick)
    bfloat16(rounds=2 if quick else 5)


if __name__ == "__main__":
    main()
