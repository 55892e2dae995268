"""The README's two set-up commands are the ones CI and users actually run."""

import re
from pathlib import Path

import pytest

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


def _figures(cell: str) -> list[float]:
    """The numbers of a table cell ('**0.470 ± 0.227**' -> [0.47, 0.227]; NaN counts left out)."""
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", re.sub(r"\(\d+ NaN\)", "", cell))]


def test_readme_test_table_matches_its_records():
    """Every figure of the README's test-split table is the one recorded in weights/manifest.yaml
    (`test`), or, for the shipped weights' vessel Betti errors, in their record of 2026-12-03: a
    cell that says "not recorded" or is left empty while a record holds the figure is caught too."""
    import yaml

    test = yaml.safe_load((REPO / "weights" / "manifest.yaml").read_text())["models"]["general"]["test"]
    columns = ["this_model", "previous_shipped_8c1decb4f2c3", "previous_weights_f4df85524441", "smoothed_otsu"]
    text = (REPO / "README.md").read_text()
    table = text[text.index("| structure (cases) | metric |"):].split("\n\n", 1)[0].splitlines()[2:]
    betti_record = (REPO / "evaluation" / "results" / "vessel_test_betti_2026-12-03.md").read_text()
    shipped_betti = [float(x) for x in re.search(r"\| \*\*(\d+)\*\* \| \*\*(\d+)\*\* \|", betti_record).groups()]
    keys = {"Dice": ["dice"], "clDice": ["cldice"], "PQ": ["panoptic_quality"],
            "Betti-0 / Betti-1 error": ["betti0_error", "betti1_error"]}
    structure, checked = None, 0
    for row in table:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        structure = cells[0].split(" (")[0] or structure
        for column, cell in zip(columns, cells[3:]):
            record = test[column][structure]
            if keys[cells[1]][0].startswith("betti") and column == "this_model":
                expected = shipped_betti
            else:
                expected = []
                for key in keys[cells[1]]:
                    expected += [record[key]["mean"]] + ([record[key]["std"]] if "std" in record[key] else [])
            assert _figures(cell) == pytest.approx(expected, abs=6e-4), f"{structure} {cells[1]} {column}: {cell!r}"
            checked += 1
    assert checked == 7 * 4
