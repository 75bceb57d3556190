"""Benchmark of ``token_losses`` against the numpy a user would write: log-softmax + gather.

Run:  python benches/bench_losses.py            logits [8, 1024, 50257] float32 (1.65 GB; the
                                               numpy baseline needs ~3.5 GB more for temporaries)
      python benches/bench_losses.py --small    [2, 256, 50257], for a quick check
      python benches/bench_losses.py --batch 4  [4, 1024, 50257]

Prints the sizes, then our time, numpy's time and the ratio (numpy / ours, > 1 means we are
faster; target >= 10), then ours on one thread, and the CPU time per logit (process time, which a
busy shared machine inflates less than wall time). Each timing is the best of 3 after one
warm-up; results are checked against each other.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

import induct_fast as inf


def make_logits(batch: int, n: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Gaussian float32 logits, filled one sequence at a time (no float64 temporary)."""
    rng = np.random.default_rng(seed)
    logits = np.empty((batch, n, vocab), dtype=np.float32)
    for b in range(batch):
        rng.standard_normal(out=logits[b], dtype=np.float32)
        logits[b] *= 3.0
    return logits


def numpy_losses(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """log_softmax(logits[:, :-1]) gathered at tokens[:, 1:], negated, in float32 like torch."""
    x = logits[:, :-1]
    shifted = x - x.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]


def best_of(fn, repeats: int = 3, clock=time.perf_counter) -> tuple[float, object]:
    result = fn()  # warm-up (page faults, thread pool)
    times = []
    for _ in range(repeats):
        start = clock()
        result = fn()
        times.append(clock() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="logits [2, 256, 50257]")
    parser.add_argument("--batch", type=int, default=8, help="batch of [batch, 1024, 50257] (default 8)")
    args = parser.parse_args()
    batch, n, vocab = (2, 256, 50257) if args.small else (args.batch, 1024, 50257)

    logits = make_logits(batch, n, vocab)
    tokens = np.random.default_rng(1).integers(0, vocab, size=(batch, n))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, induct_fast threads: {inf.get_num_threads()}")
    print(f"logits: {logits.shape} {logits.dtype}, {logits.nbytes / 1e9:.2f} GB; tokens: {tokens.shape}")

    ours_s, ours = best_of(lambda: inf.token_losses(logits, tokens))
    base_s, base = best_of(lambda: numpy_losses(logits, tokens))
    err = float(np.max(np.abs(ours - base)))
    assert err < 1e-3, f"token_losses disagrees with numpy by {err}"
    print(f"max |ours - numpy float32| = {err:.2e}")
    print(f"{'measurement':<40} {'ours':>9} {'numpy':>9} {'ratio':>7}  target")
    ratio = base_s / ours_s
    print(f"{'token_losses vs log-softmax + gather':<40} {ours_s:>8.3f}s {base_s:>8.3f}s {ratio:>6.1f}x  >= 10 {'PASS' if ratio >= 10 else 'BELOW'}")
    read = logits[:, :-1].nbytes
    threads = inf.get_num_threads()
    try:
        inf.set_num_threads(1)
        one_s, _ = best_of(lambda: inf.token_losses(logits, tokens))
        cpu_s, _ = best_of(lambda: inf.token_losses(logits, tokens), clock=time.process_time)
    finally:
        inf.set_num_threads(threads)
    print(f"{'  token_losses, set_num_threads(1)':<40} {one_s:>8.3f}s {base_s:>8.3f}s {base_s / one_s:>6.1f}x")
    print(f"ours reads logits at {read / ours_s / 1e9:.2f} GB/s ({threads} threads), {read / one_s / 1e9:.2f} GB/s (1 thread)")
    print(f"CPU time on 1 thread: {cpu_s / (read / 4) * 1e9:.3f} ns per logit ({read / cpu_s / 1e9:.2f} GB/s per busy core)")


if __name__ == "__main__":
    main()
