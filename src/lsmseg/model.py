"""The one model factory, used by training, export and inference."""

from __future__ import annotations

import torch

from .config import ModelConfig


def build_model(config: ModelConfig) -> torch.nn.Module:
    """A MONAI Swin UNETR for ``config`` (logits out; apply a sigmoid for probabilities)."""
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        feature_size=config.feature_size,
        depths=tuple(config.depths),
        num_heads=tuple(config.num_heads),
        use_v2=config.use_v2,
        dropout_path_rate=config.drop_path_rate,
        use_checkpoint=config.use_checkpoint,
        spatial_dims=3,
    )


def select_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when a GPU is visible, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
