"""Evaluation metrics: agreement with MONAI, hand-computed values, topology of known shapes."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("skimage")
pytest.importorskip("cc3d")
EVALUATION = Path(__file__).resolve().parents[2] / "evaluation"
if str(EVALUATION) not in sys.path:
    sys.path.insert(0, str(EVALUATION))

from lsmseg.errors import InputError  # noqa: E402
from lsmseg_evaluation.categories import classify, structure_from_name  # noqa: E402
from lsmseg_evaluation.labels import label_masks, prediction_mask  # noqa: E402
from lsmseg_evaluation.metrics import (  # noqa: E402
    betti_numbers,
    cldice,
    dice,
    hd95,
    panoptic_quality,
    score_volume,
    skeleton,
)


def grid(shape=(24, 24, 24)):
    return np.mgrid[: shape[0], : shape[1], : shape[2]]


def ball(centre=(12, 12, 12), radius=7, shape=(24, 24, 24)):
    z, y, x = grid(shape)
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius**2


def torus(shape=(16, 32, 32), major=9.0, minor=2.5):
    z, y, x = grid(shape)
    rho = np.sqrt((y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2)
    return (rho - major) ** 2 + (z - shape[0] / 2) ** 2 <= minor**2


def random_blobs(seed: int, shape=(20, 24, 28), density=0.5):
    """Random masks with some spatial structure (smoothed noise), so surfaces are not all edge."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    return noise > np.quantile(noise, 1 - density)


# --------------------------------------------------------------------------------- MONAI agreement


@pytest.mark.parametrize("seed", range(4))
def test_dice_matches_monai_dice_metric(seed):
    import torch
    from monai.metrics import DiceMetric

    pred, label = random_blobs(seed, density=0.3), random_blobs(seed + 100, density=0.4)
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    expected = metric(torch.from_numpy(pred)[None, None].float(), torch.from_numpy(label)[None, None].float())
    assert dice(pred, label) == pytest.approx(float(expected.item()), abs=1e-6)
    tp = np.count_nonzero(pred & label)  # and with the textbook formula
    assert dice(pred, label) == pytest.approx(2 * tp / (pred.sum() + label.sum()), abs=1e-6)


@pytest.mark.parametrize("seed,spacing", [(0, None), (1, (5.0, 0.99, 0.99)), (2, (2.0, 1.0, 0.5))])
def test_hd95_matches_monai_hausdorff_metric(seed, spacing):
    import torch
    from monai.metrics import HausdorffDistanceMetric

    pred, label = random_blobs(seed, density=0.2), random_blobs(seed + 50, density=0.25)
    metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    kwargs = {"spacing": spacing} if spacing else {}
    expected = metric(torch.from_numpy(pred)[None, None], torch.from_numpy(label)[None, None], **kwargs)
    assert hd95(pred, label, spacing) == pytest.approx(float(expected.item()), rel=1e-6)


def test_hd95_single_voxels_in_physical_units():
    pred, label = np.zeros((8, 8, 12), bool), np.zeros((8, 8, 12), bool)
    pred[4, 4, 2], label[4, 4, 6] = True, True  # 4 voxels apart along x
    assert hd95(pred, label) == pytest.approx(4.0)
    assert hd95(pred, label, spacing=(5.0, 1.0, 0.5)) == pytest.approx(2.0)
    pred[4, 4, 2], pred[2, 4, 6] = False, True  # now 2 planes apart along z, z spacing 5 um
    assert hd95(pred, label, spacing=(5.0, 1.0, 0.5)) == pytest.approx(10.0)


# --------------------------------------------------------------------------------- hand-computed


def straight_tube():
    tube = np.zeros((9, 9, 24), bool)
    tube[3:6, 3:6, 2:22] = True  # 3 x 3 cross-section, 20 voxels long: 180 voxels
    return tube


def test_straight_tube_cut_short():
    label = straight_tube()
    pred = label.copy()
    pred[:, :, 17:] = False  # keeps x = 2..16: 135 voxels, all inside the label
    row = score_volume(pred, label)
    assert (row["tp"], row["fp"], row["fn"]) == (135, 0, 45)
    assert row["dice"] == pytest.approx(2 * 135 / (135 + 180))
    assert (row["precision"], row["recall"]) == (1.0, 0.75)
    # The label's centreline is x = 3..20 (18 voxels, thinning shortens each end by one); the
    # prediction covers x <= 16, i.e. 14 of them; its own centreline lies inside the label.
    assert skeleton(label).sum() == 18
    t_sens, t_prec = 14 / 18, 1.0
    assert row["cldice"] == pytest.approx(2 * t_prec * t_sens / (t_prec + t_sens))
    assert (row["b0_pred"], row["b1_pred"], row["betti0_error"], row["betti1_error"]) == (1, 0, 0, 0)


def test_two_blobs_one_found():
    label = np.zeros((10, 20, 20), bool)
    label[2:6, 2:6, 2:6] = True
    label[2:6, 12:16, 12:16] = True
    pred = np.zeros_like(label)
    pred[2:6, 2:6, 2:6] = True
    row = score_volume(pred, label, spacing=(2.0, 1.0, 1.0))
    assert row["dice"] == pytest.approx(2 * 64 / (64 + 128))
    assert (row["precision"], row["recall"]) == (1.0, 0.5)
    assert (row["b0_pred"], row["b0_label"], row["betti0_error"]) == (1, 2, 1)
    assert row["pq"] == pytest.approx(1.0 / (1 + 0.5))  # one perfect match, one missed blob
    assert row["label_volume_um3"] == pytest.approx(128 * 2.0)
    assert row["hd95_um"] is not None and row["hd95_voxels"] is None


def test_empty_label_conventions():
    empty = np.zeros((6, 8, 8), bool)
    both = score_volume(empty, empty, spacing=(1.0, 1.0, 1.0))
    assert (both["dice"], both["cldice"], both["precision"], both["recall"], both["pq"]) == (1, 1, 1, 1, 1)
    assert both["hd95_um"] == 0.0
    assert (both["betti0_error"], both["betti1_error"]) == (0, 0)

    blob = empty.copy()
    blob[2:4, 2:4, 2:4] = True
    extra = score_volume(blob, empty, spacing=(1.0, 1.0, 1.0))  # something predicted, nothing there
    assert (extra["dice"], extra["cldice"], extra["precision"], extra["pq"]) == (0, 0, 0, 0)
    assert math.isnan(extra["recall"]) and math.isnan(extra["hd95_um"])
    assert extra["betti0_error"] == 1

    missed = score_volume(empty, blob)  # something there, nothing predicted
    assert (missed["dice"], missed["cldice"], missed["recall"]) == (0, 0, 0)
    assert math.isnan(missed["precision"]) and math.isnan(missed["hd95_voxels"])


def test_sparse_valid_mask_scores_labelled_voxels_only():
    label = np.zeros((4, 6, 6), bool)
    label[1, 1:3, 1:3] = True
    valid = np.zeros_like(label)
    valid[1] = True  # only plane 1 is annotated
    pred = label.copy()
    pred[3] = True  # wrong, but on an unlabelled plane
    row = score_volume(pred, label, valid=valid)
    assert row["dice"] == 1.0 and row["fp"] == 0
    assert row["cldice"] is None and row["hd95_voxels"] is None and row["betti0_error"] is None


# --------------------------------------------------------------------------------- topology


@pytest.mark.parametrize(
    "name,mask,expected",
    [
        ("ball", ball(), (1, 0, 0)),
        ("torus", torus(), (1, 1, 0)),
        ("two balls", ball((12, 6, 6), 4) | ball((12, 17, 17), 4), (2, 0, 0)),
        ("hollow sphere", ball(radius=8) & ~ball(radius=5), (1, 0, 1)),
        ("empty", np.zeros((5, 5, 5), bool), (0, 0, 0)),
        ("touching every border", np.ones((5, 6, 7), bool), (1, 0, 0)),  # padding keeps it a ball
        ("two tori", np.concatenate([torus(), torus()], axis=0), (2, 2, 0)),
    ],
)
def test_betti_numbers_of_known_shapes(name, mask, expected):
    assert betti_numbers(mask) == expected, name


def test_betti_uses_26_connectivity_for_foreground():
    diagonal = np.zeros((4, 4, 4), bool)
    diagonal[1, 1, 1] = diagonal[2, 2, 2] = True  # corner-touching voxels: one 26-connected component
    assert betti_numbers(diagonal)[0] == 1


# --------------------------------------------------------------------------------- clDice, PQ


def ladder():
    """Three thick rails joined by nine thin rungs: one connected network with 16 loops."""
    label = np.zeros((12, 64, 64), bool)
    rails = np.zeros_like(label)
    for y0 in (8, 30, 52):
        rails[2:10, y0 - 4 : y0 + 4, 4:60] = True
    label |= rails
    for x0 in range(8, 60, 6):
        label[5:7, 8:52, x0 : x0 + 2] = True
    return label, rails


def test_cldice_perfect_prediction_is_one():
    label, _ = ladder()
    assert cldice(label, label) == 1.0
    assert cldice(straight_tube(), straight_tube()) == 1.0


def test_breaking_every_vessel_hurts_cldice_far_more_than_dice():
    label, rails = ladder()
    row = score_volume(rails, label)  # every thin connection missed: the network falls apart
    assert row["dice"] > 0.9
    assert row["cldice"] < row["dice"] - 0.2
    assert (row["b0_label"], row["b1_label"]) == (1, 16)
    assert (row["betti0_error"], row["betti1_error"]) == (2, 16)


def test_skeleton_survives_even_thickness_tubes():
    """scikit-image's thinning erases a 4 x 4 tube (issue #3757); our guard keeps a centreline."""
    tube = np.zeros((10, 10, 40), bool)
    tube[3:7, 3:7, 2:38] = True
    centreline = skeleton(tube)
    assert centreline.sum() >= 30 and not (centreline & ~tube).any()
    assert cldice(tube, tube) == 1.0


def test_panoptic_quality_is_panopticas_pq_dsc():
    pytest.importorskip("panoptica")
    label = np.zeros((8, 30, 30), bool)
    label[2:6, 2:8, 2:8] = True  # A
    label[2:6, 15:21, 15:21] = True  # B
    label[2:6, 2:8, 20:26] = True  # C
    pred = np.zeros_like(label)
    pred[2:6, 2:8, 3:9] = True  # A shifted by one: IoU 5/7, Dice 5/6
    pred[2:6, 15:17, 15:17] = True  # covers a ninth of B: IoU 1/9, no match
    pred[2:6, 2:8, 23:29] = True  # C shifted by three: IoU 1/3, matched at >= 0.3, Dice 1/2
    pred[2:4, 25:28, 0:3] = True  # nothing there
    # TP 2 (A, C), FP 2, FN 1; quality = mean Dice of the matches
    expected = (5 / 6 + 1 / 2) / 2 * 2 / (2 + 0.5 * 2 + 0.5 * 1)
    assert panoptic_quality(pred, label) == pytest.approx(expected, abs=1e-12)
    empty = np.zeros_like(label)
    assert panoptic_quality(empty, empty) == 1.0  # our convention (panoptica: NaN)
    assert panoptic_quality(empty, label) == 0.0


# --------------------------------------------------------------------------------- labels, categories


def test_label_schemes():
    values = np.array([0, 255, 0, 255], np.uint8).reshape(1, 2, 2)
    fg, valid = label_masks(values, "x.tif")
    assert fg.sum() == 2 and valid is None
    with pytest.raises(InputError, match="non-binary label"):
        label_masks(np.array([0, 1, 2], np.uint8).reshape(1, 1, 3), "x.tif")
    fg, valid = label_masks(np.array([0, 1, 2], np.uint8).reshape(1, 1, 3), "x.tif", "nonzero")
    assert fg.tolist() == [[[False, True, True]]]
    sparse = np.array([0, 1, 2, 3, 4], np.uint8).reshape(1, 1, 5)
    fg, valid = label_masks(sparse, "x.tif", "sparse")
    assert fg.tolist() == [[[False, False, True, False, False]]]
    assert valid.tolist() == [[[False, True, True, True, False]]]  # 0 and edge (4) ignored
    _, valid = label_masks(sparse, "x.tif", "sparse", sparse_edge="background")
    assert valid.tolist() == [[[False, True, True, True, True]]]
    with pytest.raises(InputError, match="sparse label has values"):
        label_masks(np.array([0, 7], np.uint8).reshape(1, 1, 2), "x.tif", "sparse")
    with pytest.raises(InputError, match=r"no labelled voxels \(only 0 = unlabelled\)"):
        label_masks(np.zeros((1, 1, 2), np.uint8), "x.tif", "sparse", sparse_edge="background")
    with pytest.raises(InputError, match=r"no labelled voxels \(only 0 = unlabelled and 4 = edge, ignored\)"):
        label_masks(np.array([0, 4], np.uint8).reshape(1, 1, 2), "x.tif", "sparse")  # was: "all 0"


def test_prediction_must_be_binary():
    assert prediction_mask(np.array([0, 255], np.uint8), "p.tif").tolist() == [False, True]
    with pytest.raises(InputError, match="p.tif: prediction is not a binary mask.*probabilities"):
        prediction_mask(np.array([0.0, 0.3, 0.9], np.float32), "p.tif")


def test_structure_and_category_from_name_or_mapping():
    # the organisers' prefixes first, case-sensitive as their str.startswith
    assert classify("blood_vessel_003") == ("blood_vessel", "contiguous-dense", True)
    assert classify("microglia_patch_1") == ("microglia", "isolated-sparse", True)
    assert classify("AD_plaques_7") == ("AD_plaques", "isolated-sparse", True)
    assert classify("ad_plaques_7") == ("AD_plaques", "isolated-sparse", False)  # only our alias knows it
    assert classify("Blood_vessel_003")[2] is False
    # then our aliases, mapped to the organisers' structure names
    assert structure_from_name("Vessels_003") == "blood_vessel"
    assert structure_from_name("cFos-12") == "cfos_neuron"
    assert structure_from_name("c-Fos_patch7") == "cfos_neuron"
    assert classify("nuclei12") == ("cell_nuclei", "isolated-dense", False)
    assert classify("burgess2014_tgMouse") == ("unknown", "unknown", False)
    assert classify("burgess2014_tgMouse", structure="vessels") == ("blood_vessel", "contiguous-dense", False)
    mapping = {"patch1": {"structure": "microglia", "category": "isolated-sparse"}}
    assert classify("patch1", mapping, structure="vessels") == ("microglia", "isolated-sparse", False)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_prediction_or_label_is_refused(bad):
    """A NaN/Inf volume is not a mask: {0, NaN} has one non-zero value but must not score NaN as foreground."""
    array = np.zeros((2, 3, 3), np.float32)
    array[1] = bad
    with pytest.raises(InputError, match="p.tif: prediction contains NaN/Inf"):
        prediction_mask(array, "p.tif")
    with pytest.raises(InputError, match="l.tif: label contains NaN/Inf"):
        label_masks(array, "l.tif")
    with pytest.raises(InputError, match="l.tif: sparse label has values"):
        label_masks(array, "l.tif", "sparse")
    assert prediction_mask(np.array([0.0, 0.5], np.float32), "p.tif").tolist() == [False, True]  # finite: fine


def test_failure_scoring_a_missing_prediction_names_the_label(tmp_path, monkeypatch):
    from lsmseg.io import write_volume
    from lsmseg_evaluation import evaluate
    from lsmseg_evaluation.pairing import Pair

    label = np.zeros((5, 6, 6), np.uint8)
    label[1:3, 1:3, 1:3] = 1
    path = tmp_path / "cells_1.tif"
    write_volume(label, path)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(evaluate, "score_volume", broken)
    settings = evaluate.EvaluationSettings(figures=False, progress=False)
    row, _ = evaluate.evaluate_pair(Pair("cells_1", pred=None, label=path), settings)
    assert row["status"] == "error"
    assert row["error"] == f"{path}: unexpected RuntimeError: boom"


def test_2024_cldice_with_one_empty_skeleton_is_not_one():
    """The 2024 formula (2ab + 1e-6) / (a + b + 1e-6) gives 1 only when both cl-scores are 0 (e.g. an
    empty mask); an empty label skeleton with a prediction skeleton inside the label gives ~0."""
    from skimage.morphology import skeletonize

    from lsmseg_evaluation.leaderboard import cldice_2024

    label = np.zeros((10, 10, 40), bool)
    label[3:7, 3:7, 2:38] = True  # 4 x 4 tube: empty scikit-image skeleton
    pred = np.zeros_like(label)
    pred[4:7, 4:7, 2:38] = True  # 3 x 3 tube inside it
    assert not skeletonize(label).any() and skeletonize(pred).any()
    assert cldice_2024(pred, label) == pytest.approx(1e-6 / (1 + 1e-6))
    assert cldice_2024(np.zeros_like(label), label) == 1.0  # empty prediction: both scores 0
