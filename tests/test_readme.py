"""Every ```python block of README.md runs as written, top to bottom in one namespace, offline
(the demo's hand-built model and models built from configs), in a fresh folder; then the shell
examples of "Files and the command line" run on the files those blocks wrote."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

# Checks run right after the block under the given heading (the namespace is the README's).
CHECKS = {
    "## Scores from attention patterns": "assert scores['induction'].mean(axis=0).argmax() == 6  # L1H2",
    "## Live models: `scan_model`": "assert scores.n_layers == 4 and scores.n_heads == 8",
    "## Scanning a whole model: `scan` and `HeadScores`": textwrap.dedent(
        """
        assert scores.kinds == ('previous_token', 'duplicate_token', 'induction')
        assert os.path.getsize('heads.png') > 10_000 and '<table' in scores._repr_html_()
        """
    ),
    "## Dask": "assert float(scores['induction'].mean(axis=0).compute()[1, 2]) > 0.99",
}

DRIVER = """
import json, os, sys, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__readme__"}
for heading, code in blocks:
    try:
        exec(compile(code, f"README.md ({heading})", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        sys.exit(f"README block under {heading!r} failed")
"""


def python_blocks(text: str) -> list[tuple[str, str]]:
    """(heading, code) of every ```python block, in order; a check follows its section's last block."""
    blocks, heading = [], ""
    for match in re.finditer(r"^(#{2,3} [^\n]*)$|^```python\n(.*?)^```", text, flags=re.M | re.S):
        if match.group(1):
            heading = match.group(1).strip()
        else:
            blocks.append((heading, match.group(2)))
    return blocks


def shell_commands(text: str, heading: str) -> list[str]:
    section = text[text.index(heading):]
    section = section[: section.index("\n## ", 1)]
    block = re.search(r"^```sh\n(.*?)^```", section, flags=re.M | re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.strip()]


def test_readme_python_blocks_run_in_order(tmp_path):
    text = README.read_text()
    blocks = python_blocks(text)
    assert len(blocks) >= 8, [h for h, _ in blocks]
    with_checks = []
    for index, (heading, code) in enumerate(blocks):
        with_checks.append((heading, code))
        last_of_section = index + 1 == len(blocks) or blocks[index + 1][0] != heading
        if heading in CHECKS and last_of_section:
            with_checks.append((heading + " (check)", "import os\n" + CHECKS[heading]))
    assert {h for h in CHECKS} <= {h for h, _ in blocks}
    (tmp_path / "blocks.json").write_text(json.dumps(with_checks))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    done = subprocess.run(
        [sys.executable, "driver.py", "blocks.json"], cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env
    )
    assert done.returncode == 0, done.stderr[-4000:]
    for name in ("patterns.npy", "tokens.npy", "cache.npz", "heads.png"):
        assert (tmp_path / name).is_file(), name

    # The shell examples, on the files the blocks wrote (a line with "..." is a pattern, not a command).
    fixture = README.parents[1] / "shared" / "fixtures" / "attn_only_tl_reference.npz"
    for command in shell_commands(text, "## Files and the command line"):
        if "..." in command:
            continue
        command = command.replace("../shared/fixtures/attn_only_tl_reference.npz", str(fixture))
        command = re.sub(r"^(induct-fast|python -m induct_fast)", f"{shlex.quote(sys.executable)} -m induct_fast", command)
        run = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 0, (command, run.stderr[-2000:])
        assert "Traceback" not in run.stderr
    assert json.loads((tmp_path / "scores.json").read_text())["shape"] == [2, 4]
