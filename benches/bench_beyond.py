"""Benchmark of DESIGN.md section 12 (top-1, copy, spans) against what a user would otherwise run.

Run: python benches/bench_beyond.py [--quick]

1. The retrieval score of Wu et al. (2024) from q and k, one head, d_head 64, float32, on a
   needle-in-a-haystack prompt of n = 16k and 64k tokens (a 32-token needle at depth 0.5, the
   needle repeated as the answer, a retrieval head planted in random q/k): ``scores_from_qk(q, k, tokens, kinds="copy", measure="top1",
   queries=..., keys=...)`` against the numpy route of their code, which forms each scored query's
   attention row (logits, softmax), takes its argmax and checks it. Two spans:
   - the answer's 32 queries (the score itself): both routes only touch those rows;
   - every query and every key (a copying map of the whole prompt): numpy forms every row that
     has a target (above 4096 rows timed on ~1024 evenly spread rows and scaled, said so).
2. RazorAttention's probe (BOS + 2500 random tokens x 4, echo = duplicate_token and induction
   heads, scored on the repeats) over a Llama-shaped Hugging Face model (4 layers, d_model 256,
   8 heads, 2 kv heads, random init, float32): ``scan_model`` with the probe's spans against the
   method's own route (eager attention, each layer's full [batch, head, n, n] pattern scored as it
   is made), time and peak memory, each in a fresh process (tests/model_memory.py), and the
   largest difference of their scores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import induct_fast as inf

ROOT = Path(__file__).resolve().parents[1]
MEMORY = ROOT / "tests" / "model_memory.py"
NEEDLE = 32
D = 64


def best_time(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def needle_case(n: int, seed: int = 0):
    """A haystack of 2000 token types (so most positions have earlier copies of the next token),
    random q/k, and a planted retrieval head: every other answer query points at the needle key
    holding the token it predicts (so the score is about 0.5, and both routes must find it)."""
    rng = np.random.default_rng(seed)
    haystack = rng.integers(100, 2100, size=n - 1 - 2 * NEEDLE)
    probe = inf.probes.needle(haystack, np.arange(10, 10 + NEEDLE), depths=0.5, bos=1)
    q = rng.standard_normal((1, n, 1, D)).astype(np.float32)
    k = rng.standard_normal((1, n, 1, D)).astype(np.float32)
    needle_keys = np.flatnonzero(probe.keys[0])
    for m, i in enumerate(np.flatnonzero(probe.queries[0])):
        if m % 2 == 0:
            q[0, i, 0] = 4 * k[0, needle_keys[m], 0]
    return probe, q, k


def numpy_rows(q, k, tokens, queries, keys, rows) -> tuple[float, int]:
    """The numpy route: for each query row i, its attention row softmax(q_i . k_j / sqrt(d),
    j <= i), its argmax, and whether that key holds the next token and lies in `keys`."""
    Q, K, t = q[0, :, 0], k[0, :, 0], tokens[0]
    hits = count = 0
    for i in rows:
        if not queries[0, i] or i + 1 >= len(t):
            continue
        targets = (t[: i + 1] == t[i + 1]) & keys[0, : i + 1]
        if not targets.any():
            continue
        logits = K[: i + 1] @ Q[i] / np.sqrt(D)
        row = np.exp(logits - logits.max())
        row /= row.sum()
        hits += bool(targets[np.argmax(row)])
        count += 1
    return hits, count


def retrieval(sizes: list[int]) -> None:
    print("1. retrieval score (copy + top1 + spans) from q/k, one head, d_head 64, float32, 32-token needle")
    print(f"{'n':>6} {'queries':>9} | {'ours ms':>9} | {'numpy ms':>10} | {'speed-up':>8} | agree")
    for n in sizes:
        probe, q, k = needle_case(n)
        tokens = probe.tokens
        everything = np.ones_like(probe.queries)
        for label, queries, keys in (("answer", probe.queries, probe.keys), ("all", everything, everything)):
            def ours():
                return inf.scores_from_qk(q, k, tokens, kinds="copy", measure="top1", queries=queries, keys=keys)

            ours_t = best_time(ours)
            got = float(ours()["copy"][0, 0])
            rows = np.flatnonzero(queries[0])
            sample = rows if len(rows) <= 4096 else rows[:: len(rows) // 1024]  # evenly spread rows
            start = time.perf_counter()
            hits, count = numpy_rows(q, k, tokens, queries, keys, sample)
            numpy_t = (time.perf_counter() - start) * len(rows) / len(sample)
            scaled = "" if len(sample) == len(rows) else f"  (numpy timed on {len(sample)} evenly spread rows, scaled)"
            agree = f"{got:.4f} == {hits / count:.4f}" if len(sample) == len(rows) else f"{got:.4f}"
            print(
                f"{n:>6} {label:>9} | {ours_t * 1e3:>9.2f} | {numpy_t * 1e3:>10.1f} | {numpy_t / ours_t:>7.1f}x | {agree}{scaled}",
                flush=True,
            )


def job(mode: str, period: int) -> dict:
    done = subprocess.run([sys.executable, str(MEMORY), mode, str(period)], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def razor(period: int) -> None:
    n = 1 + 4 * period
    print(f"\n2. RazorAttention probe (BOS + {period} x 4 = {n} tokens) over a Llama-shaped model (4 layers, 8 heads, 2 kv)")
    ours, eager = job("razor", period), job("razor_eager", period)
    for name, r in (("scan_model (spans)", ours), ("eager, per-layer patterns", eager)):
        if "error" in r:
            print(f"   {name:<28} failed: {r['error'][:80]}")
        else:
            print(f"   {name:<28} {r['seconds']:>8.2f} s  peak +{r['growth'] / 1e6:>7.0f} MB")
    if "error" not in ours and "error" not in eager:
        diff = max(np.max(np.abs(np.array(ours["scores"][k]) - np.array(eager["scores"][k]))) for k in ours["scores"])
        print(f"   scan_model: {eager['seconds'] / ours['seconds']:.1f}x faster, {eager['growth'] / ours['growth']:.0f}x less memory; "
              f"scores agree to {diff:.1e}")


def main() -> None:
    quick = "--quick" in sys.argv
    retrieval([4096, 16384] if quick else [16384, 65536])
    razor(250 if quick else 2500)


if __name__ == "__main__":
    main()
