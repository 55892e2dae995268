"""Every code block in README.md, docs/*.md and the folder READMEs runs as written (a doctest for Markdown).

Fences: ```python and ```sh blocks are executed; ```text blocks are synopses or output, never run.
A block that is too expensive or has side effects here (installs, training, image builds, rewriting
the shipped sample) carries the line ``<!-- docs-test: skip REASON -->`` right above its fence; the
reason is required and says where the command is exercised instead. Unlabelled fences are refused,
so every block is a deliberate choice.

Blocks run in a scratch folder that links to the repository's top-level entries (so that
``sample/images`` and ``weights`` resolve) while anything the block writes lands in the scratch
folder, with this checkout's packages first on PYTHONPATH.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# benchmarks/README.md is left out: its blocks are benchmark runs (minutes each) and their result
# tables, kept by benchmarks/ itself.
DOCS = sorted([REPO / "README.md", *REPO.glob("docs/*.md"),
               *(p for p in REPO.glob("*/README.md") if p.parent.name != "benchmarks")])
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
SKIP = re.compile(r"<!-- docs-test: skip (\S.*?) -->")
RUNNABLE, INERT = {"python", "sh"}, {"text"}
# Writes in a block land here, not in the checkout: entries it may create are not linked.
NOT_LINKED = {".git", "runs", "masks", "sample-masks", "demo", "out"}


def blocks():
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            skip = SKIP.fullmatch(before.strip())
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{path.relative_to(REPO)}:{line}", match.group(1).strip(), match.group(2),
                          skip.group(1) if skip else None))
    return found


BLOCKS = blocks()


def test_every_block_is_labelled_and_every_skip_has_a_reason():
    assert len(BLOCKS) > 10
    bad = [(where, lang) for where, lang, _, _ in BLOCKS if lang not in RUNNABLE | INERT]
    assert not bad, f"label these fences python, sh or text: {bad}"
    assert any(lang == "python" and skip is None for _, lang, _, skip in BLOCKS)


def _scratch(tmp_path: Path) -> Path:
    for entry in REPO.iterdir():
        if entry.name not in NOT_LINKED:
            (tmp_path / entry.name).symlink_to(entry)
    return tmp_path


def _env() -> dict:
    env = dict(os.environ)
    roots = [str(REPO / "src"), str(REPO / "training"), str(REPO / "evaluation")]
    env["PYTHONPATH"] = os.pathsep.join(roots + [env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


@pytest.mark.slow
@pytest.mark.parametrize("where, lang, code, skip", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_block_runs(where, lang, code, skip, tmp_path):
    if lang not in RUNNABLE:  # text, or unlabelled (refused by the test above): never run
        pytest.skip(f"{lang or 'unlabelled'} block: not run")
    if skip is not None:
        pytest.skip(f"marked docs-test skip: {skip}")
    work = _scratch(tmp_path)
    env = _env()
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    (bin_dir / "lsmseg").write_text(f"#!/bin/sh\nexec {sys.executable} -m lsmseg \"$@\"\n")
    (bin_dir / "lsmseg").chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{where} ({lang}) failed:\n{code}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr[-3000:]}"


def test_evaluation_readme_lists_every_alias():
    """The structure table of evaluation/README.md names every alias that `lsmseg evaluate` routes
    (lsmseg_evaluation.categories.ALIASES), each in its structure's row."""
    from lsmseg_evaluation.categories import ALIASES

    text = (REPO / "evaluation" / "README.md").read_text()
    table = text[text.index("| structure (organisers' prefix) |"):].split("\n\n", 1)[0].splitlines()[2:]
    rows = {}
    for row in table:
        names, aliases = (re.findall(r"`([^`]+)`", cell) for cell in row.strip("|").split("|")[:2])
        for alias in aliases:
            rows[alias] = names
    missing = {alias: structure for alias, structure in ALIASES.items()
               if alias != structure.lower() and structure not in rows.get(alias, ())}
    assert not missing, f"aliases missing from evaluation/README.md's structure table (or in the wrong row): {missing}"


def test_container_doc_names_every_exit_code():
    """docs/container.md's exit-code paragraph covers every code `lsmseg` defines (lsmseg.errors)."""
    from lsmseg import errors

    text = (REPO / "docs" / "container.md").read_text()
    paragraph = text[text.index("**Exit codes and errors.**"):].split("\n\n", 1)[0]
    named = {int(code) for code in re.findall(r"(?<![\w.])(\d+): ", paragraph)}
    codes = {getattr(errors, name) for name in dir(errors) if name.startswith("EXIT_")}
    assert codes <= named, f"exit codes missing from docs/container.md: {sorted(codes - named)}"
