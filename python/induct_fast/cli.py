"""The ``induct-fast`` command line (also ``python -m induct_fast``).

Every error is one line on stderr, ``induct-fast <command>: error: ...``: exit status 2 for
usage errors (bad options), 1 for errors in the input or the environment. A closed stdout
(``induct-fast demo | head -3``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Optional, Sequence

if TYPE_CHECKING:
    from .results import HeadScores

# What a scan reports as an error in its input (one line, exit status 1).
_INPUT_ERRORS = (OSError, ValueError, TypeError, KeyError, ImportError, NotImplementedError)
_EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: the message and where to find help, no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command line; returns the exit status."""
    try:
        return _run(argv)
    except BrokenPipeError:
        _silence_stdout()
        return _EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("induct-fast: interrupted", file=sys.stderr)
        return 130


def _run(argv: Optional[Sequence[str]]) -> int:
    import induct_fast

    parser = _Parser(
        prog="induct-fast",
        description="Find and measure induction circuits in transformers.",
        epilog=_MAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"induct-fast {induct_fast.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_scan_command(commands)
    _add_demo_command(commands)
    args = parser.parse_args(argv)
    status: int = args.run(args)
    sys.stdout.flush()  # a closed pipe shows here, inside main's handler, not at exit
    return status


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so that the interpreter's final flush does
    not fail again (and print a second error) on the way out."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _fail(command: str, message: Any) -> int:
    print(f"induct-fast {command}: error: {message}", file=sys.stderr)
    return 1


def _message(exc: BaseException) -> str:
    """An exception as one line (KeyError's str() adds quotes; some messages span lines)."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    return " ".join(str(text).split())


def _check_plot_target(path: str) -> None:
    """Fails before any work if matplotlib is missing or the image cannot be written there."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib (or induct_fast[plot])") from None
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise IsADirectoryError(f"--plot {path}: is a directory, expected an image file name")
    if not folder.is_dir():
        raise FileNotFoundError(f"--plot {path}: no such directory {str(folder)!r}")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"--plot {path}: directory {str(folder)!r} is not writable")


def _integer_at_least(minimum: int, what: str) -> Any:
    """An argparse type: an integer >= minimum, else a usage error saying so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            shown = repr(text) if value is None else value
            raise argparse.ArgumentTypeError(f"expected {what} integer, got {shown}")
        return value

    return parse


_non_negative_int = _integer_at_least(0, "a non-negative")
_positive_int = _integer_at_least(1, "a positive")


# -- demo ----------------------------------------------------------------------------------------


def _add_demo_command(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="run the hand-built induction-circuit model and score its heads",
        description="Build a 2-layer attention-only model with an induction circuit by hand (no download), "
        "run it on repeated random tokens and report its heads, circuit and in-context loss drop.",
    )
    demo.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the distractor weights and the tokens (>= 0)")
    demo.add_argument("--json", action="store_true", help="print the report as one JSON object")
    demo.add_argument("--plot", metavar="FILE.png", help="write heatmaps of the scores to this image (needs matplotlib)")
    demo.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        if args.plot:
            _check_plot_target(args.plot)
        return run_demo(seed=args.seed, as_json=args.json, plot=args.plot)
    except (OSError, ImportError, ValueError) as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        return _fail("demo", _message(exc))


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
  A saved TransformerLens cache (np.savez(path, **cache)) needs no --key: its
  blocks.{l}.attn.hook_pattern arrays are read, else its hook_rot_q/hook_rot_k (or hook_q/hook_k),
  scored from q and k.
  A key named "tokens" holds the token ids [n] or [batch, n] and is used unless --tokens is given;
  --tokens FILE:KEY takes the array KEY of an .npz/.safetensors file.
  Without tokens, only token-free kinds are scored by default (previous_token and any --offsets).

output:
  The table, CSV and JSON give each head's mean over the prompts (the batch axis), NaN where no
  prompt has an eligible query; --per-prompt gives every prompt's scores instead.

examples:
  induct-fast scan patterns.npy --tokens tokens.npy
  induct-fast scan patterns.npy --tokens tokens.npy --kinds induction entropy --offsets 49 --csv
  induct-fast scan probe.npz --key 'blocks.*.attn.hook_pattern' --kinds copy --measure top1 \
      --queries probe.npz:queries --keys probe.npz:keys
  induct-fast scan cache.npz --key 'blocks.*.attn.hook_pattern' --json
  induct-fast scan ref.npz --key L2_rep_patterns --tokens ref.npz:L2_rep_tokens
  induct-fast scan cache.safetensors --exclude-bos --table --plot heads.png
"""

_TOKEN_KINDS = ("duplicate_token", "induction", "copy")


def _add_scan_command(commands: Any) -> None:
    import induct_fast

    scan = commands.add_parser(
        "scan",
        help="score every head from attention patterns in a .npy/.npz/.safetensors file",
        description="Score every attention head from patterns (or a saved cache's queries and keys) stored in "
        "a file, one layer at a time.",
        epilog=_SCAN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scan.add_argument("patterns", metavar="PATTERNS", help="a .npy, .npz or .safetensors file of attention patterns")
    scan.add_argument(
        "--tokens",
        metavar="FILE[:KEY]",
        help="token ids [n] or [batch, n]: .npy, .npz or .safetensors (KEY: which array), or text (one sequence per line)",
    )
    scan.add_argument("--key", metavar="GLOB", help="select the layer arrays of a .npz/.safetensors file by name (a glob)")
    scan.add_argument(
        "--kinds",
        nargs="+",
        metavar="KIND",
        help=f"kinds to score (default: {' '.join(induct_fast.DEFAULT_KINDS)}); any of {', '.join(induct_fast.KINDS)}",
    )
    scan.add_argument("--offsets", nargs="+", type=_positive_int, default=[], metavar="D", help="also score offset_D heads (attention to i - D)")
    scan.add_argument("--exclude-bos", action="store_true", help="renormalise every row without key 0 first")
    scan.add_argument(
        "--measure",
        choices=("mass", "top1"),
        default="mass",
        help="mass: attention mass on the targets (default); top1: whether the row's argmax key is a target",
    )
    scan.add_argument("--queries", metavar="FILE[:KEY]", help="0/1 span [n] or [batch, n] of the queries to score")
    scan.add_argument("--keys", metavar="FILE[:KEY]", help="0/1 span [n] or [batch, n] of the keys that count as targets")
    output = scan.add_mutually_exclusive_group()
    output.add_argument("--table", dest="format", action="store_const", const="table", help="an aligned table (default)")
    output.add_argument("--json", dest="format", action="store_const", const="json", help="JSON: kinds, shape, batch, scores[kind][layer][head]")
    output.add_argument("--csv", dest="format", action="store_const", const="csv", help="CSV: one row per (layer, head)")
    scan.add_argument(
        "--per-prompt",
        action="store_true",
        help="every prompt's scores, not the mean over prompts (table/CSV: a prompt column; JSON: per_prompt)",
    )
    scan.add_argument("--plot", metavar="FILE.png", help="also write heatmaps (one panel per kind) to this image")
    scan.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no notes on stderr")
    scan.set_defaults(run=_scan, format="table")


def _scan(args: argparse.Namespace) -> int:
    """Runs ``induct-fast scan``; errors in the input are reported on one line, exit status 1."""
    try:
        if args.plot:
            _check_plot_target(args.plot)
        scores, note = _scan_file(args)
        sys.stdout.write(_format_scores(scores, args.format, args.per_prompt))
        if args.plot:
            scores.plot().savefig(args.plot, dpi=120)
    except _INPUT_ERRORS as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        return _fail("scan", _message(exc))
    if note and not args.quiet:
        print(f"induct-fast scan: note: {note}", file=sys.stderr)
    return 0


def _scan_file(args: argparse.Namespace) -> tuple[HeadScores, Optional[str]]:
    """The scores of the file, and a note for stderr (or None)."""
    import induct_fast
    from induct_fast.files import load_tokens, open_patterns, split_key

    source = open_patterns(args.patterns, key=args.key)
    tokens = load_tokens(*split_key(args.tokens)) if args.tokens else source.tokens
    kinds, note = _scan_kinds(args.kinds, tokens is not None)
    spans: dict[str, Any] = {
        name: load_tokens(*split_key(spec), name=name) if spec else None
        for name, spec in (("queries", args.queries), ("keys", args.keys))
    }
    scores = induct_fast.scan(
        source,
        tokens,
        kinds=kinds,
        offsets=args.offsets,
        exclude_bos=args.exclude_bos,
        measure=args.measure,
        progress=not args.quiet,
        **spans,
    )
    return scores, note


def _scan_kinds(requested: Optional[Sequence[str]], have_tokens: bool) -> tuple[list[str], Optional[str]]:
    """The requested kinds (``a b`` or ``a,b``), or the defaults that the available input allows,
    and a note when the defaults were cut down."""
    import induct_fast

    if requested:
        kinds = [k for item in requested for k in item.split(",") if k]
        needs = [k for k in kinds if k in _TOKEN_KINDS]
        if needs and not have_tokens:
            raise ValueError(
                f"--kinds {needs[0]} needs token ids: pass --tokens FILE[:KEY] or store a 'tokens' array in the file"
            )
        return kinds, None
    if have_tokens:
        return list(induct_fast.DEFAULT_KINDS), None
    kinds = [k for k in induct_fast.DEFAULT_KINDS if k not in _TOKEN_KINDS]
    return kinds, f"no tokens (--tokens FILE[:KEY]), so only {', '.join(kinds)} (and any --offsets) were scored"


def _format_scores(scores: HeadScores, fmt: str, per_prompt: bool) -> str:
    if fmt == "json":
        import json

        return json.dumps(scores.to_dict(per_prompt=per_prompt), allow_nan=False) + "\n"
    if fmt == "csv":
        return _csv(scores, per_prompt)
    return _table(scores, per_prompt)


def _table(scores: HeadScores, per_prompt: bool) -> str:
    prompts = f"{scores.batch} prompt{'s' if scores.batch != 1 else ''}"
    if not per_prompt:
        caption = f"# mean over {prompts} of each head's score (nan: no prompt had an eligible query)"
        return caption + "\n" + scores.to_table() + "\n"
    width = max([8] + [len(kind) for kind in scores.kinds])
    lines = [
        f"# every prompt's scores ({prompts}; nan: no eligible query in that prompt)",
        "prompt  layer  head  " + "  ".join(f"{kind:>{width}}" for kind in scores.kinds),
    ]
    for prompt, layer, head in _cells(scores, True):
        values = ("nan" if v != v else f"{v:.3f}" for v in _values(scores, prompt, layer, head))
        lines.append(f"{prompt:>6}  {layer:>5}  {head:>4}  " + "  ".join(f"{c:>{width}}" for c in values))
    return "\n".join(lines) + "\n"


def _cells(scores: HeadScores, per_prompt: bool) -> list[tuple[int, int, int]]:
    prompts = range(scores.batch) if per_prompt else [-1]
    return [(p, layer, head) for p in prompts for layer in range(scores.n_layers) for head in range(scores.n_heads)]


def _values(scores: HeadScores, prompt: int, layer: int, head: int) -> list[float]:
    if prompt < 0:
        return [float(scores[kind][layer, head]) for kind in scores.kinds]
    return [float(scores.per_prompt[kind][prompt, layer, head]) for kind in scores.kinds]


def _csv(scores: HeadScores, per_prompt: bool) -> str:
    """One row per (layer, head) (per prompt: per (prompt, layer, head)), a column per kind; NaN
    as an empty field; values as repr, so they read back exactly."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["prompt", "layer", "head", *scores.kinds] if per_prompt else ["layer", "head", *scores.kinds])
    for prompt, layer, head in _cells(scores, per_prompt):
        cells = ["" if v != v else repr(v) for v in _values(scores, prompt, layer, head)]
        writer.writerow([prompt, layer, head, *cells] if per_prompt else [layer, head, *cells])
    return out.getvalue()


if __name__ == "__main__":
    sys.exit(main())
