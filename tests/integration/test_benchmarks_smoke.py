"""The benchmark scripts still run against the package's API: each on tiny synthetic inputs (phantoms, the
block plan alone), a few seconds a child process. Not a measurement: the figures are checked for shape
(the expected rows, ratios finite and positive), never for speed."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from ..conftest import REPO

BENCH = REPO / "benchmarks"
WEIGHTS = REPO / "weights"


def needs(*modules: str) -> None:
    """Skip unless every named module is installed (the benchmarks' optional dependencies)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


def run_script(name: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python benchmarks/NAME ARGS`` from the repository root; a failure shows the script's error output."""
    result = subprocess.run([sys.executable, str(BENCH / name), *map(str, args)], capture_output=True, text=True,
                            check=False, cwd=REPO, timeout=timeout)
    assert result.returncode == 0, f"{name} exit {result.returncode}:\n{result.stderr[-3000:]}"
    return result


def markdown_rows(text: str) -> list[dict]:
    """The rows of the last Markdown table in ``text``, as {header: cell}."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    start = max(i for i, line in enumerate(lines) if line.startswith("|---"))
    headers = [h.strip() for h in lines[start - 1].strip("|").split("|")]
    rows = []
    for line in lines[start + 1:]:
        rows.append(dict(zip(headers, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_window_reuse_plan_alone():
    rows = markdown_rows(run_script("window_reuse.py", "--shapes", "256,512,512", "--caps-mb", "0,1024").stdout)
    got = {(r["on the grid"], r["cache cap (MB)"]): r for r in rows}
    assert set(got) == {("no", "0"), ("no", "1024"), ("yes", "0"), ("yes", "1024")}
    assert all(int(r["windows run"]) >= int(r["windows"]) > 0 for r in rows)
    # README ("Window reuse across block borders"): 256x512x512 runs 1.14x its windows without the cache, 1.00x with it.
    assert float(got["yes", "0"]["runs / windows"]) > 1.0
    assert float(got["yes", "1024"]["runs / windows"]) == 1.0


def test_bench_scaling_stand_in(tmp_path):
    needs("monai")
    out = tmp_path / "scaling.json"
    run_script("bench_scaling.py", "--base", "32,64,64", "--block", "32,64,64", "--sizes", "1,4", "--no-monai",
               "--no-prefetch", "--no-cache-at", "", "--threads", "1", "--json", out)
    rows = json.loads(out.read_text())
    assert [(r["factor"], r["variant"]) for r in rows] == [("1x", "lsmseg"), ("4x", "lsmseg")]
    assert [r["runs"] for r in rows] == ["1/1", "9/9"]  # 4x = 32x128x128 in four 32x64x64 blocks: 9 distinct windows
    assert all(positive(r["seconds"]) and positive(r["rss"]) and positive(r["growth"]) for r in rows)
    assert rows[0]["growth"] == 1.0


def test_bench_vs_monai_phantom(tmp_path):
    needs("monai")
    out = tmp_path / "vs_monai.json"
    run_script("bench_vs_monai.py", "--phantom-shape", "32,64,64", "--wide-shape", "", "--no-real",
               "--variants", "monai,lsmseg-no-skip", "--threads", "1", "--json", out)
    rows = json.loads(out.read_text())
    by_variant = {r["variant"]: r for r in rows}
    assert set(by_variant) == {"monai", "lsmseg-no-skip"}
    for row in rows:
        assert positive(row["speedup"]) and positive(row["cpu_speedup"]), row
        assert 0.0 <= row["dice"] <= 1.0
    # Without skipping, lsmseg runs MONAI's windows with MONAI's blending: the same mask up to float rounding.
    assert by_variant["lsmseg-no-skip"]["agree"] >= 0.99


def test_bench_seed_phantom_only(tmp_path):
    """No real data: the wide-field phantom alone (``--vesselnn '' --delivr ''``), shipped weights."""
    needs("monai")
    if not (WEIGHTS / "manifest.yaml").is_file():
        pytest.skip("shipped weights absent")
    out = tmp_path / "seed.jsonl"
    result = run_script("bench_seed.py", "--weights", WEIGHTS, "--vesselnn", "", "--delivr", "",
                        "--wide-field", "32,64,64:32,96,96", "--variants", "seed,lsmseg", "--threads", "1",
                        "--json", out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["variant"] for r in lines) == ["lsmseg", "seed"]
    assert all(positive(r["seconds"]) and positive(r["peak_rss_mb"]) for r in lines)
    seed, lsmseg = sorted(lines, key=lambda r: r["variant"] != "seed")
    assert lsmseg["window_runs"] <= lsmseg["windows"] and lsmseg["windows"] > 0
    assert abs(seed["dice"] - lsmseg["dice"]) < 0.02  # the same network on the same windows
    rows = markdown_rows(result.stdout)
    assert [r["variant"] for r in rows] == ["seed", "lsmseg"]
    assert all(positive(float(r["throughput vs seed (wall)"])) for r in rows)


def test_bench_evaluation_tiny():
    needs("panoptica", "cc3d")
    rows = markdown_rows(run_script("bench_evaluation.py", "--cases", "1", "--jobs", "1", "--size", "32",
                                    "--cells", "20").stdout)
    assert [r["what"] for r in rows] == ["panoptica PQ alone", "leaderboard values (Dice + PQ)",
                                         "evaluate, all metrics, read + score, --jobs 1"]
    assert all(positive(float(r["per case (mean)"].split()[0])) for r in rows[2:])


@pytest.mark.parametrize("script", ["engines_onnx_memory.py", "engines_onnx_check.py", "engines_torch_variants.py"])
def test_argv_scripts_print_their_usage(script):
    """These read sys.argv by hand: --help printed a WeightsError, or (engines_onnx_memory) ran a 30-second
    measurement as the "off" setting."""
    result = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                            check=False, cwd=REPO, timeout=60)
    assert result.returncode == 0 and f"python benchmarks/{script}" in result.stdout, result.stderr[-2000:]


def test_engines_onnx_memory_usage_error():
    result = subprocess.run([sys.executable, str(BENCH / "engines_onnx_memory.py")], capture_output=True,
                            text=True, check=False, cwd=REPO, timeout=60)
    assert result.returncode == 2 and "usage: engines_onnx_memory.py on|off" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("args, message", [
    (["--volumes", "nerves"], "argument --volumes: expected some of cfos_neuron,microglia,blood_vessel, got 'nerves'"),
    (["--reps", "0"], "argument --reps: expected a whole number >= 1, got '0'"),
])
def test_engines_openvino_refuses_bad_options_before_measuring(args, message):
    result = subprocess.run([sys.executable, str(BENCH / "engines_openvino.py"), "weights", *args],
                            capture_output=True, text=True, check=False, cwd=REPO, timeout=60)
    assert result.returncode == 2 and result.stderr.splitlines()[-1] == f"engines_openvino.py: error: {message}"
    assert result.stdout == ""  # nothing measured
