#!/usr/bin/env bash
# Wheels for the GPU machine (no network there): what lsmseg and the GPU check need beyond the
# packages its image has (/work/.library/device/KINDS.md: Python 3.12, torch, numpy, scipy,
# tifffile, pyyaml, tqdm, safetensors, einops, pytest, matplotlib, psutil, click, ... are there).
#   monai                                   the network
#   zarr, numcodecs, donfig, google-crc32c  lazy TIFF reads (tifffile's zarr view), zarr output
#   dask, distributed + tornado, zict, tblib, partd, locket   the dask check
#   lsmseg itself (a wheel of this tree)    only for its entry points (`lsmseg finetune`, `export`,
#                                           `phantom`); the code runs from the tree (PYTHONPATH)
# Every wheel is then recompressed with LZMA (scripts/repack_wheels.py: pip installs it alike):
# 14.0 -> 11.5 MiB, which leaves the data pack more of the call's 64 MiB.
#
# --simpleitk: SimpleITK too (52.8 MB, 28.8 MB in LZMA; a few minutes to recompress here), for the
# exec-mode check, which writes output.mha with it; the dask stack (2.8 MiB) is then left out (its
# check skips) so that the tree (~26 MiB), these wheels (~36 MiB) and no data pack fit in 64 MiB.
# The call that carries it runs the checks that need no real data: the exec-mode test and the
# benchmark (docs/gpu_check.md). Left out always: imagecodecs (26.5 MB: scripts/gpu_pack_data.py
# writes zlib TIFFs, which tifffile reads without it). Versions are the ones the tests pass with on
# the development machine.
#
#   scripts/gpu_fetch_wheels.sh [--simpleitk] [DEST]   # default .whl/ in the repository root (ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
simpleitk=0
if [ "${1:-}" = "--simpleitk" ]; then simpleitk=1; shift; fi
dest="${1:-.whl}"
rm -rf "$dest" && mkdir -p "$dest"
packages=(
  monai==1.6.1
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
)
if [ "$simpleitk" = 1 ]; then
  packages+=(SimpleITK==2.5.7)
else
  packages+=(dask==2026.8.0 distributed==2026.8.0 tornado==6.6.1 zict==3.0.0 tblib==3.2.2 partd==1.4.2 locket==1.0.0)
fi
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 \
         manylinux_2_5_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${packages[@]}"
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$dest" .
python3 scripts/repack_wheels.py "$dest"
du -sh "$dest"
ls -1 "$dest"
