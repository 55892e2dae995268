"""Score a folder of predictions against a folder of labels and write the report folder.

``evaluate_folders`` reads every pair through :mod:`lsmseg.io` (so every input format works),
scores it with :mod:`lsmseg_evaluation.metrics` and draws its figure; ``write_report`` writes
``metrics.csv``, ``summary.json``, ``report.html`` and ``figures/*.png``, each atomically.
A pair that cannot be scored becomes a row with ``status = error`` and a one-line reason; a label
without a prediction is scored against an empty prediction and listed.

Every row starts with the leaderboard's own values for the chosen preset (``lb_*`` columns,
:mod:`lsmseg_evaluation.leaderboard`), followed by our extra metrics; ``metrics.json`` holds the
organisers' ``results`` + ``aggregates``. ``jobs > 1`` scores pairs in a process pool.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from lsmseg.errors import InputError, LsmsegError, one_line, printable, single_line
from lsmseg.io import atomic_output, read_volume
from lsmseg.io.atomic import write_text
from tqdm import tqdm

from .categories import UNKNOWN, classify, unknown_structure
from .labels import LABEL_SCHEMES, SPARSE_EDGE_MODES, label_masks, prediction_mask
from .leaderboard import DEFAULT_PRESET, LB_PREFIX, check_preset, lb_columns, leaderboard_summary, route, score_case
from .metrics import CONVENTIONS, METRIC_COLUMNS, score_volume
from .pairing import Pair, pair_volumes

logger = logging.getLogger(__name__)

ROW_HEAD = ["name", "status", "error", "structure", "category", "lb_group", "lb_by_rule"]
ROW_TAIL = ["label_scheme", "shape", "spacing_um", *METRIC_COLUMNS, "seconds", "prediction", "label", "image", "notes"]


def row_columns(preset: str = DEFAULT_PRESET) -> list[str]:
    """metrics.csv columns: identification, the preset's leaderboard values (lb_*), then ours."""
    return [*ROW_HEAD, *lb_columns(preset), *ROW_TAIL]


ROW_COLUMNS = row_columns()
# Metrics aggregated in summary.json and the report, with how to read them.
SUMMARY_METRICS = {
    "lb_dice": "leaderboard Dice",
    "lb_cldice": "leaderboard clDice (2026, panoptica; contiguous)",
    "lb_panoptic_quality": "leaderboard PQ (2026, panoptica pq_dsc; isolated)",
    "lb_betti_matching_error_0": "leaderboard |Δb0| (2024)",
    "lb_betti_matching_error_1": "leaderboard |Δb1| (2024, microglia)",
    "lb_centerline_dice": "leaderboard clDice (2024, microglia)",
    "dice": "Dice (higher is better)",
    "cldice": "clDice (higher is better)",
    "precision": "precision",
    "recall": "recall",
    "hd95_um": "HD95 in um (lower is better)",
    "hd95_voxels": "HD95 in voxels (lower is better)",
    "pq": "panoptic quality (higher is better)",
    "betti0_error": "|b0 pred - b0 label| (lower is better)",
    "betti1_error": "|b1 pred - b1 label| (lower is better)",
}
SPACING_TOLERANCE = 0.01  # relative; prediction and label spacings further apart get a note


@dataclass
class EvaluationSettings:
    label_scheme: str = "binary"  # binary | nonzero | sparse (see labels.py)
    sparse_edge: str = "ignore"  # ignore | background: what label 4 means in sparse labels
    spacing: tuple[float, float, float] | None = None  # (z, y, x) um; overrides the files' spacing
    structure: str | None = None  # structure of every volume not in the mapping
    mapping: dict = field(default_factory=dict)  # name -> {"structure", "category"} (categories.load_mapping)
    mapping_source: str | None = None  # the mapping's file, named in messages about its entries
    topology: bool = True  # clDice, PQ, Betti numbers
    figures: bool = True
    progress: bool = True
    preset: str = DEFAULT_PRESET  # selma3d-2026 | selma3d-2024: which leaderboard's metrics come first
    jobs: int = 1  # processes scoring pairs in parallel

    def __post_init__(self):
        check_preset(self.preset)
        if self.label_scheme not in LABEL_SCHEMES:
            raise ValueError(f"label_scheme {self.label_scheme!r} is not one of {', '.join(LABEL_SCHEMES)}")
        if self.sparse_edge not in SPARSE_EDGE_MODES:
            raise ValueError(f"sparse_edge {self.sparse_edge!r} is not one of {', '.join(SPARSE_EDGE_MODES)}")
        reason = unknown_structure(self.structure) if self.structure is not None else None
        if reason is not None:
            raise ValueError(f"structure {reason}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {self.jobs}")


@dataclass
class EvaluationResult:
    rows: list[dict]
    summary: dict
    figures: dict[str, bytes] = field(default_factory=dict)  # name -> PNG
    metrics_json: dict = field(default_factory=dict)  # the organisers' metrics.json: results + aggregates

    @property
    def failed(self) -> list[dict]:
        return [row for row in self.rows if row["status"] != "ok"]


# ------------------------------------------------------------------------------------- scoring


def _row(pair: Pair, settings: EvaluationSettings) -> dict:
    structure, category, _ = classify(pair.name, settings.mapping, settings.structure, settings.preset)
    group, by_rule = route(pair.name, structure, category, settings.preset)
    row = {column: None for column in row_columns(settings.preset)}
    row.update(
        name=pair.name,
        status="ok",
        structure=structure,
        category=category,
        lb_group=group,
        lb_by_rule=by_rule,
        label_scheme=settings.label_scheme,
        prediction=str(pair.pred) if pair.pred else None,
        label=str(pair.label) if pair.label else None,
        image=str(pair.image) if pair.image else None,
        notes="; ".join(pair.notes) or None,
    )
    return row


def _note(row: dict, text: str) -> None:
    row["notes"] = f"{row['notes']}; {text}" if row["notes"] else text


def _spacing_for(row: dict, settings: EvaluationSettings, pred_spacing, label_spacing) -> tuple | None:
    if settings.spacing is not None:
        return tuple(float(s) for s in settings.spacing)
    if pred_spacing is not None and label_spacing is not None:
        if any(abs(p - q) > SPACING_TOLERANCE * max(abs(q), 1e-9) for p, q in zip(pred_spacing, label_spacing)):
            _note(row, f"prediction spacing {tuple(pred_spacing)} differs from label spacing "
                       f"{tuple(label_spacing)}; the label's is used")
    spacing = label_spacing if label_spacing is not None else pred_spacing
    return tuple(float(s) for s in spacing) if spacing is not None else None


def evaluate_pair(pair: Pair, settings: EvaluationSettings) -> tuple[dict, bytes | None]:
    """Score one pair; returns its row and its figure (PNG bytes, or None)."""
    row = _row(pair, settings)
    if not pair.ok:
        row.update(status="error", error=pair.problem)
        return row, None
    start = time.perf_counter()
    try:
        label_volume = read_volume(pair.label)
        if pair.pred is not None:
            pred_volume = read_volume(pair.pred)
            if pred_volume.shape != label_volume.shape:
                raise InputError(
                    pair.pred,
                    f"shape {pred_volume.shape} differs from the label's {label_volume.shape} ({pair.label.name})",
                )
        label, valid = label_masks(label_volume.load(), pair.label, settings.label_scheme, settings.sparse_edge)
        if pair.pred is not None:
            pred = prediction_mask(pred_volume.load(), pair.pred)
            spacing = _spacing_for(row, settings, pred_volume.spacing, label_volume.spacing)
        else:  # missing prediction: scored as an empty one (the leaderboard has no better answer)
            pred = np.zeros(label.shape, dtype=bool)
            spacing = _spacing_for(row, settings, None, label_volume.spacing)
            _note(row, "no prediction: scored as an empty prediction")
        row["shape"] = "x".join(map(str, label_volume.shape))
        row["spacing_um"] = "x".join(f"{s:g}" for s in spacing) if spacing else None
        known_pq = None
        if valid is None:  # the leaderboards score fully labelled volumes only
            lb = score_case(pred, label, row["lb_group"], settings.preset)
            row.update({LB_PREFIX + key: value for key, value in lb.items()})
            if "panoptic_quality" in lb and (pred.any() or label.any()):
                known_pq = lb["panoptic_quality"]  # the same panoptica call; no need to run it twice
            if row["lb_group"] == "unknown":
                _note(row, f"name matches no {settings.preset} rule: leaderboard Dice only")
            elif not row["lb_by_rule"]:
                # No structure: only a mapping's category can have routed it.
                how = (f"as {row['structure']} by our alias" if row["structure"] != UNKNOWN
                       else f"as {row['lb_group']} by the mapping's category")
                _note(row, f"routed {how}; the organisers' evaluator would refuse the name")
        row.update(score_volume(pred, label, spacing=spacing, valid=valid, topology=settings.topology, known_pq=known_pq))
        row["seconds"] = round(time.perf_counter() - start, 3)
        figure = _figure(pair, row, pred, label, valid, spacing) if settings.figures else None
        return row, figure
    except LsmsegError as exc:
        row.update(status="error", error=str(exc))
    except MemoryError:
        row.update(status="error", error=f"{pair.pred or pair.label}: out of memory while scoring")
    except Exception as exc:  # an unforeseen file or a bug: one row, the other volumes still scored
        logger.debug("traceback", exc_info=True)
        where = pair.pred or pair.label  # a missing prediction is scored as an empty one: name the label
        row.update(status="error", error=one_line(where, f"unexpected {type(exc).__name__}: {single_line(exc)[:300]}"))
    return row, None


def _figure(pair: Pair, row: dict, pred, label, valid, spacing) -> bytes | None:
    from .report import volume_figure

    image = None
    if pair.image is not None:
        try:
            image_volume = read_volume(pair.image)
            if image_volume.shape == label.shape:
                image = image_volume.load()
            else:
                _note(row, f"image shape {image_volume.shape} differs from the label's; figure drawn without it")
        except LsmsegError as exc:
            _note(row, f"image unreadable ({exc}); figure drawn without it")
    try:
        return volume_figure(row["name"], image, pred, label, valid, row, spacing)
    except Exception as exc:  # a figure must never cost the metrics
        logger.warning("%s: figure failed (%s: %s)", printable(row["name"]), type(exc).__name__, single_line(exc))
        _note(row, f"figure failed: {type(exc).__name__}")
        return None


def evaluate_folders(
    pred_dir: str | Path,
    label_dir: str | Path,
    image_dir: str | Path | None = None,
    settings: EvaluationSettings | None = None,
) -> EvaluationResult:
    """Pair, score and summarise; nothing is written (see :func:`write_report`)."""
    settings = settings or EvaluationSettings()
    pairs = pair_volumes(pred_dir, label_dir, image_dir)
    # A mapping entry that names no case is a typo that would silently leave its case unmapped.
    unmatched = sorted(set(settings.mapping) - {pair.name for pair in pairs})
    if unmatched:
        names = ", ".join(printable(name) for name in unmatched[:10]) + (", ..." if len(unmatched) > 10 else "")
        logger.warning("%s: names %d case(s) not among the volumes, ignored: %s",
                       printable(settings.mapping_source or "--mapping"), len(unmatched), names)
    rows, figures = [], {}
    for pair, (row, figure) in zip(pairs, _score_pairs(pairs, settings)):
        if row["status"] != "ok":
            logger.error("%s", row["error"])
        else:  # names are untrusted: one named "x\nERROR: y" must not print a second line
            logger.info("%s: Dice %.4f%s", printable(row["name"]), row["dice"],
                        f", clDice {row['cldice']:.4f}" if row["cldice"] is not None else "")
        rows.append(row)
        if figure is not None:
            figures[pair.name] = figure
    summary = summarise(rows, settings)
    summary["inputs"] = {
        "predictions": str(pred_dir),
        "labels": str(label_dir),
        "images": str(image_dir) if image_dir is not None else None,
    }
    summary["leaderboard"], metrics_json = leaderboard_summary(rows, settings.preset)
    return EvaluationResult(rows=rows, summary=summary, figures=figures, metrics_json=metrics_json)


def _score_pairs(pairs: list[Pair], settings: EvaluationSettings):
    """(row, figure) per pair, in order; in a process pool when ``settings.jobs > 1``."""
    progress = dict(desc="scoring", unit="vol", total=len(pairs), disable=not settings.progress or len(pairs) < 2)
    if settings.jobs == 1 or len(pairs) < 2:
        yield from tqdm((evaluate_pair(pair, settings) for pair in pairs), **progress)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn: torch (MONAI's HD95) and OpenMP do not survive fork reliably.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(settings.jobs, len(pairs)), mp_context=context) as pool:
        futures = [pool.submit(evaluate_pair, pair, settings) for pair in pairs]
        try:
            for pair, future in tqdm(zip(pairs, futures), **progress):
                try:
                    yield future.result()
                except BrokenProcessPool:  # a worker died (OOM killer?): which case killed it is unknown
                    yield _score_alone(pair, settings, context)
        finally:  # Ctrl-C: the cases not started yet are dropped, not scored before exiting
            for future in futures:
                future.cancel()


def _score_alone(pair: Pair, settings: EvaluationSettings, context) -> tuple[dict, bytes | None]:
    """Score ``pair`` in a process of its own, after a worker died: the case that kills this one
    too becomes an error row, and every other case is still scored."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            return pool.submit(evaluate_pair, pair, settings).result()
    except BrokenProcessPool:
        row = _row(pair, settings)
        row.update(status="error", error=one_line(pair.pred or pair.label, "the scoring process died (out of memory?)"))
        return row, None


# ------------------------------------------------------------------------------------- summary


def _is_undefined(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def metric_stats(values: Sequence) -> dict:
    """mean/median/std/min/max over defined values; ``n_undefined`` counts NaN, None is skipped."""
    present = [v for v in values if v is not None]
    defined = np.asarray([v for v in present if not _is_undefined(v)], dtype=float)
    stats = {"n": int(defined.size), "n_undefined": len(present) - int(defined.size)}
    if defined.size == 0:
        return stats | {"mean": None, "median": None, "std": None, "min": None, "max": None}
    return stats | {
        "mean": float(defined.mean()),
        "median": float(np.median(defined)),
        "std": float(defined.std(ddof=1)) if defined.size > 1 else 0.0,
        "min": float(defined.min()),
        "max": float(defined.max()),
    }


def _group_stats(rows: list[dict]) -> dict:
    out = {}
    for metric in SUMMARY_METRICS:
        stats = metric_stats([row.get(metric) for row in rows])
        if stats["n"] or stats["n_undefined"]:
            out[metric] = stats
    return out


def summarise(rows: list[dict], settings: EvaluationSettings | None = None) -> dict:
    settings = settings or EvaluationSettings()
    scored = [row for row in rows if row["status"] == "ok"]
    summary = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "n_volumes": len(rows),
        "n_scored": len(scored),
        "n_failed": len(rows) - len(scored),
        "failures": [{"name": row["name"], "error": row["error"]} for row in rows if row["status"] != "ok"],
        "missing_predictions": [row["name"] for row in rows if row["status"] == "ok" and row["prediction"] is None],
        "label_scheme": settings.label_scheme,
        "sparse_edge": settings.sparse_edge if settings.label_scheme == "sparse" else None,
        "spacing_override_um": list(settings.spacing) if settings.spacing else None,
        "metrics": _group_stats(scored),
        "by_structure": {},
        "by_category": {},
        "conventions": CONVENTIONS + ["std is the sample standard deviation (ddof = 1); 0 for a single volume."],
    }
    for key, target in (("structure", "by_structure"), ("category", "by_category")):
        for group in sorted({row[key] for row in scored}):
            members = [row for row in scored if row[key] == group]
            summary[target][group] = {"n_volumes": len(members), "metrics": _group_stats(members)}
    return summary


# ------------------------------------------------------------------------------------- output


def _csv_cell(value) -> str:
    if value is None:
        return ""  # not computed / not applicable
    if _is_undefined(value):
        return "nan"  # undefined by the conventions (e.g. HD95 with one empty mask)
    if isinstance(value, float):
        return f"{value:.12g}"  # enough digits to carry the leaderboard values to 1e-6 and beyond
    return str(value)


def metrics_csv(rows: list[dict], preset: str = DEFAULT_PRESET) -> str:
    columns = row_columns(preset)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row.get(column)) for column in columns])
    return buffer.getvalue()


def write_report(result: EvaluationResult, out_dir: str | Path, title: str = "lsmseg evaluation") -> dict[str, Path]:
    """Write metrics.csv, metrics.json (the organisers' shape), summary.json, figures/*.png and
    report.html into ``out_dir``."""
    from .report import distributions_figure, render_html

    out_dir = Path(out_dir)
    paths = {"metrics": out_dir / "metrics.csv", "metrics_json": out_dir / "metrics.json",
             "summary": out_dir / "summary.json", "report": out_dir / "report.html"}
    preset = result.summary.get("leaderboard", {}).get("preset", DEFAULT_PRESET)
    # Everything is rendered before the first file is written, so that a failure while rendering
    # (a figure, the HTML) leaves an earlier report whole rather than half replaced; each file is
    # then replaced atomically, report.html last.
    distributions = distributions_figure(result.rows)
    figures = dict(result.figures) | ({"distributions": distributions} if distributions is not None else {})
    texts = {
        "metrics": metrics_csv(result.rows, preset),
        # As the organisers write it (json.dumps, indent 4): NaN stays NaN.
        "metrics_json": json.dumps(result.metrics_json, indent=4) + "\n",
        "summary": json.dumps(result.summary, indent=2) + "\n",
        "report": render_html(result, distributions, title=title),
    }
    for key in ("metrics", "metrics_json", "summary"):
        write_text(texts[key], paths[key])
    figures_dir = out_dir / "figures"
    for name, png in figures.items():
        with atomic_output(figures_dir / f"{name}.png") as tmp:
            tmp.write_bytes(png)
    # Figures of an earlier report into this folder (cases no longer here, --no-figures now)
    # would pass for this run's: the folder is the report's own, so only its PNGs are kept.
    written = {f"{name}.png" for name in figures}
    if figures_dir.is_dir():
        for stale in figures_dir.glob("*.png"):
            if stale.name not in written and (stale.is_file() or stale.is_symlink()):
                stale.unlink(missing_ok=True)
    write_text(texts["report"], paths["report"])
    return paths
