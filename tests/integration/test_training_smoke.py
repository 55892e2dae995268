"""The smoke configs end to end, as CI runs them: pretrain -> finetune -> export -> predict.

Plus resuming, the 2-process gloo (DistributedDataParallel) run and refusals before training.
Every run happens in a temporary folder: the configs' relative ``runs/smoke/...`` paths land there.
"""

import json
import shutil
import sys

import numpy as np
import pytest
import yaml

from lsmseg import io

from ..conftest import REPO, run_lsmseg

CONFIGS = REPO / "training" / "configs"


def lsmseg(*args, cwd, launcher=None):
    return run_lsmseg(*args, cwd=cwd, launcher=launcher, env={"OMP_NUM_THREADS": "1"})


def _config(tmp_path, name, data_changes=None, **changes):
    data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    data.update(changes)
    data["data"].update(data_changes or {})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Pretrain (interrupted after one epoch, then resumed), fine-tune, export."""
    work = tmp_path_factory.mktemp("smoke")
    first = lsmseg("pretrain", "-c", _config(work, "smoke_pretrain", epochs=1), cwd=work)
    assert first.returncode == 0, first.stderr
    resumed = lsmseg("pretrain", "-c", _config(work, "smoke_pretrain"), "--resume", cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    # Fine-tuned with the "log" upper tail from a clipped pretraining, as the ablation in training/README.md,
    # keeping a moving average of the weights (what it validates and keeps).
    finetune = lsmseg("finetune", "-c", _config(work, "smoke_finetune", data_changes={"upper_tail": "log"},
                                                average_decay=0.5), cwd=work)
    assert finetune.returncode == 0, finetune.stderr
    export = lsmseg("export", "runs/smoke/finetune", "-o", "weights", "--min-component-voxels", "5", cwd=work)
    assert export.returncode == 0, export.stderr
    return {"work": work, "resumed": resumed, "finetune": finetune}


def test_resume_continues_the_same_run(smoke_run):
    work = smoke_run["work"]
    assert "resumed runs/smoke/pretrain/checkpoint_last.pt at step 2" in smoke_run["resumed"].stderr
    steps = [line.split(",")[0] for line in (work / "runs/smoke/pretrain/log.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4"]
    assert (work / "runs/smoke/pretrain/encoder.safetensors").is_file()


def test_finetune_reports_the_encoder_match_and_validates(smoke_run):
    work = smoke_run["work"]
    assert "89 of 89 encoder tensors matched" in smoke_run["finetune"].stderr
    record = json.loads((work / "runs/smoke/finetune/run.json").read_text())
    assert [h["step"] for h in record["history"]] == [2, 4]
    assert record["best"]["step"] in (2, 4) and record["final"]["step"] == 4
    assert 0.0 <= record["best"]["evaluation"]["best_dice"] <= 1.0
    assert record["pretrained"]["matched"] == 89


def test_finetune_keeps_the_moving_average_of_the_weights(smoke_run):
    """With average_decay, the final weights are the checkpoint's average, not the last step's weights."""
    import torch

    from lsmseg.weights import load_state_dict

    run = smoke_run["work"] / "runs/smoke/finetune"
    checkpoint = torch.load(run / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    final = load_state_dict(run / "final.safetensors", json.loads((run / "run.json").read_text())["final"]["sha256"])
    assert int(checkpoint["averaged"]["n_averaged"]) == checkpoint["step"] == 4
    assert set(final) == set(checkpoint["model"])
    for name, tensor in final.items():
        torch.testing.assert_close(tensor, checkpoint["averaged"][f"module.{name}"])
    assert any(not torch.equal(final[name], checkpoint["model"][name]) for name in final)


def test_export_manifest_then_predict_with_it(smoke_run):
    from lsmseg.weights import load_manifest, sha256_file

    work = smoke_run["work"]
    manifest = load_manifest(work / "weights")
    entry = manifest.models["general"]
    assert entry.sha256 == sha256_file(work / "weights" / entry.file)
    assert entry.inference.overlap == 0.5 and entry.inference.blend == "gaussian"
    assert entry.inference.min_component_voxels == 5
    assert entry.inference.threshold == entry.validation["threshold"]
    assert entry.inference.spacing is None  # the smoke run trains on the native grid
    assert entry.inference.upper_tail == "log"  # inference normalises as training did
    assert set(entry.validation["per_volume"]) == {"vessels_100", "nuclei_100"}
    assert len(entry.provenance["training_data"]["sha256"]) == 64
    assert entry.provenance["training_config"]["name"] == "smoke_finetune"
    assert "train" in entry.provenance["splits"]  # by source; the smoke sets name no source pattern
    assert entry.provenance["versions"]["torch"]

    image_path, _ = _phantom(work)
    result = lsmseg("predict", image_path, "-o", work / "masks", "--weights", work / "weights", "-q", cwd=work)
    assert result.returncode == 0, result.stderr
    mask = io.read_volume(work / "masks" / image_path.name).load()
    assert mask.shape == io.read_volume(image_path).shape and set(np.unique(mask)) <= {0, 1}
    provenance = json.loads((work / "masks" / "cells_7.tif.provenance.json").read_text())
    assert provenance["weights"]["sha256"] == entry.sha256
    assert provenance["parameters"]["inference"]["upper_tail"] == "log"


def test_training_writes_its_curves(smoke_run):
    pytest.importorskip("matplotlib")
    work = smoke_run["work"]
    for stage in ("pretrain", "finetune"):
        png = work / "runs/smoke" / stage / "training.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stage


def test_export_never_replaces_without_force(smoke_run):
    work = smoke_run["work"]
    files = [work / "weights" / "manifest.yaml", work / "weights" / "general.safetensors"]
    before = [f.read_bytes() for f in files]
    again = lsmseg("export", "runs/smoke/finetune", "-o", "weights", "--checkpoint", "final", cwd=work)
    assert again.returncode == 1
    assert "would replace entry 'general'" in again.stderr and "--force" in again.stderr
    assert [f.read_bytes() for f in files] == before  # nothing touched
    forced = lsmseg("export", "runs/smoke/finetune", "-o", "weights", "--min-component-voxels", "5", "--force", cwd=work)
    assert forced.returncode == 0, forced.stderr


def test_export_defaults_to_the_run_folder_and_the_shipped_clean_up(smoke_run):
    from lsmseg.weights import load_manifest

    work = smoke_run["work"]
    result = lsmseg("export", "runs/smoke/finetune", cwd=work)
    assert result.returncode == 0, result.stderr
    entry = load_manifest(work / "runs/smoke/finetune/export").models["general"]
    shipped = load_manifest(REPO / "weights").models["general"]
    assert shipped.inference.min_component_voxels > 0
    assert entry.inference.min_component_voxels == shipped.inference.min_component_voxels
    assert not (work / "weights" / "other.safetensors").exists()


def test_continued_pretraining_and_a_pretrained_encoder_over_a_whole_model(smoke_run, tmp_path):
    """Pretraining with init starts from that whole model; fine-tuning with init and pretrained takes the
    encoder from pretrained and everything else from init. At learning rate 0 the weights stay at their start."""
    import torch

    from lsmseg.weights import load_manifest, load_state_dict
    from lsmseg_training.pretrain import ENCODER_PREFIXES

    work = smoke_run["work"]
    entry = load_manifest(work / "weights").models["general"]
    whole = load_state_dict(work / "weights" / entry.file, entry.sha256)
    still = {"optim": {"lr": 0.0, "warmup_steps": 1}, "epochs": 1, "steps_per_epoch": 1}

    continued = lsmseg("pretrain", "-c", _config(tmp_path, "smoke_pretrain", data_changes={"upper_tail": "log"},
                                                 output="runs/smoke/continued", init="weights", **still), cwd=work)
    assert continued.returncode == 0, continued.stderr
    assert "from a whole model" in continued.stderr
    encoder = load_state_dict(work / "runs/smoke/continued/encoder.safetensors", None)
    assert len(encoder) == 89 and all(torch.equal(tensor, whole[name]) for name, tensor in encoder.items())

    pretrained = load_state_dict(work / "runs/smoke/pretrain/encoder.safetensors", None)
    assert any(not torch.equal(tensor, whole[name]) for name, tensor in pretrained.items())
    both = lsmseg("finetune", "-c", _config(tmp_path, "smoke_finetune", output="runs/smoke/both", init="weights",
                                            **still), cwd=work)
    assert both.returncode == 0, both.stderr
    assert "from a whole model with a pretrained encoder" in both.stderr
    final = load_state_dict(work / "runs/smoke/both/final.safetensors", None)
    assert set(final) == set(whole)
    for name, tensor in final.items():
        expected = pretrained[name] if name.startswith(ENCODER_PREFIXES) else whole[name]
        assert torch.equal(tensor, expected), name


def _phantom(work):
    from lsmseg.synth.phantom import write_phantom

    return write_phantom(work / "new", "cells", (24, 70, 70), 7)


def test_two_process_gloo_training(tmp_path):
    """torchrun with 2 CPU processes: DDP over gloo keeps both ranks' parameters identical, and a spent
    max_seconds stops both ranks after the same step (rank 0's clock decides)."""
    config = _config(tmp_path, "smoke_pretrain", epochs=1, batch_size=1, max_seconds=0.01)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                "--nproc_per_node", "2", "-m", "lsmseg"]
    result = lsmseg("pretrain", "-c", config, cwd=tmp_path, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "joined the gloo process group" in result.stderr
    digests = {}
    for line in result.stderr.splitlines():
        if "parameter digest" in line:
            rank = line.split("rank ")[1].split()[0]
            digests[rank] = line.split("parameter digest ")[1].strip()
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    record = json.loads((tmp_path / "runs/smoke/pretrain/run.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 1
    assert record["stopped"] == {"reason": "max_seconds", "step": 1, "planned_steps": 2}


def test_bad_inputs_are_refused_before_training(tmp_path):
    # a checkpoint for another architecture
    shutil.copytree(CONFIGS, tmp_path / "configs")
    bigger = yaml.safe_load((CONFIGS / "smoke_finetune.yaml").read_text())
    bigger["model"]["feature_size"] = 24
    bigger["pretrained"] = str(tmp_path / "encoder.safetensors")
    _encoder_of_tiny_model(tmp_path / "encoder.safetensors")
    path = tmp_path / "bigger.yaml"
    path.write_text(yaml.safe_dump(bigger))
    result = lsmseg("finetune", "-c", path, cwd=tmp_path)
    assert result.returncode == 1
    assert "encoder.safetensors: checkpoint is for another architecture" in result.stderr
    assert f"ERROR: {path}: pretrained: {tmp_path / 'encoder.safetensors'}: checkpoint is for another" in result.stderr
    assert not (tmp_path / "runs/smoke/finetune/log.csv").exists()

    # an unknown key
    bad = tmp_path / "typo.yaml"
    bad.write_text((CONFIGS / "smoke_pretrain.yaml").read_text() + "learning_rate: 0.1\n")
    result = lsmseg("pretrain", "-c", bad, cwd=tmp_path)
    assert result.returncode == 1 and f"ERROR: {bad}: unknown key 'learning_rate'" in result.stderr

    # a data path that does not exist
    missing = yaml.safe_load((CONFIGS / "smoke_pretrain.yaml").read_text())
    missing["data"]["train"] = [{"images": "no/such/folder"}]
    path = tmp_path / "missing.yaml"
    path.write_text(yaml.safe_dump(missing))
    result = lsmseg("pretrain", "-c", path, cwd=tmp_path)
    assert result.returncode == 1 and "data.train[0].images: no/such/folder: no such file or folder" in result.stderr

    # a whole model to continue from that does not exist
    no_init = yaml.safe_load((CONFIGS / "smoke_pretrain.yaml").read_text())
    no_init["init"] = "no/such/weights.safetensors"
    path = tmp_path / "no_init.yaml"
    path.write_text(yaml.safe_dump(no_init))
    result = lsmseg("pretrain", "-c", path, cwd=tmp_path)
    assert result.returncode == 1 and "ERROR: no/such/weights.safetensors: no such file" in result.stderr
    assert not (tmp_path / "runs/smoke/pretrain/log.csv").exists()


def _encoder_of_tiny_model(path):
    import torch

    from lsmseg.config import ModelConfig
    from lsmseg.model import build_model
    from lsmseg.weights import save_weights
    from lsmseg_training.pretrain import encoder_state

    torch.manual_seed(0)
    config = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), roi=(32, 64, 64))
    save_weights(encoder_state(build_model(config)), path)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_bad_data_is_one_line_before_training(tmp_path, stage):
    # NaN in an image: pretraining stopped at step 1 with a traceback blaming the learning rate
    # ("loss became nan ...; lower optim.lr"); fine-tuning trained on it silently.
    image = np.random.default_rng(0).random((32, 64, 64)).astype(np.float32)
    image[5, 6, 7] = np.nan
    io.write_volume(image, tmp_path / "images" / "a.tif")
    io.write_mask((image > 0.9).astype(np.uint8), tmp_path / "labels" / "a.tif")
    train = [{"images": "images", "labels": "labels"}]
    path = _config(tmp_path, f"smoke_{stage}", data_changes={"train": train, "train_phantoms": None, "validation_phantoms": None},
                   **({"pretrained": None, "validation": {"every": 0}} if stage == "finetune" else {}))
    result = lsmseg(stage, "-c", path, "--set", "threads=1", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "ERROR: images/a.tif: volume contains 1 NaN/Inf voxel(s) (first at z 5); refusing to guess their values"]
    assert not (tmp_path / "runs").exists()


def test_pretraining_refuses_a_validation_set_sharing_a_source_with_training(tmp_path):
    # Pretraining never checked the splits: a validation scan could be pretrained on unnoticed.
    rng = np.random.default_rng(0)
    for name in ("scan1_0", "scan1_1"):
        io.write_volume(rng.random((32, 64, 64)).astype(np.float32), tmp_path / "images" / f"{name}.tif")
    source = r"^(scan\d+)_"
    data = {"train": [{"images": "images", "include": ["scan1_0"], "source": source}],
            "validation": [{"images": "images", "include": ["scan1_1"], "source": source}],
            "train_phantoms": None, "validation_phantoms": None}
    path = _config(tmp_path, "smoke_pretrain", data_changes=data)
    result = lsmseg("pretrain", "-c", path, "--set", "threads=1", cwd=tmp_path)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("ERROR: ") and "source 'scan1' of images is in both data.train and data.validation" in line
    assert not (tmp_path / "runs").exists()


def _steps(log):
    return [line.split(",")[0] for line in log.read_text().splitlines()[1:]]


def test_sigterm_between_checkpoints_leaves_a_resumable_run(tmp_path):
    # SIGTERM killed the process (exit -15, temporary files left); the resumed run logged the steps
    # after the last checkpoint twice and restarted the clock (seconds and max_seconds from 0); a
    # second run into the folder appended to its log and overwrote its checkpoints.
    import os
    import signal
    import subprocess
    import time

    config = _config(tmp_path, "smoke_pretrain", epochs=3)  # 6 steps, checkpoints at 2, 4, 6
    log = tmp_path / "runs/smoke/pretrain/log.csv"
    command = [sys.executable, "-m", "lsmseg", "pretrain", "-c", str(config), "--set", "threads=1"]
    process = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not (log.is_file() and "3" in _steps(log)) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)  # during step 4: checkpoint at 2, steps 1-3 logged
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "ERROR: terminated; continue the run from its last checkpoint with --resume"
    assert "Traceback" not in stderr and _steps(log) == ["1", "2", "3"]
    assert {p.name for p in log.parent.iterdir()} <= {"checkpoint_last.pt", "encoder.safetensors", "log.csv", "run.json",
                                                      "training.png", ".lock"}  # no temporary file left
    before = json.loads((log.parent / "run.json").read_text())["seconds"]

    again = lsmseg("pretrain", "-c", config, "--set", "threads=1", cwd=tmp_path)
    assert again.returncode == 1 and again.stderr.strip().splitlines()[-1] == (
        "ERROR: runs/smoke/pretrain: holds a run already (checkpoint_last.pt, log.csv, run.json); continue it "
        "with --resume, or choose another output folder")
    assert _steps(log) == ["1", "2", "3"]

    resumed = lsmseg("pretrain", "-c", config, "--set", "threads=1", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed runs/smoke/pretrain/checkpoint_last.pt at step 2" in resumed.stderr
    assert _steps(log) == ["1", "2", "3", "4", "5", "6"]
    seconds = [float(line.split(",")[-1]) for line in log.read_text().splitlines()[1:]]
    assert seconds == sorted(seconds) and json.loads((log.parent / "run.json").read_text())["seconds"] > before


def test_resumed_finetuning_keeps_the_best_checkpoint_it_recorded(tmp_path):
    # A run killed after a better validation but before its next checkpoint left that validation's
    # best.safetensors; the resumed run's record named an earlier step for it, and export shipped it.
    from lsmseg.weights import sha256_file

    # At a threshold no probability reaches, every validation scores Dice 0: the best stays step 1.
    changes = {"pretrained": None, "epochs": 1,
               "validation": {"every": 1, "threshold": 0.999999, "thresholds": [0.999999]}}
    first = lsmseg("finetune", "-c", _config(tmp_path, "smoke_finetune", **changes), "--set", "threads=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "runs/smoke/finetune"
    best = json.loads((run / "run.json").read_text())["best"]
    assert best["step"] == 1
    shutil.copy(run / "final.safetensors", run / "best.safetensors")  # the killed run's later "best"
    resumed = lsmseg("finetune", "-c", _config(tmp_path, "smoke_finetune", **{**changes, "epochs": 2}),
                     "--set", "threads=1", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    record = json.loads((run / "run.json").read_text())
    assert record["best"]["step"] == 1 and record["final"]["step"] == 4
    assert record["best"]["sha256"] == sha256_file(run / "best.safetensors") == best["sha256"]
