"""The ``induct-fast`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        return run_demo(seed=args.seed, as_json=args.json, plot=args.plot)
    except ImportError as exc:  # --plot without matplotlib
        print(f"induct-fast demo: {exc}", file=sys.stderr)
        return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    import induct_fast

    parser = argparse.ArgumentParser(
        prog="induct-fast",
        description="Find and measure induction circuits in transformers.",
        epilog=_MAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"induct-fast {induct_fast.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_scan_command(commands)
    demo = commands.add_parser("demo", help="run the hand-built induction-circuit model and score its heads")
    demo.add_argument("--seed", type=int, default=0, help="seed of the distractor weights and the tokens")
    demo.add_argument("--json", action="store_true", help="print the report as one JSON object")
    demo.add_argument("--plot", metavar="FILE", help="write heatmaps of the scores to this PNG (needs matplotlib)")
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)


# -- scan ----------------------------------------------------------------------------------------

_MAIN_EXAMPLES = """\
examples:
  induct-fast scan patterns.npy --tokens tokens.npy         score every head, print a table
  induct-fast scan cache.npz --json > scores.json            JSON (batch axis averaged)
  induct-fast demo                                           the built-in demo

run 'induct-fast scan --help' for the file layouts.
"""

_SCAN_EXAMPLES = """\
file layouts (see induct_fast.files):
  .npy          [batch, layer, head, n, n] (memory-mapped, one layer at a time), or one layer
                [batch, head, n, n]
  .npz          one stacked 5-d array, or one [batch, head, n, n] array per layer, layers in
                natural key order (layer2 < layer10); uncompressed members are memory-mapped
  .safetensors  the same layouts as .npz (needs the safetensors package)
  A key named "tokens" holds the token ids [n] or [batch, n] and is used unless --tokens is given.
  Without tokens, only token-free kinds are scored by default (previous_token and any --offsets).

examples:
  induct-fast scan patterns.npy --tokens tokens.npy
  induct-fast scan patterns.npy --tokens tokens.npy --kinds induction entropy --offsets 49 --csv
  induct-fast scan cache.npz --key 'blocks.*.attn.hook_pattern' --json
  induct-fast scan cache.safetensors --exclude-bos --table --plot heads.png
"""

_TOKEN_KINDS = ("duplicate_token", "induction")


def _add_scan_command(commands: Any) -> None:
    import induct_fast

    scan = commands.add_parser(
        "scan",
        help="score every head from attention patterns in a .npy/.npz/.safetensors file",
        description="Score every attention head from patterns stored in a file, one layer at a time.",
        epilog=_SCAN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scan.add_argument("patterns", metavar="PATTERNS", help="a .npy, .npz or .safetensors file of attention patterns")
    scan.add_argument("--tokens", metavar="FILE", help="token ids [n] or [batch, n]: .npy, .npz, .safetensors or text (one sequence per line)")
    scan.add_argument("--key", metavar="GLOB", help="select the layer arrays of a .npz/.safetensors file by name (a glob)")
    scan.add_argument(
        "--kinds",
        nargs="+",
        metavar="KIND",
        help=f"kinds to score (default: {' '.join(induct_fast.DEFAULT_KINDS)}); any of {', '.join(induct_fast.KINDS)}",
    )
    scan.add_argument("--offsets", nargs="+", type=int, default=[], metavar="D", help="also score offset_D heads (attention to i - D)")
    scan.add_argument("--exclude-bos", action="store_true", help="renormalise every row without key 0 first")
    output = scan.add_mutually_exclusive_group()
    output.add_argument("--table", dest="format", action="store_const", const="table", help="an aligned table (default)")
    output.add_argument("--json", dest="format", action="store_const", const="json", help="JSON: kinds, shape, batch, scores[kind][layer][head]")
    output.add_argument("--csv", dest="format", action="store_const", const="csv", help="CSV: one row per (layer, head)")
    scan.add_argument("--plot", metavar="FILE.png", help="also write heatmaps (one panel per kind) to this image")
    scan.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    scan.set_defaults(run=_scan, format="table")


def _scan(args: argparse.Namespace) -> int:
    """Runs ``induct-fast scan``; errors in the input are reported on one line, exit status 1."""
    try:
        scores = _scan_file(args)
        sys.stdout.write(_format_scores(scores, args.format))
        if args.plot:
            _write_plot(scores, args.plot)
    except (OSError, ValueError, TypeError, KeyError, ImportError, NotImplementedError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"induct-fast scan: error: {message}", file=sys.stderr)
        return 1
    return 0


def _scan_file(args: argparse.Namespace) -> Any:
    import induct_fast
    from induct_fast.files import load_tokens, open_patterns

    source = open_patterns(args.patterns, key=args.key)
    tokens = load_tokens(args.tokens) if args.tokens else source.tokens
    kinds = _scan_kinds(args.kinds, tokens is not None)
    return induct_fast.scan(
        source, tokens, kinds=kinds, offsets=args.offsets, exclude_bos=args.exclude_bos, progress=not args.quiet
    )


def _scan_kinds(requested: Optional[Sequence[str]], have_tokens: bool) -> list:
    """The requested kinds (``a b`` or ``a,b``), or the defaults that the available input allows."""
    import induct_fast

    if requested:
        kinds = [k for item in requested for k in item.split(",") if k]
        needs = [k for k in kinds if k in _TOKEN_KINDS]
        if needs and not have_tokens:
            raise ValueError(f"--kinds {needs[0]} needs token ids: pass --tokens FILE or store a 'tokens' array in the file")
        return kinds
    if have_tokens:
        return list(induct_fast.DEFAULT_KINDS)
    print("induct-fast scan: no tokens (--tokens FILE), scoring previous_token only", file=sys.stderr)
    return [k for k in induct_fast.DEFAULT_KINDS if k not in _TOKEN_KINDS]


def _format_scores(scores: Any, fmt: str) -> str:
    if fmt == "json":
        import json

        return json.dumps(scores.to_dict(), allow_nan=False) + "\n"
    if fmt == "csv":
        return _csv(scores)
    return scores.to_table() + "\n"


def _csv(scores: Any) -> str:
    """One row per (layer, head), a column per kind; NaN as an empty field."""
    import csv
    import io
    import math

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["layer", "head", *scores.kinds])
    for layer in range(scores.n_layers):
        for head in range(scores.n_heads):
            values = (float(scores[kind][layer, head]) for kind in scores.kinds)
            writer.writerow([layer, head, *("" if math.isnan(v) else repr(v) for v in values)])
    return out.getvalue()


def _write_plot(scores: Any, path: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib") from None
    figure = scores.plot()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
