"""``lsmseg export``: a fine-tuning run's checkpoint -> ``<weights dir>/<name>.safetensors`` + manifest entry.

The weights folder defaults to the run's own ``export/``; an existing entry or checkpoint file is
never replaced without ``force`` (with an editable install, ``weights/`` *is* the installed model).
Post-processing settings the run does not decide (``min_component_voxels``) default to the shipped
weights' values, so that an exported model is applied the way the shipped one is.

The entry records everything needed to trust and reproduce the weights: sha256, model config,
inference settings (overlap 0.5, Gaussian blending, the threshold tuned on the validation set, the
training voxel spacing or null), validation metrics, the training config, the weights it started
from, a fingerprint of the training data and the package and library versions.
"""

from __future__ import annotations

import contextlib
import logging
import re
from datetime import datetime, timezone
from pathlib import Path

from lsmseg.config import InferenceSettings, ModelConfig, from_dict
from lsmseg.errors import ConfigError, WeightsError, single_line
from lsmseg.io import write_bytes
from lsmseg.model import build_model
from lsmseg.weights import (
    MANIFEST_NAME,
    Manifest,
    WeightsEntry,
    load_manifest,
    load_model,
    load_state_dict,
    save_weights,
    write_manifest,
)

from .engine import read_record

logger = logging.getLogger(__name__)


def export_run(
    run: Path,
    weights_dir: Path | None = None,
    name: str = "general",
    checkpoint: str = "best",
    structures: list[str] | None = None,
    make_default: bool | None = None,
    threshold: float | None = None,
    min_component_voxels: int | None = None,
    force: bool = False,
) -> Path:
    """Export ``checkpoint`` of the fine-tuning run in ``run``; return the manifest path.

    Args:
        run: output folder of a finished ``lsmseg finetune`` run.
        weights_dir: folder for ``<name>.safetensors`` and ``manifest.yaml`` (default: ``run/export``).
        name: model name in the manifest.
        checkpoint: "best" or "final".
        structures: structures the model segments (default: the run config's).
        make_default: make ``name`` the manifest's default model.
        threshold: override the threshold tuned on the validation set.
        min_component_voxels: inference clean-up (default: the shipped weights' value, else 0).
        force: replace an existing entry or checkpoint file named ``name``.
    """
    run = Path(run)
    try:
        check_name(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    weights_dir = Path(weights_dir) if weights_dir is not None else run / "export"
    file_name = f"{name}.safetensors"
    manifest_path = weights_dir / MANIFEST_NAME
    if not force:
        refuse_overwrite(weights_dir, name, file_name)
    if min_component_voxels is None:
        min_component_voxels = shipped_min_component_voxels()
    record = read_record(run)
    if record.get("kind") != "finetune":
        raise WeightsError(f"{run}: not a fine-tuning run (kind {record.get('kind')!r}); export fine-tuned weights")
    # A run's record names its checkpoint files only once it has finished (before, "best" is the
    # validation history's best so far and there is no "final").
    chosen = record.get(checkpoint) if checkpoint in ("best", "final") else None
    if not (isinstance(chosen, dict) and "file" in chosen):
        raise WeightsError(f"{run}: the run has not finished (no '{checkpoint}' checkpoint recorded; it stopped at "
                           f"step {record.get('steps')}); finish it with `lsmseg finetune --resume` before exporting")
    try:
        source = run / chosen["file"]
        sha256 = chosen["sha256"]
        config = record["config"]
        model_config = from_dict(ModelConfig, config["model"], f"{run}/run.json:config.model")
        evaluation = chosen.get("evaluation")
        if evaluation is None:  # no final sweep (validation.final_overlap null): the in-training one at that step
            evaluation = next((h for h in record.get("history", []) if h.get("step") == chosen.get("step")), None)
        if threshold is None:
            threshold = evaluation["best_threshold"] if evaluation else config["validation"]["threshold"]
        data = config["data"]
        lower, upper = data["lower_percentile"], data["upper_percentile"]
    except (KeyError, TypeError, AttributeError) as exc:
        raise WeightsError(f"{run}/run.json: incomplete run record ({type(exc).__name__}: {exc}); "
                           "export a run that `lsmseg finetune` finished") from exc
    state = load_state_dict(source, sha256)
    try:
        settings = InferenceSettings(
            threshold=float(threshold),
            min_component_voxels=int(min_component_voxels),
            lower_percentile=lower,
            upper_percentile=upper,
            upper_tail=data.get("upper_tail", "clip"),  # runs before the option clipped
            spacing=training_spacing(data, record.get("data") or {}),
        )
    except ValueError as exc:
        raise ConfigError(f"{run}: cannot export with these inference settings ({single_line(exc)})") from exc
    # The weights must fit the recorded model before anything is written (no half-made export).
    try:
        build_model(model_config).load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{source}: weights do not fit the run's model config ({str(exc).splitlines()[0]})") from exc
    # The folder's manifest is read before anything is written: an unreadable one refuses the export.
    existing = load_manifest(manifest_path) if manifest_path.is_file() else None
    target = weights_dir / file_name
    # --force: the file replaced is kept, so that a failure puts it back with the manifest that names
    # its sha256 (else the folder's weights would fail their own checksum).
    existed = target.exists()
    replaced = target.read_bytes() if target.is_file() else None
    created = [folder for folder in (weights_dir, *weights_dir.parents) if not folder.exists()]
    manifest_text = manifest_path.read_bytes() if existing is not None else None
    try:
        return _write_export(run, weights_dir, name, checkpoint, structures, make_default, state, chosen, config,
                             model_config, evaluation, settings, record, existing)
    except BaseException:
        # No half-made export: a new checkpoint file goes, a replaced one and the manifest are put back.
        if not existed:
            target.unlink(missing_ok=True)
        elif replaced is not None:
            write_bytes(replaced, target)  # atomically: a second interruption leaves old or new
        if manifest_text is not None:
            write_bytes(manifest_text, manifest_path)
        elif manifest_path.is_file():
            manifest_path.unlink()
        for folder in created:  # innermost first, each only if nothing else went in
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _write_export(run, weights_dir, name, checkpoint, structures, make_default, state, chosen, config, model_config,
                  evaluation, settings, record, manifest) -> Path:
    """The writing half of :func:`export_run` (arguments checked and read there)."""
    file_name = f"{name}.safetensors"
    manifest_path = weights_dir / MANIFEST_NAME
    sha = save_weights(state, weights_dir / file_name)
    validation = {"checkpoint": checkpoint, "step": chosen.get("step")}
    if evaluation:
        validation.update(
            metric="MONAI DiceMetric, mean over validation volumes",
            overlap=evaluation["overlap"],
            threshold=evaluation["best_threshold"],
            mean_dice=evaluation["best_dice"],
            dice_by_threshold=dict(zip(evaluation["thresholds"], evaluation["mean_dice"])),
            per_volume={
                volume: scores[evaluation["thresholds"].index(evaluation["best_threshold"])]
                for volume, scores in evaluation["per_volume"].items()
            },
        )
    provenance = {
        "run": record["name"],
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "steps": record.get("steps"),
        "training_seconds": record.get("seconds"),
        "world_size": record.get("world_size"),
        # Where the weights began (a whole model's manifest, file and sha256) and why the run ended
        # early: the config records only init's path and the resume's settings (max_seconds: 1).
        "init": record.get("init"),
        "pretrained": record.get("pretrained"),
        "stopped": record.get("stopped"),
        "training_config": config,
        "training_data": record.get("data"),
        "validation_data": record.get("validation_data"),
        "versions": record.get("versions"),
    }
    if record.get("splits"):
        provenance["splits"] = splits_by_source(record["splits"])
    entry = WeightsEntry(
        file=file_name,
        sha256=sha,
        model=model_config,
        inference=settings,
        structures=list(structures if structures is not None else config.get("structures", [])),
        validation=validation,
        provenance=provenance,
    )
    if manifest is not None:
        old = manifest.models.get(name)
        if old is not None and (old.inference.per_structure or old.test):
            # They were chosen and measured for the replaced weights: carrying them would misdescribe these.
            logger.warning("%s: the replaced entry '%s' had per-structure settings or test scores; they are not "
                           "carried to the new weights (tune them again: python -m lsmseg_training.tune ... --write)",
                           manifest_path, name)
        manifest.models[name] = entry
        if make_default:
            manifest.default = name
    else:
        manifest = Manifest(models={name: entry}, default=name)
    write_manifest(manifest, manifest_path)
    # Prove the export is usable the way inference will use it (checksum + strict load).
    check = load_manifest(manifest_path)
    load_model(check, check.models[name])
    logger.info("exported %s (%s checkpoint, step %s) -> %s, sha256 %s..., threshold %.2f",
                run, checkpoint, chosen.get("step"), weights_dir / file_name, sha[:12], settings.threshold)
    return manifest_path


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(name: str) -> str:
    """``name`` if it can name a manifest entry and its ``NAME.safetensors`` in the weights folder
    (letters, digits, ``.``, ``_``, ``-``; no path), else ValueError."""
    if not NAME_PATTERN.fullmatch(name or ""):
        raise ValueError(f"model name {name!r} must be letters, digits, '.', '_' or '-' (not starting with "
                         "'.', '_' or '-'), e.g. general or vessels")
    return name


def splits_by_source(splits: dict) -> dict:
    """``{split: {source: [volume names]}}`` from the run record's ``{split: {"set:source": [...]}}``."""
    merged = {}
    for split, groups in splits.items():
        by_source = merged.setdefault(split, {})
        for key, names in groups.items():
            source = key.split(":", 1)[-1]
            by_source[source] = sorted(set(by_source.get(source, [])) | set(names))
    return merged


def refuse_overwrite(weights_dir: Path, name: str, file_name: str) -> None:
    """Raise unless exporting ``name`` into ``weights_dir`` replaces nothing."""
    manifest_path = weights_dir / MANIFEST_NAME
    existing = []
    if manifest_path.is_file() and name in load_manifest(manifest_path).models:
        existing.append(f"entry '{name}' in {manifest_path}")
    if (weights_dir / file_name).exists():
        existing.append(str(weights_dir / file_name))
    if existing:
        raise WeightsError(f"{weights_dir}: export would replace {' and '.join(existing)}; "
                           "choose another -o/--name, or pass --force to replace it")


def shipped_min_component_voxels() -> int:
    """The installed (shipped) weights' ``min_component_voxels``, or 0 when none are installed."""
    from lsmseg.weights import resolve_manifest

    try:
        manifest = load_manifest(resolve_manifest())
        _, entry = manifest.entry_for(None)
    except WeightsError:
        return 0
    return entry.inference.min_component_voxels


def training_spacing(data: dict, fingerprint: dict) -> tuple[float, float, float] | None:
    """The voxel spacing inference should resample to: the one the model was trained at, or None.

    With ``target_spacing`` it is that. With only an in-plane ``downscale`` it is the training
    grid's spacing when every training volume had the same one (else inference could not know
    which to use: warn, and record None). Native-grid training records None (never resample).
    """
    if data.get("target_spacing"):
        return tuple(float(v) for v in data["target_spacing"])
    if data.get("downscale", 1.0) == 1.0:
        return None
    spacings = {tuple(v["training_spacing"]) if v.get("training_spacing") else None
                for v in fingerprint.get("volumes", [])}
    if len(spacings) == 1 and None not in spacings:
        return spacings.pop()
    logger.warning("the run down-scaled planes by %s but its volumes had unknown or differing spacings; the "
                   "manifest records no spacing, so inference will not down-scale (set data.target_spacing)",
                   data["downscale"])
    return None
