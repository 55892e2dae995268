"""Fine-tuning (``lsmseg finetune``): pretrained encoder -> binary segmentation.

Dice + BCE loss (MONAI ``DiceCELoss`` with a sigmoid: one output channel uses BCE) on augmented
patches, foreground/background balanced. Every ``validation.every`` steps the model is applied to
whole validation volumes with the package's own :class:`lsmseg.inference.Predictor` (the exact
inference path: percentile normalisation, Gaussian-blended sliding window) and scored with MONAI's
``DiceMetric``; the best checkpoint (by mean Dice at the swept threshold) and the final one are kept.
At the end both are evaluated with the shipped inference settings (overlap 0.5) over a threshold
sweep, and the best threshold is recorded for export.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from lsmseg.config import InferenceSettings, to_dict
from lsmseg.errors import WeightsError
from lsmseg.io import read_volume
from lsmseg.model import build_model
from lsmseg.weights import load_state_dict, save_weights, sha256_file

from .config import FinetuneConfig
from .data import VolumeRecord, check_splits, fingerprint, prepare_volumes
from .engine import (
    CHECKPOINT_NAME, Loop, autocast, hold_output, load_full_model, main_first, resume_state, run_processes, strip_prefixes,
    train_loop, unwrap, write_record,
)
from .plots import plot_training
from .pretrain import ENCODER_PREFIXES

logger = logging.getLogger(__name__)

BEST_FILE = "best.safetensors"
FINAL_FILE = "final.safetensors"
EXPORT_OVERLAP = 0.5  # what the exported inference settings use; the final sweep uses it too


def describe_start(init, pretrained) -> str:
    """What a fine-tuning run starts from, in words (its log line; compare's table), from its record's
    ``init`` (a whole model) and ``pretrained`` (an encoder that replaces init's)."""
    if init and pretrained:
        return "a whole model with a pretrained encoder"
    return "a whole model" if init else "the pretrained encoder" if pretrained else "scratch"


# --------------------------------------------------------------------------------------------
# Loading a pretrained encoder, loudly


def load_pretrained_encoder(model: torch.nn.Module, path: Path, min_fraction: float, where: str | None = None) -> dict:
    """Copy the matching encoder tensors of ``path`` into ``model``; refuse a poor match.

    A silent ``load_state_dict(strict=False)`` of a checkpoint from another architecture loads
    nothing and trains from scratch unnoticed; here a file that fills less than ``min_fraction`` of
    the encoder's tensors (by name and shape), or holds an encoder tensor that fits nowhere in
    ``model`` (another shape; blocks of other depths or heads), stops the run before it starts.
    ``where`` (the config file) is named in that error beside ``path``.
    """
    path = Path(path)
    state = strip_prefixes(load_state_dict(path, sha256=None))
    own = model.state_dict()
    encoder_keys = [k for k in own if k.startswith(ENCODER_PREFIXES)]
    matched = {k: v for k, v in state.items() if k in own and k.startswith(ENCODER_PREFIXES) and v.shape == own[k].shape}
    wrong_shape = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    # Encoder tensors of the file that fit nowhere (another shape, or blocks this model lacks: other
    # depths or heads) mean another architecture, even where the rest matches by name.
    misfits = [k for k in state if k.startswith(ENCODER_PREFIXES) and k not in matched]
    fraction = len(matched) / max(1, len(encoder_keys))
    summary = {
        "path": str(path),
        "sha256": sha256_file(path),
        "matched": len(matched),
        "encoder_tensors": len(encoder_keys),
        "file_tensors": len(state),
        "wrong_shape": len(wrong_shape),
    }
    logger.info("pretrained encoder %s: %d of %d encoder tensors matched (%d tensors in the file, %d of wrong shape)",
                path, len(matched), len(encoder_keys), len(state), len(wrong_shape))
    if fraction < min_fraction or misfits:
        key = next(iter(wrong_shape or misfits), None)
        example = "" if key is None else (f"; e.g. {key} is {tuple(state[key].shape)} there, "
                                          + (f"{tuple(own[key].shape)} here" if key in own else "not in this model"))
        config = f"{where}: pretrained: " if where else ""
        found = (f"only {len(matched)} of {len(encoder_keys)} encoder tensors match ({fraction:.0%} < "
                 f"min_matched_fraction {min_fraction:.0%})" if fraction < min_fraction
                 else f"{len(misfits)} of its encoder tensors fit nowhere in this model (pretrain with the same "
                 "model settings)")
        raise WeightsError(f"{config}{path}: checkpoint is for another architecture: {found}{example}")
    model.load_state_dict({**own, **matched})
    return summary


# --------------------------------------------------------------------------------------------
# Validation through the package's predictor


def load_validation(records: list[VolumeRecord]) -> list[dict]:
    """Validation volumes in memory (raw intensities; the predictor normalises them as inference does)."""
    volumes = []
    for record in records:
        image = read_volume(record.image).load()
        label = read_volume(record.label).load() != 0  # values checked by prepare_volumes (data._scan_label)
        volumes.append({"name": record.name, "image": image, "label": label, "spacing": record.spacing})
    return volumes


def dice_scores(probabilities: np.ndarray, label: np.ndarray, thresholds) -> list[float]:
    """MONAI DiceMetric of ``probabilities >= t`` against ``label``, for each threshold."""
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=True, reduction="mean", ignore_empty=False)
    truth = torch.from_numpy(label.astype(np.float32))[None, None]
    prob = torch.from_numpy(probabilities)[None, None]
    scores = []
    for threshold in thresholds:
        metric.reset()
        metric((prob >= threshold).float(), truth)
        scores.append(float(metric.aggregate().item()))
    return scores


def validate(model: torch.nn.Module, config: FinetuneConfig, volumes: list[dict], device, overlap: float) -> dict:
    """Per-volume Dice over the threshold sweep; the model is left in eval mode."""
    from lsmseg.inference import Predictor, RunOptions

    thresholds = sorted(set(config.validation.thresholds) | {config.validation.threshold})
    # The training ROI on MONAI's grid at the configured overlap, so that scores stay comparable across runs.
    settings = InferenceSettings(overlap=overlap, sw_batch_size=config.validation.sw_batch_size,
                                 lower_percentile=config.data.lower_percentile,
                                 upper_percentile=config.data.upper_percentile,
                                 upper_tail=config.data.upper_tail,
                                 spacing=config.data.target_spacing)
    predictor = Predictor(unwrap(model), config.model, settings, device=device, options=RunOptions(progress=False))
    per_volume = {}
    for volume in volumes:
        logits = predictor.predict_logits(volume["image"], volume["spacing"], name=volume["name"])
        probabilities = torch.sigmoid(torch.from_numpy(logits)).numpy()
        per_volume[volume["name"]] = dice_scores(probabilities, volume["label"], thresholds)
    mean = np.mean(list(per_volume.values()), axis=0)
    best = int(np.argmax(mean))
    return {
        "overlap": overlap,
        "thresholds": thresholds,
        "mean_dice": [round(float(v), 5) for v in mean],
        "per_volume": {k: [round(float(v), 5) for v in s] for k, s in per_volume.items()},
        "best_threshold": thresholds[best],
        "best_dice": round(float(mean[best]), 5),
        "dice_at_default": round(float(mean[thresholds.index(config.validation.threshold)]), 5),
    }


# --------------------------------------------------------------------------------------------


def run_finetuning(config: FinetuneConfig, config_path: Path | None = None, resume: bool = False) -> dict:
    """Fine-tune as ``config`` says; return the run record.

    Args:
        config: the validated config.
        config_path: its YAML file, for the run record.
        resume: continue from the output folder's last checkpoint, if there is one.
    """
    from .losses import dice_bce, soft_cldice, split_label

    where = str(config_path or config.name)
    output = Path(config.output)
    with run_processes(config) as processes:
        # Every check before training: splits by source, data, labels, the initial weights, a resume.
        splits = check_splits(config.data, where)
        records = main_first(processes, lambda: prepare_volumes(config.data, "train", need_labels=True,
                                                                 where=where, seed=config.seed))
        validation_records = []  # rank 0 validates
        if processes.main and (config.data.validation or config.data.validation_phantoms is not None):
            validation_records = prepare_volumes(config.data, "validation", need_labels=True, where=where,
                                                 seed=config.seed)
        torch.manual_seed(config.seed)
        model = build_model(config.model)

        def starting_weights() -> tuple[dict | None, dict | None]:
            """Load init, then the pretrained encoder (which replaces init's; the decoder stays)."""
            initialised = load_full_model(model, Path(config.init), config.model) if config.init is not None else None
            pretrained = None
            if config.pretrained is not None:
                if not Path(config.pretrained).is_file():
                    raise WeightsError(f"{where}: pretrained: {config.pretrained}: no such file")
                pretrained = load_pretrained_encoder(model, Path(config.pretrained), config.min_matched_fraction,
                                                     where)
            return initialised, pretrained

        # A fresh run checks its starting weights before it takes the output folder; a resume takes
        # every weight from the checkpoint, so init and pretrained need not be there any more, and
        # where the run began is the checkpoint's record of it, whatever they say now.
        start = None if resume and (output / CHECKPOINT_NAME).is_file() else starting_weights()
        hold_output(output, processes)  # one run at a time in a folder
        resume_from = resume_state(output, config.model, resume, kind="finetune", total_steps=config.total_steps,
                                   config=to_dict(config))
        resumed = resume_from["extra"] if resume_from else {}
        if "init" in resumed:
            start = resumed["init"], resumed.get("pretrained")
        elif start is None:  # checkpoints from before 2026-12-07 record neither
            start = starting_weights()
        initialised, pretrained = start
        history = resumed.get("history", [])
        best = resumed.get("best", {"dice": -1.0, "step": None})
        # The best weights travel in the checkpoint: a run killed after a better validation but before
        # its next checkpoint left a best.safetensors the resumed history knows nothing of.
        best_state = resumed.get("best_state")
        if best_state is not None and processes.main:
            save_weights(best_state, output / BEST_FILE)
        validation_volumes = load_validation(validation_records) if processes.main else []

        def step(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
            image = batch["image"].to(processes.device, non_blocking=True)
            target, valid = split_label(batch["label"].to(processes.device, non_blocking=True))
            tubular = batch["tubular"].to(processes.device)
            with autocast(processes.device, config.optim.amp, config.optim.amp_dtype):
                logits = model(image)
            logits = logits.float()
            loss = dice_bce(logits, target, valid, config.dice_weight, config.bce_weight, config.batch_dice)
            if config.cldice_weight and bool(tubular.any()):
                loss = loss + config.cldice_weight * soft_cldice(logits, target, valid, config.cldice_iterations,
                                                                 weights=tubular)
            return loss, {}

        def validate_when_due(loop: Loop) -> dict | None:
            nonlocal best, best_state
            due = config.validation.every and loop.step % config.validation.every == 0
            if not (processes.main and validation_volumes and (due or loop.last)):
                return None
            val = validate(loop.weights(), config, validation_volumes, processes.device, config.validation.overlap)
            loop.model.train()
            history.append({"step": loop.step, **val})
            logger.info("step %d: validation Dice %.4f at threshold %.2f (%.4f at %.2f)", loop.step, val["best_dice"],
                        val["best_threshold"], val["dice_at_default"], config.validation.threshold)
            if val["best_dice"] > best["dice"]:
                best = {"dice": val["best_dice"], "step": loop.step, "threshold": val["best_threshold"]}
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in loop.weights().state_dict().items()}
                save_weights(best_state, output / BEST_FILE)
            plot_training(output, history)
            return {"val_dice": val["best_dice"], "val_threshold": val["best_threshold"]}

        def keep_history(loop: Loop) -> dict:
            loop.record.update(history=history, best=best)
            return {"history": history, "best": best, "init": initialised, "pretrained": pretrained,  # for a resume
                    **({"best_state": best_state} if best_state is not None else {})}

        logger.info("fine-tuning %s: %d training and %d validation volume(s), %d steps of batch %d x %d process(es), "
                    "roi %s, %s, on %s", config.name, len(records), len(validation_volumes), config.total_steps,
                    config.batch_size, processes.world_size, tuple(config.model.roi),
                    f"from {describe_start(initialised, pretrained)}", processes.device)
        loop = train_loop(
            config, processes, records, model, step, kind="finetune", config_path=config_path,
            log_fields=["step", "epoch", "lr", "loss", "grad_norm", "val_dice", "val_threshold", "seconds"],
            stream_options={"foreground_ratio": config.data.foreground_ratio, "labels": True,
                            "augment": config.augment},
            resume_from=resume_from, on_step=validate_when_due, on_checkpoint=keep_history,
            average_decay=config.average_decay,
            record_extra={"pretrained": pretrained, "init": initialised, "splits": splits,
                          "validation_data": fingerprint(validation_records) if validation_records else None},
        )
        record = loop.record
        if processes.main:
            final_state = loop.weights().state_dict()
            final_sha = save_weights(final_state, output / FINAL_FILE)
            if best["step"] is None:  # no validation set: the final weights are the best we know
                save_weights(final_state, output / BEST_FILE)
            record["final"] = {"file": FINAL_FILE, "sha256": final_sha, "step": loop.step}
            record["best"] = {**best, "file": BEST_FILE, "sha256": sha256_file(output / BEST_FILE)}
            if validation_volumes and config.validation.final_overlap is not None:
                sweep_checkpoints(loop, config, validation_volumes)
            record.update(steps=loop.step, seconds=round(loop.timer.elapsed(), 1), history=history)
            write_record(output, record)
            plot_training(output, history)
        return record


def sweep_checkpoints(loop: Loop, config: FinetuneConfig, volumes: list[dict]) -> None:
    """Threshold sweep of the best and final checkpoints with the settings that will be exported."""
    record = loop.record
    for which in ("best", "final"):
        if which == "final" and record["best"]["sha256"] == record["final"]["sha256"]:
            record["final"]["evaluation"] = record["best"]["evaluation"]  # same weights
            continue
        state = load_state_dict(loop.output / record[which]["file"], record[which]["sha256"])
        unwrap(loop.model).load_state_dict(state)
        record[which]["evaluation"] = validate(loop.model, config, volumes, loop.processes.device,
                                               config.validation.final_overlap)
        logger.info("%s checkpoint (step %s): Dice %.4f at tuned threshold %.2f (overlap %.2f)", which,
                    record[which]["step"], record[which]["evaluation"]["best_dice"],
                    record[which]["evaluation"]["best_threshold"], config.validation.final_overlap)


__all__ = ["run_finetuning", "load_pretrained_encoder", "validate", "dice_scores"]
