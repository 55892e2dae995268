"""The SELMA3D leaderboards' own numbers: per-case metrics, aggregates and ``metrics.json``.

Mirrors the organisers' evaluators (public repositories, read for this module):

* ``selma3d-2026``: YingChen7/SELMA3D2026_evaluation ``evaluate.py`` (pins ``panoptica==2.1.7``).
  Prediction and label binarised at > 0. Dice = 2|P∩L| / (|P| + |L|), 1 when both are empty.
  Contiguous cases: + ``cldice`` = ``panoptica.metrics.cldice._compute_centerline_dice_coefficient
  (label, prediction)`` (no smoothing: NaN when either
  mask or either skeleton is empty, or the two do not overlap).
  Isolated cases: + ``panoptic_quality`` = ``pq_dsc`` of the "ungrouped" result of
  ``Panoptica_Evaluator(expected_input=SEMANTIC, instance_approximator=ConnectedComponents
  InstanceApproximator(cca_backend=None), instance_matcher=NaiveThresholdMatching(matching_threshold
  =0.3), instance_metrics=[DSC])`` (NaN when both masks are empty). Aggregates ``iso_dice_mean/std``,
  ``iso_panoptic_quality_mean/std``, ``con_dice_mean/std``, ``con_cldice_mean/std`` with
  ``statistics.mean`` / ``statistics.stdev`` over the cases.
* ``selma3d-2024``: YingChen7/SELMA3D_challenge-evaluation ``evaluate.py`` and its metric modules.
  cfos cases: ``dice``, ``betti_matching_error_0``; microglia cases: ``dice``,
  ``betti_matching_error_0``, ``betti_matching_error_1``, ``centerline_dice`` (skimage 3-D
  skeletons, no tolerance, (2 tprec tsens + 1e-6) / (tprec + tsens + 1e-6), a score being 0 for
  an empty skeleton: 1 when both scores are 0, e.g. an empty mask or disjoint masks; near 0 when
  only one is). Betti numbers of the zero-padded mask (26-connected foreground, Euler number
  with connectivity 3, 6-connected background), errors 0 when both masks are empty.
  Aggregates (``statistics.mean``): ``cfos_dice``, ``cfos_betti_error_0``, ``micro_dice``,
  ``micro_betti_error_0``, ``micro_betti_error_1``, ``micro_cldice``.

Where the organisers' code would fail (a name no rule routes, an aggregate over too few cases, a
standard deviation over a NaN, which ``statistics.stdev`` refuses), this module writes ``None``
and says why instead of failing; nothing else departs from their computation.
"""

from __future__ import annotations

import statistics
import warnings

import numpy as np

from .categories import (
    CONTIGUOUS,
    ISOLATED,
    UNKNOWN,
    category_2026,
    organisers_prefix_2026,
    organisers_structure_2024,
)

PRESETS = ("selma3d-2026", "selma3d-2024")
DEFAULT_PRESET = "selma3d-2026"

# Organisers' per-case keys -> our metrics.csv columns (leaderboard columns come first there).
RESULT_KEYS = {
    "selma3d-2026": ("dice", "cldice", "panoptic_quality"),
    "selma3d-2024": ("dice", "betti_matching_error_0", "betti_matching_error_1", "centerline_dice"),
}
LB_PREFIX = "lb_"
AGGREGATE_KEYS = {
    "selma3d-2026": ("iso_dice_mean", "iso_dice_std", "iso_panoptic_quality_mean", "iso_panoptic_quality_std",
                     "con_dice_mean", "con_dice_std", "con_cldice_mean", "con_cldice_std"),
    "selma3d-2024": ("cfos_dice", "cfos_betti_error_0", "micro_dice", "micro_betti_error_0",
                     "micro_betti_error_1", "micro_cldice"),
}
PRESET_SOURCES = {
    "selma3d-2026": "YingChen7/SELMA3D2026_evaluation evaluate.py (panoptica 2.1.7)",
    "selma3d-2024": "YingChen7/SELMA3D_challenge-evaluation evaluate.py",
}


def lb_columns(preset: str) -> list[str]:
    """metrics.csv columns holding this preset's leaderboard values."""
    return [LB_PREFIX + key for key in RESULT_KEYS[preset]]


def all_lb_columns() -> list[str]:
    return list(dict.fromkeys(c for preset in PRESETS for c in lb_columns(preset)))


def check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    return preset


# ------------------------------------------------------------------------------------ routing


def route(name: str, structure: str, category: str, preset: str) -> tuple[str, bool]:
    """(leaderboard group, by the organisers' own rule) for a case.

    2026 groups: ``contiguous`` / ``isolated``; 2024 groups: ``cfos`` / ``microglia``;
    ``unknown`` when neither the organisers' rule nor our structure says (Dice only then).
    """
    if preset == "selma3d-2026":
        if organisers_prefix_2026(name) is not None:
            return category_2026(organisers_prefix_2026(name)), True
        group = category.split("-")[0] if category and category != UNKNOWN else category_2026(structure)
        return (group if group in (CONTIGUOUS, ISOLATED) else UNKNOWN), False
    found = organisers_structure_2024(name)
    if found is not None:
        return found, True
    return {"cfos_neuron": "cfos", "microglia": "microglia"}.get(structure, UNKNOWN), False


# ------------------------------------------------------------------------------------ metrics


def _binary_uint8(mask) -> np.ndarray:
    """The organisers' ``x[x > 0] = 1`` on a 0/1 mask, as the uint8 array their readers give."""
    mask = np.asarray(mask)
    return (mask > 0).view(np.uint8) if mask.dtype == bool else (mask > 0).astype(np.uint8)


def dice(pred, label) -> float:
    """Both evaluators' volumetric Dice: 2|P∩L| / (|P| + |L|); 1 when both are empty."""
    pred, label = np.asarray(pred) > 0, np.asarray(label) > 0
    pred_sum, label_sum = int(np.count_nonzero(pred)), int(np.count_nonzero(label))
    if pred_sum + label_sum == 0:
        return 1.0
    return float(2.0 * int(np.count_nonzero(pred & label)) / (pred_sum + label_sum))


_EVALUATOR = None


def _panoptica_evaluator():
    """The 2026 evaluator's Panoptica_Evaluator, built once per process."""
    global _EVALUATOR
    if _EVALUATOR is None:
        from panoptica import (
            ConnectedComponentsInstanceApproximator,
            InputType,
            NaiveThresholdMatching,
            Panoptica_Evaluator,
            disable_citation_reminder,
        )
        from panoptica.metrics import Metric

        disable_citation_reminder()  # cited in evaluation/README.md instead of on stdout per process
        _EVALUATOR = Panoptica_Evaluator(
            expected_input=InputType.SEMANTIC,
            instance_approximator=ConnectedComponentsInstanceApproximator(cca_backend=None),
            instance_matcher=NaiveThresholdMatching(matching_threshold=0.3),
            instance_metrics=[Metric.DSC],
        )
    return _EVALUATOR


def panoptica_pq(pred, label) -> float:
    """``pq_dsc`` of panoptica's ungrouped result with the 2026 settings (NaN when both are empty)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 0/0 in panoptica's edge cases: the value is NaN, as theirs
        result = _panoptica_evaluator().evaluate(_binary_uint8(pred), _binary_uint8(label), verbose=False)
    return float(result["ungrouped"].pq_dsc)


def panoptica_cldice(pred, label) -> float:
    """panoptica's centerline Dice (label first, as the 2026 evaluator calls it); NaN-prone."""
    from panoptica.metrics.cldice import _compute_centerline_dice_coefficient

    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(_compute_centerline_dice_coefficient(_binary_uint8(label), _binary_uint8(pred)))


def cldice_2024(pred, label) -> float:
    """The 2024 evaluator's centerline Dice: plain 3-D skeletons, smoothing 1e-6."""
    from skimage.morphology import skeletonize

    pred, label = np.asarray(pred) > 0, np.asarray(label) > 0

    def cl_score(volume, skeleton):
        total = int(np.count_nonzero(skeleton))
        return 0 if total == 0 else int(np.count_nonzero(volume & skeleton)) / total

    smooth = 1e-6
    first = cl_score(pred, skeletonize(label))  # their "tprec": the label's skeleton inside the prediction
    second = cl_score(label, skeletonize(pred))
    return float((2 * first * second + smooth) / (first + second + smooth))


def betti_errors_2024(pred, label) -> tuple[int, int]:
    """|Δb0|, |Δb1| as the 2024 evaluator computes them (0, 0 when both masks are empty)."""
    from .metrics import betti_numbers

    pred, label = np.asarray(pred) > 0, np.asarray(label) > 0
    if not pred.any() and not label.any():
        return 0, 0
    b_pred, b_label = betti_numbers(pred), betti_numbers(label)
    return abs(b_pred[0] - b_label[0]), abs(b_pred[1] - b_label[1])


def score_case(pred, label, group: str, preset: str) -> dict:
    """The organisers' per-case result dict for one case of leaderboard group ``group``.

    ``unknown`` cases get Dice only (the organisers' evaluators would stop on them).
    """
    result = {"dice": dice(pred, label)}
    if preset == "selma3d-2026":
        if group == CONTIGUOUS:
            result["cldice"] = panoptica_cldice(pred, label)
        elif group == ISOLATED:
            result["panoptic_quality"] = panoptica_pq(pred, label)
    elif group == "cfos":
        result["betti_matching_error_0"] = betti_errors_2024(pred, label)[0]
    elif group == "microglia":
        b0, b1 = betti_errors_2024(pred, label)
        result.update(betti_matching_error_0=b0, betti_matching_error_1=b1, centerline_dice=cldice_2024(pred, label))
    return result


# ------------------------------------------------------------------------------------ aggregates


def _aggregate(function, values: list, key: str, notes: list[str]):
    try:
        return function(values)
    except (statistics.StatisticsError, AttributeError, ValueError, TypeError) as exc:
        # StatisticsError: too few cases; AttributeError/ValueError: statistics.stdev over a NaN.
        notes.append(f"{key}: the organisers' {function.__name__} would raise {type(exc).__name__} "
                     f"({exc}) over {len(values)} value(s); written as null")
        return None


def aggregates(results: list[tuple[str, dict]], preset: str) -> tuple[dict, list[str]]:
    """The organisers' ``aggregates`` from (group, result) pairs, and notes on what they could not compute."""
    notes: list[str] = []
    mean, stdev = statistics.mean, statistics.stdev
    if preset == "selma3d-2026":
        iso = [r for g, r in results if g == ISOLATED]
        con = [r for g, r in results if g == CONTIGUOUS]
        lists = {"iso_dice": [r["dice"] for r in iso], "iso_panoptic_quality": [r["panoptic_quality"] for r in iso],
                 "con_dice": [r["dice"] for r in con], "con_cldice": [r["cldice"] for r in con]}
        out = {}
        for key, values in lists.items():
            out[f"{key}_mean"] = _aggregate(mean, values, f"{key}_mean", notes)
            out[f"{key}_std"] = _aggregate(stdev, values, f"{key}_std", notes)
        return out, notes
    cfos = [r for g, r in results if g == "cfos"]
    micro = [r for g, r in results if g == "microglia"]
    lists = {
        "cfos_dice": [r["dice"] for r in cfos],
        "cfos_betti_error_0": [r["betti_matching_error_0"] for r in cfos],
        "micro_dice": [r["dice"] for r in micro],
        "micro_betti_error_0": [r["betti_matching_error_0"] for r in micro],
        "micro_betti_error_1": [r["betti_matching_error_1"] for r in micro],
        "micro_cldice": [r["centerline_dice"] for r in micro],
    }
    return {key: _aggregate(mean, values, key, notes) for key, values in lists.items()}, notes


def nan_free(row: dict) -> bool:
    """True when none of a row's leaderboard values is NaN."""
    return not any(isinstance(row.get(c), float) and row[c] != row[c] for c in all_lb_columns())


def leaderboard_summary(rows: list[dict], preset: str) -> tuple[dict, dict]:
    """(summary block, ``metrics.json`` content) from scored rows (``status == ok``) in name order.

    ``metrics.json`` holds the organisers' ``results`` (one dict per routed case, in metrics.csv's
    order, without names, as theirs) and ``aggregates``; cases no rule routes are left out of it
    (their evaluator would stop on them) and listed in the summary.
    """
    # Sparse labels have no leaderboard values (the leaderboards score fully labelled volumes).
    scored = [row for row in rows if row["status"] == "ok" and row.get(LB_PREFIX + "dice") is not None]
    routed = [row for row in scored if row["lb_group"] != UNKNOWN]
    results = [(row["lb_group"], {k: row[LB_PREFIX + k] for k in RESULT_KEYS[preset] if row.get(LB_PREFIX + k) is not None})
               for row in routed]
    values, notes = aggregates(results, preset)
    nan_cases = [row["name"] for row in routed if not nan_free(row)]
    if nan_cases:
        notes.append(f"NaN per-case values (kept, as the organisers' code computes them) in: {', '.join(nan_cases)}")
    summary = {
        "preset": preset,
        "source": PRESET_SOURCES[preset],
        "aggregates": values,
        "notes": notes,
        "n_routed": len(routed),
        "unrouted": [row["name"] for row in scored if row["lb_group"] == UNKNOWN],
        "routed_by_alias": [row["name"] for row in routed if not row["lb_by_rule"]],
        "nan_cases": nan_cases,
        "groups": {g: sum(row["lb_group"] == g for row in scored) for g in sorted({row["lb_group"] for row in scored})},
    }
    return summary, {"results": [r for _, r in results], "aggregates": values}
