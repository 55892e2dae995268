"""Score weights on the real labelled data with the SELMA3D leaderboard's own metrics.

    python -m lsmseg_evaluation.validate_shipped [--data DIR] [--weights MANIFEST] [--out DIR]
        [--structures blood_vessel cfos_neuron microglia] [--cases NAME ...] [--split FILE --set test]
        [--baseline] [--predictions DIR [--reuse-predictions]] [--jobs N]

The real data (``--data``, else ``$LSMSEG_DATA``, else ``<repo>/../shared/data/real``) holds three
labelled sets; each is scored under the SELMA3D 2026 name of its structure, so that the
organisers' prefix routing applies unchanged:

==============  =====================  ============================  ======================
structure       folder                 cases                         voxel size (z, y, x)
==============  =====================  ============================  ======================
blood_vessel    vesselnn/              5 two-photon vessel stacks    5 x 0.99 x 0.99 um
cfos_neuron     delivr/cfos/           25 labelled 100^3 patches     6 x 1.62 x 1.62 um
microglia       delivr/microglia/      48 labelled 100^3 patches     6 x 1.62 x 1.62 um
==============  =====================  ============================  ======================

A case is named ``<structure>_<file name>`` (``cfos_neuron_patchvolume_1008_0``). The images,
which record no voxel size, are staged as copies that do (so the predictor can resample as it
would for a well-described file); ``lsmseg predict`` segments them, one call per structure;
``lsmseg evaluate``'s code scores them with the 2026 preset (and the 2024 one for the 2024
structures), and ``--baseline`` adds a smoothed-Otsu baseline scored the same way. Written to
``--out``: ``model/`` (the full report of the weights: metrics.csv, metrics.json, summary.json,
report.html), ``baseline/`` (the same for the baseline), ``selma3d-2024/`` and ``results.md``, the
Markdown tables quoted in README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lsmseg.argtypes import device as device_name

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DATA_ENV = "LSMSEG_DATA"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "real"


@dataclass(frozen=True)
class Dataset:
    structure: str  # SELMA3D 2026 prefix: the case names start with it
    folder: str  # below --data, holding images/ and labels/
    spacing: tuple[float, float, float]  # (z, y, x) um, from the data's README
    predict_as: str  # --structure for lsmseg predict (a manifest entry, else its default model)


DATASETS = (
    Dataset("blood_vessel", "vesselnn", (5.0, 0.99, 0.99), "vessels"),
    # DELiVR: 1.62 x 1.62 x 6 um (x, y, z) as the DELiVR repository states; axis 0 is the coarse one.
    Dataset("cfos_neuron", "delivr/cfos", (6.0, 1.62, 1.62), "cfos"),
    Dataset("microglia", "delivr/microglia", (6.0, 1.62, 1.62), "microglia"),
)


def default_data() -> Path:
    return Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else DEFAULT_DATA


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lsmseg_evaluation.validate_shipped",
        description="Predict the real labelled data with lsmseg weights and score it with the SELMA3D "
        "leaderboard metrics (2026 preset; 2024 for c-Fos and microglia).",
    )
    parser.add_argument("--data", type=Path, default=None,
                        help=f"real data folder (default: ${DATA_ENV}, else {DEFAULT_DATA})")
    parser.add_argument("--weights", type=Path, help="weights manifest or folder (default: the installed weights)")
    parser.add_argument("--out", type=Path, default=Path("runs/validate-shipped"),
                        help="report folder (default: %(default)s)")
    parser.add_argument("--structures", nargs="+", choices=[d.structure for d in DATASETS],
                        default=[d.structure for d in DATASETS], help="which labelled sets to score (default: all)")
    parser.add_argument("--cases", nargs="+", metavar="NAME",
                        help="only these cases (file name, e.g. patchvolume_1008_0, or case name, e.g. "
                             "cfos_neuron_patchvolume_1008_0)")
    parser.add_argument("--split", type=Path, metavar="FILE",
                        help="YAML/JSON mapping set name -> list of case names, a fine-tuning config (its "
                             "data.<set> include lists), a run's run.json (its splits), or a text file, one name "
                             "per line; with --set, only that set's cases are scored")
    parser.add_argument("--set", dest="split_set", default="test", help="which set of --split (default: test)")
    parser.add_argument("--baseline", action="store_true",
                        help="also score a smoothed-Otsu baseline (Gaussian sigma 1 voxel, Otsu threshold)")
    parser.add_argument("--predict-as", action="append", default=[], metavar="STRUCTURE=NAME",
                        help="lsmseg predict --structure for a data set, e.g. cfos_neuron=cells "
                             "(defaults: blood_vessel=vessels, cfos_neuron=cfos, microglia=microglia; a name the "
                             "manifest lacks selects its default model)")
    parser.add_argument("--predictions", type=Path,
                        help="keep the predicted masks here (default: a temporary folder)")
    parser.add_argument("--reuse-predictions", action="store_true",
                        help="with --predictions: predict only the cases that have no mask there yet")
    parser.add_argument("--device", type=device_name, help="torch device for prediction (default: cuda if available)")
    parser.add_argument("--threshold", help="probability threshold (default: the manifest's)")
    parser.add_argument("--jobs", type=int, default=1, help="processes scoring cases in parallel (default: 1)")
    parser.add_argument("--no-figures", dest="figures", action="store_false", help="no per-case figures")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return parser


# --------------------------------------------------------------------------------------- cases


def read_split(path: Path, set_name: str) -> set[str]:
    """Case names of one set of a split file: a YAML/JSON mapping of lists, a fine-tuning config
    (its ``data.<set>`` include lists), a run's ``run.json`` (its ``splits``), or plain lines."""
    from lsmseg.errors import ConfigError

    if not path.is_file():
        raise ConfigError(f"{path}: split file not found")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        import yaml  # YAML is a superset of JSON

        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of set name to a list of case names")
        if isinstance(data.get("splits"), dict):  # a fine-tuning run's run.json: {set: {source: [names]}}
            data = {name: [n for names in sources.values() for n in names] for name, sources in data["splits"].items()}
        elif isinstance(data.get("data"), dict):  # a fine-tuning config: data.<set> is a list of volume sets
            data = {name: _included(path, name, sets) if name == set_name else []
                    for name, sets in data["data"].items() if name in ("train", "validation", "test")}
        if set_name not in data:
            raise ConfigError(f"{path}: no set '{set_name}' (sets: {', '.join(map(str, data))})")
        names = data[set_name] or []
        if not isinstance(names, list):
            raise ConfigError(f"{path}: set '{set_name}' must be a list of case names")
        return {str(n) for n in names}
    return {line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")}


def _included(path: Path, set_name: str, volume_sets) -> list[str]:
    """The volumes a config's set names (``include`` lists); a set without one would mean 'every file'."""
    from lsmseg.errors import ConfigError

    names = []
    for volume_set in volume_sets or []:
        if not volume_set.get("include"):
            raise ConfigError(f"{path}: a '{set_name}' set of {volume_set.get('images')} has no include list")
        names += volume_set["include"]
    return names


@dataclass(frozen=True)
class Case:
    name: str  # leaderboard name: <structure>_<file name>
    source: str  # file name without suffix
    dataset: Dataset
    image: Path
    label: Path


def find_cases(data: Path, structures, wanted: set[str] | None = None) -> tuple[list[Case], list[str]]:
    """The labelled cases of the chosen structures (images without a label are left out: DELiVR
    c-Fos has 7 unlabelled patches), filtered to ``wanted`` names; and the problems met."""
    from lsmseg.io import list_volumes, volume_name

    cases, problems = [], []
    left_out = set()  # file names of the structures not chosen: a split names them, yet they are not missing
    for dataset in DATASETS:
        images_dir, labels_dir = data / dataset.folder / "images", data / dataset.folder / "labels"
        if dataset.structure not in structures:
            if wanted is not None and images_dir.is_dir():
                left_out |= {volume_name(p) for p in list_volumes(images_dir)}  # prefixed names: `excluded` below
            continue
        if not images_dir.is_dir() or not labels_dir.is_dir():
            problems.append(f"{data / dataset.folder}: expected images/ and labels/ folders")
            continue
        labels = {volume_name(p): p for p in list_volumes(labels_dir)}
        for image in list_volumes(images_dir):
            source = volume_name(image)
            name = f"{dataset.structure}_{source}"
            if source not in labels or (wanted is not None and not {source, name} & wanted):
                continue
            cases.append(Case(name, source, dataset, image, labels[source]))
    if wanted is not None:
        found = {c.name for c in cases} | {c.source for c in cases}
        # A name of a structure left out by --structures is not missing.
        excluded = tuple(f"{d.structure}_" for d in DATASETS if d.structure not in structures)
        problems += [f"case '{n}' not found in {data}" for n in sorted(wanted - found - left_out)
                     if not (excluded and n.startswith(excluded))]
    return cases, problems


def _stage(cases: list[Case], folder: Path) -> tuple[Path, Path]:
    """images/<case>.tif that record the voxel size, labels/<case>.<ext> linked to the originals."""
    from lsmseg.io import read_volume, write_volume

    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    for case in cases:
        volume = read_volume(case.image)
        write_volume(volume.load(), images / f"{case.name}.tif", spacing=volume.spacing or case.dataset.spacing)
        suffix = case.label.name[len(case.source):]
        (labels / f"{case.name}{suffix}").symlink_to(case.label.resolve())
    return images, labels


def _predict(cases, images: Path, predictions: Path, args, predict_as: dict[str, str]) -> tuple[int, float]:
    from lsmseg import cli as lsmseg_cli

    status, seconds = 0, 0.0
    for dataset in DATASETS:
        todo = [c for c in cases if c.dataset is dataset]
        if args.reuse_predictions:
            todo = [c for c in todo if not (predictions / f"{c.name}.tif").exists()]
        if not todo:
            continue
        argv = ["--quiet"] if args.quiet else []
        argv += ["predict", *(str(images / f"{c.name}.tif") for c in todo), "-o", str(predictions),
                 "--structure", predict_as[dataset.structure]]
        for option, value in (("--weights", args.weights), ("--device", args.device), ("--threshold", args.threshold)):
            if value is not None:
                argv += [option, str(value)]
        logger.info("predicting %d %s case(s)", len(todo), dataset.structure)
        start = time.perf_counter()
        status |= lsmseg_cli.main(argv)
        seconds += time.perf_counter() - start
        lsmseg_cli.configure_logging(quiet=args.quiet)
    return status, seconds


def _baseline(images: Path, out: Path) -> None:
    from lsmseg.io import list_volumes, read_volume, volume_name, write_volume
    from lsmseg_training.compare import smoothed_otsu

    for path in list_volumes(images):
        volume = read_volume(path)
        write_volume(smoothed_otsu(volume.load()).astype("uint8"), out / f"{volume_name(path)}.tif", volume.spacing)


# --------------------------------------------------------------------------------------- tables


def _fmt(value, digits=3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and value != value:
        return "NaN"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _mean_std(values) -> str:
    from statistics import mean, stdev

    values = [float(v) for v in values if v is not None]
    defined = [v for v in values if v == v]  # NaN: undefined, e.g. PQ of an empty label and empty mask
    undefined = f" ({len(values) - len(defined)} NaN)" if len(defined) < len(values) else ""
    if not defined:
        return "–" + undefined
    if len(defined) == 1:
        return _fmt(defined[0]) + undefined
    return f"{_fmt(mean(defined))} ± {_fmt(stdev(defined))}{undefined}"


def results_markdown(model, baseline=None, model_2024=None, baseline_2024=None, note: str = "") -> str:
    """Markdown tables for README.md: per structure, the leaderboard metrics of the weights
    (and of the baseline), then the 2026 aggregates exactly as the leaderboard computes them."""
    from .leaderboard import nan_free

    lines = []
    header = "| structure | category | cases | Dice | clDice / PQ |"
    rule = "|---|---|---|---|---|"
    if baseline is not None:
        header += " Dice (Otsu) | clDice / PQ (Otsu) |"
        rule += "---|---|"
    lines += ["SELMA3D 2026 scoring (mean ± sample std over cases; clDice for contiguous, PQ for isolated "
              "structures):", "", header, rule]
    by_structure = {}
    for result in (model, baseline):
        if result is None:
            continue
        for row in result.rows:
            if row["status"] == "ok":
                by_structure.setdefault(row["structure"], {}).setdefault(id(result), []).append(row)
    for structure, groups in by_structure.items():
        rows = groups.get(id(model), [])
        second = "lb_cldice" if rows and rows[0]["lb_group"] == "contiguous" else "lb_panoptic_quality"
        cells = [structure, rows[0]["category"] if rows else "–", str(len(rows)),
                 _mean_std(r["lb_dice"] for r in rows), _mean_std(r[second] for r in rows)]
        if baseline is not None:
            base = groups.get(id(baseline), [])
            cells += [_mean_std(r["lb_dice"] for r in base), _mean_std(r[second] for r in base)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "The 2026 leaderboard's aggregates for these cases (`metrics.json`, `aggregates`):", ""]
    keys = list(model.summary["leaderboard"]["aggregates"])
    lines.append("| | " + " | ".join(f"`{k}`" for k in keys) + " |")
    lines.append("|---" * (len(keys) + 1) + "|")
    for label, result in (("weights", model), ("smoothed Otsu", baseline)):
        if result is not None:
            aggregates = result.summary["leaderboard"]["aggregates"]
            lines.append(f"| {label} | " + " | ".join(_fmt(aggregates[k]) for k in keys) + " |")
    nan_cases = [row["name"] for row in model.rows if row["status"] == "ok" and not nan_free(row)]
    if nan_cases:
        lines += ["", f"NaN leaderboard values (panoptica's clDice/PQ when a mask is empty or nothing "
                      f"overlaps) for: {', '.join(nan_cases)}."]
    if model_2024 is not None:
        keys = list(model_2024.summary["leaderboard"]["aggregates"])
        lines += ["", "SELMA3D 2024 scoring of the c-Fos and microglia cases (`aggregates`, means over cases):", "",
                  "| | " + " | ".join(f"`{k}`" for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for label, result in (("weights", model_2024), ("smoothed Otsu", baseline_2024)):
            if result is not None:
                aggregates = result.summary["leaderboard"]["aggregates"]
                lines.append(f"| {label} | " + " | ".join(_fmt(aggregates[k]) for k in keys) + " |")
    return "\n".join(lines) + (f"\n\n{note}\n" if note else "\n")


def _overrides_note(args) -> str:
    """The settings the command line overrode, said in the report so that such a figure is never read
    as the shipped settings' (and, on a test split, never used to choose them)."""
    overrides = [f"--threshold {args.threshold}"] if args.threshold is not None else []
    overrides += [f"--predict-as {item}" for item in args.predict_as]
    if not overrides:
        return ""
    on_test = args.split is not None and args.split_set == "test"
    return (f"**Settings overridden** ({', '.join(overrides)}): not the manifest's"
            + ("; scored on the test split, these figures may report, never choose" if on_test else "") + ". ")


def _weights_note(provenance_files: list[Path], seconds: float, n_predicted: int) -> str:
    if not provenance_files:
        return f"Prediction wrote no provenance ({seconds:.0f} s)."
    records = [json.loads(path.read_text()) for path in provenance_files]
    record = records[0]
    weights = record.get("weights", {})
    # Reused masks may come from other weights: one note must not speak for all of them.
    digests = sorted({str((r.get("weights") or {}).get("sha256", "?"))[:12] for r in records})
    if len(digests) > 1:
        return (f"**The masks come from {len(digests)} different weights** (sha256 {', '.join(digests)}…): these "
                "figures are no one model's.")
    device = record.get("parameters", {}).get("device", "?")
    timing = (f"prediction of {n_predicted} case(s) on {device} took {seconds:.0f} s in total"
              if n_predicted else "masks reused from an earlier run")
    return (f"Weights: {weights.get('file', '?')} (model '{weights.get('model', '?')}', sha256 "
            f"{str(weights.get('sha256', '?'))[:12]}…); {timing}.")


# --------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from lsmseg import cli as lsmseg_cli
    from lsmseg.argtypes import progress_wanted
    from lsmseg.argtypes import structure as structure_argument
    from lsmseg.errors import EXIT_USAGE, LsmsegError
    from lsmseg.inference.results import provenance_path_for
    from lsmseg.io.atomic import write_text

    from .evaluate import EvaluationSettings, evaluate_folders, write_report

    args = build_parser().parse_args(argv)
    lsmseg_cli.configure_logging(quiet=args.quiet)
    data = args.data or default_data()
    if args.reuse_predictions and args.predictions is None:
        logger.error("--reuse-predictions needs --predictions DIR")
        return EXIT_USAGE
    try:  # bars as lsmseg predict and evaluate draw them: never with -q, else LSMSEG_PROGRESS, else on a terminal
        progress = progress_wanted(args.quiet)
    except ValueError as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    predict_as = {d.structure: d.predict_as for d in DATASETS}
    for item in args.predict_as:
        key, _, value = item.partition("=")
        if key not in predict_as or not value:
            logger.error("--predict-as %s: expected STRUCTURE=NAME with STRUCTURE one of %s", item, ", ".join(predict_as))
            return EXIT_USAGE
        try:  # checked here, not by lsmseg predict after the images are staged
            structure_argument(value)
        except argparse.ArgumentTypeError as exc:
            logger.error("--predict-as %s: %s", item, exc)
            return EXIT_USAGE
        predict_as[key] = value
    try:
        wanted = set(args.cases) if args.cases else None
        if args.split is not None:
            in_split = read_split(args.split, args.split_set)
            wanted = in_split if wanted is None else wanted & in_split
        cases, problems = find_cases(data, args.structures, wanted)
    except LsmsegError as exc:
        logger.error("%s", exc)
        return 1
    for problem in problems:
        logger.error("%s", problem)
    if not cases:
        logger.error("no labelled cases to score in %s", data)
        return 1
    logger.info("%d case(s): %s", len(cases), ", ".join(
        f"{sum(c.dataset is d for c in cases)} {d.structure}" for d in DATASETS if any(c.dataset is d for c in cases)))

    with tempfile.TemporaryDirectory(prefix="lsmseg-validate-") as scratch:
        scratch = Path(scratch)
        images, labels = _stage(cases, scratch)
        predictions = args.predictions or scratch / "predictions"
        predictions.mkdir(parents=True, exist_ok=True)
        n_todo = len(cases) if not args.reuse_predictions else sum(
            not (predictions / f"{c.name}.tif").exists() for c in cases)
        predict_status, predict_seconds = _predict(cases, images, predictions, args, predict_as)
        # Score only this run's cases, even when --predictions holds masks of others.
        scored = scratch / "scored"
        scored.mkdir()
        unpredicted = []
        for case in cases:
            mask = predictions / f"{case.name}.tif"
            if mask.exists():
                (scored / mask.name).symlink_to(mask.resolve())
            else:
                unpredicted.append(case.name)
        provenance = [provenance_path_for(predictions / f"{c.name}.tif") for c in cases]
        note = _weights_note([p for p in provenance if p.exists()], predict_seconds, n_todo)
        note = _overrides_note(args) + note
        if unpredicted:  # scored as empty masks (the leaderboard's rule), which is not the weights' score
            logger.error("no mask for %d of %d case(s) (prediction failed, errors above); they score as empty masks",
                         len(unpredicted), len(cases))
            note = (f"**PREDICTION FAILED for {len(unpredicted)} of {len(cases)} case(s)** ({', '.join(unpredicted)}): "
                    "no mask, scored as an empty mask, so these figures are not the weights'. " + note)

        def score(pred_dir, preset, subset=None, figures=args.figures):
            settings = EvaluationSettings(preset=preset, jobs=args.jobs, figures=figures, progress=progress)
            if subset is None:
                return evaluate_folders(pred_dir, labels, images, settings)
            # The 2024 preset knows c-Fos and microglia only: score those cases alone.
            sub = scratch / f"{Path(pred_dir).name}-{preset}"
            sub_labels = sub / "labels"
            sub_labels.mkdir(parents=True)
            (sub / "pred").mkdir()
            for case in subset:
                for path in labels.glob(f"{case.name}.*"):
                    (sub_labels / path.name).symlink_to(path.resolve())
                for path in Path(pred_dir).glob(f"{case.name}.tif"):
                    (sub / "pred" / path.name).symlink_to(path.resolve())
            return evaluate_folders(sub / "pred", sub_labels, images, settings)

        title = f"lsmseg weights on the real data ({data})"
        model = score(scored, "selma3d-2026")
        model.summary["weights"] = note
        write_report(model, args.out / "model", title=title + ", SELMA3D 2026 scoring")
        cells_2024 = [c for c in cases if c.dataset.structure in ("cfos_neuron", "microglia")]
        model_2024 = score(scored, "selma3d-2024", cells_2024, figures=False) if cells_2024 else None
        if model_2024 is not None:
            write_report(model_2024, args.out / "selma3d-2024", title=title + ", SELMA3D 2024 scoring")
        baseline = baseline_2024 = None
        if args.baseline:
            otsu = scratch / "otsu"
            _baseline(images, otsu)
            baseline = score(otsu, "selma3d-2026", figures=False)
            write_report(baseline, args.out / "baseline", title="smoothed Otsu on the real data, SELMA3D 2026 scoring")
            if cells_2024:
                baseline_2024 = score(otsu, "selma3d-2024", cells_2024, figures=False)
        markdown = results_markdown(model, baseline, model_2024, baseline_2024, note)
        write_text(markdown, args.out / "results.md")
    print(markdown)
    logger.info("report: %s", args.out / "model" / "report.html")
    failed = model.failed or (model_2024.failed if model_2024 else [])
    return 1 if predict_status != 0 or failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
