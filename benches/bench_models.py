"""Benchmark of scan_model on live models against what a user would otherwise run.

Run: python benches/bench_models.py [--quick] [--long]

1. A Llama-shaped Hugging Face model (4 layers, d_model 256, 8 heads of 32, 2 kv heads, random
   init, float32, sdpa) on one prompt of n = 2k, 8k, 16k, 32k tokens: time and peak-memory growth
   of
   - the model's own forward pass alone (``model(ids)``, sdpa, no cache), the floor;
   - ``scan_model(model, ids)`` (three token kinds), with each row's log-sum-exp taken from the
     model's own flash kernel (``via="lse"``, the default there) and recomputed
     (``via="recompute"``);
   - the route without us, where it fits in memory: eager attention with
     ``output_attentions=True`` and ``scan`` of the patterns.
   Each job runs in a fresh process (tests/model_memory.py), so each peak is its own.
   ``--long`` adds n = 64k and 128k (memory grows linearly; the forward pass, O(n^2), takes
   minutes there).
2. A TransformerLens 3.x HookedTransformer of the same shape (rotary, GQA) on 8 prompts of
   repeated random tokens (n = 512): TransformerLens's own ``detect_head`` for
   previous-token, duplicate-token and induction heads (as its docs show: one call per kind over
   the prompt strings) against ``scan_model`` for the three kinds and against
   ``scan(model.run_with_cache(...))``. (detect_head's "mul" score is a different formula from our
   mean per-query mass; its exact counterpart is ``detection_scores``, benched in
   bench_scores.py; here what is compared is the time to an answer for every head.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import induct_fast as inf
from _words import word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MEMORY = ROOT / "tests" / "model_memory.py"
MB = 1e6
KINDS = ("previous_token", "duplicate_token", "induction")


def job(mode: str, n: int) -> dict:
    done = subprocess.run([sys.executable, str(MEMORY), mode, str(n)], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def live_llama(sizes: list[int], eager_up_to: int) -> None:
    print("1. Llama-shaped HF model (4 layers, d_model 256, 8 heads, 2 kv heads), one prompt, float32, sdpa")
    print("   scan_model: via='lse' (the flash kernel's log-sum-exp, only target logits) and via='recompute'")
    print(
        f"{'n':>6} | {'forward s':>9} {'MB':>6} | {'lse s':>7} {'MB':>6} {'x fwd':>6} | "
        f"{'recompute s':>11} {'MB':>6} {'x fwd':>6} | {'eager+scan s':>12} {'MB':>7} {'vs lse':>7}"
    )
    for n in sizes:
        forward = job("forward", n)
        lse = job("scan_model", n)
        recompute = job("scan_model_recompute", n)
        eager = job("eager", n) if n <= eager_up_to else None
        row = f"{n:>6} | {forward['seconds']:>9.2f} {forward['growth'] / MB:>6.0f} | "
        row += f"{lse['seconds']:>7.2f} {lse['growth'] / MB:>6.0f} {lse['seconds'] / forward['seconds']:>6.2f} | "
        row += f"{recompute['seconds']:>11.2f} {recompute['growth'] / MB:>6.0f} {recompute['seconds'] / forward['seconds']:>6.2f} | "
        if eager is None:
            row += f"(does not fit: {4 * 8 * n * n * 4 / 1e9:.0f} GB of patterns)"
        elif "error" in eager:
            row += f"  failed: {eager['error'][:60]}"
        else:
            row += f"{eager['seconds']:>12.2f} {eager['growth'] / MB:>7.0f} {eager['seconds'] / lse['seconds']:>6.1f}x"
        print(row, flush=True)


def transformer_lens_detect_head(batch: int, period: int) -> None:
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.head_detector import detect_head

    vocab = 1024
    tokenizer = word_tokenizer(vocab)
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=4, d_model=256, n_ctx=4 * period, d_head=32, n_heads=8, n_key_value_heads=2, d_mlp=688,
        d_vocab=vocab, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=32,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer).eval()
    ids = inf.repeated_tokens(batch, period, vocab, seed=0)  # BOS (0) + period x 2
    strings = [" ".join(f"w{t}" for t in row[1:]) for row in ids]  # to_tokens prepends the BOS
    assert np.array_equal(model.to_tokens(strings).numpy(), ids)
    names = {"previous_token": "previous_token_head", "duplicate_token": "duplicate_token_head", "induction": "induction_head"}

    def tl_detect():
        return {kind: detect_head(model, strings, name) for kind, name in names.items()}

    def ours_live():
        return inf.scan_model(model, ids, kinds=KINDS)

    def ours_cache():
        with torch.no_grad():
            _, cache = model.run_with_cache(torch.as_tensor(ids), names_filter=lambda name: name.endswith("hook_pattern"))
        return inf.scan(cache, ids, kinds=KINDS)

    times = {}
    for name, fn in (("detect_head x3", tl_detect), ("scan_model", ours_live), ("run_with_cache + scan", ours_cache)):
        fn()
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        times[name] = best
    n = ids.shape[1]
    print(f"\n2. TransformerLens HookedTransformer (4 layers, d_model 256, 8 heads, 2 kv heads, rotary), {batch} prompts of n = {n}, 3 kinds")
    for name, t in times.items():
        print(f"   {name:<24} {t * 1e3:>9.1f} ms   {times['detect_head x3'] / t:>6.1f}x detect_head")


def main() -> None:
    quick = "--quick" in sys.argv
    sizes = [2048, 8192] if quick else [2048, 8192, 16384, 32768]
    if "--long" in sys.argv:  # minutes per size: the forward pass itself is O(n^2)
        sizes += [65536, 131072]
    live_llama(sizes, eager_up_to=8192)
    transformer_lens_detect_head(batch=8, period=255 if not quick else 63)


if __name__ == "__main__":
    main()
