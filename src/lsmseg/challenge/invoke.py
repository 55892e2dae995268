"""Invoke mode (SELMA3D 2026 template, image label ``org.grand-challenge.api-method="invoke"``).

An HTTP server (:mod:`.server`, port 4743) loads the model once, answers ``GET /health`` and, on
``POST /invoke``, reads ``/input/inputs.json`` (the case's socket values), segments the image of
the input socket and writes it as in exec mode (:func:`.exec.process_case`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path, PurePosixPath

from ..errors import InputError, printable
from ..io import outside_folder
from .exec import CASE_OUTPUT_NAME, process_case
from .server import serve
from .settings import ChallengeSettings, load_predictor

logger = logging.getLogger(__name__)

INPUTS_JSON = "inputs.json"


def read_inputs_json(input_dir: Path) -> list[dict]:
    """``/input/inputs.json``: the list of socket values Grand Challenge provides for a case."""
    path = input_dir / INPUTS_JSON
    if not path.is_file():
        raise InputError(path, "missing (Grand Challenge writes it for every case before calling /invoke)")
    target = outside_folder(path, input_dir)  # nothing outside the input is read
    if target is not None:
        raise InputError(path, f"links to {printable(target)}, outside the input folder {printable(input_dir)}; "
                               "refusing to read it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from exc
    except RecursionError:  # nested deeper than the parser goes: bad input, not a server error
        raise InputError(path, "not valid JSON (nested too deeply)") from None
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise InputError(path, "expected a JSON list of socket values ({'socket': {...}, 'image': {...}})")
    return data


def select_image_socket(values: list[dict], input_slug: str, where: Path) -> tuple[str, str, str | None]:
    """(slug, relative path, image name) of the input socket: the configured slug, else the only image.

    Args:
        values: the socket values of inputs.json.
        input_slug: the configured input socket.
        where: inputs.json's path, for errors.
    """
    sockets = [v for v in values if isinstance(v.get("socket"), dict)]
    chosen = [v for v in sockets if v["socket"].get("slug") == input_slug]
    if not chosen:
        images = [v for v in sockets if v["socket"].get("is_image_kind") or isinstance(v.get("image"), dict)]
        if len(images) != 1:
            slugs = ", ".join(str(v["socket"].get("slug")) for v in sockets) or "none"
            raise InputError(where, f"no input socket '{input_slug}' (sockets: {slugs})")
        chosen = images
        logger.warning("%s: no socket '%s'; using the only image socket '%s'", where, input_slug, chosen[0]["socket"].get("slug"))
    socket = chosen[0]["socket"]
    slug = str(socket.get("slug") or input_slug)
    relative = str(socket.get("relative_path") or f"images/{slug}")
    parts = PurePosixPath(relative).parts
    if PurePosixPath(relative).is_absolute() or ".." in parts:
        raise InputError(where, f"socket '{slug}' has an unsafe relative_path '{relative}'")
    image = chosen[0].get("image")
    name = image.get("name") if isinstance(image, dict) else None
    return slug, relative, (str(name) if name else None)


def handle_invocation(predictor, settings: ChallengeSettings) -> dict:
    """One ``POST /invoke``: inputs.json -> case image -> mask. Raises LsmsegError on bad input.

    The previous invocation's mask is removed first: the server outlives its cases, and a case that
    fails must not leave another case's mask where the platform collects this one's."""
    stale = settings.output_dir / "images" / settings.output_slug / CASE_OUTPUT_NAME
    # Never inside the input (an output folder inside it is refused below, and inputs are never touched).
    if (stale.is_file() or stale.is_symlink()) and outside_folder(stale, settings.input_dir) is not None:
        stale.unlink(missing_ok=True)
    values = read_inputs_json(settings.input_dir)
    slug, relative, name = select_image_socket(values, settings.input_slug, settings.input_dir / INPUTS_JSON)
    record = process_case(predictor, settings, relative_path=relative, image_name=name).record
    return {"input": record["input"], "output": record["output"], "socket": slug, "image_name": name,
            "shape": record["shape"], "foreground_fraction": record["foreground_fraction"]}


def run_invoke(settings: ChallengeSettings, predictor=None) -> int:
    """Serve the invoke API until SIGTERM; returns the exit code (see :func:`.server.serve`)."""
    return serve(settings, invoke=handle_invocation, loader=load_predictor, predictor=predictor)
