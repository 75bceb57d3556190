"""The ``induct-fast`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        return run_demo(seed=args.seed, as_json=args.json, plot=args.plot)
    except ImportError as exc:  # --plot without matplotlib
        print(f"induct-fast demo: {exc}", file=sys.stderr)
        return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    import induct_fast

    parser = argparse.ArgumentParser(prog="induct-fast", description="Find and measure induction circuits in transformers.")
    parser.add_argument("--version", action="version", version=f"induct-fast {induct_fast.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the hand-built induction-circuit model and score its heads")
    demo.add_argument("--seed", type=int, default=0, help="seed of the distractor weights and the tokens")
    demo.add_argument("--json", action="store_true", help="print the report as one JSON object")
    demo.add_argument("--plot", metavar="FILE", help="write heatmaps of the scores to this PNG (needs matplotlib)")
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
