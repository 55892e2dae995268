"""The README's two set-up commands are the ones CI and users actually run."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _shell_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    blocks = _shell_blocks((REPO / "README.md").read_text())
    test_command = next(b for b in blocks if "pytest" in b)
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_readme_main_command_uses_the_bundled_sample():
    blocks = _shell_blocks((REPO / "README.md").read_text())
    main_command = blocks[0]
    assert "lsmseg predict sample/images" in main_command
    assert any((REPO / "sample" / "images").iterdir())
