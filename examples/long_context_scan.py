"""Score heads over a long context from cached queries and keys, without the n x n patterns.

At n = 16384 one head's pattern is 1 GiB in float32; scores_from_qk computes the same scores
tile by tile with an online softmax in a few MB. Here q and k are synthetic, on tokens that
repeat with period 1000: head 0 attends to the previous position, head 1 to position
i - 999 (the token after the previous occurrence of the current one: an induction head),
heads 2-3 are random.

Run:  python examples/long_context_scan.py [n]
"""

import sys
import time

import numpy as np

import induct_fast as ift

n = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
period = 1000
d_head = 16
rng = np.random.default_rng(0)
tokens = np.concatenate([[0], np.tile(rng.permutation(np.arange(1, period + 1)), n // period + 1)])[:n]


def looks_back(offset, sharpness=5.0):
    """q, k rows whose logit is -sharpness * (j - (i - offset))^2 plus a per-row constant, so
    query i attends to key i - offset: q_i . k_j with k_j = (1, j, j^2)."""
    target = np.arange(n, dtype=np.float64) - offset
    q = sharpness * np.stack([-(target**2), 2 * target, -np.ones(n)], axis=1)
    k = np.stack([np.ones(n), np.arange(n, dtype=np.float64), np.arange(n, dtype=np.float64) ** 2], axis=1)
    return q, k


# float64: logits of size sharpness * n^2 need its precision to keep neighbours apart.
q = rng.normal(scale=0.3, size=(1, n, 4, d_head))
k = rng.normal(scale=0.3, size=(1, n, 4, d_head))
q[0, :, 0, :3], k[0, :, 0, :3] = looks_back(1)  # head 0: previous token
q[0, :, 1, :3], k[0, :, 1, :3] = looks_back(period - 1)  # head 1: induction on the repeats

start = time.perf_counter()
scores = ift.scores_from_qk(q, k, tokens, kinds=("previous_token", "induction", "entropy"), scale=1.0)
elapsed = time.perf_counter() - start
print(f"n = {n}, 4 heads, d_head = {d_head}: {elapsed * 1e3:.0f} ms "
      f"(the float64 patterns would be {4 * n * n * 8 / 2**30:.1f} GiB)")
for kind, values in scores.items():
    print(f"  {kind:>15}: " + "  ".join(f"{v:.3f}" for v in values[0]))
assert scores["previous_token"][0, 0] > 0.9 and scores["induction"][0, 1] > 0.9
