"""Which structure a case shows, from its name, as the SELMA3D 2026 challenge names its cases.

The 2026 cases are named by a structure prefix (``cfos_neuron_012``, ``blood_vessel_3``); the
organisers' evaluator scores *isolated* structures by Dice and panoptic quality and *contiguous*
ones by Dice and clDice (github.com/YingChen7/SELMA3D2026_evaluation). Inference uses the same
names to pick per-structure post-processing from the weights manifest (threshold, small-component
removal, splitting of touching objects). The evaluation package routes its metrics from this table
too, so there is one list of prefixes.
"""

from __future__ import annotations

# Organisers' prefixes, case-sensitive, as in their evaluator.
ISOLATED = ("AD_plaques", "cell_nuclei", "cfos_neuron", "microglia", "protein")
CONTIGUOUS = ("axonalmarker", "blood_vessel", "gutnerve", "lymphatic_vessel", "peripheral_nerve")
STRUCTURES = ISOLATED + CONTIGUOUS

# Our own names for the same structures (phantom kinds, data-set names; lower-case match), tried
# after the organisers' prefixes.
ALIASES = {
    "cfos": "cfos_neuron",
    "c-fos": "cfos_neuron",
    "nuclei": "cell_nuclei",
    "cells": "cell_nuclei",
    "plaques": "AD_plaques",
    "vessels": "blood_vessel",
    "vessel": "blood_vessel",
    "axons": "axonalmarker",
    "axon": "axonalmarker",
}


def structure_from_name(name: str) -> str | None:
    """The 2026 structure a case name starts with, or None.

    Args:
        name: a case or file name (folders and extensions are ignored), e.g. ``cfos_neuron_003.tif``.

    Returns:
        One of :data:`STRUCTURES`, or None when the name starts with no known prefix or alias.
    """
    stem = name.replace("\\", "/").rsplit("/", 1)[-1]
    # Longest prefix first, so that a longer name is never shadowed by a shorter one.
    for prefix in sorted(STRUCTURES, key=len, reverse=True):
        if stem.startswith(prefix):
            return prefix
    lower = stem.lower()
    for alias in sorted(ALIASES, key=len, reverse=True):
        if lower.startswith(alias):
            return ALIASES[alias]
    return None


def is_structure_name(name: str) -> bool:
    """Whether ``name`` is exactly one of :data:`STRUCTURES` (case-sensitive, as the organisers'
    prefixes) or of :data:`ALIASES` (any case): the names :func:`structure_from_name` resolves whole,
    so that a typo or a longer name (``microglia2``) is not taken for a structure."""
    return name in STRUCTURES or name.lower() in ALIASES


def category_of(structure: str | None) -> str | None:
    """``"isolated"``, ``"contiguous"`` or None for a structure of :data:`STRUCTURES`."""
    if structure in ISOLATED:
        return "isolated"
    if structure in CONTIGUOUS:
        return "contiguous"
    return None


__all__ = ["ISOLATED", "CONTIGUOUS", "STRUCTURES", "ALIASES", "structure_from_name", "is_structure_name", "category_of"]
