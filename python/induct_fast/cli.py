"""The ``induct-fast`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import numpy as np


def _synthetic_patterns(tokens: np.ndarray, n_layers: int, n_heads: int, seed: int) -> np.ndarray:
    """Causal softmax patterns [batch, layer, head, n, n] of random logits, with L0H1 boosted
    towards the previous token and L1H2 towards induction targets (a stand-in until the hand-built
    demo model exists)."""
    rng = np.random.default_rng(seed)
    batch, n = tokens.shape
    logits = rng.normal(size=(batch, n_layers, n_heads, n, n))
    rows = np.arange(1, n)
    logits[:, 0, 1, rows, rows - 1] += 6.0
    earlier = tokens[:, :, None] == tokens[:, None, :]  # [b, i, p]: t[p] == t[i]
    induction = np.zeros((batch, n, n), dtype=bool)
    induction[:, :, 1:] = np.tril(earlier[:, :, :-1], k=-1)  # key p + 1 for every earlier p
    logits[:, 1, 2][induction] += 6.0
    logits = np.where(np.tril(np.ones((n, n), dtype=bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def _demo(args: argparse.Namespace) -> int:
    import induct_fast as inf

    tokens = inf.repeated_tokens(4, period=20, vocab_size=500, seed=args.seed)
    patterns = _synthetic_patterns(tokens, n_layers=2, n_heads=4, seed=args.seed)
    scores = {k: v.mean(axis=0) for k, v in inf.head_scores(patterns, tokens).items()}
    print(f"head scores on repeated random tokens, patterns {patterns.shape} (synthetic)")
    print("layer head " + " ".join(f"{k:>16}" for k in scores))
    for layer in range(patterns.shape[1]):
        for head in range(patterns.shape[2]):
            print(f"{layer:>5} {head:>4} " + " ".join(f"{v[layer, head]:>16.3f}" for v in scores.values()))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    import induct_fast

    parser = argparse.ArgumentParser(prog="induct-fast", description="Find and measure induction circuits in transformers.")
    parser.add_argument("--version", action="version", version=f"induct-fast {induct_fast.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="score the heads of the built-in demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
