"""``lsmseg evaluate --preset``: every leaderboard value against an independent reimplementation.

The reference below is written from the organisers' formulas (SELMA3D 2026 and 2024 evaluators,
as evaluation/README.md describes them), with scipy/scikit-image primitives and no code from
``lsmseg_evaluation``: labelling with scipy.ndimage (26-connected), greedy one-to-one matching at
IoU >= 0.3 in order of decreasing IoU, PQ = mean Dice of the matches x TP / (TP + FP/2 + FN/2),
clDice from scikit-image skeletons, Betti numbers from skimage.measure.label / euler_number, and
aggregates with statistics.mean / stdev. Masks are small random volumes that include instances
matched at IoU between 0.3 and 0.5, an empty prediction, an empty label and a broken vessel.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("panoptica")
pytest.importorskip("skimage")
pytest.importorskip("cc3d")
pytest.importorskip("matplotlib")

from lsmseg.cli import main  # noqa: E402
from lsmseg.io import write_volume  # noqa: E402

TOL = 1e-6
SHAPE = (20, 40, 40)


# ------------------------------------------------------------------------------ reference


def ref_dice(pred, label):
    p, g = pred > 0, label > 0
    if p.sum() + g.sum() == 0:
        return 1.0
    return 2.0 * (p & g).sum() / (p.sum() + g.sum())


def ref_components(mask):
    from scipy import ndimage

    labels, n = ndimage.label(mask > 0, structure=np.ones((3, 3, 3)))
    return labels, n


def ref_pq_dsc(pred, label, threshold=0.3):
    """Panoptic quality with the Dice of matched instances as its quality term (NaN if both empty)."""
    pl, n_pred = ref_components(pred)
    gl, n_ref = ref_components(label)
    if n_pred == 0 and n_ref == 0:
        return math.nan
    pairs = []
    for r in range(1, n_ref + 1):
        ref_mask = gl == r
        for p in np.unique(pl[ref_mask]):
            if p == 0:
                continue
            pred_mask = pl == p
            inter = np.count_nonzero(ref_mask & pred_mask)
            union = np.count_nonzero(ref_mask | pred_mask)
            dsc = 2 * inter / (np.count_nonzero(ref_mask) + np.count_nonzero(pred_mask))
            pairs.append((inter / union, r, p, dsc))
    pairs.sort(key=lambda t: -t[0])
    used_ref, used_pred, matched = set(), set(), []
    for iou, r, p, dsc in pairs:
        if r in used_ref or p in used_pred or iou < threshold:
            continue
        used_ref.add(r)
        used_pred.add(p)
        matched.append(dsc)
    tp = len(matched)
    if tp == 0:
        return 0.0
    rq = tp / (tp + 0.5 * (n_pred - tp) + 0.5 * (n_ref - tp))
    return float(np.mean(matched)) * rq


def ref_skeleton(mask):
    from skimage.morphology import skeletonize

    return skeletonize(mask > 0)


def ref_cldice_2026(pred, label):
    """2 tprec tsens / (tprec + tsens), no smoothing: NaN where a ratio is 0/0."""
    p, g = pred > 0, label > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        sl, sp = ref_skeleton(g), ref_skeleton(p)
        tprec = np.float64(np.count_nonzero(p & sl)) / np.float64(np.count_nonzero(sl))
        tsens = np.float64(np.count_nonzero(g & sp)) / np.float64(np.count_nonzero(sp))
        return float(2 * tprec * tsens / (tprec + tsens))


def ref_cldice_2024(pred, label):
    p, g = pred > 0, label > 0

    def score(volume, skeleton):
        return 0 if skeleton.sum() == 0 else (volume & skeleton).sum() / skeleton.sum()

    a, b = score(p, ref_skeleton(g)), score(g, ref_skeleton(p))
    return (2 * a * b + 1e-6) / (a + b + 1e-6)


def ref_betti(mask):
    from skimage.measure import euler_number, label

    padded = np.pad((mask > 0).astype(np.uint8), 1)
    _, b0 = label(padded, return_num=True, connectivity=3)
    _, b2 = label(1 - padded, return_num=True, connectivity=1)
    return b0, b0 + (b2 - 1) - euler_number(padded, connectivity=3)


def ref_betti_errors(pred, label):
    if not (pred > 0).any() and not (label > 0).any():
        return 0, 0
    bp, bg = ref_betti(pred), ref_betti(label)
    return abs(bp[0] - bg[0]), abs(bp[1] - bg[1])


def ref_2026(name, pred, label):
    if name.startswith(("axonalmarker", "blood_vessel", "gutnerve", "lymphatic_vessel", "peripheral_nerve")):
        return {"dice": ref_dice(pred, label), "cldice": ref_cldice_2026(pred, label)}
    assert name.startswith(("AD_plaques", "cell_nuclei", "cfos_neuron", "microglia", "protein"))
    return {"dice": ref_dice(pred, label), "panoptic_quality": ref_pq_dsc(pred, label)}


def ref_2024(name, pred, label):
    b0, b1 = ref_betti_errors(pred, label)
    if "cfos" in name:
        return {"dice": ref_dice(pred, label), "betti_matching_error_0": b0}
    assert "microglia" in name
    return {"dice": ref_dice(pred, label), "betti_matching_error_0": b0, "betti_matching_error_1": b1,
            "centerline_dice": ref_cldice_2024(pred, label)}


def ref_aggregates_2026(results):
    iso = [r for r in results if "panoptic_quality" in r]
    con = [r for r in results if "cldice" in r]
    out = {}
    for prefix, group, key in (("iso_dice", iso, "dice"), ("iso_panoptic_quality", iso, "panoptic_quality"),
                               ("con_dice", con, "dice"), ("con_cldice", con, "cldice")):
        values = [r[key] for r in group]
        out[prefix + "_mean"] = statistics.mean(values)
        out[prefix + "_std"] = statistics.stdev(values)
    return out


def ref_aggregates_2024(results):
    cfos = [r for r in results if len(r) == 2]
    micro = [r for r in results if len(r) != 2]
    return {
        "cfos_dice": statistics.mean(r["dice"] for r in cfos),
        "cfos_betti_error_0": statistics.mean(r["betti_matching_error_0"] for r in cfos),
        "micro_dice": statistics.mean(r["dice"] for r in micro),
        "micro_betti_error_0": statistics.mean(r["betti_matching_error_0"] for r in micro),
        "micro_betti_error_1": statistics.mean(r["betti_matching_error_1"] for r in micro),
        "micro_cldice": statistics.mean(r["centerline_dice"] for r in micro),
    }


# ------------------------------------------------------------------------------ masks


def cube(mask, z, y, x, size=6, shift=(0, 0, 0)):
    dz, dy, dx = shift
    mask[z + dz : z + dz + size, y + dy : y + dy + size, x + dx : x + dx + size] = True


def cells_case(seed):
    """Label cubes and a prediction that finds some well (IoU > 0.5), some at IoU 0.3-0.5 (a
    shift of 3 voxels: IoU 1/3; of 2 and 1: IoU 0.385), misses some, and adds random blobs."""
    rng = np.random.default_rng(seed)
    label, pred = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    outcomes = [(0, 0, 1), (0, 0, 3), (0, 1, 2), None, (0, 0, 0), (1, 0, 0)]
    for i, (y, x) in enumerate([(2, 2), (2, 16), (2, 30), (16, 2), (16, 16), (30, 30)]):
        z = int(rng.integers(2, SHAPE[0] - 10))
        cube(label, z, y, x)
        outcome = outcomes[(i + seed) % len(outcomes)]
        if outcome is not None:
            cube(pred, z, y, x, shift=outcome)
    for _ in range(3):  # false positives, possibly touching real cells
        z, y, x = rng.integers(0, SHAPE[0] - 3), rng.integers(0, SHAPE[1] - 3), rng.integers(0, SHAPE[2] - 3)
        pred[z : z + 3, y : y + 3, x : x + 3] = True
    pred &= rng.random(SHAPE) > 0.02  # a few holes
    return pred, label


def vessel_network():
    """Two tubes along x joined by three rungs along y: one network with two loops."""
    label = np.zeros(SHAPE, bool)
    label[8:12, 6:10, 3:37] = True
    label[8:12, 28:32, 3:37] = True
    for x in (5, 18, 31):
        label[9:11, 6:32, x : x + 3] = True
    return label


def write_case(folder: Path, name: str, pred, label):
    write_volume(label.astype(np.uint8) * 255, folder / "labels" / f"{name}.tif")
    if pred is not None:
        write_volume(pred.astype(np.uint8), folder / "pred" / f"{name}.nii.gz")


def cases_2026():
    vessel = vessel_network()
    broken = vessel.copy()
    broken[:, 10:28, 18:21] = False  # the middle rung is cut
    broken[:, :, 20:23] &= ~np.ones_like(broken[:, :, 20:23])  # and both tubes: the network falls apart
    shifted = np.roll(vessel, 1, axis=1) & (np.random.default_rng(5).random(SHAPE) > 0.05)
    random_cells = [cells_case(seed) for seed in range(4)]
    empty = np.zeros(SHAPE, bool)
    return {
        "AD_plaques_1": random_cells[0],
        "blood_vessel_broken": (broken, vessel),
        "blood_vessel_shifted": (shifted, vessel),
        "blood_vessel_thin": (np.roll(vessel, 2, axis=2), vessel),
        "cell_nuclei_empty_label": (random_cells[1][0], empty),
        "cfos_neuron_2": random_cells[1],
        "cfos_neuron_empty_pred": (empty, random_cells[2][1]),
        "microglia_3": random_cells[3],
    }


def run_evaluate(tmp_path, *extra) -> int:
    return main(["--quiet", "evaluate", "--pred", str(tmp_path / "pred"), "--labels", str(tmp_path / "labels"),
                 "--out", str(tmp_path / "report"), "--no-figures", *extra])


def read_csv(path: Path) -> dict[str, dict]:
    with path.open() as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


def assert_close(ours, expected, what):
    if isinstance(expected, float) and math.isnan(expected):
        assert isinstance(ours, float) and math.isnan(ours), what
    else:
        assert ours == pytest.approx(expected, abs=TOL), what


# ------------------------------------------------------------------------------ tests


def test_reference_sees_the_intended_cases():
    """The masks do what the test needs: matches at IoU in [0.3, 0.5), a broken network."""
    pred, label = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    cube(label, 4, 4, 4)
    cube(pred, 4, 4, 4, shift=(0, 0, 3))
    assert ref_pq_dsc(pred, label) == pytest.approx(0.5)  # IoU 1/3 matched; its Dice is 1/2
    cube(pred, 4, 20, 20)  # a false positive
    assert ref_pq_dsc(pred, label) == pytest.approx(0.5 * 1 / 1.5)
    assert ref_pq_dsc(pred, label, threshold=0.5) == 0.0  # 0.5 would not match it
    for seed in range(4):  # every random cell case has matches that only the 0.3 threshold accepts
        pred, label = cells_case(seed)
        assert ref_pq_dsc(pred, label) > ref_pq_dsc(pred, label, threshold=0.5) > 0
    cases = cases_2026()
    broken, vessel = cases["blood_vessel_broken"]
    assert ref_betti(vessel) == (1, 2) and ref_betti(broken)[0] > 1
    assert 0 < ref_cldice_2026(broken, vessel) < ref_dice(broken, vessel) + 0.2


def test_2026_preset_matches_reference_for_every_case_and_aggregate(tmp_path):
    cases = cases_2026()
    for name, (pred, label) in cases.items():
        write_case(tmp_path, name, pred, label)
    assert run_evaluate(tmp_path) == 0  # selma3d-2026 is the default

    rows = read_csv(tmp_path / "report" / "metrics.csv")
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    names = sorted(cases)  # metrics.csv order = metrics.json results order
    assert list(rows) == names and len(metrics["results"]) == len(names)
    expected_results = [ref_2026(name, *cases[name]) for name in names]
    for name, ours, expected in zip(names, metrics["results"], expected_results):
        assert set(ours) == set(expected), name
        for key, value in expected.items():
            assert_close(ours[key], value, (name, key))
            assert_close(float(rows[name]["lb_" + key]), value, (name, "csv", key))
    # the cases were built to exercise these paths
    assert expected_results[names.index("cfos_neuron_empty_pred")] == {"dice": 0.0, "panoptic_quality": 0.0}
    assert expected_results[names.index("cell_nuclei_empty_label")] == {"dice": 0.0, "panoptic_quality": 0.0}
    expected_aggregates = ref_aggregates_2026(expected_results)
    assert set(metrics["aggregates"]) == set(expected_aggregates)
    for key, value in expected_aggregates.items():
        assert_close(metrics["aggregates"][key], value, key)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["leaderboard"]["aggregates"] == metrics["aggregates"]
    assert summary["leaderboard"]["unrouted"] == [] and summary["leaderboard"]["notes"] == []
    html = (tmp_path / "report" / "report.html").read_text()
    assert "what the SELMA3D 2026 leaderboard would show" in html and "iso_panoptic_quality_mean" in html


def test_2024_preset_matches_reference(tmp_path):
    cases = {name: masks for name, masks in cases_2026().items() if name.startswith(("cfos", "microglia"))}
    broken, vessel = cases_2026()["blood_vessel_broken"]
    cases["microglia_branched"] = (broken, vessel)  # loops, to give Betti-1 and clDice something to do
    for name, (pred, label) in cases.items():
        write_case(tmp_path, name, pred, label)
    assert run_evaluate(tmp_path, "--preset", "selma3d-2024", "--jobs", "2") == 0

    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    rows = read_csv(tmp_path / "report" / "metrics.csv")
    names = sorted(cases)
    expected_results = [ref_2024(name, *cases[name]) for name in names]
    assert metrics["results"] == pytest.approx(expected_results, abs=TOL)
    assert any(r.get("betti_matching_error_1") for r in expected_results)
    for name, expected in zip(names, expected_results):
        assert rows[name]["lb_dice"] != "" and rows[name]["lb_group"] in ("cfos", "microglia")
    expected_aggregates = ref_aggregates_2024(expected_results)
    assert metrics["aggregates"] == pytest.approx(expected_aggregates, abs=TOL)


def test_nan_values_are_kept_and_failing_aggregates_flagged(tmp_path):
    """panoptica gives NaN (PQ of two empty masks, clDice of an empty prediction); the organisers'
    statistics.stdev cannot take a NaN, so those aggregates are null with a note, not invented."""
    vessel = vessel_network()
    empty = np.zeros(SHAPE, bool)
    pred, label = cells_case(7)
    cases = {"blood_vessel_missed": (empty, vessel), "blood_vessel_ok": (vessel, vessel),
             "cell_nuclei_nothing": (empty, empty), "cell_nuclei_some": (pred, label)}
    for name, (p, g) in cases.items():
        write_case(tmp_path, name, p, g)
    assert run_evaluate(tmp_path) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    by_name = dict(zip(sorted(cases), metrics["results"]))
    assert math.isnan(ref_cldice_2026(empty, vessel)) and math.isnan(by_name["blood_vessel_missed"]["cldice"])
    assert math.isnan(ref_pq_dsc(empty, empty)) and math.isnan(by_name["cell_nuclei_nothing"]["panoptic_quality"])
    assert by_name["cell_nuclei_nothing"]["dice"] == 1.0
    aggregates = metrics["aggregates"]
    assert math.isnan(aggregates["con_cldice_mean"]) and aggregates["con_cldice_std"] is None
    assert math.isnan(aggregates["iso_panoptic_quality_mean"]) and aggregates["iso_panoptic_quality_std"] is None
    assert aggregates["con_dice_mean"] == pytest.approx(0.5)
    notes = json.loads((tmp_path / "report" / "summary.json").read_text())["leaderboard"]["notes"]
    assert any(n.startswith("con_cldice_std:") for n in notes)
    assert any("NaN per-case values" in n and "blood_vessel_missed" in n for n in notes)


def test_unknown_prefix_is_scored_with_dice_only_and_flagged(tmp_path):
    pred, label = cells_case(3)
    write_case(tmp_path, "burgess2014_tgMouse", pred, label)  # no organisers' prefix, no alias
    write_case(tmp_path, "Cfos_neuron_1", pred, label)  # prefixes are case-sensitive: only our alias knows it
    write_case(tmp_path, "cfos_neuron_1", pred, label)
    write_case(tmp_path, "microglia_missing", None, label)  # no prediction
    assert run_evaluate(tmp_path) == 1  # a label without a prediction fails the run, after scoring it

    rows = read_csv(tmp_path / "report" / "metrics.csv")
    unknown = rows["burgess2014_tgMouse"]
    assert unknown["lb_group"] == "unknown" and unknown["lb_panoptic_quality"] == ""
    assert float(unknown["lb_dice"]) == pytest.approx(ref_dice(pred, label), abs=TOL)
    assert "leaderboard Dice only" in unknown["notes"]
    alias = rows["Cfos_neuron_1"]
    assert alias["lb_group"] == "isolated" and alias["lb_by_rule"] == "False"
    assert float(alias["lb_panoptic_quality"]) == pytest.approx(ref_pq_dsc(pred, label), abs=TOL)
    assert float(rows["microglia_missing"]["lb_dice"]) == 0.0
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    board = summary["leaderboard"]
    assert board["unrouted"] == ["burgess2014_tgMouse"] and board["routed_by_alias"] == ["Cfos_neuron_1"]
    assert summary["missing_predictions"] == ["microglia_missing"]
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert len(metrics["results"]) == 3  # the unrouted case stays out, as the organisers could not score it
    html = (tmp_path / "report" / "report.html").read_text()
    assert "match no selma3d-2026 name rule" in html and "burgess2014_tgMouse" in html
    assert "without a prediction" in html and "microglia_missing" in html


def test_2024_case_names_get_the_structure_they_are_scored_as(tmp_path):
    # The 2024 evaluator routes by 'cfos' / 'microglia' anywhere in the name ('cfos' first); the
    # structure column (and summary.json's by_structure) used to say 'unknown' for such names.
    pred, label = cells_case(4)
    for name in ("x_microglia_h", "brain_cfos_3", "microglia_cfos_4", "vol9"):
        write_case(tmp_path, name, pred, label)
    assert run_evaluate(tmp_path, "--preset", "selma3d-2024") == 0
    rows = read_csv(tmp_path / "report" / "metrics.csv")
    got = {name: (row["structure"], row["category"], row["lb_group"], row["lb_by_rule"]) for name, row in rows.items()}
    assert got == {
        "x_microglia_h": ("microglia", "isolated-sparse", "microglia", "True"),
        "brain_cfos_3": ("cfos_neuron", "isolated-sparse", "cfos", "True"),
        "microglia_cfos_4": ("cfos_neuron", "isolated-sparse", "cfos", "True"),
        "vol9": ("unknown", "unknown", "unknown", "False"),  # matches no rule: said so, Dice only
    }
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert {k: v["n_volumes"] for k, v in summary["by_structure"].items()} == {
        "cfos_neuron": 2, "microglia": 1, "unknown": 1}
    assert summary["leaderboard"]["unrouted"] == ["vol9"] and "leaderboard Dice only" in rows["vol9"]["notes"]

    assert run_evaluate(tmp_path) == 0  # the 2026 preset: its prefixes only, as before
    rows = read_csv(tmp_path / "report" / "metrics.csv")
    assert rows["x_microglia_h"]["structure"] == "unknown" and rows["x_microglia_h"]["lb_group"] == "unknown"
    assert rows["microglia_cfos_4"]["structure"] == "microglia" and rows["microglia_cfos_4"]["lb_group"] == "isolated"


def test_a_case_routed_by_the_mappings_category_says_so(tmp_path):
    # Its note used to read "routed as unknown by our alias" although the mapping's category routed it.
    pred, label = cells_case(5)
    write_case(tmp_path, "patch7", pred, label)
    write_case(tmp_path, "vessels_1", pred, label)
    mapping = tmp_path / "mapping.csv"
    mapping.write_text("name,structure,category\npatch7,,isolated-dense\n")
    assert run_evaluate(tmp_path, "--mapping", str(mapping)) == 0
    rows = read_csv(tmp_path / "report" / "metrics.csv")
    row = rows["patch7"]
    assert (row["structure"], row["lb_group"], row["lb_by_rule"]) == ("unknown", "isolated", "False")
    assert row["notes"].startswith("routed as isolated by the mapping's category;")
    assert rows["vessels_1"]["notes"].startswith("routed as blood_vessel by our alias;")  # unchanged
