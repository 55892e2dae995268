"""Figures (matplotlib, Agg, no pyplot state) and the self-contained HTML report."""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Sequence

import numpy as np

# Outcome colours: green = found, magenta = predicted but not there, yellow = there but missed.
OUTCOME_COLOURS = {
    "true positive": (0.15, 0.85, 0.25),
    "false positive": (1.0, 0.1, 0.9),
    "false negative": (1.0, 0.85, 0.0),
}
OVERLAY_ALPHA = 0.7


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _grey(plane: np.ndarray) -> np.ndarray:
    from lsmseg.normalise import normalise, percentiles

    lo, hi = percentiles(plane, 0.5, 99.8)
    return normalise(plane, lo, hi)


def outcome_map(pred: np.ndarray, label: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Per (y, x): 0 = nothing, 1 = TP, 2 = FP, 3 = FN: the most frequent outcome along z."""
    if valid is not None:
        pred, label = pred & valid, label & valid
    counts = np.stack([
        np.count_nonzero(pred & label, axis=0),
        np.count_nonzero(pred & ~label, axis=0),
        np.count_nonzero(~pred & label, axis=0),
    ])
    winner = counts.argmax(axis=0) + 1
    return np.where(counts.sum(axis=0) > 0, winner, 0).astype(np.uint8)


def _overlay(grey: np.ndarray, outcome: np.ndarray) -> np.ndarray:
    rgb = np.repeat((grey * 0.8)[..., None], 3, axis=2)
    for index, colour in enumerate(OUTCOME_COLOURS.values(), start=1):
        where = outcome == index
        rgb[where] = (1 - OVERLAY_ALPHA) * rgb[where] + OVERLAY_ALPHA * np.asarray(colour)
    return np.clip(rgb, 0, 1)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isnan(value):
        return "undefined"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _fmt_lb(value, digits: int = 4) -> str:
    """Leaderboard values: NaN is the organisers' own value there, not "undefined" by our conventions."""
    return "NaN" if isinstance(value, float) and math.isnan(value) else _fmt(value, digits)


def _headline(row: dict) -> str:
    parts = [f"Dice {_fmt(row['dice'])}"]
    if row.get("cldice") is not None:
        parts.append(f"clDice {_fmt(row['cldice'])}")
    if row.get("hd95_um") is not None:
        parts.append(f"HD95 {_fmt(row['hd95_um'], 1)} µm")
    elif row.get("hd95_voxels") is not None:
        parts.append(f"HD95 {_fmt(row['hd95_voxels'], 1)} vox")
    if row.get("betti0_error") is not None:
        parts.append(f"|Δb0| {row['betti0_error']}  |Δb1| {row['betti1_error']}")
    return " · ".join(parts)


def volume_figure(
    name: str,
    image: np.ndarray | None,
    pred: np.ndarray,
    label: np.ndarray,
    valid: np.ndarray | None,
    row: dict,
    spacing: Sequence[float] | None = None,
) -> bytes:
    """Image and TP/FP/FN overlay, as a z maximum-intensity projection (or, for a sparse label,
    the labelled plane with the most foreground). Returns PNG bytes."""
    from matplotlib.patches import Patch

    if valid is None:
        view = "maximum-intensity projection along z"
        outcome = outcome_map(pred, label)
        plane = image.max(axis=0) if image is not None else None
        label_view = label.any(axis=0)
    else:
        z = int(np.argmax(np.count_nonzero(label & valid, axis=(1, 2)) + 1e-3 * np.count_nonzero(valid, axis=(1, 2))))
        view = f"labelled plane z = {z} (sparse label; unlabelled voxels not coloured)"
        outcome = outcome_map(pred[z : z + 1], label[z : z + 1], valid[z : z + 1])
        plane = image[z] if image is not None else None
        label_view = label[z]
    grey = _grey(plane.astype(np.float32)) if plane is not None else label_view.astype(np.float32) * 0.5
    aspect = spacing[1] / spacing[2] if spacing else 1.0  # y/x pixel size ratio
    height, width = grey.shape
    panel_width = 4.6
    panel_height = min(max(panel_width * height * aspect / width, 2.0), 6.0)
    figure = _new_figure(2 * panel_width + 0.4, panel_height + 1.1)
    axes = figure.subplots(1, 2)
    axes[0].imshow(grey, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
    axes[0].set_title("image" if plane is not None else "label (no image given)", fontsize=9)
    axes[1].imshow(_overlay(grey, outcome), aspect=aspect, interpolation="nearest")
    axes[1].set_title("prediction vs label", fontsize=9)
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"{name}\n{_headline(row)}", fontsize=10)
    handles = [Patch(color=colour, label=text) for text, colour in OUTCOME_COLOURS.items()]
    axes[0].set_xlabel(view, fontsize=7, color="0.35")
    axes[1].legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.005), ncol=3, fontsize=8, frameon=False)
    figure.subplots_adjust(left=0.01, right=0.99, top=1 - 0.75 / (panel_height + 1.1),
                           bottom=0.45 / (panel_height + 1.1), wspace=0.04)
    return _png(figure)


DISTRIBUTION_METRICS = [
    ("dice", "Dice"), ("cldice", "clDice"), ("precision", "precision"), ("recall", "recall"),
    ("pq", "PQ"), ("hd95_um", "HD95 (µm)"), ("hd95_voxels", "HD95 (voxels)"),
    ("betti0_error", "|Δb0|"), ("betti1_error", "|Δb1|"),
]


def distributions_figure(rows: list[dict]) -> bytes | None:
    """One panel per metric: box plot and one dot per volume, coloured by category."""
    from matplotlib.lines import Line2D

    scored = [row for row in rows if row["status"] == "ok"]
    panels = []
    for key, title in DISTRIBUTION_METRICS:
        points = [(row[key], row["category"]) for row in scored
                  if row[key] is not None and not (isinstance(row[key], float) and math.isnan(row[key]))]
        undefined = sum(1 for row in scored if isinstance(row[key], float) and math.isnan(row[key]))
        if points:
            panels.append((title, points, undefined))
    if not panels:
        return None
    categories = sorted({category for _, points, _ in panels for _, category in points})
    palette = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"]
    colour_of = {category: palette[i % len(palette)] for i, category in enumerate(categories)}
    columns = min(len(panels), 5)
    rows_of_panels = math.ceil(len(panels) / columns)
    figure = _new_figure(2.1 * columns + 0.3, 2.6 * rows_of_panels + 0.5)
    rng = np.random.default_rng(0)  # fixed jitter: the same data gives the same picture
    for index, (title, points, undefined) in enumerate(panels):
        axis = figure.add_subplot(rows_of_panels, columns, index + 1)
        values = np.asarray([value for value, _ in points], dtype=float)
        axis.boxplot(values, widths=0.5, showfliers=False, medianprops={"color": "black"})
        jitter = 1 + rng.uniform(-0.15, 0.15, size=values.size)
        axis.scatter(jitter, values, s=18, zorder=3, c=[colour_of[c] for _, c in points], edgecolors="white", linewidths=0.5)
        axis.set_xticks([])
        axis.set_title(f"{title}\nn = {values.size}" + (f", undefined {undefined}" if undefined else ""), fontsize=8)
        axis.tick_params(labelsize=7)
    handles = [Line2D([], [], marker="o", linestyle="", color=colour_of[c], label=c) for c in categories]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    return _png(figure)


# ------------------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
th { background: #f0f0f0; } td.text, th.text { text-align: left; }
tr.error td { background: #fde2e2; }
.failures { border-left: 4px solid #c00; padding-left: 1em; }
figure { display: inline-block; margin: 0.5em; } figure img { max-width: 100%; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""

# Leaderboard columns first (labelled "LB"), then ours.
_LB_METRICS = [
    ("lb_dice", "LB Dice"), ("lb_cldice", "LB clDice"), ("lb_panoptic_quality", "LB PQ"),
    ("lb_betti_matching_error_0", "LB |Δb0|"), ("lb_betti_matching_error_1", "LB |Δb1|"),
    ("lb_centerline_dice", "LB clDice 2024"),
]
_TABLE_METRICS = _LB_METRICS + [
    ("dice", "Dice"), ("cldice", "clDice"), ("precision", "precision"), ("recall", "recall"),
    ("hd95_um", "HD95 µm"), ("hd95_voxels", "HD95 vox"), ("pq", "PQ"), ("betti0_error", "|Δb0|"),
    ("betti1_error", "|Δb1|"),
]


def _digits(metric: str) -> int:
    """Decimals worth showing: scores in [0, 1] get 4, distances 2, counts 1 (their means)."""
    if metric.startswith(("hd95",)) or metric.endswith("_um3"):
        return 2
    if metric.startswith(("betti", "b0", "b1", "b2", "lb_betti")) or metric.endswith("voxels"):
        return 1
    return 4


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _stats_cell(stats: dict | None, digits: int = 3) -> str:
    if not stats or stats["n"] == 0:
        return "–" if not stats else f"undefined ×{stats['n_undefined']}"
    text = f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f} (n={stats['n']})"
    return text + (f", undefined ×{stats['n_undefined']}" if stats["n_undefined"] else "")


def _group_table(groups: dict, heading: str) -> str:
    if not groups:
        return ""
    used = [(k, t) for k, t in _TABLE_METRICS if any(k in g["metrics"] for g in groups.values())]
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in used)
    body = "".join(
        f"<tr><td class=text>{html.escape(name)}</td><td>{group['n_volumes']}</td>"
        + "".join(f"<td>{_stats_cell(group['metrics'].get(k), min(_digits(k), 3))}</td>" for k, _ in used)
        + "</tr>"
        for name, group in groups.items()
    )
    return f"<h3>{heading}</h3><table><tr><th class=text>group</th><th>volumes</th>{head}</tr>{body}</table>"


def _leaderboard_block(summary: dict) -> str:
    """What the leaderboard would show for these cases, and every case it would not score as is."""
    board = summary.get("leaderboard")
    if not board:
        return ""
    year = board["preset"].split("-")[-1]
    parts = [f"<h2>Leaderboard: what the SELMA3D {year} leaderboard would show for these cases</h2>",
             f"<p>Computed as {html.escape(board['source'])} computes it (<code>metrics.json</code> beside this "
             "report holds its <code>results</code> and <code>aggregates</code>). Columns marked LB below are its "
             "per-case values; NaN is kept where its code produces NaN.</p>"]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in board["aggregates"])
    cells = "".join(f"<td>{_fmt_lb(v) if v is not None else 'null'}</td>" for v in board["aggregates"].values())
    parts.append(f"<table><tr>{head}</tr><tr>{cells}</tr></table>")
    groups = ", ".join(f"{html.escape(g)}: {n}" for g, n in board["groups"].items())
    parts.append(f"<p>Cases per leaderboard group: {groups}.</p>")
    flagged = []
    if board["unrouted"]:
        flagged.append(f"{len(board['unrouted'])} case(s) match no {html.escape(board['preset'])} name rule and are "
                       "scored with Dice only, outside the aggregates (the organisers' evaluator would stop on them): "
                       + ", ".join(map(html.escape, board["unrouted"])))
    if board["routed_by_alias"]:
        flagged.append("routed by our aliases, not by an organisers' prefix (rename them for the real leaderboard): "
                       + ", ".join(map(html.escape, board["routed_by_alias"])))
    if summary.get("missing_predictions"):
        flagged.append(f"{len(summary['missing_predictions'])} label(s) without a prediction, scored as empty "
                       "predictions: " + ", ".join(map(html.escape, summary["missing_predictions"])))
    flagged += [html.escape(note) for note in board["notes"]]
    if flagged:
        parts.append("<div class=failures><ul>" + "".join(f"<li>{item}</li>" for item in flagged) + "</ul></div>")
    return "\n".join(parts)


def render_html(result, distributions_png: bytes | None, title: str = "lsmseg evaluation") -> str:
    summary, rows = result.summary, result.rows
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    inputs = summary.get("inputs", {})
    parts.append(
        "<p>"
        + "<br>".join(f"{html.escape(k)}: <code>{html.escape(str(v))}</code>" for k, v in inputs.items() if v)
        + f"<br>label scheme: <code>{html.escape(summary['label_scheme'])}</code>"
        + (f" (edge label: {html.escape(summary['sparse_edge'])})" if summary.get("sparse_edge") else "")
        + (f"<br>spacing override: {summary['spacing_override_um']} µm" if summary.get("spacing_override_um") else "")
        + f"<br>created {html.escape(summary['created'])}: {summary['n_scored']} of {summary['n_volumes']} "
        "volume(s) scored</p>"
    )
    if summary["failures"]:
        items = "".join(
            f"<li><b>{html.escape(f['name'])}</b>: {html.escape(f['error'] or '')}</li>" for f in summary["failures"]
        )
        parts.append(f"<div class=failures><h2>{len(summary['failures'])} failure(s)</h2><ul>{items}</ul></div>")
    parts.append(_leaderboard_block(summary))
    metrics = summary["metrics"]
    if metrics:
        head = "".join(f"<th>{h}</th>" for h in ("mean", "median", "std", "min", "max", "n", "undefined"))
        body = "".join(
            f"<tr><td class=text>{html.escape(t)}</td>"
            + "".join(f"<td>{_fmt(metrics[k][s], _digits(k))}</td>" for s in ("mean", "median", "std", "min", "max"))
            + f"<td>{metrics[k]['n']}</td><td>{metrics[k]['n_undefined']}</td></tr>"
            for k, t in _TABLE_METRICS
            if k in metrics
        )
        parts.append(f"<h2>Summary</h2><table><tr><th class=text>metric</th>{head}</tr>{body}</table>")
        parts.append(_group_table(summary["by_category"], "By category (SELMA3D 2026 groups)"))
        parts.append(_group_table(summary["by_structure"], "By structure"))
    if distributions_png:
        parts.append("<h2>Distributions across volumes</h2><figure>" + _img(distributions_png, "metric distributions") + "</figure>")
    columns = [("structure", "structure"), ("category", "category"), ("lb_group", "LB group"), *_TABLE_METRICS,
               ("b0_pred", "b0 pred"), ("b0_label", "b0 label"), ("b1_pred", "b1 pred"), ("b1_label", "b1 label"),
               ("pred_voxels", "pred voxels"), ("label_voxels", "label voxels")]
    scored = [row for row in rows if row["status"] == "ok"]
    columns = [(k, t) for k, t in columns if any(row.get(k) is not None for row in scored)]
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in columns)
    body = []
    for row in rows:
        if row["status"] != "ok":
            body.append(f"<tr class=error><td class=text>{html.escape(row['name'])}</td>"
                        f"<td class=text colspan={len(columns) + 1}>{html.escape(row['error'] or '')}</td></tr>")
            continue
        cells = "".join(
            f"<td class=text>{html.escape(str(row[k]))}</td>" if k in ("structure", "category", "lb_group") else f"<td>{_fmt_lb(row[k], _digits(k)) if k.startswith('lb_') else _fmt(row[k], _digits(k))}</td>"
            for k, _ in columns
        )
        body.append(f"<tr><td class=text>{html.escape(row['name'])}</td>{cells}"
                    f"<td class=text>{html.escape(row['notes'] or '')}</td></tr>")
    parts.append(f"<h2>Per volume</h2><table><tr><th class=text>name</th>{head}<th class=text>notes</th></tr>"
                 + "".join(body) + "</table>")
    if result.figures:
        parts.append("<h2>Prediction vs label</h2><p>Green: true positive, magenta: false positive, yellow: false "
                     "negative; each pixel shows the most frequent outcome along its projection ray.</p>")
        parts.extend(f"<figure>{_img(png, name)}</figure>" for name, png in result.figures.items())
    parts.append("<h2>Conventions</h2><ul>" + "".join(f"<li>{html.escape(c)}</li>" for c in summary["conventions"]) + "</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
