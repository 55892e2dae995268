"""Pairing predictions with labels (and optionally images) by base name, across formats.

``brain01.tif`` pairs with ``brain01.nii.gz`` and with a plane folder ``brain01/``: names come
from :func:`lsmseg.io.volume_name`. A prediction without a label and two files with the same base
name in one folder are reported as problems; a label without a prediction is a pair with
``pred = None`` (scored as an empty prediction). Nothing is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lsmseg.errors import InputError
from lsmseg.io import list_volumes, natural_sorted, volume_name


@dataclass
class Pair:
    name: str
    pred: Path | None = None
    label: Path | None = None
    image: Path | None = None
    problem: str | None = None  # why this pair cannot be scored; None when it can
    notes: list[str] = field(default_factory=list)  # worth saying, but the pair is still scored

    @property
    def ok(self) -> bool:
        return self.problem is None


def _by_name(folder: Path, what: str) -> tuple[dict[str, Path], dict[str, str]]:
    """name -> path, and name -> problem for names that occur more than once."""
    found: dict[str, list[Path]] = {}
    for path in list_volumes(folder):
        found.setdefault(volume_name(path), []).append(path)
    unique = {name: paths[0] for name, paths in found.items() if len(paths) == 1}
    clashes = {
        name: f"{len(paths)} {what} files share the base name '{name}': " + ", ".join(p.name for p in paths)
        for name, paths in found.items()
        if len(paths) > 1
    }
    return unique, clashes


def pair_volumes(pred_dir: str | Path, label_dir: str | Path, image_dir: str | Path | None = None) -> list[Pair]:
    """One :class:`Pair` per base name found in either folder, naturally sorted by name.

    Raises:
        InputError: a folder is missing, or the label folder holds no volume (nothing could be
            scored; an empty report and exit 0 would read as a pass).
    """
    preds, pred_clashes = _by_name(Path(pred_dir), "prediction")
    labels, label_clashes = _by_name(Path(label_dir), "label")
    if not labels and not label_clashes:
        raise InputError(Path(label_dir), "label folder holds no volume to score against")
    images, image_clashes = _by_name(Path(image_dir), "image") if image_dir is not None else ({}, {})
    names = {*preds, *labels, *pred_clashes, *label_clashes}
    pairs = []
    for name in [p.name for p in natural_sorted(names)]:
        pair = Pair(name=name, pred=preds.get(name), label=labels.get(name), image=images.get(name))
        if name in label_clashes:
            pair.problem = label_clashes[name]
        elif name in pred_clashes:
            pair.problem = pred_clashes[name]
        elif pair.label is None:
            pair.problem = f"prediction {pair.pred.name} has no label in {label_dir}"
        elif pair.pred is None:
            pass  # scored as an empty prediction and listed (evaluate.evaluate_pair)
        elif name in image_clashes:
            pair.notes.append(image_clashes[name] + "; figure drawn without the image")
        pairs.append(pair)
    return pairs
