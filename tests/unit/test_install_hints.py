"""Every install hint names an extra that pyproject.toml defines; `lsmseg evaluate` checks its own first."""

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXTRAS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
# lsmseg[eval], ".[dev]", '.[eval,dev]', -e .[train]
HINT = re.compile(r"(?:lsmseg|\.)\[([A-Za-z0-9_,\- ]+)\]")


def _hint_sources() -> list[Path]:
    files = [REPO / "README.md", REPO / "Dockerfile", REPO / ".ci" / "run", REPO / "pyproject.toml"]
    for pattern in ("src/**/*.py", "training/**/*.py", "evaluation/**/*.py", "scripts/*", "benchmarks/*.py",
                    "docs/*.md", "*/README.md"):
        files += REPO.glob(pattern)
    return sorted(f for f in set(files) if f.is_file())


def test_every_install_hint_names_a_defined_extra():
    found = []
    for path in _hint_sources():
        for match in HINT.finditer(path.read_text(errors="replace")):
            for extra in match.group(1).split(","):
                found.append((path.relative_to(REPO), extra.strip()))
    assert len(found) >= 5  # the pattern does find the hints
    unknown = [(str(path), extra) for path, extra in found if extra not in EXTRAS]
    assert not unknown, f"hints naming extras pyproject.toml does not define: {unknown}"


def test_no_hint_suggests_installing_a_core_dependency_as_an_extra():
    core = {re.split(r"[<>=\[ ;]", d)[0].lower() for d in
            tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert "zarr" in core
    offending = [(str(path.relative_to(REPO)), match.group(0)) for path in _hint_sources()
                 for match in HINT.finditer(path.read_text(errors="replace")) if match.group(1).lower() in core]
    assert not offending, f"hints that present a core dependency as optional: {offending}"


def test_evaluate_checks_the_eval_extra_against_pyproject():
    from lsmseg_evaluation.cli import EVAL_MODULES

    declared = {re.split(r"[<>=\[ ;]", d)[0] for d in EXTRAS["eval"]}
    assert set(EVAL_MODULES.values()) == declared


def test_evaluate_without_the_extra_stops_first_with_the_pip_command(tmp_path, monkeypatch, capsys):
    from lsmseg import cli
    from lsmseg_evaluation import cli as eval_cli

    monkeypatch.setattr(eval_cli, "EVAL_MODULES", {**eval_cli.EVAL_MODULES, "no_such_module_lsmseg": "scikit-image"})
    code = cli.main(["evaluate", "--pred", str(tmp_path / "missing"), "--labels", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip().splitlines() == [
        "ERROR: lsmseg evaluate needs the 'eval' extra (missing: scikit-image): "
        "pip install 'lsmseg[eval]', or from a clone: pip install -e '.[eval]'"
    ]
