"""Training front ends as a rebuilder meets them: what an export records, what compare compares."""

import json

import pytest

from lsmseg.config import to_dict
from lsmseg.weights import load_manifest, save_weights


def _finished_run(folder, model_config, model, **extra):
    """A fine-tuning run folder as `lsmseg finetune` leaves it, as far as `lsmseg export` reads it."""
    folder.mkdir()
    sha = save_weights(model.state_dict(), folder / "best.safetensors")
    record = {"kind": "finetune", "name": "tiny", "steps": 451,
              "best": {"file": "best.safetensors", "sha256": sha, "step": 451},
              "config": {"model": to_dict(model_config), "structures": ["vessels"], "validation": {"threshold": 0.5},
                         "data": {"lower_percentile": 0.5, "upper_percentile": 99.5}, "max_seconds": 1.0},
              **extra}
    (folder / "run.json").write_text(json.dumps(record))
    return record


def test_export_records_the_weights_the_run_started_from_and_why_it_stopped(tmp_path, tiny_model_config,
                                                                           tiny_model):
    # The shipped run started from the previous model (`init`) and was ended by `--set max_seconds=1`;
    # its manifest recorded init's path only (in the config) and max_seconds 1.0 with no word why.
    from lsmseg_training.export import export_run

    start = {"manifest": "runs/general/previous/manifest.yaml", "model": "general", "sha256": "f4df" + "0" * 60}
    stopped = {"reason": "max_seconds", "step": 451, "planned_steps": 1200}
    _finished_run(tmp_path / "run", tiny_model_config, tiny_model, init=start, stopped=stopped)
    manifest = load_manifest(export_run(tmp_path / "run", tmp_path / "weights", min_component_voxels=0))
    provenance = manifest.models["general"].provenance
    assert provenance["init"] == start
    assert provenance["stopped"] == stopped


def _compared_run(folder, model_config, model, name, thresholds, threshold=0.5, **extra):
    """A finished fine-tuning run as `compare --runs` reads it (its config a full FinetuneConfig)."""
    from pathlib import Path

    from lsmseg_training.config import FinetuneConfig, load_run_config

    smoke = Path(__file__).resolve().parents[2] / "training" / "configs" / "smoke_finetune.yaml"
    config = to_dict(load_run_config(FinetuneConfig, smoke))
    config.update(name=name, model=to_dict(model_config))
    config["validation"]["thresholds"] = thresholds
    config["validation"]["threshold"] = threshold  # validate() sweeps it too
    folder.mkdir()
    sha = save_weights(model.state_dict(), folder / "best.safetensors")
    best = {"file": "best.safetensors", "sha256": sha, "step": 4}
    record = {"kind": "finetune", "name": name, "config": config, "best": best, "final": best, "steps": 4,
              "data": {"volumes": [{"name": "seen"}]}, **extra}
    (folder / "run.json").write_text(json.dumps(record))


@pytest.fixture
def two_runs(tmp_path, tiny_model_config, tiny_model, monkeypatch):
    """Two runs of different sweeps and starts, the volumes `seen` (trained on) and `held`, and the
    threshold sweep each run was scored on (validation itself replaced: compare's choices are tested)."""
    import numpy as np
    import tifffile
    from lsmseg_training import finetune

    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
        for name in ("seen", "held"):
            tifffile.imwrite(tmp_path / folder / f"{name}.tif", np.zeros((8, 16, 16), np.uint8))
    _compared_run(tmp_path / "a", tiny_model_config, tiny_model, "a", [0.3, 0.7])
    _compared_run(tmp_path / "b", tiny_model_config, tiny_model, "b", [0.5, 0.9], threshold=0.45,
                  init={"manifest": "previous/manifest.yaml", "sha256": "f4df" + "0" * 60})
    swept = {}

    def fake_validate(model, config, volumes, device, overlap):
        thresholds = sorted(set(config.validation.thresholds) | {config.validation.threshold})
        swept[config.name] = thresholds
        mean = [0.1 * i for i in range(len(thresholds))]
        return {"thresholds": thresholds, "mean_dice": mean, "best_threshold": thresholds[-1], "best_dice": mean[-1],
                "per_volume": {v["name"]: mean for v in volumes}}

    monkeypatch.setattr(finetune, "validate", fake_validate)
    return tmp_path, swept


def test_compared_runs_are_scored_on_one_sweep_and_their_start_is_named(two_runs, capsys, caplog):
    # Each run was tuned on its own config's sweep (one run's "tuned" column picked from 0.3/0.7, the
    # other's from 0.5/0.9), the runs' other differences went unsaid, a run started from a whole
    # model (`init`) was labelled "scratch", and a volume a run trained on was scored as held out.
    from lsmseg_training.compare import main

    folder, swept = two_runs
    main(["--images", str(folder / "images"), "--labels", str(folder / "labels"), "--names", "seen", "held",
          "--runs", str(folder / "a"), str(folder / "b")])
    assert swept["a"] == swept["b"] == [0.3, 0.5, 0.7, 0.9]
    rows = {line.split(" | ")[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert " | scratch | " in rows["| a"] and " | a whole model | " in rows["| b"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    trained = [w for w in warnings if "trained on" in w]
    assert len(trained) == 2 and all(w.endswith("trained on seen: its scores there are not held-out") for w in trained)
    assert any("differ in validation.threshold, validation.thresholds besides name and output" in w for w in warnings)


def test_weights_table_names_the_threshold_each_volume_was_cut_at(tmp_path, tiny_model_config, tiny_model, capsys):
    # A name with a structure prefix is cut at its structure's threshold (as `lsmseg predict` does),
    # but the table's note gave the manifest's default one.
    import numpy as np
    import tifffile
    from lsmseg_training.compare import main

    from ..conftest import make_weights

    weights = make_weights(tmp_path / "weights", tiny_model_config, tiny_model, threshold=0.5,
                           per_structure={"microglia": {"threshold": 0.995}})
    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
        tifffile.imwrite(tmp_path / folder / "microglia_1.tif", np.zeros((8, 16, 16), np.uint8))
    main(["--weights", str(weights), "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"),
          "--names", "microglia_1"])
    assert "(model threshold 0.995 from the manifest)" in capsys.readouterr().out
    # Real case names carry no prefix (patchvolume_1147_0): --structure applies the structure's settings.
    (tmp_path / "images" / "microglia_1.tif").rename(tmp_path / "images" / "patchvolume_1.tif")
    (tmp_path / "labels" / "microglia_1.tif").rename(tmp_path / "labels" / "patchvolume_1.tif")
    main(["--weights", str(weights), "--structure", "microglia", "--images", str(tmp_path / "images"),
          "--labels", str(tmp_path / "labels"), "--names", "patchvolume_1"])
    assert "(model threshold 0.995 from the manifest)" in capsys.readouterr().out


def test_trained_on_warning_reads_the_model_structure_picks(tmp_path, tiny_model_config, tiny_model, caplog):
    # The warning read the default model's training data, while --structure scored another model.
    import dataclasses

    import numpy as np
    import tifffile
    from lsmseg.weights import load_manifest, write_manifest
    from lsmseg_training.compare import main

    from ..conftest import make_weights

    manifest = load_manifest(make_weights(tmp_path / "weights", tiny_model_config, tiny_model))
    general = manifest.models["general"]
    manifest.models["microglia_model"] = dataclasses.replace(
        general, structures=["microglia"], provenance={"training_data": {"volumes": [{"name": "held"}]}})
    weights = write_manifest(manifest, tmp_path / "weights" / "manifest.yaml")
    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
        tifffile.imwrite(tmp_path / folder / "held.tif", np.zeros((8, 16, 16), np.uint8))
    main(["--weights", str(weights), "--structure", "microglia", "--images", str(tmp_path / "images"),
          "--labels", str(tmp_path / "labels"), "--names", "held"])
    assert any(r.levelname == "WARNING" and r.getMessage().endswith("trained on held: its scores there are not held-out")
               for r in caplog.records)


def test_run_record_names_the_source_commit_only_where_git_tracks_the_code(tmp_path):
    """A manifest's versions gave only lsmseg's version, not which code trained the model."""
    import shutil
    import subprocess

    from lsmseg_training.engine import source_commit, versions

    if shutil.which("git") is None:
        pytest.skip("git not installed")
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (repo / "train.py").write_text("a = 1\n")
    git("add", "train.py")
    git("commit", "-q", "-m", "first")
    assert source_commit(repo / "train.py") == {"commit": git("rev-parse", "HEAD"), "modified": False}
    (repo / "train.py").write_text("a = 2\n")
    assert source_commit(repo / "train.py")["modified"] is True
    (repo / "venv.py").write_text("")  # an untracked copy (an installed package inside a checkout): no commit
    assert source_commit(repo / "venv.py") is None
    assert source_commit(tmp_path / "elsewhere.py") is None
    assert "source" in versions()
