"""Encoder transfer (loud on mismatch), masked L1, schedule, checkpoints refuse other architectures."""

import dataclasses

import pytest
import torch

from lsmseg.config import ModelConfig
from lsmseg.errors import WeightsError
from lsmseg.model import build_model
from lsmseg.weights import save_weights
from lsmseg_training.config import OptimConfig
from lsmseg_training.engine import load_checkpoint, make_averaged, make_optimiser, make_scaler, save_checkpoint
from lsmseg_training.finetune import dice_scores, load_pretrained_encoder
from lsmseg_training.pretrain import ENCODER_PREFIXES, encoder_state, masked_l1

TINY = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), roi=(32, 64, 64))


def _model(config=TINY, seed=0):
    torch.manual_seed(seed)
    return build_model(config)


def test_encoder_transfer_copies_every_encoder_tensor_and_nothing_else(tmp_path):
    source, target = _model(seed=1), _model(seed=2)
    save_weights(encoder_state(source), tmp_path / "encoder.safetensors")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    summary = load_pretrained_encoder(target, tmp_path / "encoder.safetensors", min_fraction=0.9)
    assert summary["matched"] == summary["encoder_tensors"] > 50
    after, src = target.state_dict(), source.state_dict()
    for key in after:
        if key.startswith(ENCODER_PREFIXES):
            assert torch.equal(after[key], src[key]), key
        else:  # decoder and output head keep their own initialisation
            assert torch.equal(after[key], before[key]), key


def test_checkpoint_of_another_architecture_fails_loudly(tmp_path):
    bigger = dataclasses.replace(TINY, feature_size=24)
    save_weights(encoder_state(_model(bigger)), tmp_path / "encoder.safetensors")
    with pytest.raises(WeightsError, match=r"encoder\.safetensors: checkpoint is for another architecture: only \d+ of \d+ encoder tensors match"):
        load_pretrained_encoder(_model(), tmp_path / "encoder.safetensors", min_fraction=0.9)


def test_unrelated_checkpoint_fails_loudly(tmp_path):
    save_weights({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match="only 0 of"):
        load_pretrained_encoder(_model(), tmp_path / "other.safetensors", min_fraction=0.9)


def test_ddp_prefixed_names_are_accepted(tmp_path):
    state = {f"module.{k}": v for k, v in encoder_state(_model(seed=1)).items()}
    save_weights(state, tmp_path / "ddp.safetensors")
    summary = load_pretrained_encoder(_model(), tmp_path / "ddp.safetensors", min_fraction=1.0)
    assert summary["matched"] == summary["encoder_tensors"]


def test_masked_l1_weights_hidden_and_visible_voxels():
    target = torch.zeros(1, 1, 4, 4, 4)
    reconstruction = torch.zeros_like(target)
    mask = torch.zeros_like(target, dtype=torch.bool)
    mask[..., :2] = True
    reconstruction[mask] = 0.5  # error 0.5 on hidden voxels
    reconstruction[~mask] = 0.1  # error 0.1 on visible voxels
    loss, hidden, visible = masked_l1(reconstruction, target, mask, visible_weight=0.2)
    assert hidden.item() == pytest.approx(0.5) and visible.item() == pytest.approx(0.1)
    assert loss.item() == pytest.approx(0.5 + 0.2 * 0.1)


def test_warmup_then_cosine():
    param = torch.nn.Parameter(torch.zeros(1))
    model = torch.nn.Module()
    model.p = param
    optimiser, scheduler = make_optimiser(model, OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1), 20)
    lrs = []
    for _ in range(20):
        lrs.append(scheduler.get_last_lr()[0])
        optimiser.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] == pytest.approx(0.1, abs=0.02)


def test_resume_checkpoint_of_another_architecture_is_refused(tmp_path):
    model = _model()
    optimiser, scheduler = make_optimiser(model, OptimConfig(), 10)
    save_checkpoint(tmp_path / "c.pt", model, optimiser, scheduler, make_scaler(torch.device("cpu"), False), 3, TINY)
    assert load_checkpoint(tmp_path / "c.pt", TINY)["step"] == 3
    with pytest.raises(WeightsError, match=r"c\.pt: checkpoint is for another architecture \(feature_size 12 here, 24"):
        load_checkpoint(tmp_path / "c.pt", dataclasses.replace(TINY, feature_size=24))


def test_moving_average_of_the_weights_and_its_resume(tmp_path):
    """decay d: the first update copies the weights, then avg = d * avg + (1 - d) * weights; a checkpoint keeps it."""
    torch.manual_seed(0)
    model = torch.nn.Conv3d(1, 2, 3)
    assert make_averaged(model, 0.0) is None
    averaged = make_averaged(model, 0.75)
    first = model.weight.detach().clone()
    averaged.update_parameters(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    averaged.update_parameters(model)
    torch.testing.assert_close(averaged.module.weight, 0.75 * first + 0.25 * (first + 1.0))
    assert not torch.equal(averaged.module.weight, model.weight)

    optimiser, scheduler = make_optimiser(model, OptimConfig(), 10)
    save_checkpoint(tmp_path / "c.pt", model, optimiser, scheduler, make_scaler(torch.device("cpu"), False), 2, TINY,
                    averaged=averaged)
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    resumed = make_averaged(model, 0.75, state)
    torch.testing.assert_close(resumed.module.weight, averaged.module.weight)
    assert int(resumed.n_averaged) == 2
    # A checkpoint without an average (a run that kept none) starts it from the restored weights.
    del state["averaged"]
    torch.testing.assert_close(make_averaged(model, 0.75, state).module.weight, model.weight)


def test_dice_scores_over_thresholds():
    import numpy as np

    label = np.zeros((4, 4, 4), bool)
    label[:2] = True
    probabilities = np.where(label, 0.6, 0.3).astype(np.float32)
    assert dice_scores(probabilities, label, [0.2, 0.5, 0.7]) == pytest.approx([2 * 32 / (64 + 32), 1.0, 0.0])


def test_exported_spacing_is_the_training_grid_spacing():
    from lsmseg_training.export import training_spacing

    assert training_spacing({"target_spacing": [2, 1, 1]}, {}) == (2.0, 1.0, 1.0)
    assert training_spacing({"downscale": 1.0}, {}) is None  # native grids: never resample
    same = {"volumes": [{"training_spacing": [3.0, 3.0, 3.0]}, {"training_spacing": [3.0, 3.0, 3.0]}]}
    assert training_spacing({"downscale": 1 / 3}, same) == (3.0, 3.0, 3.0)
    mixed = {"volumes": [{"training_spacing": [3.0, 3.0, 3.0]}, {"training_spacing": [4.0, 3.0, 3.0]}]}
    assert training_spacing({"downscale": 1 / 3}, mixed) is None
    assert training_spacing({"downscale": 1 / 3}, {"volumes": [{"training_spacing": None}]}) is None


def test_amp_dtype_and_grad_scaler_follow_the_config(monkeypatch):
    """CPU: never autocast nor scale. CUDA: bf16 where supported (no scaler), fp16 with a GradScaler."""
    from lsmseg_training.engine import amp_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype(cpu, True, "fp16") is None and not make_scaler(cpu, True, "fp16").is_enabled()
    assert amp_dtype(cuda, False, "fp16") is None
    assert amp_dtype(cuda, True, "fp16") == torch.float16 and amp_dtype(cuda, True, "bf16") == torch.bfloat16
    asked = []
    for supported, expected in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **k: asked.append(k) or supported)
        assert amp_dtype(cuda, True, "auto") == expected
    assert asked == [{"including_emulation": False}] * 2  # emulated bf16 (a T4) is slower than fp16


def test_max_seconds_stops_every_rank_together():
    from lsmseg_training.engine import Processes, Timer, out_of_time

    processes = Processes(0, 1, 0, torch.device("cpu"))
    timer = Timer()
    budget = lambda seconds: type("Config", (), {"max_seconds": seconds})()  # noqa: E731
    assert not out_of_time(budget(None), processes, timer)
    assert not out_of_time(budget(3600.0), processes, timer)
    timer.start -= 10.0
    assert out_of_time(budget(5.0), processes, timer)


def test_export_records_the_splits_by_source():
    from lsmseg_training.export import splits_by_source

    record = {"train": {"images:1008": ["p_1008_1", "p_1008_0"], "labels:1008": ["p_1008_2"], "volume.tif:volume": ["volume"]},
              "validation": {"images:1147": ["p_1147_0"]}}
    assert splits_by_source(record) == {"train": {"1008": ["p_1008_0", "p_1008_1", "p_1008_2"], "volume": ["volume"]},
                                        "validation": {"1147": ["p_1147_0"]}}
