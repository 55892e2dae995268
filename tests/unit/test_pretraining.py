"""Masked pretraining against its method (shared/seed/method.md): what the network sees and is scored
against, the masks, a resume, and what fine-tuning takes over from the pretrained encoder."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lsmseg_training import finetune, pretrain
from lsmseg_training.config import (
    DataConfig,
    FinetuneConfig,
    MaskingConfig,
    OptimConfig,
    PretrainConfig,
    ValidationConfig,
    VolumeSet,
    load_run_config,
)
from lsmseg_training.data import PatchStream, cuboid_mask, prepare_volumes
from lsmseg_training.pretrain import ENCODER_PREFIXES, encoder_state

from lsmseg import io
from lsmseg.config import ModelConfig
from lsmseg.errors import WeightsError
from lsmseg.model import build_model
from lsmseg.normalise import normalise, percentiles
from lsmseg.weights import load_state_dict, save_weights

TINY = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), roi=(32, 64, 64))
CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


def _pretrain_config(tmp_path, images, **changes) -> PretrainConfig:
    config = PretrainConfig(
        name="t", output=tmp_path / "run", model=TINY, data=DataConfig(train=[VolumeSet(images=images)], workers=0),
        optim=OptimConfig(lr=1e-3, warmup_steps=1), masking=MaskingConfig(count=(2, 4), size=(0.2, 0.4)),
        batch_size=2, epochs=1, steps_per_epoch=1, checkpoint_every=1, log_every=1, seed=0, device="cpu", threads=1,
    )
    return dataclasses.replace(config, **changes)


def _labelled_volume(tmp_path) -> None:
    """tmp_path/images/a.tif and its label tmp_path/labels/a.tif (one small box of foreground)."""
    image = np.random.default_rng(0).integers(0, 1000, (40, 80, 80), dtype=np.uint16)
    label = np.zeros(image.shape, np.uint8)
    label[18:22, 30:40, 30:40] = 1
    io.write_volume(image, tmp_path / "images" / "a.tif")
    io.write_volume(label, tmp_path / "labels" / "a.tif")


def _model(config=TINY, seed=0):
    torch.manual_seed(seed)
    return build_model(config)


def test_hidden_voxels_are_zero_in_the_normalised_input_and_the_target_is_the_unmasked_image(tmp_path, monkeypatch):
    # Intensities around 0 (lo < 0): a raw 0 normalises to about 0.5, so hiding voxels before
    # normalisation would show here as a non-zero input.
    image = np.random.default_rng(0).normal(0.0, 100.0, size=TINY.roi).astype(np.float32)
    io.write_volume(image, tmp_path / "images" / "a.tif")
    seen = {}
    build = pretrain.build_model

    def spied_model(config):
        model = build(config)
        forward = model.forward
        model.forward = lambda x: (seen.setdefault("input", x.detach().clone()), forward(x))[1]
        return model

    def spied_loss(reconstruction, target, mask, visible_weight):
        seen.update(target=target.clone(), mask=mask.clone())
        return pretrain_loss(reconstruction, target, mask, visible_weight)

    pretrain_loss = pretrain.masked_l1
    monkeypatch.setattr(pretrain, "build_model", spied_model)
    monkeypatch.setattr(pretrain, "masked_l1", spied_loss)
    pretrain.run_pretraining(_pretrain_config(tmp_path, tmp_path / "images"))

    x, target, mask = seen["input"], seen["target"], seen["mask"]
    expected = torch.from_numpy(normalise(image, *percentiles(image)))  # the one normaliser, whole patch = volume
    assert mask.any() and (~mask).any()
    assert not torch.equal(mask[0], mask[1])  # one mask per sample, not per batch
    assert torch.count_nonzero(x[mask]) == 0  # hidden voxels are 0 in what the network sees
    assert torch.equal(x[~mask], target[~mask])
    for sample in target:  # the loss compares with the unmasked normalised image, hidden voxels included
        assert torch.equal(sample[0], expected)
    assert float(expected[mask[0, 0]].abs().mean()) > 0.2  # so the check above could fail


def test_masks_are_random_per_sample_and_reproducible_with_the_seed(tmp_path):
    io.write_volume(np.random.default_rng(0).integers(0, 1000, (40, 80, 80), dtype=np.uint16), tmp_path / "a.tif")
    records = prepare_volumes(DataConfig(train=[VolumeSet(images=tmp_path / "a.tif")]), "train", False, "cfg")

    def masks(seed, rank=0):
        stream = iter(PatchStream(records, TINY.roi, seed=seed, set_weights=[1.0], masking=MaskingConfig(), rank=rank))
        return [next(stream)["mask"] for _ in range(3)]

    first, again, other_seed, other_rank = masks(0), masks(0), masks(1), masks(0, rank=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], other_seed[0]) and not torch.equal(first[0], other_rank[0])


def test_share_hidden_with_the_shipped_masking_settings():
    """What training/README.md says: count 4-16 cuboids of 0.1-0.35 of each side hide about a
    tenth of the patch; max_fraction 0.6 is never reached, and where it is reached the last cuboid
    overshoots it (a cap on adding cuboids, not on the share)."""
    rng = np.random.default_rng(0)
    shares = np.array([cuboid_mask((64, 64, 64), MaskingConfig(), rng).mean() for _ in range(400)])
    assert 0.08 < shares.mean() < 0.13 and shares.max() < 0.3
    capped = np.array([cuboid_mask((64, 64, 64), MaskingConfig(max_fraction=0.05), rng).mean() for _ in range(100)])
    assert (capped > 0.05).mean() > 0.5


def test_a_resume_takes_its_weights_from_the_checkpoint_and_keeps_the_runs_init(tmp_path):
    """A resumed run neither needs the init file (its weights come from the checkpoint: README,
    RESUMABLE_CHANGES) nor forgets in run.json that it started from it."""
    io.write_volume(np.random.default_rng(0).integers(0, 1000, (40, 80, 80), dtype=np.uint16),
                    tmp_path / "images" / "a.tif")
    save_weights(_model(seed=5).state_dict(), tmp_path / "init.safetensors")
    config = _pretrain_config(tmp_path, tmp_path / "images", init=tmp_path / "init.safetensors", batch_size=1)
    started = pretrain.run_pretraining(config)["init"]
    assert started["sha256"]
    (tmp_path / "init.safetensors").unlink()  # moved away after the run began
    resumed = pretrain.run_pretraining(dataclasses.replace(config, epochs=2), resume=True)
    assert resumed["steps"] == 2 and resumed["init"] == started
    assert json.loads((tmp_path / "run" / "run.json").read_text())["init"] == started
    # init unset on resume (allowed): still the same provenance
    resumed = pretrain.run_pretraining(dataclasses.replace(config, epochs=3, init=None), resume=True)
    assert resumed["init"] == started
    checkpoint = torch.load(tmp_path / "run" / "checkpoint_last.pt", weights_only=True)
    encoder = load_state_dict(tmp_path / "run" / pretrain.ENCODER_FILE, None)
    assert checkpoint["step"] == 3 and len(encoder) == resumed["encoder_tensors"] > 50
    assert all(torch.equal(tensor, checkpoint["model"][name]) for name, tensor in encoder.items())


def test_the_pretrained_encoder_is_finetunings_starting_encoder(tmp_path, monkeypatch):
    _labelled_volume(tmp_path)
    pretrained = _model(seed=7)
    save_weights(encoder_state(pretrained), tmp_path / "encoder.safetensors")
    started = {}

    class Started(Exception):
        pass

    def first_step(config, processes, records, model, *args, **kwargs):
        started.update({k: v.clone() for k, v in model.state_dict().items()})
        raise Started

    monkeypatch.setattr(finetune, "train_loop", first_step)
    config = FinetuneConfig(
        name="t", output=tmp_path / "run", model=TINY, pretrained=tmp_path / "encoder.safetensors",
        data=DataConfig(train=[VolumeSet(images=tmp_path / "images", labels=tmp_path / "labels")], workers=0),
        validation=ValidationConfig(every=0), batch_size=1, epochs=1, steps_per_epoch=1, seed=0, device="cpu", threads=1,
    )
    with pytest.raises(Started):
        finetune.run_finetuning(config)
    scratch = _model(seed=config.seed).state_dict()  # what fine-tuning would start from without it
    source = pretrained.state_dict()
    encoder = [k for k in started if k.startswith(ENCODER_PREFIXES)]
    assert len(encoder) == 89
    learned = [k for k in encoder if not torch.equal(source[k], scratch[k])]
    assert len(learned) > 50  # parameters (fixed buffers such as relative_position_index agree anyway)
    assert all(torch.equal(started[k], source[k]) for k in encoder)
    assert all(torch.equal(started[k], scratch[k]) for k in started if k not in encoder)  # decoder untouched


# Another architecture's encoder whose tensors mostly fit by name (over min_matched_fraction) was
# loaded in part, with one log line.
@pytest.mark.parametrize("other", [dataclasses.replace(TINY, num_heads=(3, 6, 12, 24)),
                                   dataclasses.replace(TINY, depths=(2, 2, 2, 2))], ids=["num_heads", "depths"])
def test_an_encoder_of_another_shape_is_refused_in_one_line(tmp_path, other):
    save_weights(encoder_state(_model(other, seed=1)), tmp_path / "encoder.safetensors")
    with pytest.raises(WeightsError, match=r"encoder\.safetensors: checkpoint is for another architecture") as caught:
        finetune.load_pretrained_encoder(_model(), tmp_path / "encoder.safetensors", 0.9, "cfg.yaml")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("cfg.yaml: pretrained: ")


def test_the_paper_scale_pretraining_config_is_the_methods():
    config = load_run_config(PretrainConfig, CONFIGS / "selma3d_pretrain_gpu.yaml")
    assert tuple(config.model.roi) == (64, 64, 64) and config.batch_size == 4 and config.epochs == 100
    assert config.data.downscale == pytest.approx(1 / 3) and config.data.upper_tail == "clip"
    finetuning = load_run_config(FinetuneConfig, CONFIGS / "selma3d_finetune_gpu.yaml")
    # one normalisation and grid in both stages, and the encoder fine-tuning loads is this run's
    for key in ("lower_percentile", "upper_percentile", "upper_tail", "downscale", "target_spacing"):
        assert getattr(config.data, key) == getattr(finetuning.data, key), key
    assert Path(finetuning.pretrained) == Path(config.output) / pretrain.ENCODER_FILE
    assert dataclasses.replace(finetuning.model, roi=config.model.roi) == config.model


def test_a_finetuning_resume_takes_its_weights_from_the_checkpoint_and_keeps_init_and_pretrained(tmp_path):
    """As pretraining's: init and pretrained may move or be unset on --resume (RESUMABLE_CHANGES);
    the resumed run needs neither file and keeps both in run.json."""
    _labelled_volume(tmp_path)
    save_weights(_model(seed=5).state_dict(), tmp_path / "init.safetensors")
    save_weights(encoder_state(_model(seed=7)), tmp_path / "encoder.safetensors")
    config = FinetuneConfig(
        name="t", output=tmp_path / "run", model=TINY, init=tmp_path / "init.safetensors",
        pretrained=tmp_path / "encoder.safetensors",
        data=DataConfig(train=[VolumeSet(images=tmp_path / "images", labels=tmp_path / "labels")], workers=0),
        validation=ValidationConfig(every=0), batch_size=1, epochs=1, steps_per_epoch=1, checkpoint_every=1,
        seed=0, device="cpu", threads=1,
    )
    first = finetune.run_finetuning(config)
    assert first["init"]["sha256"] and first["pretrained"]["sha256"]
    (tmp_path / "init.safetensors").unlink()  # both moved away after the run began
    (tmp_path / "encoder.safetensors").unlink()
    resumed = finetune.run_finetuning(dataclasses.replace(config, epochs=2), resume=True)
    assert resumed["steps"] == 2
    assert (resumed["init"], resumed["pretrained"]) == (first["init"], first["pretrained"])
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (recorded["init"], recorded["pretrained"]) == (first["init"], first["pretrained"])
    resumed = finetune.run_finetuning(dataclasses.replace(config, epochs=3, init=None, pretrained=None), resume=True)
    assert (resumed["init"], resumed["pretrained"]) == (first["init"], first["pretrained"])
