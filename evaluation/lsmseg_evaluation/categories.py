"""Which structure a case shows, and how each SELMA3D edition routes it to its metrics.

Sources of each mapping:

* ``SELMA3D_2026_CONTIGUOUS`` / ``SELMA3D_2026_ISOLATED``: the organisers' evaluator,
  YingChen7/SELMA3D2026_evaluation, ``evaluate.py`` (``process_interf0``): ``name.startswith``
  with these exact, case-sensitive tuples, contiguous first; any other name stops their evaluator
  with ``RuntimeError("Unknown category")``. Contiguous cases get Dice + clDice, isolated ones
  Dice + PQ; microglia is isolated there.
* ``SELMA3D_2024``: YingChen7/SELMA3D_challenge-evaluation, ``evaluate.py`` (``process``):
  ``'cfos' in name`` (checked first), then ``'microglia' in name``, substrings, case-sensitive.
* ``DEFAULT_CATEGORIES``: the 2026 pages group structures as isolated/contiguous x sparse/dense
  but name neither the members nor the split in code; isolated/contiguous is the organisers'
  (above), sparse/dense is OUR reading of density, used only for grouping report tables.
* ``ALIASES`` (:mod:`lsmseg.structures`, the table predict reads too): our own names
  (``vessels_003``, ``cFos-12``, ``nuclei12``), tried only when no organisers' prefix matches; such
  cases are scored as their structure but flagged, because the organisers' evaluator would refuse
  the name. ``cells`` (our phantoms' cell bodies) is a structure of its own, scored as isolated.

A case's structure comes from, in order: the chosen edition's organisers' rule (2024: ``cfos`` /
``microglia`` in the name, then a 2026 prefix; 2026: a prefix), the mapping file (by base name),
``--structure``, the leading word of its name, else ``unknown``. ``--structure`` and the mapping
file take only names :func:`known_structure` resolves (a typo would score every case as nothing).
"""

from __future__ import annotations

import csv
from pathlib import Path

from lsmseg.errors import ConfigError, single_line
from lsmseg.structures import ALIASES, known_structure, structure_from_name, unknown_structure  # noqa: F401 (API)

CATEGORIES = ("isolated-sparse", "isolated-dense", "contiguous-sparse", "contiguous-dense")
UNKNOWN = "unknown"
CONTIGUOUS, ISOLATED = "contiguous", "isolated"

# YingChen7/SELMA3D2026_evaluation evaluate.py, process_interf0 (str.startswith, case-sensitive).
SELMA3D_2026_CONTIGUOUS = ("axonalmarker", "blood_vessel", "gutnerve", "lymphatic_vessel", "peripheral_nerve")
SELMA3D_2026_ISOLATED = ("AD_plaques", "cell_nuclei", "cfos_neuron", "microglia", "protein")
# YingChen7/SELMA3D_challenge-evaluation evaluate.py, process ('x' in name, in this order).
SELMA3D_2024 = ("cfos", "microglia")
# Their 2024 groups as the 2026 structure names.
STRUCTURES_2024 = {"cfos": "cfos_neuron", "microglia": "microglia"}

DEFAULT_CATEGORIES = {
    # contiguous (organisers); sparse/dense is our reading
    "blood_vessel": "contiguous-dense",  # a space-filling network
    "lymphatic_vessel": "contiguous-sparse",
    "axonalmarker": "contiguous-sparse",  # labelled projections: thin fibres
    "gutnerve": "contiguous-sparse",
    "peripheral_nerve": "contiguous-sparse",
    # isolated (organisers); sparse/dense is our reading
    "cfos_neuron": "isolated-sparse",  # activity-marked cells: scattered dots
    "microglia": "isolated-sparse",  # cell bodies ~0.2-1.5 % of DELiVR patches
    "AD_plaques": "isolated-sparse",
    "cell_nuclei": "isolated-dense",  # packed dots
    "protein": "isolated-dense",
    "cells": "isolated-sparse",  # ours (phantoms): no organisers' prefix
}

def organisers_prefix_2026(name: str) -> str | None:
    """The 2026 organisers' structure prefix ``name`` starts with (exactly as they test it), or None."""
    for prefix in SELMA3D_2026_CONTIGUOUS + SELMA3D_2026_ISOLATED:
        if name.startswith(prefix):
            return prefix
    return None


def organisers_structure_2024(name: str) -> str | None:
    """``cfos`` or ``microglia`` as the 2024 organisers route ``name`` (substring, cfos first), or None."""
    return next((key for key in SELMA3D_2024 if key in name), None)


def category_2026(structure: str) -> str:
    """``contiguous``, ``isolated`` (the 2026 evaluator's two metric sets) or ``unknown``."""
    category = DEFAULT_CATEGORIES.get(structure, UNKNOWN)
    return category.split("-")[0] if category != UNKNOWN else UNKNOWN


def load_mapping(path: str | Path) -> dict[str, dict[str, str]]:
    """name -> {"structure": ..., "category": ...} from a CSV or YAML file.

    CSV: a header with ``name`` and ``structure`` and/or ``category`` columns. YAML: a mapping
    ``name: structure`` or ``name: {structure: ..., category: ...}``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: mapping file not found")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({single_line(exc)[:200]})") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of volume name to structure")
        entries = {str(k): (v if isinstance(v, dict) else {"structure": v}) for k, v in raw.items()}
    else:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            fields = set(reader.fieldnames or ())
            if "name" not in fields or not fields & {"structure", "category"}:
                raise ConfigError(f"{path}: CSV needs a 'name' column and a 'structure' and/or 'category' column")
            entries = {row["name"].strip(): row for row in reader if row.get("name")}
    mapping = {}
    for name, entry in entries.items():
        unknown = set(entry) - {"name", "structure", "category"}
        if unknown and path.suffix.lower() in (".yaml", ".yml"):
            raise ConfigError(f"{path}: {name}: unknown key(s) {sorted(unknown)}")
        structure = str(entry.get("structure") or "").strip() or None
        category = str(entry.get("category") or "").strip().lower() or None
        if category is not None and category not in CATEGORIES:
            raise ConfigError(f"{path}: {name}: category {category!r} is not one of {', '.join(CATEGORIES)}")
        # A structure of one's own is fine where the entry's category says how to score it; without
        # one, an unknown name is a typo that would score the case Dice-only.
        reason = unknown_structure(structure) if structure is not None and category is None else None
        if reason is not None:
            raise ConfigError(f"{path}: {name}: structure {reason}; or give the entry a category")
        mapping[name] = {"structure": structure, "category": category}
    return mapping


def _canonical(structure: str) -> str:
    return known_structure(structure) or structure.lower()


def classify(name: str, mapping: dict | None = None, structure: str | None = None,
             preset: str = "selma3d-2026") -> tuple[str, str, bool]:
    """(structure, category, by_prefix) for the case called ``name``.

    ``by_prefix`` is True when an organisers' rule decided: with ``preset`` ``selma3d-2024`` first
    theirs of 2024 (``cfos`` / ``microglia`` anywhere in the name, as ``leaderboard.route`` scores
    it), then a 2026 prefix; False when our mapping, ``structure`` or an alias did, or nothing did.
    """
    entry = (mapping or {}).get(name, {})
    prefix = None
    if preset == "selma3d-2024":  # else x_microglia_h would be scored as microglia but listed as unknown
        prefix = STRUCTURES_2024.get(organisers_structure_2024(name))
    prefix = prefix or organisers_prefix_2026(name)
    if prefix is not None:
        return prefix, entry.get("category") or DEFAULT_CATEGORIES[prefix], True
    found = entry.get("structure") or structure or structure_from_name(name)
    found = _canonical(found) if found else UNKNOWN
    category = entry.get("category") or DEFAULT_CATEGORIES.get(found, UNKNOWN)
    return found, category, False
