"""lsmseg_training.tune: per-structure choices from the validation split, mirroring included."""

import json
import warnings

import numpy as np
import pytest

from ..conftest import make_weights
from lsmseg.synth.phantom import write_phantom


def _validation_config(tmp_path):
    from lsmseg_training.config import FinetuneConfig, load_run_config

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
    return load_run_config(FinetuneConfig, config_path)


def test_tune_scores_each_mirroring_and_writes_the_best_choice(tmp_path, tiny_model_config, tiny_model):
    from lsmseg.inference import Predictor, RunOptions
    from lsmseg_training.tune import MIRROR_ALL, tune, write_choices

    config = _validation_config(tmp_path)
    manifest = make_weights(tmp_path / "weights", tiny_model_config, tiny_model)

    result = tune(config, manifest, thresholds=(0.3, 0.5), min_components=(0,), splits=(0.0,),
                  mirrors=((), MIRROR_ALL), floors=())

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
    assert choice == {k: best[k] for k in ("threshold", "split_touching", "min_component_voxels", "mirror_axes",
                                           "intensity_floor", "input_scale")}

    write_choices(manifest, result)
    predictor = Predictor.from_manifest(manifest, options=RunOptions(progress=False))
    applied = predictor.settings_for("cfos_neuron_case.tif")
    assert applied.mirror_axes == tuple(choice["mirror_axes"]) and applied.threshold == choice["threshold"]
    assert predictor.settings_for("blood_vessel_case.tif").mirror_axes == ()
    assert np.isfinite(best["score"])


def test_tune_without_mirroring_chooses_no_mirroring(tmp_path, tiny_model_config, tiny_model):
    """The default run (no --mirror): one prediction per volume, and the choice says it was scored
    without mirroring (and at its floor, null included), so the manifest's global values cannot apply instead."""
    from lsmseg_training.tune import main

    _validation_config(tmp_path)  # writes config.yaml
    manifest = make_weights(tmp_path / "weights", tiny_model_config, tiny_model)
    out = tmp_path / "grid.json"
    assert main(["-c", str(tmp_path / "config.yaml"), "--weights", str(manifest), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["predict_seconds"]) == {"[]"}
    choice = result["per_structure"]["cfos_neuron"]
    best = result["validation"]["cfos_neuron"]["best"]
    assert choice["mirror_axes"] == [] and choice["intensity_floor"] == best["intensity_floor"]
    assert {"threshold", "split_touching", "min_component_voxels"} <= set(choice)

    # An --out that cannot be written, found after the grid: one line naming it (was a traceback).
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match=f"^ERROR: {tmp_path / 'a_file'}: "):
        main(["-c", str(tmp_path / "config.yaml"), "--weights", str(manifest), "--floors",
              "--out", str(tmp_path / "a_file" / "grid.json")])


def test_intensity_floor_searched_at_the_first_stages_best_and_applied(tmp_path, tiny_model_config, tiny_model):
    """The floor's stage: every floor × threshold at the plain grid's best removal; the choice is the
    best row of both stages, and a chosen floor reaches the manifest and the predictor."""
    from lsmseg.inference import Predictor, RunOptions
    from lsmseg_training.tune import tune, write_choices

    config = _validation_config(tmp_path)
    manifest = make_weights(tmp_path / "weights", tiny_model_config, tiny_model)
    result = tune(config, manifest, thresholds=(0.3, 0.5), min_components=(0, 5), splits=(0.0,),
                  floors=(0.5, 1.0, 50.0))
    rows = result["validation"]["cfos_neuron"]["grid"]
    plain = [r for r in rows if r["intensity_floor"] is None]
    floored = [r for r in rows if r["intensity_floor"] is not None]
    assert len(plain) == 4 and len(floored) == 6
    first = max(plain, key=lambda r: r["score"])
    assert {r["min_component_voxels"] for r in floored} == {first["min_component_voxels"]}
    # A floor above every voxel's intensity leaves nothing: Dice 0 against the phantoms' cells.
    assert all(r["dice"] == 0.0 for r in floored if r["intensity_floor"] == 50.0)
    best = max(rows, key=lambda r: r["score"])
    choice = result["per_structure"]["cfos_neuron"]
    assert choice.get("intensity_floor") == best["intensity_floor"] and choice["threshold"] == best["threshold"]

    forced = {"per_structure": {"cfos_neuron": {**choice, "intensity_floor": 1.0}}, "validation": {}}
    write_choices(manifest, forced)
    predictor = Predictor.from_manifest(manifest, options=RunOptions(progress=False))
    assert predictor.settings_for("cfos_neuron_1.tif").intensity_floor == 1.0
    assert predictor.settings_for("blood_vessel_1.tif").intensity_floor is None


def test_default_threshold_chosen_on_phantoms_and_written(tmp_path, tiny_model_config, tiny_model):
    from lsmseg.weights import load_manifest
    from lsmseg_training.tune import phantom_threshold, write_choices

    manifest = make_weights(tmp_path / "weights", tiny_model_config, tiny_model)
    chosen = phantom_threshold(manifest, thresholds=(0.3, 0.6, 0.7), kinds=("cells",), seeds=(1, 2),
                               shape=(16, 48, 48))
    dice = chosen["phantom_dice_by_threshold"]
    assert set(dice) == {0.3, 0.6, 0.7} and chosen["threshold"] == max(dice, key=dice.get)
    assert "2 validation phantoms (cells; seeds 1, 2, 16x48x48" in chosen["why"]
    write_choices(manifest, {"per_structure": {}, "validation": {}, "default_threshold": chosen})  # was 0.5
    entry = load_manifest(manifest).models["general"]
    assert entry.inference.threshold == chosen["threshold"] and entry.validation["default_threshold"] == chosen


def test_tuning_some_structures_keeps_the_others_settings(tmp_path, tiny_model_config, tiny_model):
    """--structures: only the named structures' volumes are predicted, and --write merges their
    choices into the manifest instead of replacing every structure's."""
    from lsmseg.weights import load_manifest
    from lsmseg_training.tune import main, write_choices

    _validation_config(tmp_path)  # writes config.yaml; its validation set is cfos_neuron
    manifest = make_weights(tmp_path / "weights", tiny_model_config, tiny_model)
    earlier = {"threshold": 0.7, "split_touching": 0.0, "min_component_voxels": 30}
    earlier_cfos = {"threshold": 0.6, "split_touching": 1.0, "min_component_voxels": 10}
    write_choices(manifest, {"per_structure": {"microglia": earlier, "cfos_neuron": earlier_cfos},
                             "validation": {"microglia": {"volumes": ["m"], "best": {"score": 0.1},
                                                          "at_previous_settings": None}}})

    assert main(["-c", str(tmp_path / "config.yaml"), "--weights", str(manifest), "--structures", "cfos_neuron",
                 "--write"]) == 0
    entry = load_manifest(manifest).models["general"]
    assert entry.inference.per_structure["microglia"] == earlier
    assert set(entry.inference.per_structure) == {"microglia", "cfos_neuron"}
    assert set(entry.validation["per_structure"]) == {"microglia", "cfos_neuron"}
    assert entry.validation["per_structure"]["microglia"]["volumes"] == ["m"]
    # The re-tuned structure's score before the change is kept, at its own earlier settings.
    before = entry.validation["per_structure"]["cfos_neuron"]["at_previous_settings"]
    assert {key: before[key] for key in earlier_cfos} == earlier_cfos and before["mirror_axes"] == []

    # A structure the config has no validation volumes of is refused, naming it and the config file.
    with pytest.raises(SystemExit, match="config.yaml: no validation volumes of microglia"):
        main(["-c", str(tmp_path / "config.yaml"), "--weights", str(manifest), "--structures", "microglia"])


def test_structures_take_an_alias(tmp_path, tiny_model_config, tiny_model):
    # 'cfos' names cfos_neuron everywhere else; tune refused it ('no validation volumes of cfos').
    from lsmseg_training.tune import main

    _validation_config(tmp_path)  # writes config.yaml; its validation set is cfos_neuron
    manifest = make_weights(tmp_path / "weights", tiny_model_config, tiny_model)
    out = tmp_path / "grid.json"
    assert main(["-c", str(tmp_path / "config.yaml"), "--weights", str(manifest), "--structures", "cfos",
                 "--floors", "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["per_structure"]) == {"cfos_neuron"}


def test_choice_applies_as_scored_over_a_global_floor_and_mirroring(tmp_path, tiny_model_config, tiny_model):
    """Rows are scored without a floor or mirroring unless they name one; a choice that left those
    keys out let the manifest's global floor and mirroring apply to a setting scored without them."""
    from lsmseg.inference import Predictor, RunOptions
    from lsmseg_training.tune import tune, write_choices

    config = _validation_config(tmp_path)
    manifest = make_weights(tmp_path / "weights", tiny_model_config, tiny_model, threshold=0.93,
                            intensity_floor=0.75, mirror_axes=(0, 1, 2))
    result = tune(config, manifest, thresholds=(0.5, 0.9), min_components=(0,), splits=(0.0,), floors=())
    best = result["validation"]["cfos_neuron"]["best"]
    assert best["intensity_floor"] is None and best["mirror_axes"] == []
    write_choices(manifest, result)
    applied = Predictor.from_manifest(manifest, options=RunOptions(progress=False)).settings_for("cfos_neuron_1.tif")
    assert applied.intensity_floor is None and applied.mirror_axes == () and applied.threshold == best["threshold"]
    # The previous settings (threshold 0.93) are not in the grid: no row stands for them (not the 0.9 row).
    assert result["validation"]["cfos_neuron"]["at_previous_settings"] is None


def test_rows_count_the_volumes_whose_second_metric_is_nan(tmp_path, tiny_model_config, tiny_model):
    """clDice is NaN for an empty prediction against a vessel: such a volume scores its Dice alone,
    and the row says how many did, since its score is then not the mean of its dice and cldice."""
    from lsmseg_training.config import FinetuneConfig, load_run_config
    from lsmseg_training.tune import tune

    _validation_config(tmp_path)  # writes config.yaml
    config_path = tmp_path / "config.yaml"
    config_path.write_text(config_path.read_text().replace("structure: cfos_neuron", "structure: blood_vessel"))
    manifest = make_weights(tmp_path / "weights", tiny_model_config, tiny_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's "Mean of empty slice" for an all-NaN metric
        result = tune(load_run_config(FinetuneConfig, config_path), manifest, thresholds=(0.5,), min_components=(0,),
                      splits=(0.0,), floors=(50.0,))
    rows = result["validation"]["blood_vessel"]["grid"]
    empty = next(r for r in rows if r["intensity_floor"] == 50.0)  # above every voxel: nothing predicted
    assert empty["nan_cldice"] == 2 and empty["dice"] == 0.0 and empty["score"] == 0.0
    assert empty["cldice"] is None  # undefined on every volume: JSON null, not the non-standard NaN
    assert all(isinstance(r["nan_cldice"], int) for r in rows)
    json.dumps(result, allow_nan=False)


def test_tune_refuses_validation_that_is_the_test_split(tmp_path, tiny_model_config, tiny_model):
    # finetune and pretrain refuse splits that share a source; tune tuned on them.
    from lsmseg.errors import ConfigError
    from lsmseg_training.config import FinetuneConfig, load_run_config
    from lsmseg_training.tune import main, tune

    _validation_config(tmp_path)  # writes config.yaml
    config_path = tmp_path / "config.yaml"
    data = tmp_path / "data"
    config_path.write_text(config_path.read_text().replace(
        "  validation:\n", f"  test:\n    - images: {data / 'images'}\n      labels: {data / 'labels'}\n  validation:\n"))
    manifest = make_weights(tmp_path / "weights", tiny_model_config, tiny_model)
    with pytest.raises(ConfigError, match=r"data\.test\[0\]: volume .*cells_1\.tif is also in data\.validation"):
        tune(load_run_config(FinetuneConfig, config_path), manifest)
    with pytest.raises(SystemExit, match=f"^ERROR: {config_path}: data.test.0.: volume .*cells_1.tif is also in data.val"):
        main(["-c", str(config_path), "--weights", str(manifest)])


def test_writing_a_tuned_structure_replaces_its_alias_key(tmp_path, tiny_model_config, tiny_model):
    # A manifest keyed 'vessels' and a tuned 'blood_vessel' were merged into two keys for one structure,
    # which the settings refuse: tune --write failed at its very end, after the grid.
    from lsmseg.weights import load_manifest
    from lsmseg_training.tune import write_choices

    manifest = make_weights(tmp_path / "weights", tiny_model_config, tiny_model,
                            per_structure={"vessels": {"threshold": 0.3}, "microglia": {"threshold": 0.9}})
    chosen = {"threshold": 0.7, "min_component_voxels": 10, "split_touching": 0.0, "mirror_axes": []}
    write_choices(manifest, {"per_structure": {"blood_vessel": chosen}, "validation": {}})
    per_structure = load_manifest(manifest).entry_for(None)[1].inference.per_structure
    assert sorted(per_structure) == ["blood_vessel", "microglia"] and per_structure["blood_vessel"]["threshold"] == 0.7


@pytest.mark.parametrize("skip", [True, False])
def test_tune_passes_dark_window_skipping_to_the_predictor(tmp_path, tiny_model_config, tiny_model, monkeypatch, skip):
    """scripts/lever_skip_background.py tunes the same weights with and without skipping dark windows:
    the option must reach the predictor that makes the validation logits."""
    from lsmseg.inference import Predictor
    from lsmseg_training.tune import tune

    config = _validation_config(tmp_path)
    manifest = make_weights(tmp_path / "weights", tiny_model_config, tiny_model)
    seen = []
    original = Predictor.from_manifest.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs["options"].skip_background)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(Predictor, "from_manifest", classmethod(spy))
    tune(config, manifest, thresholds=(0.5,), min_components=(0,), splits=(0.0,), floors=(), skip_background=skip)
    assert seen == [skip]


def test_tune_settings_replace_the_manifests_for_every_prediction(tmp_path, tiny_model_config, tiny_model, caplog):
    """scripts/lever_test_time_scale.py tunes with the model's spacing replaced, so that each validation
    volume is resampled before the network and its logits resampled back."""
    import logging

    from lsmseg_training.tune import tune

    config = _validation_config(tmp_path)
    config.data.validation[0].spacing = (1.0, 1.0, 1.0)
    manifest = make_weights(tmp_path / "weights", tiny_model_config, tiny_model)
    grid = dict(thresholds=(0.3, 0.5), min_components=(0,), splits=(0.0,), floors=())
    with caplog.at_level(logging.INFO, logger="lsmseg"):
        scaled = tune(config, manifest, settings={"spacing": (0.8, 0.8, 0.8), "spacing_tolerance": 0.01}, **grid)
    assert sum("resampling (32, 64, 64) at (1.0, 1.0, 1.0) um to (40, 80, 80)" in r.getMessage()
               for r in caplog.records) == 2
    plain = tune(config, manifest, **grid)
    rows = [[row["dice"] for row in result["validation"]["cfos_neuron"]["grid"]] for result in (scaled, plain)]
    assert rows[0] != rows[1]


def test_an_input_scale_is_chosen_written_and_applied_as_scored(tmp_path, tiny_model_config, tiny_model):
    """A structure tuned at an input_scale records it in every row and in its choice, so that the
    manifest applies the scale its threshold was chosen at; predict then resamples by it."""
    from lsmseg.inference import Predictor, RunOptions
    from lsmseg_training.tune import tune, write_choices

    config = _validation_config(tmp_path)
    manifest = make_weights(tmp_path / "weights", tiny_model_config, tiny_model)
    result = tune(config, manifest, thresholds=(0.3, 0.5), min_components=(0,), splits=(0.0,), floors=(),
                  settings={"input_scale": 1.25})
    assert {row["input_scale"] for row in result["validation"]["cfos_neuron"]["grid"]} == {1.25}
    assert result["per_structure"]["cfos_neuron"]["input_scale"] == 1.25
    write_choices(manifest, result)
    predictor = Predictor.from_manifest(manifest, options=RunOptions(progress=False))
    assert predictor.settings_for("cfos_neuron_1.tif").input_scale == 1.25
    assert predictor.settings_for("blood_vessel_1.tif").input_scale == 1.0
    assert predictor.network_shape((32, 64, 64), None, "cfos_neuron_1.tif") == [40, 80, 80]
    assert predictor.network_shape((32, 64, 64), None, "blood_vessel_1.tif") is None


def test_a_per_axis_input_scale_round_trips_through_the_manifest_and_matches_its_row(tmp_path, tiny_model_config,
                                                                                      tiny_model):
    """Three factors (z, y, x) are carried by every row and the choice as a list (JSON and YAML), load
    back from the written manifest as the same scale, and a re-tune at it finds the manifest's row."""
    from lsmseg.inference import Predictor, RunOptions
    from lsmseg.weights import load_manifest
    from lsmseg_training.tune import tune, write_choices

    config = _validation_config(tmp_path)
    manifest = make_weights(tmp_path / "weights", tiny_model_config, tiny_model)
    grid = dict(thresholds=(0.3, 0.5), min_components=(0,), splits=(0.0,), floors=())
    result = tune(config, manifest, settings={"input_scale": (1.25, 1, 1)}, **grid)
    rows = result["validation"]["cfos_neuron"]["grid"]
    assert all(row["input_scale"] == [1.25, 1.0, 1.0] for row in rows)
    assert json.loads(json.dumps(result))["per_structure"]["cfos_neuron"]["input_scale"] == [1.25, 1.0, 1.0]
    write_choices(manifest, result)
    assert load_manifest(manifest).entry_for(None)[1].inference.per_structure["cfos_neuron"]["input_scale"] == \
        [1.25, 1.0, 1.0]
    predictor = Predictor.from_manifest(manifest, options=RunOptions(progress=False))
    assert predictor.settings_for("cfos_neuron_1.tif").input_scale == (1.25, 1.0, 1.0)
    assert predictor.network_shape((32, 64, 64), None, "cfos_neuron_1.tif") == [40, 64, 64]

    again = tune(config, manifest, settings={"input_scale": (1.25, 1, 1)}, **grid)["validation"]["cfos_neuron"]
    chosen = result["per_structure"]["cfos_neuron"]
    assert again["at_previous_settings"] is not None
    assert {key: again["at_previous_settings"][key] for key in chosen} == chosen


def test_a_per_axis_input_scale_flag_is_checked_factor_by_factor(tmp_path, capsys):
    from lsmseg_training.tune import main

    for text, message in (("1.5,1,9", "input scale 1.5,1,9 must lie within 0.25-4 (each factor)"),
                          ("1.5x1", "input scale 1.5x1 must be one number or three (z, y, x)")):
        with pytest.raises(SystemExit) as exc:
            main(["-c", str(tmp_path / "missing.yaml"), "--weights", str(tmp_path), "--input-scale", text])
        assert exc.value.code == 2 and f"argument --input-scale: {message}" in capsys.readouterr().err


def test_input_scale_flag_out_of_range_is_a_usage_error_before_any_work(tmp_path, capsys):
    from lsmseg_training.tune import main

    with pytest.raises(SystemExit) as exc:
        main(["-c", str(tmp_path / "missing.yaml"), "--weights", str(tmp_path), "--input-scale", "0"])
    assert exc.value.code == 2 and "argument --input-scale: input scale 0 must lie within 0.25-4" in capsys.readouterr().err


def test_tune_refuses_a_validation_label_that_fine_tuning_refuses(tmp_path, tiny_model_config, tiny_model):
    # Was: read as != 0 (a sparse TRAILMAP label's background scored as foreground), where fine-tuning's
    # validation refuses a label_values: binary set whose label is not binary.
    from lsmseg import io
    from lsmseg.errors import InputError
    from lsmseg_training.tune import tune

    config = _validation_config(tmp_path)
    label = io.read_volume(tmp_path / "data" / "labels" / "cells_1.tif").load()
    io.write_volume((label + 1).astype(np.uint8), tmp_path / "data" / "labels" / "cells_1.tif")  # 1 / 2
    manifest = make_weights(tmp_path / "weights", tiny_model_config, tiny_model)
    with pytest.raises(InputError, match=r"cells_1\.tif: label values \{1, 2\} are not binary"):
        tune(config, manifest, thresholds=(0.5,), min_components=(0,), splits=(0.0,), floors=())
