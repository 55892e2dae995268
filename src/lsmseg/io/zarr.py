"""Zarr arrays and OME-Zarr images (NGFF 0.4 in zarr v2, 0.5 in zarr v3), read lazily.

A mask is a one-level OME-Zarr in the zarr version of its zarr input (else v3), whose NGFF
metadata keeps the input's units, scale and translation. Chunks of a mask written block by block
are regions of the array, so any writer (one process, or dask workers) writes whole chunks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from .volume import (
    LazyArray, Spacing, Volume, VolumeFormat, check_array_shape, check_declared_size, check_dtype, to_um,
)

MASK_CHUNKS = (64, 256, 256)


def _ngff_multiscales(attrs: dict) -> tuple[list | None, str | None]:
    """NGFF multiscales and version: 0.4 keeps them at the top, 0.5 (zarr v3) under ``ome``."""
    if isinstance(attrs.get("ome"), dict) and attrs["ome"].get("multiscales"):
        return attrs["ome"]["multiscales"], str(attrs["ome"].get("version", "0.5"))
    multiscales = attrs.get("multiscales")
    if multiscales:
        return multiscales, str(multiscales[0].get("version", "0.4"))
    return None, None


def _ngff_spatial(multiscale: dict) -> tuple[Spacing | None, dict]:
    """Spacing in micrometres, and the last three axes' units, scale and translation as stored."""
    axes = multiscale.get("axes") or [{"name": a, "type": "space"} for a in "zyx"]
    axes = [a if isinstance(a, dict) else {"name": str(a), "type": "space"} for a in axes][-3:]
    scale, translation = None, None
    for transform in multiscale["datasets"][0].get("coordinateTransformations", []):
        if transform.get("type") == "scale":
            scale = [float(v) for v in transform["scale"][-3:]]
        elif transform.get("type") == "translation":
            translation = [float(v) for v in transform["translation"][-3:]]
    spacing = None
    if scale is not None and len(scale) == 3:
        values = [to_um(v, a.get("unit", "micrometer")) for v, a in zip(scale, axes)]
        spacing = None if None in values else tuple(values)
    return spacing, {"axes": axes, "scale": scale, "translation": translation}  # type: ignore[return-value]


def _ngff_attrs(spacing: Spacing | None, like: Volume | None, zarr_format: int) -> dict:
    """NGFF multiscales for a one-level mask: the input's units, scale and translation when it was
    OME-Zarr, else micrometres; version 0.4 in a zarr v2 store, 0.5 (under ``ome``) in zarr v3."""
    ngff = like.meta.get("ngff") if like is not None and like.fmt == ZarrFormat.name else None
    if ngff and ngff.get("scale") and (spacing is None or spacing == like.spacing):
        axes, scale, translation = ngff["axes"], list(ngff["scale"]), ngff.get("translation")
    else:
        axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
        scale, translation = (list(spacing) if spacing is not None else [1.0, 1.0, 1.0]), None
    transforms = [{"type": "scale", "scale": scale}]
    if translation:
        transforms.append({"type": "translation", "translation": list(translation)})
    multiscale = {"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": transforms}], "name": "mask"}
    if zarr_format == 2:
        return {"multiscales": [{"version": "0.4", **multiscale}]}
    return {"ome": {"version": "0.5", "multiscales": [multiscale]}}


def create_zarr_mask(path: Path, shape, dtype, chunks, spacing: Spacing | None, like: Volume | None = None):
    """An empty one-level OME-Zarr whose array ``0`` blocks can be written into; return that array.

    The only place NGFF metadata is written: its version matches the zarr version written (0.4 for
    v2, 0.5 for v3; a zarr input's version, else v3) and it keeps an OME-Zarr input's units and
    translation.

    Args:
        path: the store's folder.
        shape: the mask's shape.
        dtype: the mask's dtype.
        chunks: chunk shape (capped at ``shape``); dask workers write one chunk per block.
        spacing: (z, y, x) in micrometres, or None.
        like: the input volume.
    """
    import zarr

    zarr_format = int(like.meta.get("zarr_format", 3)) if like is not None and like.fmt == ZarrFormat.name else 3
    chunks = tuple(max(1, min(int(s), int(c))) for s, c in zip(shape, chunks))
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    array = root.create_array("0", shape=tuple(shape), dtype=dtype, chunks=chunks, fill_value=0)
    root.attrs.update(_ngff_attrs(spacing, like, zarr_format))
    return array


class ZarrFormat(VolumeFormat):
    """A zarr array, or an OME-Zarr group (its first resolution level)."""

    name = "zarr"
    writes_folder = True

    def read(self, path: Path, *, lazy: bool = False, max_voxels: int | None = None) -> Volume:
        try:
            import zarr
        except ImportError as exc:
            raise InputError(path, "reading zarr needs the 'zarr' package, a core dependency of lsmseg: "
                                   "pip install 'zarr>=3'") from exc
        try:
            node = zarr.open(str(path), mode="r")
        except Exception as exc:
            raise InputError(path, f"cannot open zarr ({type(exc).__name__}: {exc})") from exc
        spacing, meta = None, {"zarr_format": int(getattr(getattr(node, "metadata", None), "zarr_format", 3) or 3)}
        if isinstance(node, zarr.Group):
            try:
                multiscales, version = _ngff_multiscales(dict(node.attrs))
                key = str(multiscales[0]["datasets"][0]["path"]) if multiscales else "0"
                if multiscales:
                    spacing, ngff = _ngff_spatial(multiscales[0])
                    meta["ngff"] = {**ngff, "version": version}
                array = node[key] if key in node else None
            except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
                raise InputError(path, f"malformed OME-Zarr metadata ({type(exc).__name__}: {exc})") from exc
            if not isinstance(array, zarr.Array):
                raise InputError(path, f"zarr group has no array '{key[:80]}' (not an OME-Zarr image)")
        else:
            array = node
        shape = tuple(array.shape)
        itemsize = np.dtype(array.dtype).itemsize
        check_declared_size(path, shape, itemsize, max_voxels, what="zarr array")
        # A chunk is decompressed whole: a chunk far larger than the array is an allocation bomb too.
        check_declared_size(path, tuple(array.chunks), itemsize, max_voxels, what="zarr chunk")
        kept_shape = shape
        if len(shape) > 3:  # leading axes of one element each leave (z, y, x), even a single plane (z=1)
            kept_shape = shape[-3:] if all(s == 1 for s in shape[:-3]) else tuple(s for s in shape if s != 1)
        check_array_shape(path, kept_shape)
        check_dtype(path, np.dtype(array.dtype))
        # Leading axes of a 4-D/5-D image (t, c) are taken at 0.
        index = (0,) * (len(shape) - 3) + (slice(None),) * 3
        data = LazyArray(array, path, "zarr chunk", index)
        return Volume(data=data if lazy else data[...], spacing=spacing, path=path, fmt=self.name, meta=meta)

    def write_blocks(self, blocks, path: Path, *, shape, dtype, like=None, spacing=None, chunks=MASK_CHUNKS) -> None:
        array = create_zarr_mask(path, shape, dtype, chunks, spacing, like=like)
        for index, block in blocks:
            array[index] = block
