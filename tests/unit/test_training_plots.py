"""training.png: drawn from log.csv and the validation history; optional when matplotlib is missing."""

import sys

import pytest

from lsmseg_training import plots

LOG = "step,epoch,lr,loss,grad_norm,val_dice,val_threshold,seconds\n" + "".join(
    f"{s},{s / 10},{1e-3 * (1 - s / 20):.6g},{1.0 / s:.6g},0.5,{'0.6' if s % 5 == 0 else ''},{'0.5' if s % 5 == 0 else ''},{s}\n"
    for s in range(1, 21)
)
HISTORY = [
    {"step": step, "thresholds": [0.3, 0.5, 0.7], "mean_dice": [0.2 + d, 0.4 + d, 0.3 + d]}
    for step, d in ((5, 0.0), (10, 0.1), (15, 0.2), (20, 0.25))
]


def test_plot_has_loss_lr_and_dice_per_threshold(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "log.csv").write_text(LOG)
    path = plots.plot_training(tmp_path, HISTORY)
    assert path == tmp_path / "training.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    with_dice = imread(path)
    without = imread(plots.plot_training(tmp_path))  # pretraining: no validation panel
    assert with_dice.shape[0] > without.shape[0]  # three panels are taller than two
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_log_columns_keep_their_steps(tmp_path):
    (tmp_path / "log.csv").write_text(LOG)
    columns = plots.read_log(tmp_path / "log.csv")
    assert [s for s, _ in columns["val_dice"]] == [5.0, 10.0, 15.0, 20.0]
    assert len(columns["loss"]) == 20 and columns["loss"][0] == (1.0, 1.0)


@pytest.mark.parametrize("torn", ["21,2.1,1e-", "21,2.1,1e-4,0.04,0.5,,", "21,2.1,1e-4,0.04,0.5,,,1e-"])
def test_torn_last_row_is_skipped(tmp_path, torn):
    # A run killed while writing a row leaves it cut short; engine.CsvLog drops it on resume, and
    # read_log raised "could not convert string to float: '1e-'" (no plot for the run's folder).
    (tmp_path / "log.csv").write_text(LOG + torn)
    columns = plots.read_log(tmp_path / "log.csv")
    assert [s for s, _ in columns["loss"]] == [float(s) for s in range(1, 21)]
    (tmp_path / "log.csv").write_text(LOG.replace("\n5,", "\n5,x", 1))  # not the last row: refused, naming the file
    with pytest.raises(ValueError, match=r"log.csv: row 6 holds a value that is not a number"):
        plots.read_log(tmp_path / "log.csv")


def test_missing_matplotlib_is_one_note_not_an_error(tmp_path, monkeypatch, caplog):
    (tmp_path / "log.csv").write_text(LOG)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    monkeypatch.setattr(plots, "_warned_missing", False)
    with caplog.at_level("INFO"):
        assert plots.plot_training(tmp_path, HISTORY) is None
        assert plots.plot_training(tmp_path, HISTORY) is None
    notes = [r.getMessage() for r in caplog.records if "matplotlib is not installed" in r.getMessage()]
    assert len(notes) == 1 and "lsmseg[train]" in notes[0]
    assert not (tmp_path / "training.png").exists()


def _line_pixels(path) -> int:
    """Pixels of matplotlib's first line colour (tab:blue, the loss and lr curves) in the PNG."""
    import numpy as np
    from matplotlib.image import imread

    rgb = imread(path)[..., :3]
    return int((np.abs(rgb - np.array([0x1F, 0x77, 0xB4]) / 255).max(axis=-1) < 0.05).sum())


def test_a_log_of_one_row_still_shows_its_point(tmp_path):
    # A line through one point draws nothing: the plot of a run's first logged step had empty panels.
    pytest.importorskip("matplotlib")
    (tmp_path / "log.csv").write_text(LOG.split("\n", 2)[0] + "\n" + LOG.split("\n", 2)[1] + "\n")
    assert len(plots.read_log(tmp_path / "log.csv")["loss"]) == 1
    assert _line_pixels(plots.plot_training(tmp_path)) > 0
