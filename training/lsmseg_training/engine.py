"""What pretraining and fine-tuning share: processes, starting weights, optimiser, schedule,
checkpoints, logs, and the training loop itself (:func:`train_loop`).

Both commands run as a single process or under ``torchrun`` (DistributedDataParallel; NCCL on GPUs,
gloo on CPU). Rank 0 alone writes files; every rank draws its own patches (seed, rank, worker).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory lock; the run-files check still refuses a second run
    fcntl = None

from lsmseg.config import ModelConfig, to_dict
from lsmseg.errors import OutputError, WeightsError, single_line
from lsmseg.io import atomic_output, write_json
from lsmseg.model import autocast_dtype, select_device
from lsmseg.weights import load_manifest, load_state_dict, sha256_file

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint_last.pt"
LOG_NAME = "log.csv"
RUN_RECORD = "run.json"
LOCK_NAME = ".lock"


# --------------------------------------------------------------------------------------------
# Starting weights


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Names as saved by DDP (``module.``) or by a wrapper (``model.``) map onto the bare model."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_full_model(model: torch.nn.Module, path: Path, model_config) -> dict:
    """Load a whole trained model (encoder and decoder) into ``model``, strictly and checksummed.

    ``path`` is a weights manifest (its default entry; the checkpoint's sha256 is verified and its
    model config must equal the run's) or a ``.safetensors``/``.pt`` state dict.
    """
    path = Path(path)
    if path.is_dir() or path.suffix in (".yaml", ".yml"):
        manifest = load_manifest(path)
        name, entry = manifest.entry_for(None)
        checkpoint = manifest.checkpoint_path(entry)
        # The window (roi) may differ; the network's shape may not.
        theirs = {k: v for k, v in to_dict(entry.model).items() if k != "roi"}
        mine = {k: v for k, v in to_dict(model_config).items() if k != "roi"}
        if theirs != mine:
            differing = next(k for k in mine if mine[k] != theirs.get(k))
            raise WeightsError(f"{manifest.path}: model '{name}' is another architecture ({differing} "
                               f"{theirs.get(differing)} there, {mine[differing]} in the config)")
        state = load_state_dict(checkpoint, entry.sha256)
        source = {"manifest": str(manifest.path), "model": name, "file": str(checkpoint), "sha256": entry.sha256}
    else:
        if not path.is_file():
            raise WeightsError(f"{path}: no such file")
        state = load_state_dict(path, sha256=None)
        source = {"file": str(path), "sha256": sha256_file(path)}
    try:
        model.load_state_dict(strip_prefixes(state), strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: weights do not fit the config's model ({str(exc).splitlines()[0]})") from exc
    logger.info("initialised every tensor from %s", source["file"])
    return source


@dataclass
class Processes:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # In a process group (launched by torchrun, one process too): DDP and its collectives (NCCL/gloo) run.
    distributed: bool = False
    held: list = field(default_factory=list)  # open lock files (:func:`hold_output`), closed at teardown

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def setup_processes(device: str | None, threads: int | None) -> Processes:
    """Join the torchrun process group when launched by torchrun; pick this process's device.

    Under torchrun (which sets ``LOCAL_RANK``) the group is joined even for one process, so that
    ``torchrun --nproc_per_node 1`` runs DistributedDataParallel and its NCCL (gloo) collectives as N do.
    """
    if threads:
        torch.set_num_threads(threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    launched = "LOCAL_RANK" in os.environ or world_size > 1
    chosen = select_device(device)
    if chosen.type == "cuda" and launched:
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    if launched and not torch.distributed.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
        logger.info("rank %d of %d joined the %s process group on %s", rank, world_size, backend, chosen)
    return Processes(rank, world_size, local_rank, chosen, distributed=launched)


def main_first(processes: Processes, prepare):
    """``prepare()`` on every rank, the main one first (it writes shared files such as phantoms)."""
    result = prepare() if processes.main else None
    processes.barrier()
    return result if processes.main else prepare()


def teardown_processes(processes: Processes) -> None:
    for handle in processes.held:
        handle.close()  # releases the folder's lock
    processes.held.clear()
    if processes.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def run_processes(config):
    """This process's place in a run of ``config`` (``device``, ``threads``), left cleanly however it ends."""
    processes = setup_processes(config.device, config.threads)
    try:
        yield processes
    finally:
        teardown_processes(processes)


def wrap_model(model: torch.nn.Module, processes: Processes) -> torch.nn.Module:
    model = model.to(processes.device)
    if processes.distributed:
        ids = [processes.device.index] if processes.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def parameter_digest(model: torch.nn.Module) -> str:
    """A short digest of the parameters, to check that every rank ends with the same model."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(unwrap(model).state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def make_optimiser(model: torch.nn.Module, optim, total_steps: int):
    """AdamW with a linear warm-up and a cosine decay to ``lr * min_lr_ratio``."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    warmup = max(0, min(optim.warmup_steps, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
    return optimiser, scheduler


def amp_dtype(device: torch.device, enabled: bool, dtype: str = "auto") -> torch.dtype | None:
    """The autocast dtype of a training step: None (full precision) unless enabled on CUDA.

    Args:
        device: where the model trains (autocast on CPU is slower; it is never used there).
        enabled: ``optim.amp``.
        dtype: ``optim.amp_dtype``: ``"auto"`` (bf16 where the GPU has it natively, else fp16), ``"bf16"``, ``"fp16"``.
    """
    if not enabled or device.type != "cuda":
        return None
    return autocast_dtype(dtype)


def autocast(device: torch.device, enabled: bool, dtype: str = "auto"):
    """fp16/bf16 autocast on CUDA when enabled (:func:`amp_dtype`); full precision on CPU."""
    chosen = amp_dtype(device, enabled, dtype)
    return contextlib.nullcontext() if chosen is None else torch.autocast(device_type="cuda", dtype=chosen)


def make_scaler(device: torch.device, enabled: bool, dtype: str = "auto"):
    """A GradScaler that scales only where fp16 autocast runs (bf16 keeps fp32's exponent range)."""
    return torch.amp.GradScaler("cuda", enabled=amp_dtype(device, enabled, dtype) == torch.float16)


def backward_step(loss, model, optimiser, scheduler, scaler, grad_clip: float) -> float:
    """One optimiser step with gradient scaling and clipping; returns the gradient norm."""
    optimiser.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimiser)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    scaler.step(optimiser)
    scaler.update()
    scheduler.step()
    return float(norm)


# --------------------------------------------------------------------------------------------
# Checkpoints (data only: torch.save of tensors and plain values, loaded with weights_only=True)


def save_checkpoint(path: Path, model, optimiser, scheduler, scaler, step: int, model_config: ModelConfig,
                    extra: dict | None = None, averaged: torch.nn.Module | None = None,
                    kind: str | None = None, config: dict | None = None, seconds: float | None = None) -> None:
    """Write the resumable state atomically (a kill mid-write leaves the previous checkpoint).

    ``config`` (the run's whole config, as a dict) lets a resume refuse changed settings;
    ``seconds`` is the training time so far, which a resumed run continues counting.
    """
    state = {
        **({"kind": kind} if kind else {}),
        **({"config": config} if config is not None else {}),
        **({"seconds": float(seconds)} if seconds is not None else {}),
        "model": unwrap(model).state_dict(),
        **({"averaged": averaged.state_dict()} if averaged is not None else {}),
        "optimiser": optimiser.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        "model_config": to_dict(model_config),
        "extra": extra or {},
    }
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def check_architecture(found: dict, expected: ModelConfig, path: Path) -> None:
    """Refuse a checkpoint made for another model configuration, naming what differs."""
    wanted = to_dict(expected)
    for key in ("in_channels", "out_channels", "feature_size", "depths", "num_heads", "use_v2"):
        have = found.get(key)
        want = wanted[key]
        if isinstance(want, list):
            have = list(have) if have is not None else None
        if have != want:
            raise WeightsError(f"{path}: checkpoint is for another architecture ({key} {have} here, {want} in the config)")


def load_checkpoint(path: Path, model_config: ModelConfig) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: cannot load checkpoint: the file is truncated or corrupt "
                           f"({type(exc).__name__}: {single_line(exc).split('. ')[0]}); remove it to start the run again") from exc
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise WeightsError(f"{path}: not a training checkpoint of lsmseg")
    check_architecture(state["model_config"], model_config, path)
    return state


def restore(state: dict, model, optimiser, scheduler, scaler) -> int:
    unwrap(model).load_state_dict(state["model"])
    optimiser.load_state_dict(state["optimiser"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    # The optimiser's saved lr is the old schedule's at this step: with more epochs the schedule is
    # longer, and the first resumed step would run at the old one's (near its end, near zero).
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimiser.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() (the log's lr column) reads
    return int(state["step"])


def make_averaged(model: torch.nn.Module, decay: float, resume_from: dict | None = None):
    """An exponential moving average of ``model``'s weights (``decay`` per step), or None when ``decay`` is 0.

    torch's ``AveragedModel`` keeps the copy; a resumed run continues the average its checkpoint
    saved (a checkpoint without one starts it from the restored weights). Buffers are not averaged:
    the Swin UNETR's are constant (relative position indices; its instance norms keep no statistics).
    """
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    averaged = AveragedModel(unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(decay))
    if resume_from and "averaged" in resume_from:
        averaged.load_state_dict(resume_from["averaged"])
    return averaged


# --------------------------------------------------------------------------------------------
# Logs and the run record


class CsvLog:
    """Append-only CSV of per-step values (a resumed run continues the same file).

    ``start_step``: the step the run (re)starts from. Rows after it were logged by a run killed
    after its last checkpoint; they are trained again, so they are dropped (no duplicate steps).
    """

    def __init__(self, path: Path, fields: list[str], enabled: bool = True, start_step: int = 0):
        self.path, self.fields, self.enabled = path, fields, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            with open(path, "w", newline="") as handle:
                csv.writer(handle).writerow(fields)
            return
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
        # A row cut short (the torn last line of a killed run) is dropped too, whatever its step reads.
        kept = rows[:1] + [row for row in rows[1:] if len(row) == len(rows[0]) and _step_of(row) <= start_step]
        if len(kept) < len(rows):
            logger.info("%s: dropped %d row(s) after step %d (logged after the last checkpoint)", path,
                        len(rows) - len(kept), start_step)
            with atomic_output(path) as tmp, open(tmp, "w", newline="") as handle:
                csv.writer(handle).writerows(kept)

    def write(self, **row) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle).writerow([_fmt(row.get(f)) for f in self.fields])


def _step_of(row: list[str]) -> float:
    try:
        return float(row[0])
    except ValueError:
        return float("inf")  # not a step: a torn last line of a killed run


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def write_record(folder: Path, record: dict) -> Path:
    """Write the run record (``run.json``) atomically."""
    return write_json(record, folder / RUN_RECORD)


def start_record(kind: str, config, config_path, processes: Processes, records, **extra) -> dict:
    """The run record (``run.json``) every stage starts with: config, data fingerprint, versions."""
    from .data import fingerprint

    return {
        "kind": kind,
        "name": config.name,
        "config": to_dict(config),
        "config_path": str(config_path) if config_path else None,
        "world_size": processes.world_size,
        **extra,
        "data": fingerprint(records) if processes.main else None,
        "versions": versions(),
    }


def set_weights(data) -> list[float]:
    """Sampling weight of each training set, the phantom set last (the order prepare_volumes uses)."""
    weights = [s.weight for s in data.train]
    if data.train_phantoms is not None:
        weights.append(data.train_phantoms.weight)
    return weights


def read_record(folder: Path) -> dict:
    path = Path(folder) / RUN_RECORD
    if not path.is_file():
        raise WeightsError(f"{path}: no run record; is {folder} the output folder of a finished run?")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise WeightsError(f"{path}: cannot read the run record ({type(exc).__name__}: {exc})") from exc
    if not isinstance(record, dict):
        raise WeightsError(f"{path}: the run record is not a JSON object")
    return record


def versions() -> dict:
    """The package and library versions, and the source tree's git commit (:func:`source_commit`)."""
    from lsmseg.inference.results import versions as package_versions

    return {**package_versions(), "source": source_commit()}


def source_commit(code: Path = Path(__file__).resolve()) -> dict | None:
    """The git commit of the checkout that holds ``code`` (default: this file, so the checkout
    training runs from) and whether its tracked files differed from it (``modified``; untracked
    files, e.g. a new module not yet added, are not looked at): the package
    version alone does not say which code trained a model. None where git does not track ``code``
    (an installed copy, even in a virtual environment inside a checkout) or without git."""
    import subprocess

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(code.parent), *args], capture_output=True, text=True, timeout=30,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})

    try:  # GIT_OPTIONAL_LOCKS=0: `git status` must not rewrite the index a commit beside the run may hold
        head = git("rev-parse", "--verify", "HEAD")
        tracked = git("ls-files", "--error-unmatch", code.name)
        if head.returncode != 0 or tracked.returncode != 0:
            return None
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": head.stdout.strip(), "modified": status.returncode != 0 or bool(status.stdout.strip())}


class Timer:
    """Training seconds: ``offset`` (a resumed run's seconds so far) plus this session's."""

    def __init__(self, offset: float = 0.0):
        self.start = time.perf_counter() - offset

    def elapsed(self) -> float:
        return time.perf_counter() - self.start



# --------------------------------------------------------------------------------------------
# The loop


def hold_output(output: Path, processes: Processes) -> None:
    """Refuse a second process training into ``output`` while this run does (a fresh run, or a
    ``--resume`` of a run still going), until :func:`run_processes` ends. The lock is the kernel's
    (``flock``), so a killed run leaves none behind; the main process holds it."""
    if not processes.main or fcntl is None:
        return
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    try:
        handle = open(output / LOCK_NAME, "a")
    except OSError as exc:  # a read-only run folder: one line, not a traceback
        raise OutputError(output, f"cannot write in the run folder ({single_line(exc)})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise OutputError(output, "another process is training into this folder now; wait for it to end, or "
                              "choose another output folder") from None
        # A file system without flock (some network mounts): train unlocked; a second fresh run is
        # still refused by the run files it would find (resume_state).
        logger.warning("%s: cannot lock the run folder (%s); a second process training into it at the same "
                       "time would not be refused", output, single_line(exc))
        return
    processes.held.append(handle)


# Settings a resumed run may change: how long and where it runs, how often it logs and checks,
# and where its starting weights came from (a resume takes its weights from the checkpoint).
# ``epochs`` lengthens the run (the cosine schedule is then stretched from the resumed step).
RESUMABLE_CHANGES = ("name", "output", "epochs", "max_seconds", "threads", "device", "checkpoint_every",
                     "log_every", "init", "pretrained", "data.workers", "data.cache_mb", "validation.every",
                     "validation.sw_batch_size")
RUN_FILES = (CHECKPOINT_NAME, LOG_NAME, RUN_RECORD)
# Settings added since checkpoints record their config (2026-12-07), with the value runs had before.
ADDED_SETTINGS = {"batch_dice": False}


def resume_state(output: Path, model_config: ModelConfig, resume: bool, *, kind: str | None = None,
                 total_steps: int | None = None, config: dict | None = None) -> dict | None:
    """The run's last checkpoint when resuming and one exists, else None.

    Without ``resume`` a folder that already holds a run is refused (two runs in one folder would
    share its log and overwrite each other's checkpoints). Resuming, the checkpoint is checked for
    the architecture, for the stage (``kind``: a pretraining checkpoint does not continue a
    fine-tuning run, nor the reverse), for steps left to train (``total_steps``) and for settings
    changed since the run started (``config``, the run's config as a dict; only
    :data:`RESUMABLE_CHANGES` may differ).
    """
    output = Path(output)
    path = output / CHECKPOINT_NAME
    if not resume:
        found = [name for name in RUN_FILES if (output / name).exists()]
        if found:
            raise OutputError(output, f"holds a run already ({', '.join(found)}); continue it with --resume, "
                              "or choose another output folder")
        return None
    if not path.is_file():
        if any((output / name).exists() for name in RUN_FILES):
            logger.warning("%s: no checkpoint to resume; starting the run again from step 0", path)
        return None
    state = load_checkpoint(path, model_config)
    # Checkpoints from before the stage was recorded: fine-tuning's always keep its validation history.
    found = state.get("kind") or ("finetune" if "best" in (state.get("extra") or {}) else "pretrain")
    if kind is not None and found != kind:
        raise WeightsError(f"{path}: checkpoint is from a {found} run, not {kind}; resume it with `lsmseg {found}` "
                           "or choose another output folder")
    step = int(state.get("step", 0))
    if total_steps is not None and step >= total_steps:
        raise WeightsError(f"{path}: checkpoint is at step {step}, the config's run is {total_steps} steps "
                           "(epochs x steps_per_epoch): nothing left to train; raise epochs to continue")
    if config is not None and isinstance(state.get("config"), dict):  # checkpoints before 2026-12-07 have none
        changed = changed_settings(state["config"], config)
        if changed:
            key, theirs, mine = changed[0]
            more = f" (also changed: {', '.join(k for k, _, _ in changed[1:])})" if len(changed) > 1 else ""
            raise WeightsError(f"{path}: {key} is {_short(mine)} in the config but was {_short(theirs)} in the run "
                               f"being resumed"
                               f"{more}; a resume continues the same run, so only {', '.join(RESUMABLE_CHANGES[2:])} "
                               "may change; start a new run in another output folder to train with these settings")
    return state


def changed_settings(before: dict, after: dict) -> list[tuple[str, object, object]]:
    """``(dotted key, before, after)`` of every setting that differs, except :data:`RESUMABLE_CHANGES`
    and where the data lies (:func:`_without_locations`: the same sets on another machine or under
    another ``$LSMSEG_DATA`` continue the run)."""
    flat_before, flat_after = (_flatten(_without_locations(_plain(c))) for c in (before, after))
    # A run recorded before a setting existed ran with the value it had then.
    flat_before = {**{k: v for k, v in ADDED_SETTINGS.items() if k in flat_after}, **flat_before}
    return [(key, flat_before.get(key), flat_after.get(key)) for key in sorted(set(flat_before) | set(flat_after))
            if flat_before.get(key) != flat_after.get(key)
            and not any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES)]


def _plain(value):
    """JSON's view of a value (tuples as lists), so that a checkpoint's config compares with a new one."""
    return json.loads(json.dumps(value, default=str))


def flat_settings(config) -> dict:
    """A config (a run record's ``config``) as dotted keys to JSON leaf values, to compare runs' settings."""
    return _flatten(_plain(config))


# Where a data set lies, not what it is: its images/labels paths, a phantom set's folder.
_LOCATION_KEYS = ("images", "labels", "folder")


def _without_locations(config: dict) -> dict:
    """``config`` without the data's locations and without ``data.test`` (never read in training)."""
    data = config.get("data")
    if not isinstance(data, dict):
        return config
    data = {key: value for key, value in data.items() if key != "test"}
    for key, value in data.items():
        sets = value if isinstance(value, list) else [value]
        for entry in sets:
            if isinstance(entry, dict):
                for location in _LOCATION_KEYS:
                    entry.pop(location, None)
    return {**config, "data": data}


def _flatten(value, prefix: str = "") -> dict:
    """Dotted keys to leaf values; a list of dicts (data sets) by index: ``data.train.2.weight``."""
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        value = {str(i): item for i, item in enumerate(value)}
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def _short(value, limit: int = 80) -> str:
    """A setting's value for a one-line message, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass
class Loop:
    """What the loop holds while it runs; the stage's hooks read it (and update ``record``)."""

    config: object
    processes: Processes
    output: Path
    model: torch.nn.Module  # wrapped for DistributedDataParallel when distributed
    optimiser: torch.optim.Optimizer
    scheduler: object
    scaler: object
    step: int
    record: dict
    timer: Timer
    last: bool = False  # this step is the run's last (total_steps reached, or max_seconds spent)
    averaged: torch.nn.Module | None = None  # the weights' moving average (``make_averaged``), if kept

    def weights(self) -> torch.nn.Module:
        """The model whose weights are validated and kept: the moving average where one is kept."""
        return self.averaged.module if self.averaged is not None else unwrap(self.model)


def out_of_time(config, processes: Processes, timer: Timer) -> bool:
    """Whether ``config.max_seconds`` is spent; rank 0's clock decides for every rank (they stop together)."""
    if config.max_seconds is None:
        return False
    spent = torch.tensor([1.0 if timer.elapsed() >= config.max_seconds else 0.0],
                         device=processes.device if processes.device.type == "cuda" else "cpu")
    if processes.distributed:
        torch.distributed.broadcast(spent, src=0)
    return bool(spent.item())


def train_loop(
    config,
    processes: Processes,
    records: list,
    model: torch.nn.Module,
    step_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
    *,
    kind: str,
    config_path: Path | None,
    log_fields: list[str],
    stream_options: dict,
    resume_from: dict | None = None,
    record_extra: dict | None = None,
    on_step: Callable[[Loop], dict | None] | None = None,
    on_checkpoint: Callable[[Loop], dict] | None = None,
    average_decay: float = 0.0,
) -> Loop:
    """The training loop both stages share: set up, resume, stream patches, step, log, checkpoint.

    Args:
        config: the stage's config (``PretrainConfig`` or ``FinetuneConfig``).
        processes: this process's place in the run (:func:`setup_processes`).
        records: the training volumes (:func:`lsmseg_training.data.prepare_volumes`).
        model: the bare model, with any initial weights already loaded.
        step_fn: ``step_fn(model, batch) -> (loss, values)``: the forward pass and the loss of one
            batch; ``values`` (floats) go to the CSV log and the log line.
        kind: ``"pretrain"`` or ``"finetune"`` (the run record's kind).
        config_path: the YAML file, for the run record.
        log_fields: the CSV's columns (``step``, ``epoch``, ``lr``, ``loss``, ``grad_norm``,
            ``seconds`` and the stage's own).
        stream_options: the stage's :class:`~lsmseg_training.data.PatchStream` options (labels,
            masking, augmentation).
        resume_from: a checkpoint to continue (:func:`resume_state`).
        record_extra: the stage's own entries of the run record.
        on_step: called after every optimiser step (fine-tuning validates here); the values it
            returns are logged in that step's row (None: nothing to add).
        on_checkpoint: called on the main process when a checkpoint is written; returns the
            checkpoint's ``extra`` (and may update ``loop.record``).
        average_decay: keep an exponential moving average of the weights with this decay per step
            (0: none); ``Loop.weights()`` is then the average, which the stage validates and keeps.

    Returns:
        The loop's final state; its ``record`` has been written at the last checkpoint.
    """
    from .data import PatchStream, make_loader
    from .plots import plot_training

    output = Path(config.output)
    wrapped = wrap_model(model, processes)
    optimiser, scheduler = make_optimiser(wrapped, config.optim, config.total_steps)
    scaler = make_scaler(processes.device, config.optim.amp, config.optim.amp_dtype)
    step, seconds = 0, 0.0
    if resume_from:
        step = restore(resume_from, wrapped, optimiser, scheduler, scaler)
        seconds = float(resume_from.get("seconds", 0.0))  # the run's training time goes on from there
        logger.info("resumed %s at step %d", output / CHECKPOINT_NAME, step)
        if config.max_seconds is not None and seconds >= config.max_seconds:  # the budget is the run's, not a session's
            logger.warning("max_seconds %s already spent (%.0f s trained): one more step; raise max_seconds to "
                           "train on", config.max_seconds, seconds)
    stream = PatchStream(records, config.model.roi, seed=config.seed + 1000 * step, rank=processes.rank,
                         set_weights=set_weights(config.data), cache_mb=config.data.cache_mb, **stream_options)
    batches = iter(make_loader(stream, config.batch_size, config.data.workers))
    log = CsvLog(output / LOG_NAME, log_fields, enabled=processes.main, start_step=step)
    record = start_record(kind, config, config_path, processes, records, **(record_extra or {}))
    loop = Loop(config, processes, output, wrapped, optimiser, scheduler, scaler, step, record, Timer(seconds),
                averaged=make_averaged(wrapped, average_decay, resume_from))
    wrapped.train()
    while not loop.last and loop.step < config.total_steps:
        loss, values = step_fn(wrapped, next(batches))
        lr = scheduler.get_last_lr()[0]
        norm = backward_step(loss, wrapped, optimiser, scheduler, scaler, config.optim.grad_clip)
        if loop.averaged is not None:
            loop.averaged.update_parameters(unwrap(wrapped))
        loop.step += 1
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {loop.step}; lower optim.lr")
        loop.last = last = loop.step == config.total_steps or out_of_time(config, processes, loop.timer)
        if last and loop.step < config.total_steps:
            logger.info("max_seconds %s spent: stopping at step %d of %d", config.max_seconds, loop.step,
                        config.total_steps)
            record["stopped"] = {"reason": "max_seconds", "step": loop.step, "planned_steps": config.total_steps}
        extra = on_step(loop) if on_step is not None else None
        if loop.step % config.log_every == 0 or last or extra is not None:
            log.write(step=loop.step, epoch=loop.step / config.steps_per_epoch, lr=lr, loss=loss.item(), grad_norm=norm,
                      seconds=loop.timer.elapsed(), **values, **(extra or {}))
            if loop.step % config.log_every == 0 or last:
                shown = "".join(f"  {k} {v:.4f}" for k, v in values.items())
                logger.info("step %d/%d  loss %.4f%s  %.1f s", loop.step, config.total_steps, loss.item(), shown,
                            loop.timer.elapsed())
        if processes.main and (loop.step % config.checkpoint_every == 0 or last):
            checkpoint_extra = on_checkpoint(loop) if on_checkpoint is not None else {}
            save_checkpoint(output / CHECKPOINT_NAME, wrapped, optimiser, scheduler, scaler, loop.step, config.model,
                            extra=checkpoint_extra, averaged=loop.averaged, kind=kind, config=to_dict(config),
                            seconds=loop.timer.elapsed())
            record.update(steps=loop.step, seconds=round(loop.timer.elapsed(), 1))
            write_record(output, record)
            plot_training(output, record.get("history"))
    if processes.distributed:  # that every rank ends with the same weights; alone it tells nothing
        logger.info("rank %d parameter digest %s", processes.rank, parameter_digest(wrapped))
    processes.barrier()
    return loop
