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

from lsmseg.model import build_model
from lsmseg.weights import save_weights

from .config import PretrainConfig
from .data import PatchStream, make_loader, prepare_volumes
from .engine import (
    CHECKPOINT_NAME,
    LOG_NAME,
    CsvLog,
    Timer,
    autocast,
    backward_step,
    load_checkpoint,
    main_first,
    make_optimiser,
    make_scaler,
    parameter_digest,
    restore,
    save_checkpoint,
    set_weights,
    setup_processes,
    start_record,
    teardown_processes,
    unwrap,
    wrap_model,
    write_record,
)
from .plots import plot_training

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
    where = str(config_path or config.name)
    processes = setup_processes(config.device, config.threads)
    output = Path(config.output)
    try:
        # Every check (paths, readable volumes, architecture of a resumed checkpoint) before training.
        records = main_first(processes, lambda: prepare_volumes(config.data, "train", need_labels=False,
                                                                 where=where, seed=config.seed))
        records = [dataclasses.replace(r, label=None, foreground=None) for r in records]
        resume_state = None
        if resume and (output / CHECKPOINT_NAME).is_file():
            resume_state = load_checkpoint(output / CHECKPOINT_NAME, config.model)

        torch.manual_seed(config.seed)
        model = wrap_model(build_model(config.model), processes)
        optimiser, scheduler = make_optimiser(model, config.optim, config.total_steps)
        scaler = make_scaler(processes.device, config.optim.amp)
        step = restore(resume_state, model, optimiser, scheduler, scaler) if resume_state else 0
        if resume_state:
            logger.info("resumed %s at step %d", output / CHECKPOINT_NAME, step)

        stream = PatchStream(
            records, config.model.roi, seed=config.seed + 1000 * step, set_weights=set_weights(config.data),
            masking=config.masking, rank=processes.rank, cache_mb=config.data.cache_mb,
        )
        batches = iter(make_loader(stream, config.batch_size, config.data.workers))
        log = CsvLog(output / LOG_NAME, ["step", "epoch", "lr", "loss", "hidden_l1", "visible_l1", "grad_norm",
                                         "seconds"], enabled=processes.main)
        record = start_record("pretrain", config, config_path, processes, records)
        logger.info("pretraining %s: %d volume(s), %d steps of batch %d x %d process(es), roi %s, on %s",
                    config.name, len(records), config.total_steps, config.batch_size, processes.world_size,
                    tuple(config.model.roi), processes.device)
        timer = Timer()
        model.train()
        while step < config.total_steps:
            batch = next(batches)
            image = batch["image"].to(processes.device, non_blocking=True)
            mask = batch["mask"].to(processes.device, non_blocking=True)
            with autocast(processes.device, config.optim.amp):
                reconstruction = torch.sigmoid(model(image.masked_fill(mask, 0.0)).float())
            loss, hidden, visible = masked_l1(reconstruction, image, mask, config.masking.visible_weight)
            lr = scheduler.get_last_lr()[0]
            norm = backward_step(loss, model, optimiser, scheduler, scaler, config.optim.grad_clip)
            step += 1
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower optim.lr")
            if step % config.log_every == 0 or step == config.total_steps:
                log.write(step=step, epoch=step / config.steps_per_epoch, lr=lr, loss=loss.item(),
                          hidden_l1=hidden.item(), visible_l1=visible.item(), grad_norm=norm,
                          seconds=timer.elapsed())
                logger.info("step %d/%d  loss %.4f (hidden %.4f, visible %.4f)  %.1f s", step,
                            config.total_steps, loss.item(), hidden.item(), visible.item(), timer.elapsed())
            if processes.main and (step % config.checkpoint_every == 0 or step == config.total_steps):
                save_checkpoint(output / CHECKPOINT_NAME, model, optimiser, scheduler, scaler, step, config.model)
                encoder_sha = save_weights(encoder_state(model), output / ENCODER_FILE)
                record.update(steps=step, seconds=round(timer.elapsed(), 1), encoder=ENCODER_FILE,
                              encoder_sha256=encoder_sha, encoder_tensors=len(encoder_state(model)))
                write_record(output, record)
                plot_training(output)
        logger.info("rank %d parameter digest %s", processes.rank, parameter_digest(model))
        processes.barrier()
        if processes.main:
            logger.info("pretraining done: encoder weights in %s", output / ENCODER_FILE)
        return record
    finally:
        teardown_processes(processes)
