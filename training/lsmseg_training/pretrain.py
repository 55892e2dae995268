"""Masked self-supervised pretraining (``lsmseg pretrain``).

Random cuboids of each input patch are set to zero and a Swin UNETR (the package's model, with one
output channel acting as a light reconstruction head) reconstructs the normalised intensities. The
loss is L1 on the hidden voxels plus ``visible_weight`` times L1 on the visible ones. Only the
encoder (``ENCODER_PREFIXES``) is what fine-tuning takes over; it is written to
``<output>/encoder.safetensors`` at every checkpoint and at the end.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from lsmseg.config import to_dict
from lsmseg.model import build_model
from lsmseg.weights import save_weights

from .config import PretrainConfig
from .data import check_splits, prepare_volumes
from .engine import (
    Loop, autocast, hold_output, load_full_model, main_first, resume_state, run_processes, train_loop, unwrap,
)

logger = logging.getLogger(__name__)

# The encoding path of MONAI's Swin UNETR: the Swin transformer and the residual blocks on its skips.
ENCODER_PREFIXES = ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")
ENCODER_FILE = "encoder.safetensors"


def encoder_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in unwrap(model).state_dict().items() if k.startswith(ENCODER_PREFIXES)}


def masked_l1(reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, visible_weight: float):
    """L1 on hidden voxels (mean) + ``visible_weight`` * L1 on visible voxels (mean)."""
    error = (reconstruction - target).abs()
    hidden = mask.float()
    visible = 1.0 - hidden
    hidden_loss = (error * hidden).sum() / hidden.sum().clamp_min(1.0)
    visible_loss = (error * visible).sum() / visible.sum().clamp_min(1.0)
    return hidden_loss + visible_weight * visible_loss, hidden_loss, visible_loss


def run_pretraining(config: PretrainConfig, config_path: Path | None = None, resume: bool = False) -> dict:
    """Pretrain the encoder as ``config`` says; return the run record (arguments as for
    :func:`lsmseg_training.finetune.run_finetuning`)."""
    where = str(config_path or config.name)
    output = Path(config.output)
    with run_processes(config) as processes:
        # Every check (paths, readable volumes, architecture of a resumed checkpoint) before training.
        check_splits(config.data, where)  # a validation or test set listed here shares no source with training
        records = main_first(processes, lambda: prepare_volumes(config.data, "train", need_labels=False,
                                                                 where=where, seed=config.seed))
        records = [dataclasses.replace(r, label=None, foreground=None) for r in records]
        hold_output(output, processes)  # one run at a time in a folder
        resume_from = resume_state(output, config.model, resume, kind="pretrain", total_steps=config.total_steps,
                                   config=to_dict(config))
        torch.manual_seed(config.seed)
        model = build_model(config.model)
        if resume_from is not None and "init" in (resume_from.get("extra") or {}):
            # A resume takes every weight from the checkpoint: init need not be there any more, and
            # where the run began is the checkpoint's record of it, whatever init says now.
            initialised = resume_from["extra"]["init"]
        else:
            initialised = load_full_model(model, Path(config.init), config.model) if config.init is not None else None
        # Intensities normalised with the log tail exceed 1, which a sigmoid cannot reach.
        bounded = config.data.upper_tail == "clip"

        def step(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
            image = batch["image"].to(processes.device, non_blocking=True)
            mask = batch["mask"].to(processes.device, non_blocking=True)
            with autocast(processes.device, config.optim.amp, config.optim.amp_dtype):
                reconstruction = model(image.masked_fill(mask, 0.0)).float()
            if bounded:
                reconstruction = torch.sigmoid(reconstruction)
            loss, hidden, visible = masked_l1(reconstruction, image, mask, config.masking.visible_weight)
            return loss, {"hidden_l1": hidden.item(), "visible_l1": visible.item()}

        def save_encoder(loop: Loop) -> dict:
            state = encoder_state(loop.model)
            loop.record.update(encoder=ENCODER_FILE, encoder_sha256=save_weights(state, output / ENCODER_FILE),
                               encoder_tensors=len(state))
            return {"init": initialised}  # for a resume's record

        logger.info("pretraining %s: %d volume(s), %d steps of batch %d x %d process(es), roi %s, on %s, %s",
                    config.name, len(records), config.total_steps, config.batch_size, processes.world_size,
                    tuple(config.model.roi), processes.device, "from a whole model" if initialised else "from scratch")
        loop = train_loop(
            config, processes, records, model, step, kind="pretrain", config_path=config_path,
            log_fields=["step", "epoch", "lr", "loss", "hidden_l1", "visible_l1", "grad_norm", "seconds"],
            stream_options={"masking": config.masking}, resume_from=resume_from, on_checkpoint=save_encoder,
            record_extra={"init": initialised},
        )
        if processes.main:
            logger.info("pretraining done: encoder weights in %s", output / ENCODER_FILE)
        return loop.record
