"""Synthetic light-sheet phantoms with exact ground truth.

A phantom is built in two stages, both in physical units (micrometres, axes z, y, x):

1. *Geometry*: an irregular organ-shaped tissue region inside dark background, and the labelled
   structures inside it (branching vessel trees, irregular cells, dense nuclei, or plaques). The
   label is this rasterised geometry, before any optics or noise, so it is exact.
2. *Image formation*: tissue autofluorescence with multi-scale texture and a bright surface rim,
   unlabelled distractors (autofluorescent speckles, plaque halos), depth attenuation along z and
   along the light-sheet axis (x), light-sheet shadows (stripes along x), plane-to-plane flicker,
   an anisotropic Gaussian PSF (axial blur wider than lateral), Poisson shot noise, Gaussian read
   noise and a camera offset, quantised to uint16.

Everything is drawn from one ``numpy.random.Generator`` seeded from ``(seed, kind)``, so a phantom
is a pure function of its arguments. Only numpy and scipy.ndimage are used.
"""

from __future__ import annotations

import logging
import math
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from ..errors import ConfigError, OutputError
from ..resources import available_memory
from . import KINDS

logger = logging.getLogger(__name__)

_KIND_IDS = {kind: i for i, kind in enumerate(KINDS)}

Spacing = tuple[float, float, float]

# Structures are 1-12 um across: a finer voxel makes each one thousands of voxels wide, a coarser one
# packs many into a voxel (their number grows with the physical volume; 1e6 um asked for exabytes).
SPACING_RANGE_UM = (0.05, 20.0)
# The longest file name (bytes) that Linux, macOS and Windows file systems take.
NAME_MAX = 255
# Peak working memory of make_phantom per voxel: measured 74-78 bytes (tracemalloc), 82-87 (RSS
# growth) for every kind at 32x128x128 and 64x256x256; rounded up for the writer's copy.
BYTES_PER_VOXEL = 96


@dataclass(frozen=True)
class PhantomSettings:
    """Switches and physical parameters of the image formation (defaults look like real data).

    Per-volume variation (brightness, contrast, attenuation lengths, number of stripes) is drawn
    from the seed on top of these values, so a set of seeds gives a varied data set.
    """

    tissue: bool = True  # False: the whole volume is tissue (an interior crop)
    lateral_psf_um: float = 0.8  # Gaussian sigma of the PSF in y and x
    axial_psf_um: float = 3.0  # Gaussian sigma along z (light-sheet thickness), wider than lateral
    attenuation: bool = True  # depth attenuation along z and along the light-sheet axis x
    stripes: bool = True  # light-sheet shadows running along x
    noise: bool = True  # Poisson shot noise + Gaussian read noise (False: expected counts, rounded)
    tissue_photons: float = 40.0  # mean autofluorescence photons per voxel at the tissue surface
    counts_per_photon: float = 2.0
    read_noise_counts: float = 2.0
    camera_offset: float = 100.0
    structure_fraction: float | None = None  # labelled fraction of tissue; None: kind default, jittered


@dataclass
class Phantom:
    """A synthetic volume and its exact label, axes (z, y, x)."""

    image: np.ndarray  # uint16
    label: np.ndarray  # uint8, values {0, 1}
    spacing: Spacing  # voxel size in micrometres (z, y, x)
    kind: str
    seed: int
    tissue: np.ndarray = field(repr=False)  # bool, the organ region (structures lie only inside it)


def make_phantom(
    kind: str,
    shape: tuple[int, int, int],
    seed: int,
    spacing: Spacing = (3.0, 1.0, 1.0),
    settings: PhantomSettings | None = None,
) -> Phantom:
    """Build a light-sheet-like phantom of ``kind`` (one of ``KINDS``), deterministic for ``seed``.

    Args:
        kind: ``vessels``, ``cells``, ``nuclei`` or ``plaques``.
        shape: (z, y, x) in voxels.
        seed: the random seed; the phantom is a pure function of the arguments.
        spacing: the voxel size (z, y, x) in micrometres; structure sizes are physical, so the same
            kind looks the same at any spacing.
        settings: the image formation (PSF, noise, attenuation, ...); default :class:`PhantomSettings`.
    """
    shape, spacing = check_phantom_arguments(kind, shape, seed, spacing)
    settings = settings or PhantomSettings()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _KIND_IDS[kind]]))
    space = _Space(shape, spacing)

    tissue = _tissue_mask(rng, space) if settings.tissue else np.ones(shape, bool)
    if not tissue.any():  # a tiny volume may miss the organ entirely; keep it usable
        tissue[tuple(n // 2 for n in shape)] = True
    fraction = settings.structure_fraction
    label, signal, extra = _STRUCTURES[kind](rng, space, tissue, fraction)
    label &= tissue
    signal[~label] = 0.0
    image = _render(rng, space, tissue, signal, extra, settings)
    return Phantom(image=image, label=label.astype(np.uint8), spacing=spacing, kind=kind, seed=int(seed), tissue=tissue)


def _whole(value) -> int:
    """``value`` as an int if it is a whole number type (numpy's included), else TypeError: not a
    float, string or bool (``True`` would be seed 1, which configs refuse too)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError("a bool is not a whole number")
    return operator.index(value)


def check_phantom_arguments(kind: str, shape, seed: int, spacing) -> tuple[tuple[int, int, int], Spacing]:
    """Refuse arguments :func:`make_phantom` cannot use, before any array is allocated.

    Besides the kind and the types: a shape or seed that is not whole numbers (``int()`` would round
    them silently), a negative seed (numpy refuses it), a spacing outside
    :data:`SPACING_RANGE_UM`, a shape above the voxel cap that lsmseg reads volumes under
    (``LSMSEG_MAX_VOXELS``, :func:`lsmseg.io.default_max_voxels`), and a shape whose working
    memory (:data:`BYTES_PER_VOXEL` per voxel) exceeds :func:`available_memory`.

    Returns:
        ``(shape, spacing)`` as tuples of int and float.

    Raises:
        ConfigError: one line saying which argument is wrong and why.
    """
    from ..io import ENV_MAX_VOXELS, default_max_voxels

    if not isinstance(kind, str) or kind not in _KIND_IDS:
        raise ConfigError(f"unknown phantom kind {kind!r}; choose one of {', '.join(KINDS)}")
    # Whole numbers only: int() would turn seed 1.5 into seed 1's phantom and a shape of 8.7 into 8.
    try:
        whole_shape = tuple(_whole(n) for n in shape)
    except TypeError:
        whole_shape = ()
    if len(whole_shape) != 3 or min(whole_shape) < 1:
        raise ConfigError(f"phantom shape must be three positive integers (z, y, x), got {shape!r}")
    shape = whole_shape
    try:
        spacing = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ConfigError(f"phantom spacing must be three positive numbers (z, y, x), got {spacing!r}") from None
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ConfigError(f"phantom spacing must be three positive numbers (z, y, x), got {spacing}")
    low, high = SPACING_RANGE_UM
    if not all(low <= s <= high for s in spacing):
        raise ConfigError(f"phantom spacing must lie within {low:g}-{high:g} um per axis (the structures are "
                          f"1-12 um across), got {','.join(f'{s:g}' for s in spacing)}")
    try:
        whole_seed = _whole(seed)
    except TypeError:
        whole_seed = -1
    if whole_seed < 0:
        raise ConfigError(f"phantom seed must be a whole number >= 0, got {seed!r}")
    voxels = math.prod(shape)
    shown = ",".join(map(str, shape))
    cap = default_max_voxels()
    if voxels > cap:
        raise ConfigError(f"phantom shape {shown} = {voxels:,} voxels is above the limit of {cap:,} voxels that "
                          f"lsmseg reads volumes under ({ENV_MAX_VOXELS})")
    need, free = voxels * BYTES_PER_VOXEL, available_memory()
    if free is not None and need > free:
        raise ConfigError(f"phantom shape {shown} needs about {need / 2**30:.1f} GiB of memory to build, "
                          f"{free / 2**30:.1f} GiB is available; choose a smaller shape")
    return shape, spacing


def check_phantom_name(name: str) -> None:
    """Refuse a file name :func:`write_phantom` cannot use: a folder in it, no volume format suffix
    (any other name would become a folder of TIFF planes), longer than :data:`NAME_MAX` bytes, or no
    visible base name (``.tif``, ``.x.tif``: hidden files are skipped when a folder of volumes is listed)."""
    from ..io import KNOWN_SUFFIXES, volume_name
    from ..io.atomic import PARTIAL_NAME_EXTRA

    if not name or Path(name).name != name or name in (".", ".."):
        raise ConfigError(f"phantom file name must be a plain file name, got {name!r}")
    if not name.lower().endswith(KNOWN_SUFFIXES):
        raise ConfigError(f"phantom file name {name!r} has no volume format suffix "
                          f"(one of {', '.join(sorted(KNOWN_SUFFIXES))})")
    # A long seed makes a long name, and the OS refuses it mid-write: the name written first is the
    # temporary one (io.atomic.partial_path), longer by up to PARTIAL_NAME_EXTRA bytes.
    longest = NAME_MAX - PARTIAL_NAME_EXTRA
    if len(os.fsencode(name)) > longest:
        raise ConfigError(f"phantom file name {name[:24]}...{name[-12:]} is {len(os.fsencode(name))} bytes long, "
                          f"above the {longest} a file name may have here ({NAME_MAX} less the temporary "
                          "name's prefix)")
    if not volume_name(name) or name.startswith("."):
        raise ConfigError(f"phantom file name {name!r} needs a name before its suffix, not starting with '.' "
                          "(hidden files are skipped when a folder of volumes is listed)")


def _prepare_output(path: Path) -> None:
    """Check, before any work, that ``path`` can be written (:func:`lsmseg.io.atomic.prepare_output`,
    which makes its folder), naming a file that stands where one of its folders should be."""
    from ..io import FORMATS, mask_format_for
    from ..io.atomic import prepare_output

    folder = path.parent
    blocker = next((p for p in (folder, *folder.parents) if p.exists() or p.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        raise OutputError(blocker, f"is a file, not a folder; cannot write {folder} in it")
    prepare_output(path, FORMATS[mask_format_for(path)].writes_folder)


def phantom_name(kind: str, seed: int) -> str:
    """Base name shared by a phantom's image and label files: ``<kind>_<seed>``."""
    return f"{kind}_{int(seed)}"


def write_phantom(
    out_dir: str | Path,
    kind: str,
    shape: tuple[int, int, int],
    seed: int,
    fmt: str = "tif",
    spacing: Spacing = (3.0, 1.0, 1.0),
    settings: PhantomSettings | None = None,
    name: str | None = None,
) -> tuple[Path, Path]:
    """Write a phantom as ``out_dir/images/<kind>_<seed>.<fmt>`` and ``out_dir/labels/<kind>_<seed>.<fmt>``.

    Image and label share one file name (the challenge convention: a mask has its volume's name).
    Spacing is stored in the files. Both targets are checked before the phantom is built; the
    pair is written atomically (each file under a temporary name, both renamed into place only
    when both are complete), so a failure leaves neither. Returns ``(image_path, label_path)``.

    Args:
        out_dir: the folder holding ``images/`` and ``labels/``.
        kind, shape, seed, spacing, settings: as for :func:`make_phantom`.
        fmt: any suffix the I/O registry writes (``tif``, ``nii.gz``, ``mha``, ``nrrd``, ``zarr``).
        name: a file name with such a suffix, instead of ``<kind>_<seed>.<fmt>``.

    Raises:
        ConfigError: a bad argument (:func:`check_phantom_arguments`, :func:`check_phantom_name`).
        OutputError: a target that cannot be written (checked before any work).
    """
    from ..io import FORMATS, atomic_output, mask_format_for

    check_phantom_arguments(kind, shape, seed, spacing)
    name = name or f"{phantom_name(kind, seed)}.{fmt.lstrip('.')}"
    check_phantom_name(name)
    out_dir = Path(out_dir)
    image_path, label_path = out_dir / "images" / name, out_dir / "labels" / name
    # The folders this call makes, deepest first: a failure takes them away again (left empty).
    made = sorted({p for f in (image_path.parent, label_path.parent) for p in (f, *f.parents)
                   if not (p.exists() or p.is_symlink())}, key=lambda p: len(p.parts), reverse=True)
    try:
        for path in (image_path, label_path):
            _prepare_output(path)
        phantom = make_phantom(kind, shape, seed, spacing=spacing, settings=settings)
        writer = FORMATS[mask_format_for(image_path)]
        # One block for both: the label is renamed into place first, then the image; a failure in
        # either write removes both temporaries, so no image is left without its label.
        with (atomic_output(image_path, folder=writer.writes_folder) as image_tmp,
              atomic_output(label_path, folder=writer.writes_folder) as label_tmp):
            writer.write(phantom.image, image_tmp, spacing=phantom.spacing)
            writer.write(phantom.label, label_tmp, spacing=phantom.spacing)
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()  # only if empty
            except OSError:
                pass
        raise
    logger.debug("phantom %s %s seed %d -> %s", kind, "x".join(map(str, phantom.image.shape)), seed, image_path)
    return image_path, label_path


# --------------------------------------------------------------------------------------------
# Geometry helpers


class _Space:
    """The voxel grid in physical units; voxel i along an axis sits at i * spacing."""

    def __init__(self, shape: tuple[int, int, int], spacing: Spacing):
        self.shape = shape
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.extent = np.asarray(shape) * self.spacing
        self.voxel_volume = float(np.prod(self.spacing))

    def axis(self, d: int) -> np.ndarray:
        return np.arange(self.shape[d]) * self.spacing[d]

    def sigma_voxels(self, sigma_um) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.broadcast_to(sigma_um, 3) / self.spacing)

    def nearest(self, points_um: np.ndarray) -> np.ndarray:
        return np.rint(points_um / self.spacing).astype(np.int64)

    def nearest_within(self, points_um: np.ndarray) -> np.ndarray:
        """:meth:`nearest`, clipped into the volume."""
        return np.clip(self.nearest(points_um), 0, np.asarray(self.shape) - 1)

    def inside(self, idx: np.ndarray) -> np.ndarray:
        return np.all((idx >= 0) & (idx < np.asarray(self.shape)), axis=-1)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    return _rotation(rng.standard_normal((3, 3)))


def _rotation(normals: np.ndarray) -> np.ndarray:
    """The uniformly random rotation made from standard normal (..., 3, 3) matrices (one or a stack)."""
    q, r = np.linalg.qr(normals)
    return q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]


def _standardise(a: np.ndarray) -> np.ndarray:
    a = a - a.mean()
    return a / max(float(a.std()), 1e-12)


def _fine_noise(rng: np.random.Generator, space: _Space, scale_um: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field with correlation length ``scale_um``."""
    noise = rng.standard_normal(space.shape, dtype=np.float32)
    return _standardise(ndimage.gaussian_filter(noise, space.sigma_voxels(scale_um), mode="wrap"))


def _coarse_noise(rng: np.random.Generator, space: _Space, scale_um: float) -> np.ndarray:
    """Like ``_fine_noise`` for large scales: a sum of Gaussians on a coarse lattice (separable, cheap)."""
    step = scale_um / 1.5
    weights = []
    for d in range(3):
        centres = np.arange(-2 * scale_um, space.extent[d] + 2 * scale_um + step, step)
        w = np.exp(-0.5 * ((space.axis(d)[:, None] - centres[None, :]) / scale_um) ** 2)
        weights.append(w.astype(np.float32))
    coarse = rng.standard_normal(tuple(w.shape[1] for w in weights), dtype=np.float32)
    out = coarse @ weights[2].T  # (cz, cy, X)
    out = np.einsum("jb,abk->ajk", weights[1], out)  # (cz, Y, X)
    out = np.tensordot(weights[0], out, axes=(1, 0))  # (Z, Y, X)
    return _standardise(out)


def _tissue_mask(rng: np.random.Generator, space: _Space) -> np.ndarray:
    """An irregular organ: a perturbed ellipsoid covering roughly 35-45% of the volume (34-46% over 20 seeds)."""
    centre = space.extent * (0.5 + rng.uniform(-0.06, 0.06, 3))
    semi = space.extent * np.array([0.62, 0.40, 0.40]) * rng.uniform(0.9, 1.1, 3)
    rot = _random_rotation(rng) if rng.random() < 0.5 else np.eye(3)
    # Only rotate within the y-x plane: a tilted organ in z would look like an odd crop.
    rot[0, :], rot[:, 0] = 0.0, 0.0
    rot[0, 0] = 1.0
    if rot[1:, 1:].any():
        angle = rng.uniform(0, np.pi)
        rot[1:, 1:] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    z, y, x = (space.axis(d) - centre[d] for d in range(3))
    u1 = rot[1, 1] * y[:, None] + rot[1, 2] * x[None, :]
    u2 = rot[2, 1] * y[:, None] + rot[2, 2] * x[None, :]
    rho2 = (z[:, None, None] / semi[0]) ** 2 + (u1 / semi[1])[None] ** 2 + (u2 / semi[2])[None] ** 2
    lobes = _coarse_noise(rng, space, scale_um=0.25 * float(np.min(space.extent[1:])))
    return np.sqrt(rho2) < 1.0 + 0.12 * lobes


def _random_points_in(
    rng: np.random.Generator, space: _Space, mask: np.ndarray, n: int, flat: np.ndarray | None = None
) -> np.ndarray:
    """``n`` uniformly random points (µm) inside ``mask``; ``flat``: its ``np.flatnonzero``, for a caller
    that draws one point at a time (finding the mask's voxels costs more than a point)."""
    flat = np.flatnonzero(mask) if flat is None else flat
    picks = flat[rng.integers(0, flat.size, n)]
    idx = np.stack(np.unravel_index(picks, space.shape), axis=-1)
    return (idx + rng.uniform(-0.5, 0.5, (n, 3))) * space.spacing


def _paint_balls(
    label: np.ndarray, signal: np.ndarray, space: _Space, centres: np.ndarray, radii: np.ndarray, values: np.ndarray
) -> None:
    """Rasterise balls (µm): every voxel centre within a radius, plus each centre's nearest voxel.

    The nearest voxel keeps sub-voxel vessels connected (a 1 µm capillary is thinner than a 3 µm
    z step). Balls are grouped by radius so that each group is one vectorised scatter.
    """
    near = space.nearest(centres)
    bins = np.ceil(radii / 0.5).astype(np.int64)
    for b in np.unique(bins):
        sel = np.flatnonzero(bins == b)
        r_max = b * 0.5
        reach = np.ceil(r_max / space.spacing).astype(int) + 1
        grid = np.stack(np.meshgrid(*(np.arange(-k, k + 1) for k in reach), indexing="ij"), -1).reshape(-1, 3)
        keep = np.linalg.norm(grid * space.spacing, axis=1) <= r_max + 0.5 * np.linalg.norm(space.spacing)
        offsets = grid[keep]
        chunk = max(1, 2_000_000 // len(offsets))
        for start in range(0, sel.size, chunk):
            s = sel[start : start + chunk]
            cand = near[s, None, :] + offsets[None]  # (n, m, 3)
            d2 = np.sum((cand * space.spacing - centres[s, None, :]) ** 2, axis=-1)
            hit = (d2 <= radii[s, None] ** 2) | np.all(offsets == 0, axis=-1)[None]
            hit &= space.inside(cand)
            idx = cand[hit]
            vals = np.broadcast_to(values[s, None], hit.shape)[hit]
            label[idx[:, 0], idx[:, 1], idx[:, 2]] = True
            signal[idx[:, 0], idx[:, 1], idx[:, 2]] = vals


def _blob_reach(semi: np.ndarray, amplitude: float) -> np.ndarray:
    """How far (µm) from its centre a blob of semi-axes ``semi`` (last axis) may paint, its surface
    pushed out by up to ``amplitude`` of roughness."""
    return semi.max(axis=-1) * (1.0 + 2.5 * amplitude) + 0.5


def _blob_box(space: _Space, centres: np.ndarray, reach) -> tuple[np.ndarray, np.ndarray]:
    """The voxel box ``[lo, hi)`` around each centre (last axis z, y, x) that ``reach`` µm covers, within the volume."""
    reach = np.asarray(reach)[..., None]
    lo = np.maximum(np.floor((centres - reach) / space.spacing).astype(int), 0)
    hi = np.minimum(np.ceil((centres + reach) / space.spacing).astype(int) + 1, np.asarray(space.shape))
    return lo, hi


def _blob_shading(value, rho: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """A blob's brightness at body radius ``rho``: a brighter core, a dimmer rim, and a grainy interior
    (chromatin, granules)."""
    return value * (1.15 - 0.3 * np.clip(rho, 0, 1) ** 2) * (1.0 + 0.15 * texture)


def _paint_blob(
    label: np.ndarray,
    signal: np.ndarray,
    space: _Space,
    centre: np.ndarray,
    semi: np.ndarray,
    rot: np.ndarray,
    roughness: np.ndarray,
    amplitude: float,
    value: float,
    texture: np.ndarray,
) -> None:
    """Rasterise a rotated ellipsoid whose surface is pushed in and out by a smooth noise field."""
    lo, hi = _blob_box(space, centre, float(_blob_reach(semi, amplitude)))
    if np.any(hi <= lo):
        return
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    rel = [np.arange(a, b) * s - c for a, b, s, c in zip(lo, hi, space.spacing, centre)]
    grid = np.stack(np.meshgrid(*rel, indexing="ij"), -1)  # (dz, dy, dx, 3) µm
    u = grid @ rot  # body coordinates
    rho = np.sqrt(np.sum((u / semi) ** 2, axis=-1))
    inside = rho <= 1.0 + amplitude * roughness[box]
    nearest = tuple(space.nearest_within(centre))
    label[box] |= inside
    values = _blob_shading(value, rho, texture[box])
    signal[box] = np.where(inside, values, signal[box])
    label[nearest] = True
    signal[nearest] = max(signal[nearest], value)


def _paint_blobs(
    label: np.ndarray,
    signal: np.ndarray,
    space: _Space,
    blobs: list[tuple[np.ndarray, np.ndarray, np.ndarray, float]],
    roughness: np.ndarray,
    amplitude: float,
    texture: np.ndarray,
) -> None:
    """:func:`_paint_blob` for each ``(centre, semi, normals, value)`` in order (normals: the 3x3 standard
    normal draws its rotation is made from), with the same result as painting them one by one.

    At a coarse spacing a blob is a voxel or two and blobs are many: those whose box reaches less than
    two voxels from the centre on every axis are painted in vectorised runs (per-blob Python work would
    cost more than the volume). At the default spacing every blob is wider, so that path never runs there.
    """
    if not blobs:
        return
    centres, semis, normals = (np.array([b[i] for b in blobs], dtype=np.float64) for i in range(3))
    values = np.array([b[3] for b in blobs], dtype=np.float64)
    reach = _blob_reach(semis, amplitude)
    small = np.all(reach[:, None] < 2.0 * space.spacing, axis=1)
    start = 0
    for i in [*np.flatnonzero(~small), len(blobs)]:
        # Runs of small blobs in order, each large one in its turn: painting order decides overlaps.
        run = np.arange(start, i)
        chunk = 2_000_000 // 216  # at most 6x6x6 candidate voxels a small blob
        for k in range(0, run.size, chunk):
            s = run[k : k + chunk]
            _paint_small_blobs(label, signal, space, centres[s], semis[s], _rotation(normals[s]), reach[s],
                               roughness, amplitude, values[s], texture)
        if i < len(blobs):
            _paint_blob(label, signal, space, centres[i], semis[i], _rotation(normals[i]), roughness, amplitude,
                        blobs[i][3], texture)
        start = i + 1


def _paint_small_blobs(label, signal, space: _Space, centres, semis, rots, reach, roughness, amplitude, values,
                       texture) -> None:
    """:func:`_paint_blob` for a run of blobs (arrays, one row each) at once, painted as if in order."""
    shape = np.asarray(space.shape)
    lo, hi = _blob_box(space, centres, reach)
    keep = np.all(hi > lo, axis=1)  # a box wholly outside the volume paints nothing, not even its centre
    if not keep.any():
        return
    centres, semis, rots, values, lo, hi = (a[keep] for a in (centres, semis, rots, values, lo, hi))
    size = (hi - lo).max(axis=0)
    offsets = np.stack(np.meshgrid(*(np.arange(k) for k in size), indexing="ij"), -1).reshape(-1, 3)
    cand = lo[:, None, :] + offsets[None]  # (blobs, voxels, 3)
    inbox = np.all(cand < hi[:, None, :], axis=-1)
    cand = np.minimum(cand, shape - 1)  # the voxels past a box are masked out below
    u = np.matmul(cand * space.spacing - centres[:, None, :], rots)  # body coordinates
    rho = np.sqrt(np.sum((u / semis[:, None, :]) ** 2, axis=-1))
    at = tuple(cand[..., d] for d in range(3))
    inside = inbox & (rho <= 1.0 + amplitude * roughness[at])
    inner = _blob_shading(values[:, None], rho, texture[at])
    order = np.broadcast_to(np.arange(len(values))[:, None], inside.shape)
    flat, blob, inner = np.ravel_multi_index(tuple(a[inside] for a in at), space.shape), order[inside], inner[inside]
    near = np.ravel_multi_index(tuple(space.nearest_within(centres).T), space.shape)
    # One by one, a voxel ends with the value of the last blob containing it (or what it had), raised
    # to the value of any blob from that one on whose centre is nearest to it.
    voxels, where = np.unique(np.concatenate([flat, near]), return_inverse=True)
    last = np.full(voxels.size, -1)
    np.maximum.at(last, where[: flat.size], blob)
    result = signal.flat[voxels].astype(np.float64)
    won = blob == last[where[: flat.size]]
    result[where[: flat.size][won]] = inner[won]
    later = np.arange(len(values)) >= last[where[flat.size :]]
    np.maximum.at(result, where[flat.size :][later], values[later])
    label.flat[voxels] = True
    signal.flat[voxels] = result


def _place_separated(
    rng: np.random.Generator, space: _Space, tissue: np.ndarray, radii: np.ndarray, min_gap: float
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy random placement in tissue: centres at least ``min_gap * (r_i + r_j)`` apart.

    Candidates are taken in order, each unless it is too close to one taken before it. That choice is
    made in rounds over all candidates at once (their number grows with the volume): a candidate is
    decided once every earlier one it is too close to is.
    """
    centres = _random_points_in(rng, space, tissue, radii.size)
    r_max = float(radii.max()) if radii.size else 0.0
    pairs = cKDTree(centres).query_pairs(min_gap * 2 * r_max * (1 + 1e-9), output_type="ndarray")  # i < j
    first, second = pairs.reshape(-1, 2).T.astype(np.int64)
    dist = np.linalg.norm(centres[second] - centres[first], axis=1)
    clash = dist < min_gap * (radii[first] + radii[second])
    first, second = first[clash], second[clash]
    state = np.zeros(radii.size, np.int8)  # 0 undecided, 1 taken, -1 left out
    while not state.all():
        blocked = np.zeros(radii.size, bool)
        blocked[second[state[first] == 1]] = True
        waiting = np.zeros(radii.size, bool)
        waiting[second[state[first] == 0]] = True
        undecided = state == 0
        state[undecided & blocked] = -1
        state[undecided & ~blocked & ~waiting] = 1
    idx = np.flatnonzero(state == 1)
    return centres[idx], radii[idx]


def _tissue_volume(space: _Space, tissue: np.ndarray) -> float:
    return float(tissue.sum()) * space.voxel_volume


# --------------------------------------------------------------------------------------------
# Structures. Each returns (label bool, signal float32 in units of tissue brightness, extra
# unlabelled signal float32 or None).


# Vessel directions lean into the y-x plane: in thin light-sheet stacks most vessels run in-plane.
_IN_PLANE = np.array([0.4, 1.0, 1.0])


def _vessels(rng, space: _Space, tissue: np.ndarray, fraction: float | None):
    """Branching vessel trees: persistent random-walk centre lines that taper and bifurcate."""
    fraction = fraction if fraction is not None else rng.uniform(0.04, 0.08)
    target = fraction * _tissue_volume(space, tissue)
    r_min = 0.7  # µm: capillaries thinner than one z step
    # A centre line paints its nearest voxels, about a voxel's cross-section all along: counting a
    # vessel at least that thick keeps the number of trees (and the label fraction) bounded at a coarse
    # spacing. Below r_min at the default spacing (0.56 µm), so nothing changes there.
    r_count = max(0.5, float(np.sqrt(space.voxel_volume / space.spacing.max() / np.pi)))
    points, radii, values = [], [], []
    volume = 0.0
    shape = np.asarray(space.shape)
    trees = 0
    in_tissue = np.flatnonzero(tissue)
    while volume < target and trees < 2000:
        trees += 1
        start = _random_points_in(rng, space, tissue, 1, in_tissue)[0]
        r0 = float(np.clip(rng.lognormal(np.log(2.2), 0.4), 1.0, 6.0))
        brightness = rng.uniform(2.0, 6.0)
        queue = [(start, _unit(rng.standard_normal(3) * _IN_PLANE), r0, brightness)]
        segments = 0
        while queue and segments < 24 and volume < target:
            pos, direction, r, bright = queue.pop()
            segments += 1
            length = rng.exponential(60.0) + 10.0
            step = float(np.clip(0.4 * r, 0.4, 1.5))
            n = max(2, int(length / step))
            wander = rng.normal(0.0, 0.12 * np.sqrt(step), (n, 3)) * _IN_PLANE
            dirs = _unit(direction + np.cumsum(wander, axis=0))
            path = pos + np.cumsum(dirs * step, axis=0)
            taper = np.exp(-np.arange(1, n + 1) * step / rng.uniform(150.0, 400.0))
            rad = r * taper
            idx = space.nearest(path)
            ok = np.all((idx >= 0) & (idx < shape), axis=1)
            ok[ok] = tissue[tuple(idx[ok].T)]
            ok &= rad >= r_min
            stop = n if ok.all() else int(np.argmin(ok))
            if stop == 0:
                continue
            path, rad, dirs = path[:stop], rad[:stop], dirs[:stop]
            # Brightness drifts along a vessel (uneven staining).
            drift = 1.0 + 0.15 * np.sin(np.arange(stop) * step / rng.uniform(15, 40) + rng.uniform(0, 6.3))
            points.append(path)
            radii.append(rad)
            values.append(bright * drift)
            volume += float(np.sum(np.pi * np.maximum(rad, r_count) ** 2 * step))
            if stop < n:
                continue  # left the tissue or got too thin
            r_end = float(rad[-1])
            for _ in range(2):  # bifurcation (Murray-like: children thinner than the parent)
                child_r = r_end * rng.uniform(0.6, 0.85)
                if child_r < r_min:
                    continue
                axis = _unit(np.cross(dirs[-1], rng.standard_normal(3)))
                angle = np.deg2rad(rng.uniform(20, 70))
                child_dir = _unit((np.cos(angle) * dirs[-1] + np.sin(angle) * axis) * _IN_PLANE)
                queue.append((path[-1], child_dir, child_r, bright * rng.uniform(0.8, 1.1)))
    label = np.zeros(space.shape, bool)
    signal = np.zeros(space.shape, np.float32)
    if points:
        values = np.concatenate(values).astype(np.float32)
        _paint_balls(label, signal, space, np.concatenate(points), np.concatenate(radii), values)
    return label, signal, None


def _blobs(rng, space, tissue, fraction, *, radius_mu, radius_sigma, radius_range, elongation, amplitude,
           roughness_um, brightness, min_gap):
    """Place separated blobs (lognormal radii, µm) in tissue until ``fraction`` of it is covered."""
    target = fraction * _tissue_volume(space, tissue)
    mean_volume = 4.0 / 3.0 * np.pi * np.exp(3 * np.log(radius_mu) + 4.5 * radius_sigma**2)
    # A blob paints at least the voxel its centre is in: at a spacing coarser than the blobs each one
    # counts a voxel, so their number follows the voxels, not the physical volume (the label keeps its
    # fraction). At the default spacing every blob is larger than a voxel, so nothing changes there.
    n = int(np.ceil(1.5 * target / max(mean_volume, space.voxel_volume))) + 1
    radii = np.clip(rng.lognormal(np.log(radius_mu), radius_sigma, n), *radius_range)
    centres, radii = _place_separated(rng, space, tissue, radii, min_gap)
    roughness = _fine_noise(rng, space, roughness_um)
    texture = _fine_noise(rng, space, 0.8)
    label = np.zeros(space.shape, bool)
    signal = np.zeros(space.shape, np.float32)
    blobs = []  # (centre, semi, rotation normals, brightness), drawn in the order they are painted
    volume = 0.0
    for centre, r in zip(centres, radii):
        if volume >= target:
            break
        semi = r * rng.uniform(1.0 - elongation, 1.0 + elongation, 3)
        blobs.append((centre, semi, rng.standard_normal((3, 3)), rng.uniform(*brightness)))
        volume += max(4.0 / 3.0 * np.pi * math.prod(semi), space.voxel_volume)  # math.prod: cheaper, same
    _paint_blobs(label, signal, space, blobs, roughness, amplitude, texture)
    return label, signal


def _cells(rng, space, tissue, fraction):
    """Irregular cell bodies of varied size and brightness, sparse.

    Centres keep apart (``min_gap``) but rough, elongated bodies still touch: in the binary label some
    cells join into one connected component (seed 0 at 48x160x160: 72 cells, 59 components).
    """
    fraction = fraction if fraction is not None else rng.uniform(0.04, 0.09)
    label, signal = _blobs(rng, space, tissue, fraction, radius_mu=5.5, radius_sigma=0.3, radius_range=(3.0, 12.0),
                           elongation=0.3, amplitude=0.3, roughness_um=2.5, brightness=(1.5, 5.0), min_gap=0.9)
    return label, signal, None


def _nuclei(rng, space, tissue, fraction):
    """Small, dense, roughly ellipsoidal nuclei, many touching.

    Centres keep ``min_gap`` apart, but elongated bodies overlap: in the binary label most nuclei join
    others into clusters (seed 0 at 48x160x160: 1584 nuclei, 479 26-connected components, the largest
    holding 131), so PQ over connected components scores clusters, not nuclei. The separated placement
    also caps the labelled fraction near 0.17 of the tissue, below the upper part of the range drawn here.
    """
    fraction = fraction if fraction is not None else rng.uniform(0.15, 0.28)
    label, signal = _blobs(rng, space, tissue, fraction, radius_mu=3.2, radius_sigma=0.15, radius_range=(2.2, 5.0),
                           elongation=0.2, amplitude=0.08, roughness_um=1.5, brightness=(1.5, 4.0), min_gap=0.95)
    return label, signal, None


def _plaques(rng, space, tissue, fraction):
    """Compact, very bright, irregular deposits with a diffuse unlabelled halo."""
    fraction = fraction if fraction is not None else rng.uniform(0.01, 0.025)
    target = fraction * _tissue_volume(space, tissue)
    roughness = _fine_noise(rng, space, 2.0)
    texture = _fine_noise(rng, space, 0.8)
    label = np.zeros(space.shape, bool)
    signal = np.zeros(space.shape, np.float32)
    halo_seed = np.zeros(space.shape, np.float32)

    lumps = []  # (centre, semi, rotation normals, brightness), painted in this order

    def lump(c, semi, value):
        """One lump to paint, and its share of the halo seeded at its centre (brightness x volume)."""
        lumps.append((c, semi, rng.standard_normal((3, 3)), value))
        idx = tuple(space.nearest_within(c))
        halo_seed[idx] += value * float(np.prod(semi)) / space.voxel_volume

    volume = 0.0
    in_tissue = np.flatnonzero(tissue)
    for _ in range(2000):
        if volume >= target:
            break
        centre = _random_points_in(rng, space, tissue, 1, in_tissue)[0]
        r0 = float(np.clip(rng.lognormal(np.log(5.0), 0.4), 2.5, 12.0))
        value = rng.uniform(4.0, 9.0)
        for _ in range(rng.integers(1, 5)):  # a plaque is a cluster of lumps
            c = centre + rng.normal(0, 0.5 * r0, 3)
            semi = r0 * rng.uniform(0.5, 1.0, 3)
            lump(c, semi, value)
            # At least a voxel each, as for _blobs: their number follows the voxels at a coarse spacing.
            volume += max(4.0 / 3.0 * np.pi * float(np.prod(semi)), space.voxel_volume)
    _paint_blobs(label, signal, space, lumps, roughness, 0.35, texture)
    if target > 0 and not (label & tissue).any():
        # In a tiny volume every lump may fall outside it (or outside the tissue), leaving a label
        # without foreground that training refuses: one lump at a point in the tissue (only then,
        # so that other phantoms stay as they were).
        c = _random_points_in(rng, space, tissue, 1)[0]
        semi, value = 5.0 * rng.uniform(0.5, 1.0, 3), rng.uniform(4.0, 9.0)
        lumps.clear()
        lump(c, semi, value)
        _paint_blobs(label, signal, space, lumps, roughness, 0.35, texture)
    # Fibrillar halo: a wide, faint glow around each plaque, not part of the label.
    halo = ndimage.gaussian_filter(halo_seed, space.sigma_voxels(8.0), mode="constant") * 0.35
    return label, signal, halo


_STRUCTURES = {"vessels": _vessels, "cells": _cells, "nuclei": _nuclei, "plaques": _plaques}


# --------------------------------------------------------------------------------------------
# Image formation


def _speckles(rng, space: _Space, tissue: np.ndarray) -> np.ndarray:
    """Unlabelled autofluorescent debris (lipofuscin-like): sparse, bright, sub-cellular dots."""
    speckles = np.zeros(space.shape, np.float32)
    n = int(_tissue_volume(space, tissue) / 3000.0)
    if n:
        idx = space.nearest(_random_points_in(rng, space, tissue, n))
        idx = np.clip(idx, 0, np.asarray(space.shape) - 1)
        speckles[tuple(idx.T)] = rng.uniform(2.0, 8.0, n)
    return ndimage.gaussian_filter(speckles, space.sigma_voxels(0.6), mode="constant")


def _stripes(rng, space: _Space) -> np.ndarray:
    """Light-sheet shadows: an absorber casts a dark stripe that runs along x from where it sits."""
    field = np.ones(space.shape, np.float32)
    n = rng.poisson(space.extent[1] / 10.0)
    x = space.axis(2)
    z_all = space.axis(0)
    for _ in range(n):
        y0 = rng.uniform(0, space.extent[1])
        width = rng.uniform(0.8, 4.0)
        z0 = rng.uniform(0, space.extent[0])
        depth_um = rng.uniform(10.0, 60.0)
        strength = rng.uniform(0.1, 0.55) * (1 if rng.random() < 0.85 else -0.5)  # a few bright streaks
        x0 = rng.uniform(-0.2, 0.7) * space.extent[2]
        ys = slice(max(0, int((y0 - 3 * width) / space.spacing[1])),
                   min(space.shape[1], int((y0 + 3 * width) / space.spacing[1]) + 2))
        zs = slice(max(0, int((z0 - 2.5 * depth_um) / space.spacing[0])),
                   min(space.shape[0], int((z0 + 2.5 * depth_um) / space.spacing[0]) + 2))
        gy = np.exp(-0.5 * ((space.axis(1)[ys] - y0) / width) ** 2)
        gz = np.exp(-0.5 * ((z_all[zs] - z0) / depth_um) ** 2)
        # The shadow fades in behind the absorber and slowly out as scattered light refills it.
        with np.errstate(over="ignore"):  # far before x0 (a coarse spacing) exp overflows: 1 / (1 + inf) = 0, as meant
            gx = 1.0 / (1.0 + np.exp(-(x - x0) / 3.0)) * np.exp(-np.maximum(x - x0, 0) / rng.uniform(200, 800))
        field[zs, ys, :] *= (1.0 - strength * gz[:, None, None] * gy[None, :, None] * gx[None, None, :]).astype(
            np.float32
        )
    return field


def _render(rng, space: _Space, tissue: np.ndarray, signal: np.ndarray, extra, settings: PhantomSettings) -> np.ndarray:
    photons_per_unit = settings.tissue_photons * rng.uniform(0.6, 1.6)
    tissue_f = tissue.astype(np.float32)
    soft = ndimage.gaussian_filter(tissue_f, space.sigma_voxels(1.5), mode="nearest")
    # Autofluorescence: cell-scale grain, mid-scale anatomy, large-scale regional differences.
    texture = (
        0.5 * _fine_noise(rng, space, 1.5)
        + 0.6 * _fine_noise(rng, space, 6.0)
        + 0.6 * _coarse_noise(rng, space, 40.0)
    )
    autofluorescence = np.clip(1.0 + 0.22 * texture, 0.3, None)
    # Cleared tissue glows at its cut surface; the rim fades over ~10 µm.
    inner = ndimage.gaussian_filter(tissue_f, space.sigma_voxels(8.0), mode="nearest")
    rim = rng.uniform(0.3, 1.0) * np.clip(tissue_f - inner, 0.0, None) * 2.0
    emitted = soft * autofluorescence + tissue_f * rim + signal + _speckles(rng, space, tissue)
    if extra is not None:
        emitted += extra * soft
    if settings.attenuation:
        # Detection through tissue above (z) and excitation through tissue from the sheet side (x).
        depth_z = np.cumsum(tissue, axis=0, dtype=np.float32) * space.spacing[0]
        depth_x = np.cumsum(tissue, axis=2, dtype=np.float32) * space.spacing[2]
        emitted *= np.exp(-depth_z / rng.uniform(200.0, 500.0) - depth_x / rng.uniform(400.0, 1000.0))
    if settings.stripes:
        emitted *= _stripes(rng, space)
        # Plane-to-plane flicker of the laser power.
        emitted *= (1.0 + rng.normal(0.0, 0.03, space.shape[0])).astype(np.float32)[:, None, None]
    sigma = (settings.axial_psf_um * rng.uniform(0.85, 1.15), settings.lateral_psf_um, settings.lateral_psf_um)
    blurred = ndimage.gaussian_filter(emitted.astype(np.float32), space.sigma_voxels(sigma), mode="nearest")
    # Stray light / out-of-focus haze around the sample, then the camera.
    photons = photons_per_unit * np.clip(blurred, 0.0, None) + rng.uniform(2.0, 6.0)
    gain = settings.counts_per_photon
    if settings.noise:
        counts = gain * rng.poisson(photons).astype(np.float32)
        counts += rng.normal(0.0, settings.read_noise_counts, space.shape).astype(np.float32)
    else:
        counts = gain * photons
    counts += settings.camera_offset
    return np.clip(np.rint(counts), 0, np.iinfo(np.uint16).max).astype(np.uint16)


__all__ = [
    "BYTES_PER_VOXEL", "KINDS", "SPACING_RANGE_UM", "Phantom", "PhantomSettings", "available_memory",
    "check_phantom_arguments", "check_phantom_name", "make_phantom", "phantom_name", "write_phantom",
]
