"""Benchmark of induct_fast's scores against the numpy a user would write (DESIGN.md section 4).

Run:  python benches/bench_scores.py            (~20 s on 2 cores; 1.2 GB of patterns, 2.5 GB peak
                                                 with the float64 diagnostic; --no-extra skips it)
      python benches/bench_scores.py --small    (shape [2, 2, 4, 1024, 1024], for a quick check)
      python benches/bench_scores.py --bf16-only  (only (e): bfloat16 against float32, needs torch)

Prints the array sizes, then one table row per measurement: our time, the baseline's time, the
ratio (baseline / ours, > 1 means we are faster, or for (c) the fraction of the measured 2-thread
read bandwidth) and PASS/BELOW against its target. Every timing is the best (min) of >= 3 repeats
after one warm-up, with time.perf_counter. Results are checked against the baselines first.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time

import numpy as np

import induct_fast as inf
from _words import word_tokenizer

KINDS = ("previous_token", "duplicate_token", "induction")


# ----------------------------------------------------------------------------------------------
# data


def make_patterns(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Causal, row-normalised float32 patterns: random values, lower-triangular, rows sum to 1.

    Filled one [n, n] head at a time so memory stays at the output plus a few MB.
    """
    *lead, n, _ = shape
    out = np.empty(shape, dtype=np.float32)
    flat = out.reshape(-1, n, n)
    rng = np.random.default_rng(seed)
    tril = np.tril(np.ones((n, n), dtype=bool))
    buf = np.empty((n, n), dtype=np.float32)
    for h in range(flat.shape[0]):
        rng.random(out=buf, dtype=np.float32)
        buf *= tril
        buf /= buf.sum(axis=1, keepdims=True)
        flat[h] = buf
    return out


def make_tokens(batch: int, n: int) -> np.ndarray:
    # repeated_tokens returns 1 + 2 * period tokens; period 512 gives 1025, cut to n = 1024.
    period = n // 2
    tokens = inf.repeated_tokens(batch, period=period, vocab_size=50000, seed=0)[:, :n]
    assert tokens.shape == (batch, n), tokens.shape
    return tokens


# ----------------------------------------------------------------------------------------------
# numpy baselines


def numpy_masks(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """0/1 float32 target masks [b, n, n] per kind, rows i = query, columns j = key."""
    b, n = tokens.shape
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    prev = np.broadcast_to((j == i - 1), (b, n, n)).astype(np.float32)
    same = tokens[:, :, None] == tokens[:, None, :]  # [b, i, j]: t[i] == t[j]
    dup = (same & (j < i)).astype(np.float32)
    # induction: j >= 1, t[j-1] == t[i], j-1 < i
    ind = np.zeros((b, n, n), dtype=np.float32)
    ind[:, :, 1:] = same[:, :, :-1] & (j[:, :-1] < i)
    # C-contiguous like the patterns (astype of a broadcast view keeps odd strides, slowing einsum).
    return {k: np.ascontiguousarray(m) for k, m in (("previous_token", prev), ("duplicate_token", dup), ("induction", ind))}


def numpy_head_scores(patterns: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
    masks = numpy_masks(tokens)
    out = {}
    for kind, mask in masks.items():
        eligible = (mask.sum(-1) > 0).sum(-1).astype(np.float64)  # [b]
        out[kind] = np.einsum("blhij,bij->blh", patterns, mask) / eligible[:, None, None]
    return out


def numpy_offset(patterns: np.ndarray, d: int) -> np.ndarray:
    return np.diagonal(patterns, offset=-d, axis1=-2, axis2=-1).mean(-1)


def numpy_sum_threads_list(parts: list) -> float:
    """Sum the 1-d arrays `parts` on 2 Python threads (numpy drops the GIL), half the parts each."""
    results = [0.0, 0.0]

    def work(k: int) -> None:
        results[k] = float(sum(float(p.sum()) for p in parts[k::2]))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(results)


def numpy_sum_threads(flat_halves: np.ndarray) -> float:
    """Sum each row of `flat_halves` ([k, m]) on its own Python thread (numpy drops the GIL)."""
    results = [0.0] * flat_halves.shape[0]

    def work(k: int) -> None:
        results[k] = float(flat_halves[k].sum())

    threads = [threading.Thread(target=work, args=(k,)) for k in range(flat_halves.shape[0])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(results)


# ----------------------------------------------------------------------------------------------
# timing


def best_time(fn, repeats: int = 3, min_total: float = 0.3, max_repeats: int = 50) -> float:
    """Best of >= `repeats` calls after one warm-up; fast calls repeat until ~`min_total` s."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_total and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def fmt_t(t: float) -> str:
    return f"{t * 1e3:9.2f} ms" if t < 10 else f"{t:9.2f} s "


ROWS: list[str] = []


def row(name: str, ours: float, base: float | None, ratio: float | None, target: float | None, unit: str = "x") -> None:
    base_s = fmt_t(base) if base is not None else " " * 12
    if ratio is None:
        ratio_s, mark = "", ""
    else:
        ratio_s = f"{ratio:7.2f}{unit}" if unit == "x" else f"{ratio:7.3f} "
        mark = "" if target is None else (f">= {target:<5g}" + ("PASS" if ratio >= target else "BELOW"))
    line = f"{name:<48} {fmt_t(ours)} {base_s} {ratio_s:>9}  {mark}"
    ROWS.append(line)
    print(line, flush=True)


def header(title: str) -> None:
    line = f"\n{title}\n{'measurement':<48} {'ours':>12} {'baseline':>12} {'ratio':>9}  target"
    ROWS.append(line)
    print(line, flush=True)


# ----------------------------------------------------------------------------------------------


def offset_section(causal: np.ndarray, shape: tuple[int, ...], R: int, no_extra: bool) -> None:
    """(b): offset_scores against numpy's strided diagonal mean on causal patterns (the stack of
    the other sections) and on uniform random ones (not causal, rows not normalised), with the
    default threads and with one, plus small heads that stay in cache."""
    n = shape[-1]
    rng = np.random.default_rng(1)
    random = np.empty_like(causal)
    for flat in random.reshape(-1, n, n):
        rng.random(out=flat, dtype=np.float32)
    header("(b) offset_scores(patterns, d) vs np.diagonal(offset=-d).mean(-1) (targets: >= 1 at 2 threads, >= 0.8 at 1)")
    nthreads = inf.get_num_threads()
    small = {"causal": make_patterns((1, 1, 288, 64, 64)), "random": rng.random((1, 1, 288, 64, 64), dtype=np.float32)}
    try:
        for threads, target in ((nthreads, 1.0), (1, 0.8)):
            inf.set_num_threads(threads)
            for name, pats in (("causal", causal), ("random", random)):
                for d in (1, 511) if threads == nthreads else (1,):
                    err = float(np.max(np.abs(inf.offset_scores(pats, d) - numpy_offset(pats, d))))
                    assert err < 1e-5, err
                    t_ours = best_time(lambda: inf.offset_scores(pats, d), R, min_total=0.5)
                    t_base = best_time(lambda: numpy_offset(pats, d), R, min_total=0.5)
                    row(f"{name}, offset {d}, {threads} thread{'s' if threads > 1 else ''}", t_ours, t_base, t_base / t_ours,
                        target if d == 1 else None)
            if no_extra:
                continue
            for name, pats in small.items():
                ts = best_time(lambda: inf.offset_scores(pats, 1), R, min_total=0.3, max_repeats=500)
                tsn = best_time(lambda: numpy_offset(pats, 1), R, min_total=0.3, max_repeats=500)
                row(f"  in-cache [1,1,288,64,64] {name}, {threads} thr", ts, tsn, tsn / ts, 0.2)
    finally:
        inf.set_num_threads(nthreads)
    del random


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="shape [2, 2, 4, 1024, 1024] for a quick check")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-extra", action="store_true", help="skip the (b) and (c) diagnostics (f64, 1 thread)")
    parser.add_argument("--no-tl", action="store_true", help="skip (d)'s TransformerLens detect_head comparison")
    parser.add_argument("--only", choices=("a", "b", "c", "d", "e"), action="append", help="run only these sections")
    parser.add_argument("--bf16-only", action="store_true", help="only (e), bfloat16 against float32 (= --only e)")
    args = parser.parse_args()
    if args.bf16_only:
        bfloat16_rows(args.repeats, args.small)
        return 0

    b, n = 2, 1024
    shape = (b, 2, 4, n, n) if args.small else (b, 12, 12, n, n)
    t0 = time.perf_counter()
    patterns = make_patterns(shape)
    tokens = make_tokens(b, n)
    gb = patterns.nbytes / 1e9
    print(f"python {platform.python_version()}, numpy {np.__version__}, induct_fast {inf.__version__}, "
          f"cores {os.cpu_count()}, induct_fast.get_num_threads() = {inf.get_num_threads()}")
    print(f"patterns: float32 {list(patterns.shape)} = {patterns.nbytes / 2**30:.3f} GiB ({gb:.3f} GB), "
          f"{int(np.prod(shape[:-2]))} heads, filled in {time.perf_counter() - t0:.1f} s")
    print(f"tokens:   int64 {list(tokens.shape)} (repeated random, period {n // 2}, vocab 50000)")
    R = args.repeats

    want = lambda section: args.only is None or section in args.only  # noqa: E731
    # ---------------- (a) token kinds ----------------
    if want("a"):
        ours = inf.head_scores(patterns, tokens)
        base = numpy_head_scores(patterns, tokens)
        for k in KINDS:
            err = float(np.max(np.abs(ours[k] - base[k])))
            assert err < 1e-5, (k, err)
        header("(a) head_scores: 3 token kinds vs numpy masks + 3 einsums ('blhij,bij->blh') / eligible")
        t_ours = best_time(lambda: inf.head_scores(patterns, tokens), R)
        t_base = best_time(lambda: numpy_head_scores(patterns, tokens), R, min_total=0)
        row("head_scores(3 kinds) vs masks+3 einsums", t_ours, t_base, t_base / t_ours, 20)
        masks = numpy_masks(tokens)
        t_mask = best_time(lambda: numpy_masks(tokens), R)
        t_ein = {k: best_time(lambda m=m: np.einsum("blhij,bij->blh", patterns, m), R, min_total=0) for k, m in masks.items()}
        row("  (baseline part: building the 3 masks)", t_mask, None, None, None)
        funcs = {
            "previous_token": lambda: inf.previous_token_scores(patterns),
            "duplicate_token": lambda: inf.duplicate_token_scores(patterns, tokens),
            "induction": lambda: inf.induction_scores(patterns, tokens),
        }
        for k in KINDS:
            t = best_time(funcs[k], R)
            row(f"  {k} alone vs its einsum", t, t_ein[k], t_ein[k] / t, None)

    # ---------------- (b) offset ----------------
    if want("b"):
        offset_section(patterns, shape, R, args.no_extra)

    # ---------------- (c) detection, full pass ----------------
    if want("c"):
        D = np.eye(n, k=-1, dtype=np.float32)  # previous-token matrix, explicit 0/1 array
        det = inf.detection_scores(patterns, D, measure="mul")
        ref = np.einsum("...ij,ij->...", patterns, D, dtype=np.float64) / patterns.sum((-2, -1), dtype=np.float64)
        err = float(np.max(np.abs(det - ref)))
        assert err < 1e-5, err
        header("(c) detection_scores, full pass vs numpy read bandwidth (ratio = fraction of 2-thread GB/s)")
        halves = patterns.reshape(2, -1)
        whole = patterns.reshape(-1)
        t_np2 = best_time(lambda: numpy_sum_threads(halves), R)
        t_np1 = best_time(lambda: whole.sum(), R)
        t_mul = best_time(lambda: inf.detection_scores(patterns, D, measure="mul"), R)
        t_abs = best_time(lambda: inf.detection_scores(patterns, D, measure="abs"), R)
        bw2, bw1 = gb / t_np2, gb / t_np1
        row("numpy sum, 2 Python threads (bandwidth ref)", t_np2, None, None, None)
        row("numpy sum, 1 thread", t_np1, None, None, None)
        row("detection_scores(D, 'mul')", t_mul, t_np2, (gb / t_mul) / bw2, 0.7, unit="frac")
        row("detection_scores(D, 'abs')", t_abs, t_np2, (gb / t_abs) / bw2, 0.7, unit="frac")
        bw_line = (f"read bandwidth GB/s: numpy 2 threads {bw2:.2f}, numpy 1 thread {bw1:.2f}, "
                   f"ours mul {gb / t_mul:.2f}, ours abs {gb / t_abs:.2f}")
        print(bw_line)

        if not args.no_extra:
            header("(c) diagnostics")
            t = best_time(lambda: inf.detection_scores(patterns, "previous_token", measure="mul"), R)
            row("  detection 'mul', kind name instead of D", t, t_np2, (gb / t) / bw2, None, unit="frac")
            # numpy's float32 sum is partly compute-bound; the same bytes read as float64 (finite
            # values: the high half of each pair is a float32 in [0, 1]) are a tighter bandwidth bound.
            as64 = patterns.reshape(-1).view(np.float64).reshape(2, -1)
            t_np2_64 = best_time(lambda: numpy_sum_threads(as64), R)
            row("  numpy sum of same bytes viewed f64, 2 threads", t_np2_64, None, None, None)
            row("  detection 'mul' vs that f64-view bandwidth", t_mul, t_np2_64, t_np2_64 / t_mul, None, unit="frac")
            nthreads = inf.get_num_threads()
            inf.set_num_threads(1)
            try:
                t1 = best_time(lambda: inf.detection_scores(patterns, D, measure="mul"), R)
            finally:
                inf.set_num_threads(nthreads)
            row("  detection 'mul', set_num_threads(1) vs np 1 thr", t1, t_np1, (gb / t1) / bw1, None, unit="frac")
            # float64 copy of a quarter of the heads (same bytes as a float32 half): GB/s per dtype.
            sub = patterns[:, :, :6] if not args.small else patterns[:, :, :2]
            sub64 = sub.astype(np.float64)
            gb64 = sub64.nbytes / 1e9
            t64 = best_time(lambda: inf.detection_scores(sub64, D, measure="mul"), R)
            t64np = best_time(lambda: numpy_sum_threads(sub64.reshape(2, -1)), R)
            row(f"  detection 'mul' float64 {list(sub64.shape[:3])} heads", t64, t64np, (gb64 / t64) / (gb64 / t64np), None, unit="frac")
            print(f"  float64: {sub64.nbytes / 1e9:.3f} GB, ours {gb64 / t64:.2f} GB/s, numpy 2 threads {gb64 / t64np:.2f} GB/s")
            del sub64

    # ---------------- (d) detection, several kinds in one pass ----------------
    if want("d"):
        header("(d) detection_scores: 3 kinds in one call vs one kind (ratio = 1 kind / 3 kinds; >= 1/1.4)")
        for measure in ("mul", "abs"):
            t1k = best_time(lambda: inf.detection_scores(patterns, "previous_token", measure=measure), R)
            t3k = best_time(lambda: inf.detection_scores(patterns, list(KINDS), tokens=tokens, measure=measure), R)
            row(f"detection 3 kinds vs 1 kind, '{measure}'", t3k, t1k, t1k / t3k, 0.715)
        if not args.no_tl:
            transformer_lens_detect_head(R)

    patterns = halves = whole = None  # (e) builds its own arrays: free these (and their views)
    if want("e"):
        bfloat16_rows(R, args.small)
    return 0


def transformer_lens_detect_head(repeats: int) -> None:
    """TransformerLens's detect_head (one call per kind, on a cache, as its docs show) against
    detection_scores with the three kinds in one call on the same cache, patterns gathered from it
    included. A randomly initialised attention-only HookedTransformer (its scores are beside the
    point: both sides compute the same formulas, checked first); one prompt, since detect_head
    takes a cache for a single prompt only."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.head_detector import detect_head

    vocab, period, n_layers, n_heads = 1024, 511, 4, 8
    tokenizer = word_tokenizer(vocab)
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=256, n_ctx=2 * period + 2, d_head=32, n_heads=n_heads, d_vocab=vocab, attn_only=True,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer).eval()
    ids = inf.repeated_tokens(1, period, vocab, seed=0)  # BOS (0) + period x 2
    seq = " ".join(f"w{t}" for t in ids[0, 1:])  # to_tokens prepends the BOS
    assert np.array_equal(model.to_tokens(seq).numpy(), ids)
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.as_tensor(ids), remove_batch_dim=True)
    names = {"previous_token": "previous_token_head", "duplicate_token": "duplicate_token_head", "induction": "induction_head"}
    n = ids.shape[1]

    for measure in ("mul", "abs"):
        def tl(measure=measure):
            return {k: detect_head(model, seq, name, cache=cache, error_measure=measure) for k, name in names.items()}

        def ours(measure=measure):
            # Layer by layer on the cache's own tensors (no copy; stacking them into one array
            # first costs more than scoring: 134 MB of fresh pages).
            per_layer = [
                inf.detection_scores(cache["pattern", layer], list(KINDS), tokens=ids[0], measure=measure)
                for layer in range(n_layers)
            ]
            return {k: np.stack([scores[k] for scores in per_layer]) for k in KINDS}

        want, got = tl(), ours()
        for k in KINDS:
            err = float(np.max(np.abs(got[k] - want[k].numpy())))
            assert err < (1e-5 if measure == "mul" else 6e-4), (k, measure, err)
        if measure == "mul":
            header(f"(d) vs TransformerLens detect_head on one cache: {n_layers} layers x {n_heads} heads, n = {n}, float32")
        t_tl = best_time(tl, repeats, min_total=0)
        t_ours = best_time(ours, repeats)
        row(f"3 kinds '{measure}': detection_scores vs detect_head x3", t_ours, t_tl, t_tl / t_ours, 25)
    # Both measures need every entry (the 'mul' denominator sums the whole pattern; 'abs' checks the
    # upper triangle is zero, as detect_head asserts), so reading the cache once bounds any
    # implementation: the same bytes summed as float64 on 2 threads (numpy's float32 sum is partly
    # compute-bound), and the ratio detect_head would have against that bare read.
    layers = [cache["pattern", layer].numpy().reshape(-1).view(np.float64) for layer in range(n_layers)]
    halves = [part for flat in layers for part in np.array_split(flat, 2)]
    t_read = best_time(lambda: numpy_sum_threads_list(halves), repeats)
    gb = sum(flat.nbytes for flat in layers) / 1e9
    row(f"  read the cache once ({gb:.3f} GB, {gb / t_read:.1f} GB/s)", t_read, t_tl, t_tl / t_read, None)
    print(f"  the last row is the most any reader of these patterns could reach against detect_head ('abs'); ours reads "
          f"at {gb / t_ours:.1f} GB/s")


if __name__ == "__main__":
    sys.exit(main())
