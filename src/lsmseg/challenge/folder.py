"""Folder mode (local users): every volume in ``/input`` -> a mask of the same name and format in
``/output``, with a provenance JSON beside each."""

from __future__ import annotations

import logging

from ..errors import EXIT_FAILED, EXIT_OK, InputError, printable
from ..inference import predict_files
from ..io import list_volumes, outside_folder, refuse_overwriting_inputs
from .settings import ChallengeSettings, ensure_writable, load_predictor

logger = logging.getLogger(__name__)


def run_folder(settings: ChallengeSettings, predictor=None) -> int:
    """Segment every volume of ``settings.input_dir``; exit code 1 if any failed.

    Args:
        settings: the folders and weights.
        predictor: an already loaded predictor (default: load the settings' weights).
    """
    if not settings.input_dir.is_dir():
        if settings.input_dir.exists():
            raise InputError(settings.input_dir, "the input is not a folder (give the folder that holds the volumes)")
        raise InputError(settings.input_dir, "input folder does not exist (mount your volumes there: -v ./in:/input:ro)")
    volumes = list_volumes(settings.input_dir)
    if not volumes:
        logger.warning("%s: no volumes found; nothing to do", printable(settings.input_dir))
        return EXIT_OK
    # Before the model loads; the input folder itself too, so that --output in/out is refused.
    # Entries linking out of the input are left to predict_files, which refuses each alone.
    inside = [v for v in volumes if outside_folder(v, settings.input_dir) is None]
    refuse_overwriting_inputs(((v, settings.output_dir / v.name) for v in inside), [settings.input_dir])
    ensure_writable(settings.output_dir)
    predictor = predictor or load_predictor(settings)
    results = predict_files(predictor, volumes, settings.output_dir, input_folders=[settings.input_dir])
    failed = [r for r in results if not r.ok]
    unrecorded = [r for r in results if r.ok and r.provenance_error]
    logger.info("%d of %d volume(s) segmented into %s", len(results) - len(failed), len(results), settings.output_dir)
    if failed:  # each failure already had its own ERROR line
        logger.warning("%d of %d volume(s) failed; no mask was written for them", len(failed), len(results))
    if unrecorded:
        logger.warning("%d mask(s) written without their provenance JSON", len(unrecorded))
    return EXIT_FAILED if failed or unrecorded else EXIT_OK
