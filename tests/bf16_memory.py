"""Peak memory of the kernels on large bfloat16 inputs, measured in a process of its own.

    python tests/bf16_memory.py

prints one JSON object {job: {"growth": bytes, "seconds": s, "input": bytes}}: for each job the
growth of peak resident memory over the resident memory just before it (tests/peak_memory.py's
``measure``, as tests/model_memory.py uses it), so building the inputs does not count.
The inputs are filled cheaply (one head written, then copied over the whole tensor), and every
job reads real values. ``widened_qk`` is the old route (``.float()`` first), kept as a control
that the measurement sees a float32 copy. Used by tests/test_bfloat16.py.
"""

from __future__ import annotations

import json
import time

import ml_dtypes
import numpy as np
import torch

import induct_fast as inf
from peak_memory import measure

# 1.2 GB of bfloat16 patterns [16, 12, 12, 512, 512] (a float32 copy would add 2.4 GB).
PATTERNS = (16, 12, 12, 512, 512)
# q [64, 1024, 16, 64] (128 MiB) and k with 4 kv heads (32 MiB): a float32 copy adds 320 MiB.
Q, K = (64, 1024, 16, 64), (64, 1024, 4, 64)
# logits [4, 512, 32768] (128 MiB).
LOGITS = (4, 512, 32768)


def causal_patterns(shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform causal rows 1 / (i + 1), one head computed and copied over the rest."""
    n = shape[-1]
    head = (torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]).to(torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    out.view(-1, n, n).copy_(head.expand(out.numel() // (n * n), n, n))
    return out


def noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Values in [-1, 1): one random [n, heads, d] block copied over the batch axis."""
    gen = torch.Generator().manual_seed(seed)
    block = (torch.rand(shape[1:], generator=gen) * 2 - 1).to(torch.bfloat16)
    return block.expand(shape).contiguous()


def main() -> None:
    n = PATTERNS[-1]
    tokens = inf.repeated_tokens(PATTERNS[0], period=n // 2, vocab_size=50000, seed=0)[:, :n]
    results = {}

    def sized(job, nbytes: int) -> dict:
        return {**measure(job), "input": nbytes}

    patterns = causal_patterns(PATTERNS)
    size = patterns.numel() * 2
    inf.head_scores(patterns[:1, :1], tokens[:1])  # first-call costs (thread pool) are not measured
    results["head_scores_torch"] = sized(lambda: inf.head_scores(patterns, tokens), size)
    results["detection_scores_torch"] = sized(lambda: inf.detection_scores(patterns, "previous_token"), size)
    as_ml = patterns.view(torch.int16).numpy().view(ml_dtypes.bfloat16)  # a JAX-style numpy array, same memory
    results["head_scores_ml_dtypes"] = sized(lambda: inf.head_scores(as_ml, tokens), size)
    transposed = patterns.transpose(0, 2)  # a strided view [12, 12, 16, n, n]
    results["head_scores_transposed"] = sized(lambda: inf.head_scores(transposed, kinds="previous_token"), size)
    del patterns, as_ml, transposed

    q, k = noise(Q, 1), noise(K, 2)
    qk_tokens = inf.repeated_tokens(Q[0], period=Q[1] // 2, vocab_size=50000, seed=0)[:, : Q[1]]
    kinds = ("previous_token", "induction")
    # The lse path: only target logits are computed, so the job is quick and bounded by reads.
    _, lse = inf.scores_from_qk(q[:1], k[:1], qk_tokens[:1], kinds=kinds, return_lse=True)
    lse = np.broadcast_to(lse, (Q[0], *lse.shape[1:]))
    qk_bytes = (q.numel() + k.numel()) * 2
    results["scores_from_qk"] = sized(lambda: inf.scores_from_qk(q, k, qk_tokens, kinds=kinds, lse=lse), qk_bytes)
    results["widened_qk"] = sized(
        lambda: inf.scores_from_qk(q.float(), k.float(), qk_tokens, kinds=kinds, lse=lse), qk_bytes
    )
    del q, k

    logits = noise(LOGITS, 3)
    ids = np.random.default_rng(0).integers(0, LOGITS[-1], size=LOGITS[:2])
    results["token_losses"] = sized(lambda: inf.token_losses(logits, ids), logits.numel() * 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
