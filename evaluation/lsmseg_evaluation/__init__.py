"""Local evaluation of lsmseg predictions against labels (``lsmseg evaluate``).

Needs the ``eval`` extra (panoptica 2.1.7, scikit-image, connected-components-3d, matplotlib); these are imported
lazily inside the functions that use them, never by the inference core.
"""

from .evaluate import EvaluationResult, EvaluationSettings, evaluate_folders, write_report
from .leaderboard import PRESETS
from .metrics import betti_numbers, cldice, dice, hd95, panoptic_quality, score_volume

__all__ = [
    "EvaluationResult",
    "EvaluationSettings",
    "PRESETS",
    "betti_numbers",
    "cldice",
    "dice",
    "evaluate_folders",
    "hd95",
    "panoptic_quality",
    "score_volume",
    "write_report",
]
