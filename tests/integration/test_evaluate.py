"""``lsmseg evaluate`` end to end: pairing across formats, error rows, outputs, shipped-weights check."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("skimage")
pytest.importorskip("cc3d")
pytest.importorskip("matplotlib")

from lsmseg.cli import main  # noqa: E402
from lsmseg.io import write_volume  # noqa: E402
from lsmseg_evaluation.metrics import score_volume  # noqa: E402


def tubes(shape=(12, 40, 40), seed=0, count=3):
    """A few straight tubes along x at random (y, z): a tiny vessel-like label."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    for _ in range(count):
        z, y = int(rng.integers(3, shape[0] - 3)), int(rng.integers(4, shape[1] - 4))
        label[z - 1 : z + 2, y - 1 : y + 2, 3:-3] = 1
    return label


def image_for(label, seed=0):
    rng = np.random.default_rng(seed)
    return (label.astype(np.float32) * 800 + rng.normal(200, 30, label.shape)).clip(0, 4000).astype(np.uint16)


def read_rows(path: Path) -> dict[str, dict]:
    with path.open() as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


def evaluate(tmp_path, *extra, pred="pred", labels="labels", images=None) -> int:
    argv = ["--quiet", "evaluate", "--pred", str(tmp_path / pred), "--labels", str(tmp_path / labels),
            "--out", str(tmp_path / "report"), *extra]
    if images:
        argv += ["--images", str(tmp_path / images)]
    return main(argv)


def test_pairs_across_formats_and_writes_report(tmp_path):
    spacing = (2.0, 1.0, 1.0)
    labels = {name: tubes(seed=i) for i, name in enumerate(["alpha", "beta", "gamma"])}
    preds = {name: np.roll(label, 1, axis=2) * 255 for name, label in labels.items()}  # 0/255 masks
    # label and prediction of one volume in different containers; gamma is a folder of planes
    write_volume(labels["alpha"] * 255, tmp_path / "labels" / "alpha.tif", spacing)
    write_volume(preds["alpha"], tmp_path / "pred" / "alpha.nii.gz", spacing)
    write_volume(labels["beta"], tmp_path / "labels" / "beta.nii.gz", spacing)
    write_volume(preds["beta"], tmp_path / "pred" / "beta.tif", spacing)
    write_volume(labels["gamma"], tmp_path / "labels" / "gamma.mha", spacing)
    write_volume(preds["gamma"], tmp_path / "pred" / "gamma", spacing)
    (tmp_path / "pred" / "alpha.tif.provenance.json").write_text("{}")  # sidecars are not volumes
    for name, label in labels.items():
        write_volume(image_for(label), tmp_path / "images" / f"{name}.tif", spacing)

    assert evaluate(tmp_path, "--structure", "vessels", images="images") == 0

    report = tmp_path / "report"
    rows = read_rows(report / "metrics.csv")
    assert sorted(rows) == ["alpha", "beta", "gamma"]
    for name, label in labels.items():
        row = rows[name]
        assert row["status"] == "ok" and row["category"] == "contiguous-dense"
        expected = score_volume(preds[name], label, spacing=spacing)
        for key in ("dice", "cldice", "precision", "recall", "hd95_um", "pq"):
            assert float(row[key]) == pytest.approx(expected[key], rel=1e-5), (name, key)
        assert int(row["betti0_error"]) == expected["betti0_error"]
        assert row["spacing_um"] == "2x1x1"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["n_scored"] == 3 and summary["n_failed"] == 0
    dice = [float(rows[n]["dice"]) for n in rows]
    assert summary["metrics"]["dice"]["mean"] == pytest.approx(np.mean(dice), rel=1e-5)
    assert summary["metrics"]["dice"]["std"] == pytest.approx(np.std(dice, ddof=1), rel=1e-4)
    assert summary["by_category"]["contiguous-dense"]["n_volumes"] == 3
    assert summary["metrics"]["hd95_um"]["n"] == 3 and "hd95_voxels" not in summary["metrics"]
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4  # three volumes and the distributions
    assert sorted(p.name for p in (report / "figures").iterdir()) == [
        "alpha.png", "beta.png", "distributions.png", "gamma.png"]
    assert not [p for p in report.rglob(".partial-*")]


def test_bad_pairs_become_error_rows_and_fail_the_run(tmp_path):
    good = tubes(seed=1)
    write_volume(good, tmp_path / "labels" / "good.tif")
    write_volume(good, tmp_path / "pred" / "good.tif")
    write_volume(good, tmp_path / "labels" / "unpredicted.tif")
    write_volume(good, tmp_path / "pred" / "unlabelled.tif")
    write_volume(good, tmp_path / "labels" / "wrongshape.tif")
    write_volume(good[:, :20], tmp_path / "pred" / "wrongshape.tif")
    write_volume((good * 2 + (good == 0)).astype(np.uint8), tmp_path / "labels" / "sparse_by_mistake.tif")  # values 1, 2
    write_volume(good, tmp_path / "pred" / "sparse_by_mistake.tif")
    (tmp_path / "labels" / "corrupt.tif").write_bytes(b"II*\x00 this is not a TIFF")
    write_volume(good, tmp_path / "pred" / "corrupt.tif")
    write_volume(good, tmp_path / "labels" / "probabilities.tif")
    write_volume(good * np.float32(0.7) + np.float32(0.1), tmp_path / "pred" / "probabilities.tif")

    assert evaluate(tmp_path) == 1

    rows = read_rows(tmp_path / "report" / "metrics.csv")
    assert rows["good"]["status"] == "ok" and float(rows["good"]["dice"]) == 1.0
    # a label without a prediction is scored as an empty prediction, and listed
    assert rows["unpredicted"]["status"] == "ok" and float(rows["unpredicted"]["lb_dice"]) == 0.0
    assert "no prediction" in rows["unpredicted"]["notes"] and rows["unpredicted"]["prediction"] == ""
    expected_errors = {
        "unlabelled": "prediction unlabelled.tif has no label",
        "wrongshape": "shape (12, 20, 40) differs from the label's (12, 40, 40)",
        "sparse_by_mistake": "non-binary label: values [1, 2]",
        "corrupt": "corrupt.tif",
        "probabilities": "prediction is not a binary mask",
    }
    html = (tmp_path / "report" / "report.html").read_text()
    for name, text in expected_errors.items():
        assert rows[name]["status"] == "error", name
        assert text in rows[name]["error"], (name, rows[name]["error"])
        assert "\n" not in rows[name]["error"]
        assert name in html
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["n_failed"] == len(expected_errors) and summary["n_scored"] == 2
    assert summary["missing_predictions"] == ["unpredicted"]
    assert "5 failure(s)" in html and "1 label(s) without a prediction" in html


def test_same_base_name_twice_is_reported(tmp_path):
    label = tubes(seed=2)
    write_volume(label, tmp_path / "labels" / "twin.tif")
    write_volume(label, tmp_path / "pred" / "twin.tif")
    write_volume(label, tmp_path / "pred" / "twin.nii.gz")
    assert evaluate(tmp_path, "--no-figures") == 1
    row = read_rows(tmp_path / "report" / "metrics.csv")["twin"]
    assert row["status"] == "error" and "2 prediction files share the base name 'twin'" in row["error"]


def test_an_empty_label_folder_is_one_error_and_no_report(tmp_path, capsys):
    (tmp_path / "labels").mkdir()
    write_volume(tubes(seed=3), tmp_path / "pred" / "lonely.tif")
    assert evaluate(tmp_path, "--no-figures") == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"ERROR: {tmp_path / 'labels'}: label folder holds no volume to score against"]
    assert not (tmp_path / "report").exists()


def test_sparse_labels_mapping_and_undefined_values(tmp_path):
    # A sparse label annotating two planes, and an empty prediction for a fully labelled volume.
    label = tubes(seed=3)
    sparse = np.zeros(label.shape, np.uint8)
    for z in (4, 8):
        sparse[z] = np.where(label[z] > 0, 2, 1)
    pred = label.copy()
    pred[0] = 1  # wrong everywhere on plane 0, which nobody labelled
    write_volume(sparse, tmp_path / "labels" / "axons_01.tif")
    write_volume(pred, tmp_path / "pred" / "axons_01.tif")
    mapping = tmp_path / "mapping.csv"
    mapping.write_text("name,structure,category\naxons_01,axons,contiguous-sparse\n")
    assert evaluate(tmp_path, "--label-scheme", "sparse", "--mapping", str(mapping)) == 0
    row = read_rows(tmp_path / "report" / "metrics.csv")["axons_01"]
    assert float(row["dice"]) == 1.0 and row["fp"] == "0"
    assert row["cldice"] == "" and row["hd95_voxels"] == ""  # not computed for sparse labels

    write_volume(label, tmp_path / "labels2" / "nuclei_01.tif")
    write_volume(np.zeros_like(label), tmp_path / "pred2" / "nuclei_01.tif")
    write_volume(label, tmp_path / "labels2" / "nuclei_02.tif")
    write_volume(label, tmp_path / "pred2" / "nuclei_02.tif")
    assert evaluate(tmp_path, pred="pred2", labels="labels2") == 0
    rows = read_rows(tmp_path / "report" / "metrics.csv")
    assert rows["nuclei_01"]["hd95_voxels"] == "nan" and rows["nuclei_01"]["precision"] == "nan"
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    hd = summary["metrics"]["hd95_voxels"]
    assert (hd["n"], hd["n_undefined"], hd["mean"]) == (1, 1, 0.0)  # the undefined one is not averaged
    assert summary["by_category"]["isolated-dense"]["metrics"]["dice"]["mean"] == pytest.approx(0.5)


def test_real_sparse_trailmap_label(tmp_path, real_data):
    """The real TRAILMAP annotation: scoring its own axon voxels (plus noise on unlabelled ones) gives 1."""
    import tifffile

    sparse = tifffile.imread(real_data / "trailmap" / "sparse_label.tif")
    pred = (sparse == 2).astype(np.uint8)
    pred[sparse == 0] = np.random.default_rng(0).random(int((sparse == 0).sum())) < 0.05
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "volume.tif").symlink_to(real_data / "trailmap" / "sparse_label.tif")
    write_volume(pred, tmp_path / "pred" / "volume.tif")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "volume.tif").symlink_to(real_data / "trailmap" / "volume.tif")
    assert evaluate(tmp_path, "--label-scheme", "sparse", images="images") == 0
    row = read_rows(tmp_path / "report" / "metrics.csv")["volume"]
    assert float(row["dice"]) == 1.0 and int(row["label_voxels"]) == int((sparse == 2).sum())
    assert (tmp_path / "report" / "figures" / "volume.png").stat().st_size > 10_000


def test_validate_shipped_scores_each_structure_with_the_leaderboard_metrics(tmp_path, tiny_weights, monkeypatch,
                                                                             capsys):
    from lsmseg_evaluation.validate_shipped import main as validate

    data = tmp_path / "data"
    for i in range(2):  # vessels (vesselNN layout)
        label = tubes((10, 48, 48), seed=10 + i)
        write_volume(image_for(label, seed=i), data / "vesselnn" / "images" / f"vol{i}.tif")
        write_volume(label * 255, data / "vesselnn" / "labels" / f"vol{i}.tif")
    rng = np.random.default_rng(0)
    for kind, names in (("cfos", ["patchvolume_1_0", "patchvolume_1_1", "patchvolume_2_0"]),
                        ("microglia", ["patchvolume_3_0"])):
        for name in names:
            label = np.zeros((24, 32, 32), np.uint8)
            for _ in range(4):
                z, y, x = rng.integers(2, 20), rng.integers(2, 28), rng.integers(2, 28)
                label[z - 2 : z + 2, y - 2 : y + 2, x - 2 : x + 2] = 1
            write_volume(image_for(label, seed=1), data / "delivr" / kind / "images" / f"{name}.tif")
            if name != "patchvolume_1_1":  # an unlabelled patch: left out, as the DELiVR c-Fos ones
                write_volume(label, data / "delivr" / kind / "labels" / f"{name}.tif")
    split = tmp_path / "split.yaml"
    split.write_text(yaml.safe_dump({"train": ["vol0"], "test": ["vol1", "patchvolume_1_0", "microglia_patchvolume_3_0"]}))
    monkeypatch.setenv("LSMSEG_DATA", str(data))  # instead of --data
    status = validate(["--weights", str(tiny_weights), "--out", str(tmp_path / "out"), "--device", "cpu",
                       "--quiet", "--split", str(split), "--set", "test", "--baseline", "--no-figures",
                       "--predictions", str(tmp_path / "masks")])
    assert status == 0
    rows = read_rows(tmp_path / "out" / "model" / "metrics.csv")
    assert sorted(rows) == ["blood_vessel_vol1", "cfos_neuron_patchvolume_1_0", "microglia_patchvolume_3_0"]
    assert rows["blood_vessel_vol1"]["lb_group"] == "contiguous" and rows["blood_vessel_vol1"]["lb_cldice"] != ""
    assert rows["blood_vessel_vol1"]["spacing_um"] == "5x0.99x0.99"  # the dataset's voxel size
    assert rows["microglia_patchvolume_3_0"]["lb_group"] == "isolated"
    assert rows["cfos_neuron_patchvolume_1_0"]["spacing_um"] == "6x1.62x1.62"
    assert all(r["status"] == "ok" and r["lb_by_rule"] == "True" for r in rows.values())
    assert sorted(p.name for p in (tmp_path / "masks").glob("*.tif")) == [f"{n}.tif" for n in sorted(rows)]
    metrics = json.loads((tmp_path / "out" / "model" / "metrics.json").read_text())
    assert set(metrics["aggregates"]) >= {"iso_dice_mean", "con_cldice_mean"} and len(metrics["results"]) == 3
    baseline = read_rows(tmp_path / "out" / "baseline" / "metrics.csv")
    assert sorted(baseline) == sorted(rows)
    rows_2024 = read_rows(tmp_path / "out" / "selma3d-2024" / "metrics.csv")
    assert sorted(rows_2024) == ["cfos_neuron_patchvolume_1_0", "microglia_patchvolume_3_0"]
    results = (tmp_path / "out" / "results.md").read_text()
    assert "| blood_vessel | contiguous-dense | 1 |" in results and "| microglia | isolated-sparse | 1 |" in results
    assert "Dice (Otsu)" in results and "`iso_panoptic_quality_mean`" in results and "`micro_cldice`" in results
    assert "general.safetensors" in results

    # --cases by file or case name; the masks kept above are reused, not predicted again
    before = (tmp_path / "masks" / "blood_vessel_vol1.tif").stat().st_mtime_ns
    status = validate(["--data", str(data), "--weights", str(tiny_weights), "--out", str(tmp_path / "out2"),
                       "--quiet", "--cases", "vol1", "cfos_neuron_patchvolume_2_0", "--structures", "blood_vessel",
                       "cfos_neuron", "--predictions", str(tmp_path / "masks"), "--reuse-predictions", "--no-figures"])
    assert status == 0
    assert sorted(read_rows(tmp_path / "out2" / "model" / "metrics.csv")) == [
        "blood_vessel_vol1", "cfos_neuron_patchvolume_2_0"]
    assert (tmp_path / "masks" / "blood_vessel_vol1.tif").stat().st_mtime_ns == before
    # Progress bars as predict and evaluate draw them: not into a log (stderr is no terminal here)...
    capsys.readouterr()
    again = ["--data", str(data), "--weights", str(tiny_weights), "--out", str(tmp_path / "out5"), "--cases", "vol1",
             "--predictions", str(tmp_path / "masks"), "--reuse-predictions", "--no-figures"]
    assert validate(again) == 0
    assert "scoring" not in capsys.readouterr().err
    monkeypatch.setenv("LSMSEG_PROGRESS", "yes")  # ...and a bad setting is a usage error before any work
    assert validate(again) == 2
    assert "LSMSEG_PROGRESS: expected 1" in capsys.readouterr().err
    monkeypatch.delenv("LSMSEG_PROGRESS")
    assert validate(["--data", str(data), "--quiet", "--cases", "nothing_like_this", "--out", str(tmp_path / "o3")]) == 1

    # weights that cannot be loaded: the run fails, and its report says the figures are not the weights'
    broken = tmp_path / "broken"
    shutil.copytree(tiny_weights if tiny_weights.is_dir() else tiny_weights.parent, broken)
    manifest = broken / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("threshold:", "no_such_setting: 1\n      threshold:", 1))
    status = validate(["--data", str(data), "--weights", str(broken), "--out", str(tmp_path / "o4"), "--quiet",
                       "--cases", "vol1", "--no-figures"])
    assert status == 1
    assert "PREDICTION FAILED for 1 of 1 case(s)" in (tmp_path / "o4" / "results.md").read_text()


@pytest.mark.parametrize("out", ["file.txt", "pred", "labels", "images", "labels/report", "pred/sub/report"])
def test_out_over_or_inside_an_input_is_refused_before_scoring(tmp_path, capsys, monkeypatch, out):
    import lsmseg_evaluation.evaluate as evaluate_module

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before refusing --out")

    monkeypatch.setattr(evaluate_module, "evaluate_folders", no_scoring)
    label = tubes(seed=4)
    write_volume(label, tmp_path / "labels" / "vessels_01.tif")
    write_volume(label, tmp_path / "pred" / "vessels_01.tif")
    write_volume(image_for(label), tmp_path / "images" / "vessels_01.tif")
    (tmp_path / "file.txt").write_text("keep me")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    argv = ["--quiet", "evaluate", "--pred", str(tmp_path / "pred"), "--labels", str(tmp_path / "labels"),
            "--images", str(tmp_path / "images"), "--out", str(tmp_path / out)]
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ERROR: {tmp_path / out}: "), lines  # before any volume
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "file.txt").read_text() == "keep me"


class _KillsItsWorker(str):
    """A case name that ends the worker process unpickling it (as the OOM killer would)."""

    def __reduce__(self):
        import os

        return os._exit, (3,)


def test_a_worker_that_dies_is_one_error_row(tmp_path, monkeypatch):
    import lsmseg_evaluation.evaluate as evaluate_module
    from lsmseg_evaluation.evaluate import EvaluationSettings, evaluate_folders

    for i in range(3):
        label = tubes(seed=i)
        write_volume(label, tmp_path / "labels" / f"vessels_{i}.tif")
        write_volume(label, tmp_path / "pred" / f"vessels_{i}.tif")
    pair_volumes = evaluate_module.pair_volumes

    def pairs_with_a_killer(*args):
        pairs = pair_volumes(*args)
        pairs[1].name = _KillsItsWorker(pairs[1].name)
        return pairs

    monkeypatch.setattr(evaluate_module, "pair_volumes", pairs_with_a_killer)
    settings = EvaluationSettings(jobs=2, figures=False, topology=False, progress=False)
    result = evaluate_folders(tmp_path / "pred", tmp_path / "labels", settings=settings)
    assert [(row["name"], row["status"]) for row in result.rows] == [
        ("vessels_0", "ok"), ("vessels_1", "error"), ("vessels_2", "ok")]
    assert result.rows[1]["error"] == f"{tmp_path / 'pred' / 'vessels_1.tif'}: the scoring process died (out of memory?)"
    assert float(result.rows[2]["dice"]) == 1.0


def test_names_cannot_forge_log_lines(tmp_path, capsys):
    label = tubes(seed=5)
    write_volume(label, tmp_path / "labels" / "x\nERROR: forged.tif")
    write_volume(label, tmp_path / "pred" / "x\nERROR: forged.tif")
    write_volume(label, tmp_path / "labels" / "y\nERROR: forged too.tif")
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--labels", str(tmp_path / "labels"),
                 "--out", str(tmp_path / "report"), "--no-figures"]) == 1
    err = capsys.readouterr().err
    assert "\nERROR: forged" not in err and "x\\nERROR: forged" in err


def test_a_report_written_again_keeps_only_its_own_figures(tmp_path):
    for name, seed in (("alpha", 0), ("beta", 1)):
        label = tubes(seed=seed)
        write_volume(label, tmp_path / "labels" / f"{name}.tif")
        write_volume(np.roll(label, 1, axis=2), tmp_path / "pred" / f"{name}.tif")
    assert evaluate(tmp_path) == 0
    figures = tmp_path / "report" / "figures"
    assert {"alpha.png", "beta.png", "distributions.png"} <= {p.name for p in figures.iterdir()}
    (tmp_path / "pred" / "beta.tif").unlink()
    (tmp_path / "labels" / "beta.tif").unlink()
    assert evaluate(tmp_path, "--no-figures") == 0
    assert sorted(p.name for p in figures.iterdir()) == ["distributions.png"]


def test_sparse_edge_without_the_sparse_scheme_is_a_usage_error(tmp_path, capsys):
    write_volume(tubes(seed=4), tmp_path / "labels" / "a.tif")
    write_volume(tubes(seed=4), tmp_path / "pred" / "a.tif")
    assert evaluate(tmp_path, "--sparse-edge", "background") == 2
    assert capsys.readouterr().err.strip() == "ERROR: --sparse-edge needs --label-scheme sparse"
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("preset, where", [("selma3d-2026", "option"), ("selma3d-2024", "option"),
                                           ("selma3d-2026", "mapping")])
def test_an_unknown_structure_is_refused_before_scoring(tmp_path, capsys, preset, where):
    # A typo used to score every case as structure 'blood_vesel' (Dice only) and exit 0.
    write_volume(tubes(seed=4), tmp_path / "labels" / "a.tif")
    write_volume(tubes(seed=4), tmp_path / "pred" / "a.tif")
    mapping = tmp_path / "mapping.csv"
    mapping.write_text("name,structure\na,blood_vesel\n")
    args = ["--structure", "blood_vesel"] if where == "option" else ["--mapping", str(mapping)]
    # A bad option is a usage error; a bad mapping file is bad input, as a bad category in it.
    assert evaluate(tmp_path, "--preset", preset, *args) == (2 if where == "option" else 1)
    err = capsys.readouterr().err.strip()
    prefix = "ERROR: --structure" if where == "option" else f"ERROR: {mapping}: a: structure"
    assert "\n" not in err and err.startswith(f"{prefix} 'blood_vesel' is not a known structure")
    assert "blood_vessel" in err and "microglia" in err and "vessels" in err  # the known names and aliases
    assert not (tmp_path / "report").exists()


def test_a_mapping_entry_that_names_no_case_is_a_warning(tmp_path, capsys):
    write_volume(tubes(seed=4), tmp_path / "labels" / "vol1.tif")
    write_volume(tubes(seed=4), tmp_path / "pred" / "vol1.tif")
    mapping = tmp_path / "mapping.csv"
    mapping.write_text("name,structure\nvol_typo,vessels\nvol1,vessels\n")
    assert evaluate(tmp_path, "--mapping", str(mapping), "--no-figures") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING")]
    # The file is named: a user with several mapping files must know which one holds the typo.
    assert warnings == [f"WARNING: {mapping}: names 1 case(s) not among the volumes, ignored: vol_typo"], warnings
    assert read_rows(tmp_path / "report" / "metrics.csv")["vol1"]["structure"] == "blood_vessel"


def test_a_report_that_fails_to_render_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    # metrics.csv, metrics.json and summary.json used to be replaced before the HTML was rendered:
    # a rendering failure left new metrics beside the earlier run's report.html.
    from lsmseg_evaluation import report

    write_volume(tubes(seed=4), tmp_path / "labels" / "vol1.tif")
    write_volume(tubes(seed=4), tmp_path / "pred" / "vol1.tif")
    assert evaluate(tmp_path) == 0
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "report").rglob("*") if p.is_file()}
    write_volume(tubes(seed=5), tmp_path / "pred" / "vol1.tif")  # a different result

    def broken(*args, **kwargs):
        raise RuntimeError("rendering failed")

    monkeypatch.setattr(report, "render_html", broken)
    with pytest.raises(RuntimeError, match="rendering failed"):
        evaluate(tmp_path)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "report").rglob("*") if p.is_file()}
    assert after == before


def test_progress_bars_only_on_a_terminal_as_predict_draws_them(tmp_path, capsys, monkeypatch):
    # evaluate drew its bar into a log file (stderr redirected) wherever -q was not given.
    label = tubes(seed=6)
    for name in ("a.tif", "b.tif"):
        write_volume(label, tmp_path / "labels" / name)
        write_volume(label, tmp_path / "pred" / name)
    argv = ["evaluate", "--pred", str(tmp_path / "pred"), "--labels", str(tmp_path / "labels"),
            "--out", str(tmp_path / "report"), "--no-figures", "--jobs", "1"]
    monkeypatch.delenv("LSMSEG_PROGRESS", raising=False)
    assert main(argv) == 0
    assert "scoring" not in capsys.readouterr().err  # stderr is not a terminal here
    monkeypatch.setenv("LSMSEG_PROGRESS", "1")
    assert main(argv + ["--out", str(tmp_path / "again")]) == 0
    assert "scoring" in capsys.readouterr().err
    monkeypatch.setenv("LSMSEG_PROGRESS", "yes")
    assert main(argv) == 2
    assert "LSMSEG_PROGRESS: expected 1 (progress bars) or 0 (none), got 'yes'" in capsys.readouterr().err
