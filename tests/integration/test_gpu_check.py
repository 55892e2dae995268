"""scripts/gpu_check.sh --dry-run: every step of the GPU check on the CPU, and what would come back from a device."""

import json
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET

from ..conftest import REPO

STEPS = ["pack", "environment", "cuda-tests", "bench", "training", "weights"]


def test_dry_run_writes_every_result(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(REPO / "scripts/gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                            env={**os.environ, "OUT": str(out), "TMPDIR": str(tmp_path)}, timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    assert result.returncode == 0 and summary["ok"], (summary, result.stdout[-3000:])
    assert [s["step"] for s in summary["steps"]] == STEPS and summary["dry_run"]

    # What a device call returns: at most 8 plain files, none over 16 MiB, no folders.
    files = sorted(out.iterdir())
    assert len(files) <= 8 and all(f.is_file() and f.stat().st_size <= 16 * 2**20 for f in files), files
    with tarfile.open(out / "results.tar.gz") as tar:
        tar.extractall(tmp_path / "back", filter="data")
    results = tmp_path / "back" / "results"
    suite = ET.parse(results / "junit.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) >= 10 and int(suite.get("failures")) == int(suite.get("errors")) == 0
    checks = {json.loads(line)["check"] for line in (results / "cuda_report.jsonl").read_text().splitlines()}
    assert {"cpu_vs_cuda_logits", "autocast_vs_fp32", "blockwise_vs_one_pass", "torchrun_one_process",
            "dask_one_gpu_worker", "challenge_exec"} <= checks
    assert json.loads((results / "bench_vs_monai.json").read_text())
    run = json.loads((results / "training" / "run.json").read_text())
    assert run["steps"] >= 1 and run["config"]["max_seconds"] and run["history"]
    assert "torch" in (results / "environment.txt").read_text()

    # The fp16 parts reassemble into weights that load (sha256 checked part by part and whole).
    joined = subprocess.run([sys.executable, str(REPO / "scripts/gpu_weights.py"), "join", str(out / "gpu_general.json"),
                             "-o", str(tmp_path / "weights")], capture_output=True, text=True, timeout=300)
    assert joined.returncode == 0, joined.stderr[-2000:]
    from lsmseg.inference import Predictor

    assert Predictor.from_manifest(tmp_path / "weights", device="cpu", engine="torch").model_config.feature_size == 12
