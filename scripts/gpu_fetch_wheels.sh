#!/usr/bin/env bash
# Wheels for the GPU machine (no network there): what lsmseg and the GPU check need beyond the
# packages its image has (/work/.library/device/KINDS.md: Python 3.12, torch, numpy, scipy,
# tifffile, pyyaml, tqdm, safetensors, einops, pytest, matplotlib, psutil, click, ... are there).
#   monai                                   the network
#   zarr, numcodecs, donfig, google-crc32c  lazy TIFF reads (tifffile's zarr view), zarr output
#   dask, distributed + tornado, zict, tblib, partd, locket   the dask check
#   lsmseg itself (a wheel of this tree)    only for its entry points (`lsmseg finetune`, `export`,
#                                           `phantom`); the code runs from the tree (PYTHONPATH)
# Left out on purpose: SimpleITK (52.8 MB, too big to travel: the exec-mode check skips on the
# device) and imagecodecs (26.5 MB: scripts/gpu_pack_data.py writes zlib TIFFs, which tifffile reads
# without it). Versions are the ones the tests pass with on the development machine.
#
#   scripts/gpu_fetch_wheels.sh [DEST]      # default .whl/ in the repository root (ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
rm -rf "$dest" && mkdir -p "$dest"
packages=(
  monai==1.6.1
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  dask==2026.8.0 distributed==2026.8.0 tornado==6.6.1 zict==3.0.0 tblib==3.2.2 partd==1.4.2 locket==1.0.0
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 \
         manylinux_2_5_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${packages[@]}"
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$dest" .
du -sh "$dest"
ls -1 "$dest"
