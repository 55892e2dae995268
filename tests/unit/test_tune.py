"""lsmseg_training.tune: per-structure choices from the validation split, mirroring included."""

import numpy as np

from ..conftest import make_weights
from lsmseg.synth.phantom import write_phantom


def test_tune_scores_each_mirroring_and_writes_the_best_choice(tmp_path, tiny_model_config, tiny_model):
    from lsmseg.inference import Predictor, RunOptions
    from lsmseg_training.config import FinetuneConfig, load_run_config
    from lsmseg_training.tune import MIRROR_ALL, tune, write_choices

    for seed in (1, 2):
        write_phantom(tmp_path / "data", "cells", (32, 64, 64), seed)
    write_phantom(tmp_path / "train", "cells", (32, 64, 64), 3)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        f"name: t\noutput: {tmp_path / 'run'}\ndata:\n"
        f"  train:\n    - images: {tmp_path / 'train' / 'images'}\n      labels: {tmp_path / 'train' / 'labels'}\n"
        f"  validation:\n    - images: {tmp_path / 'data' / 'images'}\n"
        f"      labels: {tmp_path / 'data' / 'labels'}\n      structure: cfos_neuron\n"
    )
    config = load_run_config(FinetuneConfig, config_path)
    manifest = make_weights(tmp_path / "weights", tiny_model_config, tiny_model)

    result = tune(config, manifest, thresholds=(0.3, 0.5), min_components=(0,), splits=(0.0,),
                  mirrors=((), MIRROR_ALL))

    grid = result["validation"]["cfos_neuron"]
    assert grid["volumes"] == ["cells_1", "cells_2"]
    assert {tuple(row["mirror_axes"]) for row in grid["grid"]} == {(), MIRROR_ALL}
    assert len(grid["grid"]) == 4 and set(result["predict_seconds"]) == {"[]", "[0, 1, 2]"}
    # The two mirrorings predicted differently, and the choice is the best-scoring row.
    plain = [r for r in grid["grid"] if not r["mirror_axes"]]
    mirrored = [r for r in grid["grid"] if r["mirror_axes"]]
    assert [r["dice"] for r in plain] != [r["dice"] for r in mirrored]
    best = max(grid["grid"], key=lambda r: r["score"])
    choice = result["per_structure"]["cfos_neuron"]
    assert choice == {k: best[k] for k in ("threshold", "split_touching", "min_component_voxels", "mirror_axes")}

    write_choices(manifest, result)
    predictor = Predictor.from_manifest(manifest, options=RunOptions(progress=False))
    applied = predictor.settings_for("cfos_neuron_case.tif")
    assert applied.mirror_axes == tuple(choice["mirror_axes"]) and applied.threshold == choice["threshold"]
    assert predictor.settings_for("blood_vessel_case.tif").mirror_axes == ()
    assert np.isfinite(best["score"])
