"""Resuming a run: one run per output folder, unchanged settings, the log without duplicate steps,
a corrupt checkpoint in one line, and export refusing a run that has not finished."""

import dataclasses
import json

import pytest
import torch

from lsmseg.config import to_dict
from lsmseg.errors import OutputError, WeightsError
from lsmseg.model import build_model
from lsmseg_training.config import OptimConfig, PretrainConfig, load_run_config
from lsmseg_training.engine import (
    CHECKPOINT_NAME, LOG_NAME, CsvLog, load_checkpoint, make_optimiser, make_scaler, resume_state, save_checkpoint,
)

from ..conftest import REPO

CONFIG = load_run_config(PretrainConfig, REPO / "training" / "configs" / "smoke_pretrain.yaml")


def _checkpoint(folder, step=2, config=CONFIG):
    model = build_model(config.model)
    optimiser, scheduler = make_optimiser(model, OptimConfig(), 10)
    save_checkpoint(folder / CHECKPOINT_NAME, model, optimiser, scheduler, make_scaler(torch.device("cpu"), False),
                    step, config.model, kind="pretrain", config=to_dict(config), seconds=12.5)


def test_a_second_run_into_a_folder_that_holds_one_is_refused(tmp_path, caplog):
    # A second run without --resume appended its steps to the first run's log.csv (1 2 3 4 1 2 3 4)
    # and overwrote its checkpoints without a word.
    assert resume_state(tmp_path, CONFIG.model, False, kind="pretrain", total_steps=4) is None  # empty: fine
    (tmp_path / LOG_NAME).write_text("step,loss\n1,0.5\n")
    with pytest.raises(OutputError, match=r"holds a run already \(log\.csv\); continue it with --resume"):
        resume_state(tmp_path, CONFIG.model, False, kind="pretrain", total_steps=4)
    # --resume where no checkpoint was written yet starts again from step 0, and says so.
    assert resume_state(tmp_path, CONFIG.model, True, kind="pretrain", total_steps=4) is None
    assert "no checkpoint to resume; starting the run again from step 0" in caplog.text


def test_resume_refuses_changed_settings_naming_them(tmp_path):
    # A resume with another lr, batch size or seed went on silently as if it were the same run.
    _checkpoint(tmp_path)
    changed = dataclasses.replace(CONFIG, batch_size=1, optim=dataclasses.replace(CONFIG.optim, lr=0.1))
    with pytest.raises(WeightsError) as error:
        resume_state(tmp_path, CONFIG.model, True, kind="pretrain", total_steps=4, config=to_dict(changed))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / CHECKPOINT_NAME}: batch_size is 1 in the config but was 2 in the run "
                              "being resumed (also changed: optim.lr); a resume continues the same run")
    # What a resume is for: more epochs, another time budget, threads or device.
    longer = dataclasses.replace(CONFIG, epochs=5, max_seconds=60.0, threads=1, device="cpu")
    state = resume_state(tmp_path, CONFIG.model, True, kind="pretrain", total_steps=10, config=to_dict(longer))
    assert state["step"] == 2 and state["seconds"] == 12.5


def test_the_log_drops_the_steps_logged_after_the_last_checkpoint(tmp_path):
    # A run killed after logging step 3 but checkpointed at step 2 is resumed at 2: step 3 was logged twice.
    path = tmp_path / LOG_NAME
    path.write_text("step,loss\n1,0.5\n2,0.4\n3,0.3\n4,0.")  # the last line torn by the kill
    CsvLog(path, ["step", "loss"], start_step=2).write(step=3, loss=0.25)
    assert path.read_text().splitlines() == ["step,loss", "1,0.5", "2,0.4", "3,0.25"]
    CsvLog(path, ["step", "loss"], start_step=3)  # nothing after the step: left as it is
    assert path.read_text().splitlines()[-1] == "3,0.25"


@pytest.mark.parametrize("size", [0, 100, 5000])
def test_a_truncated_checkpoint_is_one_clear_line(tmp_path, size):
    _checkpoint(tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[:size])
    with pytest.raises(WeightsError, match=r"checkpoint_last\.pt: cannot load checkpoint: the file is truncated or "
                       r"corrupt \(.*\); remove it to start the run again") as error:
        load_checkpoint(path, CONFIG.model)
    assert "\n" not in str(error.value)


def test_export_refuses_a_run_that_has_not_finished(tmp_path):
    # An unfinished run's record holds the best validation so far, without a file: export failed with
    # "incomplete run record (KeyError: 'file')".
    from lsmseg_training.export import export_run

    record = {"kind": "finetune", "name": "x", "steps": 2, "config": {}, "best": {"dice": 0.3, "step": 2}}
    (tmp_path / "run.json").write_text(json.dumps(record))
    for which in ("best", "final"):
        with pytest.raises(WeightsError, match=r": the run has not finished \(no '" + which + r"' checkpoint recorded; "
                           r"it stopped at step 2\); finish it with `lsmseg finetune --resume` before exporting"):
            export_run(tmp_path, tmp_path / "weights", checkpoint=which, min_component_voxels=0)
    assert not (tmp_path / "weights").exists()


def test_a_checkpoint_write_that_is_interrupted_leaves_the_previous_one(tmp_path, monkeypatch):
    _checkpoint(tmp_path, step=2)

    def torn_save(state, path):
        with open(path, "wb") as handle:
            handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # Ctrl-C (or SIGTERM, raised alike) in the middle of the write

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        _checkpoint(tmp_path, step=4)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME, CONFIG.model)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no temporary file left


def test_one_process_at_a_time_trains_into_a_folder(tmp_path):
    # A --resume started while the run was still training trained both into the folder: the log read
    # 1 2 5 6 3 4 7 5 8 6 7 8 and the checkpoints were whichever process wrote last.
    from lsmseg_training.engine import Processes, hold_output, teardown_processes

    first, second = (Processes(0, 1, 0, torch.device("cpu")) for _ in range(2))
    hold_output(tmp_path / "run", first)
    with pytest.raises(OutputError, match=r"run: another process is training into this folder now; wait for it"):
        hold_output(tmp_path / "run", second)
    teardown_processes(first)  # the first run ends (or is killed): the folder is free
    hold_output(tmp_path / "run", second)
    teardown_processes(second)


def test_resume_continues_with_the_same_data_at_another_location(tmp_path):
    # The check compared the data's absolute paths: the same run resumed with another $LSMSEG_DATA
    # (another machine, another clone) was refused, named data.test (never read in training), and
    # printed every set in full: a one-line message of ~3,000 characters.
    from lsmseg_training.config import FinetuneConfig
    from lsmseg_training.engine import changed_settings

    config = REPO / "training" / "configs" / "general_finetune_real_logtail.yaml"
    here, there = (to_dict(load_run_config(FinetuneConfig, config, data_root=root))
                   for root in (tmp_path / "real", tmp_path / "copy" / "real"))
    assert here["data"]["train"][0]["images"] != there["data"]["train"][0]["images"]
    assert changed_settings(here, there) == []
    # What the data is still counts: a set's weight, what it includes, its label mode.
    heavier = json.loads(json.dumps(there))
    heavier["data"]["train"][1]["weight"] = 7.0
    heavier["data"]["train"][0]["include"] = ["x" * 200]
    assert [key for key, _, _ in changed_settings(here, heavier)] == ["data.train.0.include", "data.train.1.weight"]
    _checkpoint(tmp_path, config=CONFIG)
    moved = to_dict(CONFIG)
    moved["data"]["train_phantoms"] = {**(moved["data"].get("train_phantoms") or {}), "folder": "/elsewhere"}
    moved["optim"]["lr"] = "x" * 500
    with pytest.raises(WeightsError) as error:
        resume_state(tmp_path, CONFIG.model, True, kind="pretrain", total_steps=4, config=moved)
    assert "optim.lr is 'xxx" in str(error.value) and len(str(error.value)) < 700


def test_a_torn_log_row_is_dropped_whatever_its_step_reads(tmp_path):
    # A line cut after its first digits ("1" of "13,...") read as step 1 and was kept.
    path = tmp_path / LOG_NAME
    path.write_text("step,loss\n" + "".join(f"{i},0.5\n" for i in range(1, 13)) + "1")
    CsvLog(path, ["step", "loss"], start_step=10)
    assert path.read_text().splitlines()[-2:] == ["9,0.5", "10,0.5"]


def test_run_folder_lock_errors_other_than_busy(tmp_path, monkeypatch, caplog):
    # Any OSError from flock read as "another process is training": on a file system without
    # flock no run could start. A read-only run folder was a traceback.
    import errno

    from lsmseg_training import engine
    from lsmseg_training.engine import Processes, hold_output, teardown_processes

    def unsupported(handle, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(engine.fcntl, "flock", unsupported)
    processes = Processes(0, 1, 0, torch.device("cpu"))
    hold_output(tmp_path / "run", processes)
    assert "cannot lock the run folder" in caplog.text and processes.held == []
    teardown_processes(processes)

    def read_only_file_system(path, mode="r", *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(engine, "open", read_only_file_system, raising=False)
    with pytest.raises(OutputError, match=r"ro: cannot write in the run folder \(.*Read-only file system"):
        hold_output(tmp_path / "ro", processes)


def test_a_resume_with_more_epochs_runs_its_first_step_on_the_longer_schedule(tmp_path):
    # The optimiser's saved lr (the old schedule's at the checkpoint, near its end) ran the first
    # resumed step: epochs 1 -> 2 logged 3e-06 at step 3 where the stretched schedule gives 3e-04.
    from lsmseg_training.engine import restore

    optim = OptimConfig(lr=1e-3, warmup_steps=0, min_lr_ratio=0.01)
    model = build_model(CONFIG.model)
    optimiser, scheduler = make_optimiser(model, optim, 4)
    for _ in range(3):
        optimiser.step()
        scheduler.step()
    scaler = make_scaler(torch.device("cpu"), False)
    save_checkpoint(tmp_path / CHECKPOINT_NAME, model, optimiser, scheduler, scaler, 3, CONFIG.model)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME, CONFIG.model)
    longer_model = build_model(CONFIG.model)
    longer, longer_scheduler = make_optimiser(longer_model, optim, 40)
    assert restore(state, longer_model, longer, longer_scheduler, scaler) == 3
    expected = make_optimiser(build_model(CONFIG.model), optim, 40)[1].lr_lambdas[0](3) * 1e-3
    assert longer.param_groups[0]["lr"] == pytest.approx(expected) and expected > 5e-4
    assert longer_scheduler.get_last_lr() == [pytest.approx(expected)]
    longer.step()
    longer_scheduler.step()  # and the schedule goes on from there
    assert longer.param_groups[0]["lr"] == pytest.approx(longer_scheduler.lr_lambdas[0](4) * 1e-3)


def test_a_run_checkpointed_before_batch_dice_existed_still_resumes(tmp_path):
    # Checkpoints record their config since ddf31cb (2026-12-07 09:00); those written before
    # batch_dice was added (runs/general/finetune_mended, 15:10) lack the key, so their resume was
    # refused: "batch_dice is False in the config but was None in the run being resumed".
    config = REPO / "training" / "configs" / "general_finetune_real_logtail_mended.yaml"
    from lsmseg_training.config import FinetuneConfig
    from lsmseg_training.engine import changed_settings

    now = to_dict(load_run_config(FinetuneConfig, config, data_root=tmp_path))
    before = {key: value for key, value in now.items() if key != "batch_dice"}
    assert changed_settings(before, now) == []
    # Turned on for a run that had none, it is a change.
    assert [key for key, _, _ in changed_settings(before, {**now, "batch_dice": True})] == ["batch_dice"]
