"""Which structure a case shows, from its name, as the SELMA3D 2026 challenge names its cases.

The 2026 cases are named by a structure prefix (``cfos_neuron_012``, ``blood_vessel_3``); the
organisers' evaluator scores *isolated* structures by Dice and panoptic quality and *contiguous*
ones by Dice and clDice (github.com/YingChen7/SELMA3D2026_evaluation). Inference uses the same
names to pick per-structure post-processing from the weights manifest (threshold, small-component
removal, splitting of touching objects). The evaluation package routes its metrics from this table
too, so there is one list of prefixes and one of aliases.
"""

from __future__ import annotations

import re

# Organisers' prefixes, case-sensitive, as in their evaluator.
ISOLATED = ("AD_plaques", "cell_nuclei", "cfos_neuron", "microglia", "protein")
CONTIGUOUS = ("axonalmarker", "blood_vessel", "gutnerve", "lymphatic_vessel", "peripheral_nerve")
STRUCTURES = ISOLATED + CONTIGUOUS

# Our phantoms' cell bodies: sparse and isolated, but no 2026 structure's (they are not nuclei), so
# a structure of their own, post-processed with the defaults and scored as isolated.
OWN_STRUCTURES = {"cells": "isolated"}

# Our words for a structure at the start of a name or as a --structure value (lower-case, matched
# in any case), tried after the organisers' prefixes: predict and evaluate read this one table.
ALIASES = {
    "vessel": "blood_vessel", "vessels": "blood_vessel", "vasculature": "blood_vessel", "vascular": "blood_vessel",
    "capillaries": "blood_vessel", "artery": "blood_vessel", "arteries": "blood_vessel",
    "lymphatic": "lymphatic_vessel",
    "cfos": "cfos_neuron", "c-fos": "cfos_neuron", "fos": "cfos_neuron",
    "cell": "cells", "cells": "cells",
    "nucleus": "cell_nuclei", "nuclei": "cell_nuclei",
    "plaque": "AD_plaques", "plaques": "AD_plaques", "amyloid": "AD_plaques",
    "axon": "axonalmarker", "axons": "axonalmarker",
    "nerve": "peripheral_nerve", "nerves": "peripheral_nerve",
    "microglial": "microglia",
}
ALIASES.update({name.lower(): name for name in (*STRUCTURES, *OWN_STRUCTURES)})  # blood_vessel, ad_plaques, ...


def known_structure(name: str) -> str | None:
    """The structure ``name`` stands for as a whole (``--structure``, a mapping entry): one of
    :data:`STRUCTURES` exactly, or any case of an :data:`ALIASES` key; None for a typo or a longer
    name (``microglia2``), so that it is refused rather than silently losing its settings."""
    name = name.strip()
    return name if name in STRUCTURES else ALIASES.get(name.lower())


def is_structure_name(name: str) -> bool:
    """Whether :func:`known_structure` resolves ``name``."""
    return known_structure(name) is not None


def unknown_structure(name: str) -> str | None:
    """Why ``name`` is refused as a structure, naming the ones taken (for one error line); None when known."""
    if is_structure_name(name):
        return None
    own = {structure.lower() for structure in (*STRUCTURES, *OWN_STRUCTURES)}
    aliases = ", ".join(sorted(alias for alias in ALIASES if alias not in own))
    return (f"{name!r} is not a known structure (expected {', '.join((*STRUCTURES, *OWN_STRUCTURES))}, "
            f"or an alias: {aliases})")


def structure_from_alias(name: str) -> str | None:
    """The structure an alias at the start of ``name`` stands for (``Vessels_01`` -> blood_vessel,
    ``cFos-12`` -> cfos_neuron), or None. A one-word alias must be the name's whole first word
    (``vesselness_3`` is none), so that a word that merely begins like one is not taken for it."""
    lower = name.lower()
    for alias in sorted((a for a in ALIASES if not a.isalpha()), key=len, reverse=True):
        if lower.startswith(alias):
            return ALIASES[alias]
    word = re.match(r"[a-z]+", lower)
    return ALIASES.get(word.group(0)) if word else None


def structure_from_name(name: str) -> str | None:
    """The structure a case name starts with, or None.

    Args:
        name: a case or file name (folders are ignored), e.g. ``cfos_neuron_003.tif``.

    Returns:
        One of :data:`STRUCTURES` when the name starts with an organisers' prefix (case-sensitive,
        as their evaluator tests it), else the structure of a leading alias
        (:func:`structure_from_alias`; ``cells`` for our phantoms), else None.
    """
    stem = name.replace("\\", "/").rsplit("/", 1)[-1]
    # Longest prefix first, so that a longer name is never shadowed by a shorter one.
    for prefix in sorted(STRUCTURES, key=len, reverse=True):
        if stem.startswith(prefix):
            return prefix
    return structure_from_alias(stem)


def category_of(structure: str | None) -> str | None:
    """``"isolated"``, ``"contiguous"`` or None for a structure of :data:`STRUCTURES` or :data:`OWN_STRUCTURES`."""
    if structure in ISOLATED:
        return "isolated"
    if structure in OWN_STRUCTURES:
        return OWN_STRUCTURES[structure]
    if structure in CONTIGUOUS:
        return "contiguous"
    return None


__all__ = ["ISOLATED", "CONTIGUOUS", "STRUCTURES", "OWN_STRUCTURES", "ALIASES", "known_structure", "is_structure_name",
           "unknown_structure", "structure_from_alias", "structure_from_name", "category_of"]
