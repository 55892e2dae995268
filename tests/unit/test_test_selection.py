"""LSMSEG_CONTAINER_TESTS works both ways; the slow marker reaches the whole-pipeline tests."""

import subprocess
import sys

import pytest

from ..conftest import REPO, container_tests_enabled


@pytest.mark.parametrize("setting, tools, runs", [
    ("1", False, True), ("1", True, True),      # opt in: build_image.sh installs the tools
    ("0", True, False), ("0", False, False),    # opt out, even where podman and buildah are installed
    (None, True, True), (None, False, False),   # unset: exactly when the tools are there
    ("", True, True),
])
def test_container_switch(setting, tools, runs):
    assert container_tests_enabled(setting, tools)[0] is runs


def test_container_switch_refuses_other_values():
    with pytest.raises(pytest.UsageError):
        container_tests_enabled("yes", True)


def test_not_slow_leaves_out_the_pipelines():
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "slow", "-p", "no:cacheprovider",
         "tests/integration/test_training_smoke.py", "tests/integration/test_cli.py"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    ).stdout
    selected = [line for line in out.splitlines() if "::" in line]
    assert selected and all("test_training_smoke.py" in line for line in selected)
