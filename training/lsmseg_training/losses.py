"""Fine-tuning losses on one-channel logits, counting labelled voxels only.

Patch labels hold 0 (background), 1 (foreground) and :data:`lsmseg_training.data.IGNORE`
(unlabelled voxels of sparse sets, e.g. TRAILMAP). With every voxel labelled,
:func:`dice_bce` equals MONAI's ``DiceCELoss(sigmoid=True)`` (a test checks this).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE

SMOOTH = 1e-5  # MONAI DiceLoss's smooth_nr and smooth_dr


def split_label(label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(target, valid)`` float masks from a patch label with unlabelled voxels coded IGNORE."""
    valid = (label != IGNORE).float()
    return (label == 1).float(), valid


def dice_bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
             dice_weight: float = 1.0, bce_weight: float = 1.0, batch_dice: bool = False) -> torch.Tensor:
    """Soft Dice (per sample, averaged; or over the whole batch) plus BCE, both over valid voxels only.

    Args:
        logits: (B, 1, Z, Y, X) network output.
        target: (B, 1, Z, Y, X) foreground in {0, 1}.
        valid: (B, 1, Z, Y, X) 1 where the voxel is labelled, 0 where it is not.
        dice_weight, bce_weight: weights of the two terms.
        batch_dice: one Dice over every voxel of the batch (MONAI ``DiceLoss(batch=True)``, nnU-Net's
            ``batch_dice``). Per sample, a patch without foreground scores ~1 whatever it predicts,
            so its false positives get no Dice gradient; over the batch they count.
    """
    probabilities = torch.sigmoid(logits)
    dims = tuple(range(0 if batch_dice else 2, logits.ndim))
    intersection = (probabilities * target * valid).sum(dims)
    denominator = (probabilities * valid).sum(dims) + (target * valid).sum(dims)
    dice = (1.0 - (2.0 * intersection + SMOOTH) / (denominator + SMOOTH)).mean()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    bce = (bce * valid).sum() / valid.sum().clamp_min(1.0)
    return dice_weight * dice + bce_weight * bce


def soft_skeleton(probabilities: torch.Tensor, iterations: int) -> torch.Tensor:
    """Differentiable skeleton by iterated soft erosion/opening (Shit et al., CVPR 2021)."""

    def erode(x):
        return -F.max_pool3d(-x, kernel_size=3, stride=1, padding=1)

    def dilate(x):
        return F.max_pool3d(x, kernel_size=3, stride=1, padding=1)

    skeleton = F.relu(probabilities - dilate(erode(probabilities)))
    x = probabilities
    for _ in range(iterations):
        x = erode(x)
        delta = F.relu(x - dilate(erode(x)))
        skeleton = skeleton + F.relu(delta - skeleton * delta)
    return skeleton


def soft_cldice(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, iterations: int,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """1 - soft clDice per sample, averaged with ``weights`` (B,) (e.g. 1 for tubular sets, 0 else).

    Topology precision = skeleton of the prediction inside the label; sensitivity = skeleton of the
    label inside the prediction. Unlabelled voxels are left out of both.
    """
    probabilities = torch.sigmoid(logits) * valid
    target = target * valid
    dims = tuple(range(1, logits.ndim))
    skel_pred = soft_skeleton(probabilities, iterations)
    skel_true = soft_skeleton(target, iterations)
    precision = ((skel_pred * target).sum(dims) + SMOOTH) / (skel_pred.sum(dims) + SMOOTH)
    sensitivity = ((skel_true * probabilities).sum(dims) + SMOOTH) / (skel_true.sum(dims) + SMOOTH)
    cldice = 2.0 * precision * sensitivity / (precision + sensitivity)
    loss = 1.0 - cldice
    if weights is None:
        return loss.mean()
    return (loss * weights).sum() / weights.sum().clamp_min(1.0)


__all__ = ["split_label", "dice_bce", "soft_skeleton", "soft_cldice"]
