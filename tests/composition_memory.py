"""Peak memory and time of composition_scores on random weights, measured in a process of its own.

    python tests/composition_memory.py L H H_KV D_MODEL D_HEAD DTYPE [MODES] [BUDGET_MIB]

DTYPE is float32 (numpy arrays) or bfloat16 (torch tensors); MODES defaults to QKV (one call);
BUDGET_MIB overrides the working-memory budget of induct_fast.circuits. Prints JSON: the growth of
peak resident memory (bytes) over the resident memory just before the call (the weights are built
first and do not count; writing 5 to /proc/self/clear_refs resets the kernel's record of peak RSS,
VmHWM, to the current RSS), the seconds the call took, the bytes of the inputs and of the scores,
and a few score values (so a caller can check them against a smaller run).
Used by tests/test_circuits_memory.py and benches/bench_circuits.py.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from peak_memory import measure

from induct_fast import circuits


def weights(L: int, H: int, H_kv: int, d_model: int, d_head: int, dtype: str, seed: int = 0) -> list:
    """W_Q, W_K, W_V [L, H or H_kv, d_model, d_head] and W_O [L, H, d_head, d_model], i.i.d. normal."""
    shapes = [(L, H, d_model, d_head), (L, H_kv, d_model, d_head), (L, H_kv, d_model, d_head), (L, H, d_head, d_model)]
    if dtype == "bfloat16":
        import torch

        g = torch.Generator().manual_seed(seed)
        return [torch.randn(s, generator=g, dtype=torch.bfloat16) for s in shapes]
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s, dtype=np.float32) for s in shapes]


def main() -> None:
    L, H, H_kv, d_model, d_head = (int(v) for v in sys.argv[1:6])
    dtype = sys.argv[6]
    modes = tuple(sys.argv[7]) if len(sys.argv) > 7 else ("Q", "K", "V")
    budget = int(sys.argv[8]) << 20 if len(sys.argv) > 8 else circuits._WORK_BYTES
    W = weights(L, H, H_kv, d_model, d_head, dtype)
    inputs = sum(int(np.prod(w.shape)) * (2 if dtype == "bfloat16" else 4) for w in W)
    circuits._composition(*(w[:2, :1] for w in W), modes)  # first-call costs (imports, thread pool)
    scores: dict = {}
    result = measure(lambda: scores.update(circuits._composition(*W, modes, budget=budget)))
    growth, seconds = result["growth"], result["seconds"]
    outputs = sum(s.nbytes for s in scores.values())
    sample = {m: s[0, 0, 1, : min(H, 4)].tolist() for m, s in scores.items()}
    print(json.dumps({"growth": growth, "seconds": seconds, "inputs": inputs, "outputs": outputs, "sample": sample}))


if __name__ == "__main__":
    main()
