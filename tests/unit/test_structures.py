"""Per-structure post-processing: case-name routing, settings, splitting of touching objects."""

import numpy as np
import pytest
from scipy import ndimage

from lsmseg.config import InferenceSettings, from_dict
from lsmseg.errors import ConfigError
from lsmseg.inference.postprocess import split_touching
from lsmseg.structures import category_of, structure_from_name

FULL = np.ones((3, 3, 3))  # 26-connectivity, as a connected-components PQ labels


@pytest.mark.parametrize("name, structure", [
    ("cfos_neuron_003.tif", "cfos_neuron"),
    ("/in/blood_vessel_12.nii.gz", "blood_vessel"),
    ("AD_plaques_1", "AD_plaques"),
    ("ad_plaques_1", "AD_plaques"),  # not the organisers' prefix (case-sensitive), but our alias of it
    ("plaques_phantom", "AD_plaques"),  # our aliases are tried after the prefixes
    ("microglia_7", "microglia"),
    ("patchvolume_1008_0", None),
    ("cells_3.tif", "cells"),  # our phantoms' cell bodies: their own structure, not cell_nuclei
    ("nuclei_3.tif", "cell_nuclei"),
    ("cFos-12", "cfos_neuron"),
    ("vesselness_2", None),  # a one-word alias is the whole first word, not any beginning
])
def test_structure_from_case_name(name, structure):
    assert structure_from_name(name) == structure


def test_categories_follow_the_2026_evaluator():
    assert category_of("microglia") == "isolated" and category_of("axonalmarker") == "contiguous"
    assert category_of("cells") == "isolated" and category_of(None) is None


def test_predict_and_evaluate_read_one_structure_table():
    # 'cells' used to mean cell_nuclei to predict and a structure of its own to evaluate, and each
    # kept its own alias table (evaluate knew 'vasculature', predict refused it).
    from lsmseg_evaluation import categories

    from lsmseg import argtypes, structures

    assert categories.ALIASES is structures.ALIASES
    for name in ("cells", "vasculature", "Blood_Vessel", "c-fos", "microglial", "AD_plaques"):
        assert argtypes.structure(name) == name
        assert categories.known_structure(name) == structures.known_structure(name) is not None
        assert categories.classify(f"{name}_1")[0] == structures.structure_from_name(f"{name}_1")
    # Taken as it was read: a padded value kept its space and missed its structure's settings.
    assert argtypes.structure(" c-fos ") == "c-fos" and structures.structure_from_name(argtypes.structure(" c-fos ")) == "cfos_neuron"
    # Every structure a name can resolve to has a report category.
    assert set(structures.ALIASES.values()) <= set(categories.DEFAULT_CATEGORIES)


def test_per_structure_settings_override_only_their_structure():
    settings = from_dict(InferenceSettings, {"threshold": 0.7, "per_structure": {
        "cfos_neuron": {"threshold": 0.5, "split_touching": 1.0}}})
    assert settings.for_structure("cfos_neuron").threshold == 0.5
    assert settings.for_structure("cfos_neuron").split_touching == 1.0
    assert settings.for_structure("blood_vessel") is settings and settings.for_structure(None) is settings


@pytest.mark.parametrize("overrides, message", [
    ({"thresh": 0.5}, "unknown key 'thresh'"),
    ({"threshold": 1.5}, "threshold 1.5 must be in"),
])
def test_bad_per_structure_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(InferenceSettings, {"per_structure": {"microglia": overrides}})


def _balls(centres, radius=6, shape=(30, 60, 80)):
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    mask = np.zeros(shape, bool)
    for cz, cy, cx in centres:
        mask |= (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
    return mask.astype(np.uint8)


def test_touching_balls_are_split_for_26_connected_labelling():
    mask = _balls([(15, 30, 20), (15, 30, 31)])
    assert ndimage.label(mask, FULL)[1] == 1
    split = split_touching(mask, 1.0)
    assert ndimage.label(split, FULL)[1] == 2
    assert 0 < int(mask.sum() - split.sum()) < 0.1 * mask.sum() and not (split & ~mask).any()


def test_a_single_ball_and_separate_balls_are_left_alone():
    mask = _balls([(15, 30, 20), (15, 30, 60)])
    assert np.array_equal(split_touching(mask, 1.0), mask)
    assert split_touching(mask, 0.0) is mask


def test_the_predictor_applies_the_structure_of_the_case_name(tiny_model, tiny_model_config):
    from lsmseg.inference import Predictor, RunOptions

    settings = from_dict(InferenceSettings, {"threshold": 0.01, "per_structure": {"cfos_neuron": {"threshold": 0.99}}})
    predictor = Predictor(tiny_model, tiny_model_config, settings, options=RunOptions(progress=False))
    volume = np.random.default_rng(0).random((32, 64, 64)).astype(np.float32)
    logits = predictor.predict_logits(volume)
    low = predictor.binary_mask(logits, settings=predictor.settings_for("blood_vessel_1"))
    high = predictor.binary_mask(logits, settings=predictor.settings_for("cfos_neuron_1"))
    assert low.sum() > high.sum()
    assert np.array_equal(predictor.predict_volume(volume, name="cfos_neuron_1"), high)
    for named in ("cfos_neuron", "cfos"):  # the 2026 name or one of our aliases
        fixed = Predictor(tiny_model, tiny_model_config, settings, options=RunOptions(progress=False, structure=named))
        assert np.array_equal(fixed.predict_volume(volume, name="blood_vessel_1"), high)
