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
