"""Inference on CUDA: the same logits as the CPU, half-precision masks as good as fp32, blocks as one pass."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch

from lsmseg.inference import Predictor, RunOptions
from lsmseg.inference.predictor import logit
from lsmseg.io import read_volume
from lsmseg_evaluation.metrics import dice

pytestmark = pytest.mark.cuda

LOGIT_ATOL = 0.05  # fp32 on both sides; cuDNN may use TF32 on the GPU
MAX_FLIPPED = 1e-4  # share of voxels allowed to change side of the threshold between devices
DICE_BUDGET = 0.002  # issue 13: half-precision masks within this Dice (vs labels) of fp32's


@functools.cache
def shipped(gpu, device=None, precision="fp32", min_component_voxels=None, block_size=None,
            mirror_axes=(), split_touching=None) -> Predictor:
    """The shipped weights in PyTorch (no ONNX Runtime), with the stand-in's smaller window on the CPU; loaded once.

    One pass per window unless ``mirror_axes`` says otherwise (the manifest mirrors vessels: 8x the
    time on the CPU stand-in, where ``gpu_check.sh --dry-run`` must stay under 3 minutes)."""
    options = RunOptions(progress=False, block_size=block_size, prefetch=True if block_size else None)
    predictor = Predictor.from_manifest(device=device or gpu.device, precision=precision, engine="torch",
                                        options=options, min_component_voxels=min_component_voxels,
                                        mirror_axes=mirror_axes, split_touching=split_touching)
    predictor.model_config = dataclasses.replace(predictor.model_config, roi=gpu.roi(predictor.model_config.roi))
    return predictor


def load(gpu, path, shape=None) -> np.ndarray:
    return gpu.crop(read_volume(path).load(), shape)


def test_cuda_logits_match_the_cpu(gpu, sample_volumes):
    """Same weights, same windows: fp32 logits on the GPU equal the CPU's within tolerance."""
    image = load(gpu, sample_volumes[0][0])
    # The stand-in's "GPU" is the CPU: one predictor serves both sides there.
    on_cpu = shipped(gpu, device=None if gpu.stand_in else torch.device("cpu")).predict_logits(image)
    on_gpu = shipped(gpu).predict_logits(image)
    threshold = logit(shipped(gpu).settings.threshold)
    flipped = float(np.mean((on_cpu >= threshold) != (on_gpu >= threshold)))
    difference = float(np.abs(on_cpu - on_gpu).max())
    gpu.report("cpu_vs_cuda_logits", volume=sample_volumes[0][0].name, shape=image.shape,
               max_abs_difference=difference, flipped_share=flipped,
               tf32=bool(torch.backends.cudnn.allow_tf32))
    assert difference <= LOGIT_ATOL and flipped <= MAX_FLIPPED


def test_cuda_mirrored_logits_match_the_cpu(gpu, sample_volumes):
    """Test-time mirroring on the GPU (flips and averaging in device memory) equals the CPU's."""
    # 2x2 windows, not the whole volume: the CPU side runs 8 passes a window (on few threads: tests/conftest.py).
    image = load(gpu, sample_volumes[0][0])[:32, :96, :96]
    mirrored = shipped(gpu, mirror_axes=(0, 1, 2))
    on_cpu = shipped(gpu, device=None if gpu.stand_in else torch.device("cpu"), mirror_axes=(0, 1, 2))
    on_gpu = mirrored.predict_logits(image)
    difference = float(np.abs(on_cpu.predict_logits(image) - on_gpu).max())
    moved = float(np.abs(on_gpu - shipped(gpu).predict_logits(image)).max())  # mirroring did run
    gpu.report("cpu_vs_cuda_mirrored_logits", volume=sample_volumes[0][0].name, shape=image.shape,
               max_abs_difference=difference, mirroring_moved_logits_by=moved)
    assert difference <= LOGIT_ATOL and moved > 2 * LOGIT_ATOL


def _half_precision_against_fp32(gpu, volumes, precision):
    # The network's precision is the question: no post-processing (the watershed split and the
    # component removal need SimpleITK, which cannot travel beside the data pack these tests read).
    reference = shipped(gpu, split_touching=0.0, min_component_voxels=0)
    half = shipped(gpu, precision=precision, split_touching=0.0, min_component_voxels=0)
    worst = 0.0
    for image_path, label_path in volumes:
        image, label = load(gpu, image_path), load(gpu, label_path) != 0
        full_mask = reference.predict_volume(image, name=image_path.name)
        half_mask = half.predict_volume(image, name=image_path.name)
        full_dice, half_dice = dice(full_mask != 0, label), dice(half_mask != 0, label)
        agreement = dice(full_mask != 0, half_mask != 0)
        gpu.report("autocast_vs_fp32", precision=precision, volume=image_path.name, shape=image.shape,
                   dice_fp32=full_dice, dice_half=half_dice, mask_agreement=agreement)
        worst = max(worst, abs(half_dice - full_dice))
    assert worst <= DICE_BUDGET


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_autocast_masks_on_the_sample(gpu, sample_volumes, precision):
    if precision not in gpu.half_precisions:
        pytest.skip(f"{precision} autocast is not run on the CPU stand-in")
    _half_precision_against_fp32(gpu, sample_volumes[:1] if gpu.stand_in else sample_volumes, precision)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_autocast_masks_on_real_volumes(gpu, real_volumes, precision):
    if precision not in gpu.half_precisions:
        pytest.skip(f"{precision} autocast is not run on the CPU stand-in")
    _half_precision_against_fp32(gpu, real_volumes[:1] if gpu.stand_in else real_volumes, precision)


def test_auto_precision_is_bf16_where_supported(gpu, sample_volumes):
    """precision 'auto' autocasts to bf16 where the GPU has bf16 natively, else fp16 (the same logits)."""
    if gpu.stand_in:
        pytest.skip("'auto' is fp32 on the CPU")
    image = load(gpu, sample_volumes[0][0])
    expected = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    auto = shipped(gpu, precision="auto").predict_logits(image)
    explicit = shipped(gpu, precision=expected).predict_logits(image)
    gpu.report("auto_precision", chose=expected, max_abs_difference=float(np.abs(auto - explicit).max()))
    np.testing.assert_array_equal(auto, explicit)


def test_blockwise_on_cuda_equals_one_pass(gpu, sample_volumes, tmp_path):
    """Small blocks read from the file (prefetched in a thread) give the in-memory pass's logits and mask."""
    from lsmseg.inference import predict_file
    from lsmseg.io import write_volume

    image = load(gpu, sample_volumes[0][0])
    path = write_volume(image, tmp_path / "in" / "vessels.tif")
    # Small components are removed block by block (kept where cut by a block face), so compare without it.
    one_pass = shipped(gpu, min_component_voxels=0)
    blocks = shipped(gpu, min_component_voxels=0, block_size=(32, 32, 32) if gpu.stand_in else (24, 64, 64))
    # Named as the file: its structure's settings apply to both sides.
    whole = one_pass.predict_logits(image, name=path.name)
    pieces = blocks.predict_logits(image, name=path.name)
    difference = float(np.abs(whole - pieces).max())
    result = predict_file(blocks, path, tmp_path / "out" / "vessels.tif")
    written = read_volume(tmp_path / "out" / "vessels.tif").load()
    expected = one_pass.binary_mask(whole, settings=one_pass.settings_for(path.name))
    gpu.report("blockwise_vs_one_pass", shape=image.shape, blocks=result.record["blocks"]["blocks"],
               max_abs_difference=difference, mask_differences=int(np.count_nonzero(written != expected)))
    assert result.ok and result.record["blocks"]["blocks"] > 1
    assert difference <= 1e-3
    np.testing.assert_array_equal(written, expected)
