"""Training configs are strict: a typo or a wrong type is refused, naming the file and the key."""

from pathlib import Path

import pytest

from lsmseg.errors import ConfigError
from lsmseg_training.config import FinetuneConfig, PretrainConfig, load_run_config

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


def _config_class(path: Path):
    return FinetuneConfig if "finetune" in path.stem else PretrainConfig


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    config = load_run_config(_config_class(path), path)
    assert config.total_steps >= 1
    assert config.model.roi[0] % 32 == 0


def _write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


MINIMAL = """\
name: t
output: {out}
model: {{feature_size: 12, roi: [32, 64, 64]}}
data:
  train: [{{images: {images}}}]
"""


def test_unknown_key_is_refused_with_file_and_key(tmp_path):
    path = _write(tmp_path, MINIMAL.format(out=tmp_path, images=tmp_path) + "batchsize: 4\n")
    with pytest.raises(ConfigError) as error:
        load_run_config(PretrainConfig, path)
    assert str(path) in str(error.value) and "unknown key 'batchsize'" in str(error.value)


def test_nested_unknown_key_names_its_place(tmp_path):
    text = MINIMAL.format(out=tmp_path, images=tmp_path).replace("{images:", "{imgs: x, images:")
    with pytest.raises(ConfigError, match=r"data\.train\[0\]: unknown key 'imgs'"):
        load_run_config(PretrainConfig, _write(tmp_path, text))


def test_wrong_type_is_refused(tmp_path):
    path = _write(tmp_path, MINIMAL.format(out=tmp_path, images=tmp_path) + "batch_size: four\n")
    with pytest.raises(ConfigError, match=r"config\.yaml\.batch_size: expected an integer"):
        load_run_config(PretrainConfig, path)


def test_invalid_roi_is_refused(tmp_path):
    text = MINIMAL.format(out=tmp_path, images=tmp_path).replace("[32, 64, 64]", "[32, 32, 32]")
    with pytest.raises(ConfigError, match="too small"):
        load_run_config(PretrainConfig, _write(tmp_path, text))


def test_unknown_label_values_option(tmp_path):
    text = MINIMAL.format(out=tmp_path, images=tmp_path).replace("{images:", "{label_values: any, images:")
    with pytest.raises(ConfigError, match="label_values: 'any' is not one of"):
        load_run_config(FinetuneConfig, _write(tmp_path, text))


def test_unknown_phantom_kind(tmp_path):
    text = MINIMAL.format(out=tmp_path, images=tmp_path) + "  train_phantoms: {folder: p, kinds: [axons]}\n"
    with pytest.raises(ConfigError, match="unknown phantom kind 'axons'"):
        load_run_config(PretrainConfig, _write(tmp_path, text))


def test_set_overrides_are_checked_like_the_file():
    path = CONFIGS / "smoke_finetune.yaml"
    config = load_run_config(FinetuneConfig, path, overrides=["max_seconds=30", "model.roi=[32, 32, 64]",
                                                              "optim.amp_dtype=fp16", "pretrained=null"])
    assert config.max_seconds == 30 and tuple(config.model.roi) == (32, 32, 64)
    assert config.optim.amp_dtype == "fp16" and config.pretrained is None and config.optim.lr == 0.0003
    for bad, message in (("model.fature_size=24", "fature_size"), ("optim.amp_dtype=fp8", "amp_dtype"),
                         ("max_seconds", "KEY=VALUE"), ("max_seconds=-1", "max_seconds"),
                         ("average_decay=1.0", "average_decay")):
        with pytest.raises(ConfigError, match=message):
            load_run_config(FinetuneConfig, path, overrides=[bad])


@pytest.mark.parametrize("bad, message", [("threads=-3", "threads -3 must be positive"),
                                          ("threads=0", "threads 0 must be positive"),
                                          ("max_seconds=.nan", "max_seconds must be positive"),
                                          ("max_seconds=0", "max_seconds must be positive"),
                                          ("optim.lr=-1", r"optim: lr -1.0 must be >= 0"),
                                          ("optim.grad_clip=-1", "grad_clip must be >= 0"),
                                          ("optim.min_lr_ratio=2", r"min_lr_ratio in \[0, 1\]"),
                                          ("data.lower_percentile=99.9", "0 <= lower_percentile < upper_percentile"),
                                          ("data.target_spacing=[.nan, 1, 1]", "target_spacing .* must be positive"),
                                          ("data.target_spacing=[.inf, 1, 1]", "target_spacing .* must be positive"),
                                          ("data.train=[{images: x, spacing: [.nan, 1, 1]}]", "spacing .* must be positive"),
                                          ("data.train=[{images: x, spacing: [1, -1, 1]}]", "spacing .* must be positive"),
                                          ("data.train=[{images: x, weight: .nan}]", "weight nan must be positive"),
                                          ("data.train=[{images: x, weight: .inf}]", "weight inf must be positive"),
                                          ("data.train_phantoms={folder: x, spacing: [0, 1, 1]}", "spacing must be three positive"),
                                          ("data.train_phantoms={folder: x, spacing: [-3, 1, 1]}", "spacing must be three positive"),
                                          ("data.train_phantoms={folder: x, weight: .nan}", "must be positive"),
                                          ("data.train_phantoms={folder: x, seed: -1}", "seed must be a whole number >= 0"),
                                          ("data.train_phantoms={folder: x, spacing: [50, 1, 1]}", "within 0.05-20 um")])
def test_numbers_out_of_range_are_refused_when_loaded(bad, message):
    # threads -3 reached torch.set_num_threads (a traceback); 0 was taken as "torch's default"; a NaN
    # budget passed `<= 0` and silently meant no budget; a negative lr or inverted percentiles were
    # tracebacks from torch / the normaliser, a negative grad_clip silently meant no clipping. A NaN or
    # infinite spacing or set weight passed `<= 0` (a traceback in the sampler, or NaN recorded as the
    # training spacing); a phantom spacing was not checked until the phantoms were written.
    with pytest.raises(ConfigError, match=message):
        load_run_config(PretrainConfig, CONFIGS / "smoke_pretrain.yaml", overrides=[bad])


@pytest.mark.parametrize("kind, extra, other", [("pretrain", {}, "finetune"), (None, {}, "finetune"),
                                                ("finetune", {"history": [], "best": {}}, "pretrain"),
                                                (None, {"history": [], "best": {}}, "pretrain")])
def test_resume_refuses_another_stage_checkpoint_and_a_finished_run(tmp_path, kind, extra, other):
    # Fine-tuning resumed a pretraining checkpoint (same architecture) and validated the reconstruction
    # network as a segmenter; a checkpoint at or past the config's steps trained nothing and reported
    # an encoder or best checkpoint it had not written. Checkpoints without a kind are judged by their extra.
    import torch

    from lsmseg.errors import WeightsError
    from lsmseg.model import build_model
    from lsmseg_training.config import OptimConfig
    from lsmseg_training.engine import CHECKPOINT_NAME, make_optimiser, make_scaler, resume_state, save_checkpoint

    config = load_run_config(PretrainConfig, CONFIGS / "smoke_pretrain.yaml").model
    model = build_model(config)
    optimiser, scheduler = make_optimiser(model, OptimConfig(), 10)
    save_checkpoint(tmp_path / CHECKPOINT_NAME, model, optimiser, scheduler, make_scaler(torch.device("cpu"), False),
                    4, config, extra=extra, kind=kind)
    mine = {"pretrain": "finetune", "finetune": "pretrain"}[other]
    assert resume_state(tmp_path, config, True, kind=mine, total_steps=5)["step"] == 4
    with pytest.raises(WeightsError, match=f"{CHECKPOINT_NAME}: checkpoint is from a {mine} run, not {other}"):
        resume_state(tmp_path, config, True, kind=other, total_steps=5)
    with pytest.raises(WeightsError, match="checkpoint is at step 4, the config's run is 4 steps"):
        resume_state(tmp_path, config, True, kind=mine, total_steps=4)
    assert resume_state(tmp_path / "none", config, True, kind=other, total_steps=4) is None
