"""``training.png`` beside ``log.csv``: loss, learning rate and validation Dice against step.

matplotlib is optional (the ``train``, ``eval`` and ``dev`` extras have it; the inference image
does not): without it the run logs one line saying so, once, and trains as usual.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from lsmseg.io import atomic_output

logger = logging.getLogger(__name__)

PLOT_NAME = "training.png"
_warned_missing = False


def read_log(path: Path) -> dict[str, list[float]]:
    """Columns of a ``log.csv`` as float lists (empty cells are skipped per column, with their step).

    A row cut short (the torn last line of a run killed while writing it, ``2,0.2,1e-``) is skipped,
    as :class:`engine.CsvLog` drops it on resume: a row whose cells are not the header's count, or
    a last row whose cells are not numbers."""
    columns: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    header, rows = (rows[0], rows[1:]) if rows else ([], [])
    for index, row in enumerate(rows):
        if len(row) != len(header):
            continue
        try:
            values = [(key, float(value)) for key, value in zip(header, row) if value != ""]
        except ValueError:
            if index == len(rows) - 1:
                continue
            raise ValueError(f"{path}: row {index + 2} holds a value that is not a number") from None
        step = dict(values).get("step")
        if step is None:  # a row with no step cannot be placed on the axis
            continue
        for key, value in values:
            if key != "step":
                columns.setdefault(key, []).append((step, value))
    return columns  # type: ignore[return-value]


def plot_training(folder: Path, history: list[dict] | None = None) -> Path | None:
    """Draw ``folder/training.png`` from ``folder/log.csv`` and the validation ``history``.

    Args:
        folder: a run's output folder (holds ``log.csv``).
        history: fine-tuning validations, each ``{"step", "thresholds", "mean_dice", ...}``
            (as in ``run.json``); one Dice curve per threshold. None or empty: no Dice panel.

    Returns:
        The PNG's path, or None when matplotlib is missing or the log is empty.
    """
    global _warned_missing
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        if not _warned_missing:
            logger.info("matplotlib is not installed: no %s (pip install 'lsmseg[train]')", PLOT_NAME)
            _warned_missing = True
        return None
    folder = Path(folder)
    log_path = folder / "log.csv"
    columns = read_log(log_path) if log_path.is_file() else {}
    if not columns.get("loss"):
        return None
    panels = 3 if history else 2
    figure = Figure(figsize=(7, 2.4 * panels), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(panels, 1, sharex=True)
    for ax, key, label in ((axes[0], "loss", "training loss"), (axes[1], "lr", "learning rate")):
        steps, values = zip(*columns.get(key, [])) if columns.get(key) else ((), ())
        # A line through one point draws nothing: a run's first redraw (one logged row) showed empty panels.
        ax.plot(steps, values, lw=1.2, marker="o" if len(steps) == 1 else None, ms=3)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if history:
        ax = axes[2]
        thresholds = history[-1]["thresholds"]
        steps = [h["step"] for h in history]
        for i, threshold in enumerate(thresholds):
            dice = [h["mean_dice"][h["thresholds"].index(threshold)] if threshold in h["thresholds"] else float("nan")
                    for h in history]
            ax.plot(steps, dice, marker="o", ms=3, lw=1, label=f"{threshold:g}",
                    color=_colour(i, len(thresholds)))
        ax.set_ylabel("validation Dice")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(title="threshold", fontsize=7, title_fontsize=7, ncol=2, loc="lower right")
    axes[-1].set_xlabel("step")
    figure.suptitle(folder.name)
    figure.tight_layout()
    # Written beside and renamed, so a viewer refreshing the file never sees half a PNG.
    target = folder / PLOT_NAME
    with atomic_output(target) as tmp:
        figure.savefig(tmp, format="png")
    return target


def _colour(index: int, count: int):
    from matplotlib import colormaps

    return colormaps["viridis"](index / max(count - 1, 1))
