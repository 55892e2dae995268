"""Training on CUDA: `torchrun --nproc_per_node 1` fine-tuning over NCCL, with fp16 autocast and its GradScaler."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from ..conftest import REPO, run_lsmseg
from .conftest import STAND_IN_ROI

pytestmark = pytest.mark.cuda

STEPS = 3


def test_torchrun_one_process_finetunes_over_the_process_group(gpu, tmp_path):
    """DDP in a process group of one (NCCL on the GPU), fp16 autocast with a GradScaler, validation at the end."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                "--nproc_per_node", "1", "-m", "lsmseg"]
    steps = 2 if gpu.stand_in else STEPS
    overrides = [f"device={gpu.device.type}", "pretrained=null", "epochs=1", f"steps_per_epoch={steps}",
                 "optim.amp=true", "optim.amp_dtype=fp16", "validation.every=0", "validation.final_overlap=null",
                 "data.train_phantoms.kinds=[vessels, cells]", "data.validation_phantoms.kinds=[vessels]"]
    if gpu.stand_in:  # (the dry run's own training step validates on the CPU)
        overrides += ["batch_size=1", f"model.roi=[{', '.join(map(str, STAND_IN_ROI))}]",
                      "data.train_phantoms.shape=[32, 48, 64]", "data.validation_phantoms=null"]
    result = run_lsmseg("finetune", "-c", REPO / "training/configs/smoke_finetune.yaml",
                        *[arg for o in overrides for arg in ("--set", o)], cwd=tmp_path, launcher=launcher,
                        env={"OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs/smoke/finetune"
    record = json.loads((run / "run.json").read_text())
    scaler = torch.load(run / "checkpoint_last.pt", map_location="cpu", weights_only=True)["scaler"]
    validated = record["history"][-1]["best_dice"] if record.get("history") else None
    gpu.report("torchrun_one_process", backend=gpu.backend, steps=record["steps"], seconds=record["seconds"],
               validation_dice=validated, grad_scale=scaler.get("scale"))
    assert f"joined the {gpu.backend} process group" in result.stderr
    assert record["world_size"] == 1 and record["steps"] == steps
    assert gpu.stand_in or math.isfinite(validated)
    # The GradScaler runs exactly where fp16 autocast does: on the GPU, never on the CPU.
    assert bool(scaler) == (gpu.device.type == "cuda")
