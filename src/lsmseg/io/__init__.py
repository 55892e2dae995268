"""Volume I/O shared by inference, training and evaluation: one class per format family, one
registry, one atomic writer.

Every format maps a path to a :class:`Volume` (a 3-D array in z, y, x order, lazy where the format
allows, plus voxel spacing in micrometres) and writes a mask back *in the same container* as its
input, so that ``brain01.tif`` gives ``brain01.tif``, a folder of planes gives a folder of planes with
the same plane names, and ``x.nii.gz`` gives ``x.nii.gz`` with the input's spacing and orientation.

=============  ==========================================  ====================================
module         format family                               lazy reads
=============  ==========================================  ====================================
``tiff``       multi-page TIFF, ImageJ, OME-TIFF           tifffile's zarr view of the file
``planes``     a folder of 2-D TIFF planes                 tifffile's zarr view of the sequence
``sitk``       NIfTI, MHA/MHD, NRRD (SimpleITK)            no (read whole)
``zarr``       zarr arrays, OME-Zarr (NGFF 0.4 / 0.5)      zarr
=============  ==========================================  ====================================

``registry`` picks the class for a path; ``atomic`` writes every file under a hidden temporary name
and renames it into place when complete; ``volume`` holds what the formats share (the
:class:`Volume`, the size checks made before any pixel is read); ``paths`` names and places.
"""

from .atomic import (
    PARTIAL_PREFIX, atomic_output, partial_path, refuse_replacing_another_kind, remove_path, sweep_partials, write_bytes,
    write_json, write_text,
)
from .paths import (
    KNOWN_SUFFIXES, colliding_outputs, link_out_inside, natural_sorted, output_key, output_path_for, outside_folder,
    refuse_overwriting_inputs, same_file, volume_name,
)
from .registry import (
    FORMATS, detect_format, expand_inputs, list_volumes, mask_format_for, read_volume, remove_output, write_mask,
    write_mask_blocks, write_volume,
)
from .volume import (
    DEFAULT_MAX_VOXELS, ENV_MAX_VOXELS, Spacing, Volume, VolumeFormat, check_declared_size, check_output_space,
    default_max_voxels,
)
from .zarr import create_zarr_mask

__all__ = [
    "DEFAULT_MAX_VOXELS", "ENV_MAX_VOXELS", "FORMATS", "KNOWN_SUFFIXES", "PARTIAL_PREFIX", "Spacing", "Volume",
    "VolumeFormat", "atomic_output", "check_declared_size", "check_output_space", "colliding_outputs",
    "create_zarr_mask", "default_max_voxels", "detect_format", "expand_inputs", "list_volumes", "mask_format_for",
    "link_out_inside", "natural_sorted", "output_key", "output_path_for", "outside_folder", "partial_path", "read_volume",
    "refuse_overwriting_inputs", "refuse_replacing_another_kind", "remove_output", "remove_path", "same_file", "sweep_partials",
    "volume_name", "write_bytes", "write_json", "write_mask", "write_mask_blocks", "write_text", "write_volume",
]
