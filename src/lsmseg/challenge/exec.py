"""Exec mode (SELMA3D 2024/2025 Grand Challenge template), and the case logic invoke mode shares.

The case image lies in ``/input/images/<input-slug>/`` (``*.tif``, ``*.tiff`` or ``*.mha``); the mask
goes to ``/output/images/<output-slug>/output.mha`` (compressed MHA, the input's size and spacing,
uint8 values {0, 1}). The container runs once per case and exits.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path

from ..errors import EXIT_OK, InputError, OutputError, ProvenanceError, printable
from ..inference import VolumeResult, predict_file
from ..io import link_out_inside, natural_sorted, outside_folder, refuse_overwriting_inputs, same_file, sweep_partials
from .settings import DEFAULT_INPUT_SLUG, DEFAULT_OUTPUT_SLUG, ChallengeSettings, ensure_writable, load_predictor

logger = logging.getLogger(__name__)

KNOWN_INTERFACES = {
    "light-sheet-3d-microscopy": "isolated-biological-structure",
    "3d-brain-microscopy": "brain-structure",
}
CASE_IMAGE_SUFFIXES = (".tif", ".tiff", ".mha")
CASE_OUTPUT_NAME = "output.mha"


def find_case_image(folder: Path, image_name: str | None = None) -> Path:
    """The one case image in a socket folder (``image_name`` first if it is there).

    Args:
        folder: the input socket's folder.
        image_name: the image's name as the job gives it (invoke mode), if known.
    """
    if not folder.is_dir():
        raise InputError(folder, "input folder does not exist (expected the case image here)")
    if image_name and "/" not in image_name and (folder / image_name).is_file():
        return folder / image_name
    candidates = natural_sorted(
        p for p in folder.iterdir() if not p.name.startswith(".") and p.name.lower().endswith(CASE_IMAGE_SUFFIXES)
    )
    if not candidates:
        others = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        found = f"; found only: {', '.join(others[:5])}" if others else " (the folder is empty)"
        raise InputError(folder, f"no case image (*.tif, *.tiff or *.mha){found}")
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates[:5])
        raise InputError(folder, f"{len(candidates)} images ({names}); expected exactly one per case")
    return candidates[0]


def case_slugs(settings: ChallengeSettings) -> tuple[str, str]:
    """The configured slugs, or a known interface (2024's) when only that one is present."""
    images = settings.input_dir / "images"
    if (images / settings.input_slug).is_dir() or settings.input_slug != DEFAULT_INPUT_SLUG:
        return settings.input_slug, settings.output_slug
    for input_slug, output_slug in KNOWN_INTERFACES.items():
        if (images / input_slug).is_dir():
            if settings.output_slug != DEFAULT_OUTPUT_SLUG:
                output_slug = settings.output_slug
            logger.warning("using the '%s' -> '%s' interface found in %s", input_slug, output_slug, images)
            return input_slug, output_slug
    return settings.input_slug, settings.output_slug


@functools.cache
def _own_provenance_dir(scratch_dir: Path | None) -> Path:
    """This process's private folder for provenance records (made once): a fixed name in the shared
    temporary folder could be taken, or planted as a link, by another user or container."""
    try:
        return Path(tempfile.mkdtemp(prefix="lsmseg-provenance-", dir=scratch_dir))
    except OSError as exc:
        raise OutputError(scratch_dir or tempfile.gettempdir(), "cannot make a temporary folder for the provenance "
                          f"record: {exc.strerror or exc} (set LSMSEG_PROVENANCE_DIR)") from exc


def _provenance_path(settings: ChallengeSettings) -> Path:
    # Grand Challenge reads every file in an output socket's folder: keep the JSON out of /output.
    folder = settings.provenance_dir or _own_provenance_dir(settings.scratch_dir)
    return folder / f"{CASE_OUTPUT_NAME}.provenance.json"


def locate_case(settings: ChallengeSettings, relative_path: str | None = None,
                image_name: str | None = None) -> tuple[Path, Path]:
    """The case image of one job and its mask's path, checked before any work (bad input, an output
    onto the input, an unwritable output folder all raise).

    Args:
        settings: the folders and slugs.
        relative_path: the input socket's folder below ``/input`` (default ``images/<input-slug>``).
        image_name: the image's name in the job, if known.

    Returns:
        ``(image, output)``: the case image and ``images/<output-slug>/output.mha``.

    Raises:
        InputError: no single case image, or one (or its socket folder, or a plane of a plane
            folder) linking outside the input.
        OutputError: the output would replace the input or lie inside the input folder, or the
            output folder is not writable.
    """
    input_slug, output_slug = case_slugs(settings)
    outside = f"outside the input folder {printable(settings.input_dir)}; refusing to read it"
    # Nothing outside the input is read, not even listed: the socket folder first, then the image
    # and, for a plane folder, each link in it.
    folder = settings.input_dir / (relative_path or f"images/{input_slug}")
    target = (outside_folder(folder, settings.input_dir)
              if folder.is_dir() and not same_file(folder, settings.input_dir) else None)
    if target is not None:
        raise InputError(folder, f"links to {printable(target)}, {outside}")
    image = find_case_image(folder, image_name)
    target = outside_folder(image, settings.input_dir)
    if target is not None:
        raise InputError(image, f"links to {printable(target)}, {outside}")
    try:
        found = link_out_inside(image, settings.input_dir) if image.is_dir() else None
    except OSError as exc:
        raise InputError(image, f"cannot list the folder ({exc.strerror or exc})") from exc
    if found is not None:
        raise InputError(image, f"holds {printable(found[0].relative_to(image))}, a link to {printable(found[1])}, "
                                f"{outside}")
    output = settings.output_dir / "images" / output_slug / CASE_OUTPUT_NAME
    # The input folder too, as folder mode does: --output INPUT would write into the input.
    refuse_overwriting_inputs([(image, output)], [settings.input_dir])
    ensure_writable(settings.output_dir)
    return image, output


def segment_case(predictor, settings: ChallengeSettings, image: Path, output: Path,
                 image_name: str | None = None) -> VolumeResult:
    """Segment a located case (:func:`locate_case`) into ``output``.

    A provenance record that cannot be written is a warning, not a failed case: the platform takes
    the mask, the record is only for people.

    Args:
        predictor: the loaded predictor.
        settings: the folders (the provenance record's).
        image, output: the case image and its mask.
        image_name: the image's name in the job; its structure prefix picks the post-processing.
    """
    provenance = _provenance_path(settings)
    sweep_partials(output.parent)
    # The job's image name carries the case's structure prefix (cfos_neuron_...), which picks the
    # post-processing; the socket file itself may be named by a UUID.
    case_name = Path(image_name).name if image_name else None
    try:
        return predict_file(predictor, image, output, provenance_path=provenance, case_name=case_name)
    except ProvenanceError as exc:
        logger.warning("%s", exc)
        return VolumeResult.written(exc.record, provenance_error=str(exc))


def process_case(predictor, settings: ChallengeSettings, relative_path: str | None = None,
                 image_name: str | None = None) -> VolumeResult:
    """Segment the case image of one job and write ``images/<output-slug>/output.mha``.

    Args:
        predictor: the loaded predictor.
        settings: the folders and slugs.
        relative_path: the input socket's folder below ``/input`` (default ``images/<input-slug>``).
        image_name: the image's name in the job; its structure prefix picks the post-processing.

    Returns:
        The :class:`~lsmseg.inference.VolumeResult`.
    """
    image, output = locate_case(settings, relative_path, image_name)
    return segment_case(predictor, settings, image, output, image_name=image_name)


def run_exec(settings: ChallengeSettings, predictor=None) -> int:
    """Segment the one case of an exec-mode job.

    Args:
        settings: the folders, slugs and weights.
        predictor: an already loaded predictor (default: load the settings' weights).
    """
    image, output = locate_case(settings)  # bad input fails before the model loads
    predictor = predictor or load_predictor(settings)
    result = segment_case(predictor, settings, image, output, image_name=image.name)
    logger.info("wrote %s", result.output)
    return EXIT_OK
