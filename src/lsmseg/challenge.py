"""Challenge front ends: folder, exec and invoke modes (what the container's entrypoint runs).

* **folder** (local users): every volume in ``/input`` -> a mask of the same name and format in
  ``/output``.
* **exec** (SELMA3D 2024/2025 Grand Challenge template): the case image lies in
  ``/input/images/<input-slug>/`` (``*.tif``, ``*.tiff`` or ``*.mha``); the mask goes to
  ``/output/images/<output-slug>/output.mha`` (compressed MHA, the input's size and spacing,
  uint8 values {0, 1}). The container runs once per case and exits.
* **invoke** (SELMA3D 2026 template, image label ``org.grand-challenge.api-method="invoke"``): an
  HTTP server (:mod:`lsmseg.server`, port 4743) loads the model once, answers ``GET /health``
  and, on ``POST /invoke``, reads ``/input/inputs.json`` (the case's socket values), segments
  the image of the input socket and writes it as in exec mode.

Weights: ``--weights``/``LSMSEG_WEIGHTS`` if given; else a Grand Challenge model tarball at
``/opt/ml/model`` (already extracted, or ``*.tar.gz`` there, extracted to scratch space); else the
image's own weights (``LSMSEG_BUNDLED_WEIGHTS``); else the source tree's ``weights/``.
Every failure is one ``ERROR: <file>: <reason>`` line; see :func:`run` for the exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
from pathlib import Path, PurePosixPath

from .errors import InputError, LsmsegError, OutputError, WeightsError
from .io import list_volumes, natural_sorted, refuse_overwriting_inputs, sweep_partials
from .weights import ENV_WEIGHTS, GRAND_CHALLENGE_MODEL_DIR, MANIFEST_NAME, SOURCE_TREE_WEIGHTS

logger = logging.getLogger(__name__)

MODES = ("folder", "exec", "invoke")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_TERMINATED = 128 + signal.SIGTERM
# Outside the container the invoke server listens on loopback only; the image's invoke stage sets
# LSMSEG_HOST=0.0.0.0 so that the platform can reach it (see docs/security.md).
DEFAULT_HOST = "127.0.0.1"

DEFAULT_INPUT = Path("/input")
DEFAULT_OUTPUT = Path("/output")
# SELMA3D 2026 socket slugs; 2024 used 3d-brain-microscopy -> brain-structure.
DEFAULT_INPUT_SLUG = "light-sheet-3d-microscopy"
DEFAULT_OUTPUT_SLUG = "isolated-biological-structure"
KNOWN_INTERFACES = {
    "light-sheet-3d-microscopy": "isolated-biological-structure",
    "3d-brain-microscopy": "brain-structure",
}
CASE_IMAGE_SUFFIXES = (".tif", ".tiff", ".mha")
CASE_OUTPUT_NAME = "output.mha"
INPUTS_JSON = "inputs.json"
DEFAULT_PORT = 4743
ENV_BUNDLED_WEIGHTS = "LSMSEG_BUNDLED_WEIGHTS"
MODEL_TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")


@dataclasses.dataclass
class ChallengeSettings:
    """Where to read and write, which weights, and how to serve; filled from arguments and env."""

    input_dir: Path = DEFAULT_INPUT
    output_dir: Path = DEFAULT_OUTPUT
    input_slug: str = DEFAULT_INPUT_SLUG
    output_slug: str = DEFAULT_OUTPUT_SLUG
    weights: Path | None = None
    structure: str | None = None
    device: str | None = None
    mask_value: int = 1
    progress: bool = False
    model_dir: Path = GRAND_CHALLENGE_MODEL_DIR
    bundled_weights: Path | None = None
    scratch_dir: Path | None = None  # where a model tarball is extracted (default: the temp dir)
    provenance_dir: Path | None = None  # exec/invoke: provenance JSON goes here, not into /output
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_voxels: int | None = None  # declared-size cap for inputs (None: LSMSEG_MAX_VOXELS or the default)


# ---------------------------------------------------------------------------------- weights


def _find_manifest_below(folder: Path, depth: int = 2) -> Path | None:
    """``folder/manifest.yaml``, else the first one up to ``depth`` folders down (a tarball's top folder)."""
    if (folder / MANIFEST_NAME).is_file():
        return folder / MANIFEST_NAME
    if depth == 0:
        return None
    for child in natural_sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = _find_manifest_below(child, depth - 1)
        if found:
            return found
    return None


def _safe_members(tar: tarfile.TarFile, tarball: Path) -> list[tarfile.TarInfo]:
    """Plain files and folders inside the extraction folder only (no links, devices, ``..``)."""
    members = []
    for member in tar.getmembers():
        name = PurePosixPath(member.name)
        if name.is_absolute() or ".." in name.parts:
            raise WeightsError(f"{tarball}: refusing to extract '{member.name}' (path outside the archive)")
        if not (member.isfile() or member.isdir()):
            raise WeightsError(f"{tarball}: refusing to extract '{member.name}' (not a plain file or folder)")
        members.append(member)
    return members


def _data_only(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """What tarfile's ``data`` filter does to a plain file or folder: no setuid/setgid/sticky bits,
    no group/other write, owner read/write(/search) kept, and no owner taken from the archive."""
    member = member.replace(deep=False) if hasattr(member, "replace") else member
    base = 0o700 if member.isdir() else 0o600
    member.mode = (member.mode & 0o755) | base
    member.uid, member.gid, member.uname, member.gname = os.getuid(), os.getgid(), "", ""
    return member


def extract_model_tarball(tarball: Path, scratch_dir: Path | None = None) -> Path:
    """Extract a model tarball into a fresh scratch folder; return the manifest it holds."""
    target = Path(tempfile.mkdtemp(prefix="lsmseg-model-", dir=scratch_dir))
    try:
        with tarfile.open(tarball) as tar:
            members = _safe_members(tar, tarball)
            if hasattr(tarfile, "data_filter"):
                # filter="data" also drops setuid/world-writable modes and owners from the archive.
                tar.extractall(target, members=members, filter="data")  # noqa: S202 - members checked above
            else:  # Python < 3.11.4 (Debian bookworm's 3.11.2, the image's): the same sanitising by hand
                tar.extractall(target, members=[_data_only(m) for m in members])  # noqa: S202
        manifest = _find_manifest_below(target)
        if manifest is None:
            raise WeightsError(f"{tarball}: model tarball holds no {MANIFEST_NAME}")
    except BaseException as exc:
        shutil.rmtree(target, ignore_errors=True)  # no half-extracted model left in scratch space
        if isinstance(exc, (tarfile.TarError, OSError, EOFError)):
            raise WeightsError(f"{tarball}: cannot extract model tarball ({' '.join(str(exc).split())})") from exc
        raise
    logger.info("extracted model tarball %s to %s", tarball, target)
    return manifest


def manifest_in_model_dir(model_dir: Path, scratch_dir: Path | None = None) -> Path | None:
    """The manifest of a Grand Challenge model mount: extracted files, or a tarball to extract."""
    if not model_dir.is_dir():
        return None
    found = _find_manifest_below(model_dir)
    if found:
        return found
    tarballs = natural_sorted(
        p for p in model_dir.iterdir() if p.is_file() and p.name.lower().endswith(MODEL_TARBALL_SUFFIXES)
    )
    if len(tarballs) > 1:
        raise WeightsError(f"{model_dir}: {len(tarballs)} model tarballs ({', '.join(p.name for p in tarballs)}); expected one")
    return extract_model_tarball(tarballs[0], scratch_dir) if tarballs else None


def resolve_weights(settings: ChallengeSettings) -> Path:
    """Which manifest to load, in the documented order; a clear error when there is none."""
    explicit = settings.weights or (Path(os.environ[ENV_WEIGHTS]) if os.environ.get(ENV_WEIGHTS) else None)
    if explicit:
        return explicit  # Predictor.from_manifest says clearly if it is missing
    found = manifest_in_model_dir(settings.model_dir, settings.scratch_dir)
    if found:
        return found
    looked = [f"{settings.model_dir} (manifest.yaml or a model tarball)"]
    for folder in (settings.bundled_weights, SOURCE_TREE_WEIGHTS):
        if folder is None:
            continue
        if (folder / MANIFEST_NAME).is_file():
            return folder / MANIFEST_NAME
        looked.append(str(folder))
    raise WeightsError(
        "no trained weights are installed (looked in " + ", ".join(looked) + "); mount a model at "
        f"{settings.model_dir} or pass --weights MANIFEST"
    )


def load_predictor(settings: ChallengeSettings):
    """Load verified weights once (the slow part of start-up)."""
    from .predictor import Predictor

    return Predictor.from_manifest(
        resolve_weights(settings),
        structure=settings.structure,
        device=settings.device,
        progress=settings.progress,
        mask_value=settings.mask_value,
        max_voxels=settings.max_voxels,
    )


# ---------------------------------------------------------------------------------- helpers


def ensure_writable(folder: Path) -> None:
    """Fail early, with one line, when masks could not be written at all."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".lsmseg-probe-"):
            pass
    except OSError as exc:
        raise OutputError(
            folder,
            f"output folder is not writable ({exc.strerror or exc}); mount it writable "
            f"(e.g. -v ./out:{folder}) and let the container user (uid {os.getuid()}) write to it",
        ) from exc


def _provenance_path(settings: ChallengeSettings) -> Path:
    # Grand Challenge reads every file in an output socket's folder: keep the JSON out of /output.
    folder = settings.provenance_dir or Path(tempfile.gettempdir()) / "lsmseg-provenance"
    return folder / f"{CASE_OUTPUT_NAME}.provenance.json"


def find_case_image(folder: Path, image_name: str | None = None) -> Path:
    """The one case image in a socket folder (``image_name`` first if it is there)."""
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


def _case_slugs(settings: ChallengeSettings) -> tuple[str, str]:
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


def process_case(predictor, settings: ChallengeSettings, relative_path: str | None = None, image_name: str | None = None) -> dict:
    """Segment the case image of one job and write ``images/<output-slug>/output.mha``."""
    input_slug, output_slug = _case_slugs(settings)
    folder = settings.input_dir / (relative_path or f"images/{input_slug}")
    image = find_case_image(folder, image_name)
    output = settings.output_dir / "images" / output_slug / CASE_OUTPUT_NAME
    refuse_overwriting_inputs([(image, output)])
    ensure_writable(settings.output_dir)
    sweep_partials(output.parent)
    # The job's image name carries the case's structure prefix (cfos_neuron_...), which picks the
    # post-processing; the socket file itself may be named by a UUID.
    case_name = Path(image_name).name if image_name else None
    return predictor.predict_file(image, output, provenance_path=_provenance_path(settings), case_name=case_name)


# ---------------------------------------------------------------------------------- invoke


def read_inputs_json(input_dir: Path) -> list[dict]:
    """``/input/inputs.json``: the list of socket values Grand Challenge provides for a case."""
    path = input_dir / INPUTS_JSON
    if not path.is_file():
        raise InputError(path, "missing (Grand Challenge writes it for every case before calling /invoke)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise InputError(path, "expected a JSON list of socket values ({'socket': {...}, 'image': {...}})")
    return data


def select_image_socket(values: list[dict], input_slug: str, where: Path) -> tuple[str, str, str | None]:
    """(slug, relative path, image name) of the input socket: the configured slug, else the only image."""
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
    """One ``POST /invoke``: inputs.json -> case image -> mask. Raises LsmsegError on bad input."""
    values = read_inputs_json(settings.input_dir)
    slug, relative, name = select_image_socket(values, settings.input_slug, settings.input_dir / INPUTS_JSON)
    record = process_case(predictor, settings, relative_path=relative, image_name=name)
    return {"input": record["input"], "output": record["output"], "socket": slug, "image_name": name,
            "shape": record["shape"], "foreground_fraction": record["foreground_fraction"]}


# ---------------------------------------------------------------------------------- modes


def auto_mode(input_dir: Path) -> str:
    """exec when the Grand Challenge layout (``/input/images``) is there, folder otherwise."""
    return "exec" if (input_dir / "images").is_dir() else "folder"


def run_folder(settings: ChallengeSettings, predictor=None) -> int:
    if not settings.input_dir.is_dir():
        raise InputError(settings.input_dir, "input folder does not exist (mount your volumes there: -v ./in:/input:ro)")
    volumes = list_volumes(settings.input_dir)
    if not volumes:
        logger.warning("%s: no volumes found; nothing to do", settings.input_dir)
        return EXIT_OK
    refuse_overwriting_inputs((v, settings.output_dir / v.name) for v in volumes)  # before the model loads
    ensure_writable(settings.output_dir)
    predictor = predictor or load_predictor(settings)
    results = predictor.predict_files(volumes, settings.output_dir)
    failed = [r for r in results if not r["ok"]]
    unrecorded = [r for r in results if r["ok"] and r.get("provenance_error")]
    logger.info("%d of %d volume(s) segmented into %s", len(results) - len(failed), len(results), settings.output_dir)
    if failed:  # each failure already had its own ERROR line
        logger.warning("%d of %d volume(s) failed; no mask was written for them", len(failed), len(results))
    if unrecorded:
        logger.warning("%d mask(s) written without their provenance JSON", len(unrecorded))
    return EXIT_FAILED if failed or unrecorded else EXIT_OK


def run_exec(settings: ChallengeSettings, predictor=None) -> int:
    input_slug, output_slug = _case_slugs(settings)
    image = find_case_image(settings.input_dir / "images" / input_slug)  # bad input fails before the model loads
    refuse_overwriting_inputs([(image, settings.output_dir / "images" / output_slug / CASE_OUTPUT_NAME)])
    ensure_writable(settings.output_dir)
    predictor = predictor or load_predictor(settings)
    record = process_case(predictor, settings, image_name=image.name)
    logger.info("wrote %s", record["output"])
    return EXIT_OK


def run_invoke(settings: ChallengeSettings, predictor=None) -> int:
    from .server import serve

    return serve(settings, predictor=predictor)


RUNNERS = {"folder": run_folder, "exec": run_exec, "invoke": run_invoke}


class Terminated(BaseException):
    """SIGTERM arrived (``docker stop``): unwinds like KeyboardInterrupt, so that the atomic writer
    removes its partial output."""


@contextlib.contextmanager
def _sigterm_unwinds():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(mode: str | None, settings: ChallengeSettings, predictor=None) -> int:
    """Run one mode. Exit codes: 0 every volume segmented (or none found), 1 any failure
    (bad volume, unwritable output, missing or tampered weights), 2 bad arguments."""
    mode = mode or auto_mode(settings.input_dir)
    if mode not in RUNNERS:
        logger.error("unknown mode '%s' (expected one of %s)", mode, ", ".join(MODES))
        return EXIT_USAGE
    logger.info("lsmseg %s mode: %s -> %s", mode, settings.input_dir, settings.output_dir)
    try:
        if mode == "invoke":  # the server handles SIGTERM itself
            return RUNNERS[mode](settings, predictor)
        with _sigterm_unwinds():
            return RUNNERS[mode](settings, predictor)
    except LsmsegError as exc:
        logger.error("%s", exc)
        return EXIT_FAILED
    except Terminated:
        logger.error("terminated (SIGTERM); unfinished outputs were removed")
        return EXIT_TERMINATED
    except MemoryError:
        logger.error("%s: out of memory", settings.input_dir)
        return EXIT_FAILED
    except Exception as exc:  # a bug or an unforeseen file: still one line, never a traceback
        logger.error("unexpected %s: %s", type(exc).__name__, " ".join(str(exc).split())[:300])
        logger.debug("traceback", exc_info=True)
        return EXIT_FAILED


# ---------------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    try:
        value = int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _env_path(name: str, default: Path | None) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else default


def _add_options(p: argparse.ArgumentParser, with_mode: bool) -> None:
    env = os.environ.get
    if with_mode:
        p.add_argument("--mode", default=env("LSMSEG_MODE") or None, metavar="|".join(MODES),
                       help="folder, exec or invoke (env LSMSEG_MODE; default: exec if INPUT/images exists, else folder)")
    p.add_argument("--input", type=Path, default=_env_path("LSMSEG_INPUT", DEFAULT_INPUT),
                   help="input folder (env LSMSEG_INPUT, default /input)")
    p.add_argument("--output", type=Path, default=_env_path("LSMSEG_OUTPUT", DEFAULT_OUTPUT),
                   help="output folder (env LSMSEG_OUTPUT, default /output)")
    p.add_argument("--input-slug", default=env("LSMSEG_INPUT_SLUG") or DEFAULT_INPUT_SLUG,
                   help=f"exec/invoke input socket slug (env LSMSEG_INPUT_SLUG, default {DEFAULT_INPUT_SLUG})")
    p.add_argument("--output-slug", default=env("LSMSEG_OUTPUT_SLUG") or DEFAULT_OUTPUT_SLUG,
                   help=f"exec/invoke output socket slug (env LSMSEG_OUTPUT_SLUG, default {DEFAULT_OUTPUT_SLUG})")
    p.add_argument("--host", default=env("LSMSEG_HOST") or DEFAULT_HOST,
                   help=f"invoke: address to listen on (env LSMSEG_HOST, default {DEFAULT_HOST}; the image sets 0.0.0.0)")
    p.add_argument("--port", default=env("LSMSEG_PORT") or str(DEFAULT_PORT),
                   help=f"invoke: port (env LSMSEG_PORT, default {DEFAULT_PORT})")
    p.add_argument("--weights", type=Path, default=None,
                   help="weights manifest (env LSMSEG_WEIGHTS; default: /opt/ml/model, then the image's weights)")
    p.add_argument("--structure", default=env("LSMSEG_STRUCTURE") or None, help="structure to segment (env LSMSEG_STRUCTURE)")
    p.add_argument("--device", default=env("LSMSEG_DEVICE") or None,
                   help="torch device (env LSMSEG_DEVICE; default cuda when visible, else cpu)")
    p.add_argument("--mask-value", type=int, choices=[1, 255], default=1,
                   help="foreground value (1 for the challenge; 255 for viewers)")
    p.add_argument("--max-voxels", type=_positive_int, default=None, metavar="N",
                   help="refuse inputs that declare more voxels (env LSMSEG_MAX_VOXELS; default 2^33)")
    p.set_defaults(func=run_challenge_command)


def add_challenge_commands(subparsers) -> None:
    """Register ``lsmseg challenge`` and ``lsmseg serve`` (called by lsmseg.cli)."""
    p = subparsers.add_parser(
        "challenge",
        help="container front end: folder, exec (Grand Challenge) or invoke (HTTP) mode",
        description="Segment /input into /output the way the container does: folder mode (every volume, same "
        "name and format), exec mode (Grand Challenge: INPUT/images/<input-slug>/ -> "
        "OUTPUT/images/<output-slug>/output.mha) or invoke mode (HTTP server: GET /health, POST /invoke). "
        "Exit code 0: all segmented or nothing to do; 1: any failure; 2: bad arguments.",
    )
    _add_options(p, with_mode=True)
    s = subparsers.add_parser(
        "serve",
        help="Grand Challenge invoke server (same as challenge --mode invoke)",
        description="HTTP server for the Grand Challenge invoke API: loads the model once, GET /health -> 200 when "
        "ready, POST /invoke -> reads INPUT/inputs.json, writes OUTPUT/images/<output-slug>/output.mha, 201.",
    )
    _add_options(s, with_mode=False)
    s.set_defaults(mode="invoke")


def settings_from_args(args) -> ChallengeSettings:
    try:
        port = int(args.port)
        if not 0 <= port < 65536:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be an integer in 0..65535, got {args.port!r}") from None
    progress_env = os.environ.get("LSMSEG_PROGRESS")
    progress = progress_env == "1" if progress_env else sys.stderr.isatty() and not getattr(args, "quiet", False)
    return ChallengeSettings(
        input_dir=args.input,
        output_dir=args.output,
        input_slug=args.input_slug,
        output_slug=args.output_slug,
        weights=args.weights,
        structure=args.structure,
        device=args.device,
        mask_value=args.mask_value,
        progress=progress,
        bundled_weights=_env_path(ENV_BUNDLED_WEIGHTS, None),
        provenance_dir=_env_path("LSMSEG_PROVENANCE_DIR", None),
        host=args.host,
        port=port,
        max_voxels=args.max_voxels,
    )


def run_challenge_command(args) -> int:
    try:
        settings = settings_from_args(args)
    except argparse.ArgumentTypeError as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    return run(args.mode, settings)
