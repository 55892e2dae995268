"""Which structure a volume shows, and which SELMA3D 2026 category that structure belongs to.

The 2026 edition groups structures as isolated-sparse, isolated-dense, contiguous-sparse and
contiguous-dense and scores each group separately (Dice + PQ for isolated structures, Dice +
clDice for contiguous ones). The organisers' pages name the four groups but, at the time of
writing, not which stained structure falls in which, so ``DEFAULT_CATEGORIES`` is our reading of
morphology (isolated = dot-like cells/objects, contiguous = tree-like networks) and density.
Override it per volume with a mapping file whenever the truth is known.

A volume's structure comes from, in order: the mapping file (by base name), ``--structure``, the
leading word of its name (``vessels_003`` -> vessels, ``cFos-12`` -> cfos), else ``unknown``.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from lsmseg.errors import ConfigError

CATEGORIES = ("isolated-sparse", "isolated-dense", "contiguous-sparse", "contiguous-dense")
UNKNOWN = "unknown"

DEFAULT_CATEGORIES = {
    "cfos": "isolated-sparse",  # activity-marked cells: scattered dots
    "cells": "isolated-sparse",
    "plaques": "isolated-sparse",  # amyloid plaques
    "nuclei": "isolated-dense",  # cell nuclei: packed dots
    "vessels": "contiguous-dense",  # brain vasculature: a space-filling network
    "axons": "contiguous-sparse",  # labelled projections: thin fibres, few per volume
    "nerves": "contiguous-sparse",
    "microglia": "contiguous-sparse",  # small bodies with long thin branches
}

# Words that name a structure at the start of a file name -> canonical structure.
ALIASES = {
    "vessel": "vessels", "vessels": "vessels", "vasculature": "vessels", "vascular": "vessels",
    "capillaries": "vessels", "artery": "vessels", "arteries": "vessels",
    "cfos": "cfos", "c-fos": "cfos", "fos": "cfos",
    "cell": "cells", "cells": "cells",
    "nucleus": "nuclei", "nuclei": "nuclei",
    "plaque": "plaques", "plaques": "plaques", "amyloid": "plaques",
    "axon": "axons", "axons": "axons",
    "nerve": "nerves", "nerves": "nerves",
    "microglia": "microglia", "microglial": "microglia",
}


def structure_from_name(name: str) -> str | None:
    """The structure a volume name starts with, or None (``Vessels_01`` -> vessels)."""
    lower = name.lower()
    if lower.startswith("c-fos"):
        return "cfos"
    match = re.match(r"[a-z]+", lower)
    return ALIASES.get(match.group(0)) if match else None


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
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())[:200]})") from exc
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
        structure = str(entry.get("structure") or "").strip().lower() or None
        category = str(entry.get("category") or "").strip().lower() or None
        if category is not None and category not in CATEGORIES:
            raise ConfigError(f"{path}: {name}: category {category!r} is not one of {', '.join(CATEGORIES)}")
        mapping[name] = {"structure": structure, "category": category}
    return mapping


def classify(name: str, mapping: dict | None = None, structure: str | None = None) -> tuple[str, str]:
    """(structure, category) for the volume called ``name``."""
    entry = (mapping or {}).get(name, {})
    found = entry.get("structure") or (structure.lower() if structure else None) or structure_from_name(name)
    found = ALIASES.get(found, found) if found else UNKNOWN
    category = entry.get("category") or DEFAULT_CATEGORIES.get(found, UNKNOWN)
    return found, category
