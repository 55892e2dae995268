"""The one model factory, used by training, export and inference."""

from __future__ import annotations

import torch

from .config import ModelConfig


def build_model(config: ModelConfig) -> torch.nn.Module:
    """A MONAI Swin UNETR for ``config`` (logits out; apply a sigmoid for probabilities).

    Args:
        config: channels, feature size, depths, heads, v2 blocks, drop-path rate, checkpointing.
    """
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
    """``device`` if given, else CUDA when a GPU is visible, else CPU.

    Raises :class:`~lsmseg.errors.ConfigError` (one line) for an unknown device or a CUDA device
    that is not there, instead of torch's assertion deep inside the first forward pass.
    """
    from .errors import ConfigError, single_line

    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"--device {device}: not a torch device ({single_line(exc)[:120]})") from exc
    if chosen.type not in ("cpu", "cuda"):
        # torch names more (meta, mps, xpu, ...): meta runs without data, the others are not built in
        # or not supported here; each failed later with a traceback or on every volume.
        raise ConfigError(f"--device {device}: not supported (expected cpu, cuda or cuda:N)")
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA GPU is visible (use --device cpu, or run with a GPU)")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return chosen


def autocast_dtype(precision: str = "auto") -> torch.dtype:
    """The autocast dtype for ``precision`` (``"auto"``: a CUDA rule; ``"bf16"``, ``"fp16"``), for inference and training.

    ``"auto"`` is bf16 where the GPU has it natively, else fp16: torch's ``is_bf16_supported()`` also
    says yes where bf16 is emulated (e.g. a T4, the challenge's default GPU), which is slower than fp16.
    """
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
