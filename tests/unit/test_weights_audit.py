"""Manifest and inference settings that were accepted but meant nothing (or crashed): each is now one
clear error naming the file and the key."""

from __future__ import annotations

import pytest
import yaml

from lsmseg.config import InferenceSettings, ModelConfig, from_dict
from lsmseg.errors import ConfigError, WeightsError
from lsmseg.weights import load_manifest, load_model, resolve_manifest


def _edit(manifest, change):
    data = yaml.safe_load(manifest.read_text())
    change(data)
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    return manifest


@pytest.mark.parametrize("settings, message", [
    ({"sigma_scale": 0}, "sigma_scale 0.0 must be a finite number > 0"),
    ({"sigma_scale": float("nan")}, "sigma_scale nan"),
    ({"spacing": [0, 1, 1]}, "spacing (0.0, 1.0, 1.0) must be positive"),
    ({"spacing_tolerance": -0.1}, "spacing_tolerance -0.1"),
    ({"split_touching": float("nan")}, "split_touching nan"),
    ({"per_structure": {"blood_vesel": {"threshold": 0.3}}}, "'blood_vesel' is not a known structure"),
    ({"per_structure": {"vessels": {"threshold": 0.3}, "blood_vessel": {"threshold": 0.4}}},
     "'vessels' and 'blood_vessel' name the same structure"),
])
def test_meaningless_inference_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=f"^x: .*{message.replace('(', '.').replace(')', '.')}"):
        from_dict(InferenceSettings, settings, "x")


def test_meaningless_model_settings_are_refused():
    with pytest.raises(ConfigError, match=r"drop_path_rate 2.0 must be in \[0, 1\)"):
        from_dict(ModelConfig, {"drop_path_rate": 2.0}, "x")


def test_per_structure_alias_key_applies_to_its_structure():
    # Inference asks for the 2026 name (blood_vessel); a key written as an alias used to be ignored.
    settings = from_dict(InferenceSettings, {"per_structure": {"vessels": {"threshold": 0.3}}})
    assert settings.for_structure("blood_vessel").threshold == 0.3
    assert settings.for_structure("vessels").threshold == 0.3
    assert settings.for_structure("microglia").threshold == 0.5


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format=2), "manifest format 2 is not supported"),
    (lambda d: d.update(default=["general"]), "default: expected a model name, got list"),
    (lambda d: d["models"]["general"].pop("file"), "models.general: missing key 'file'"),
    (lambda d: d["models"]["general"]["inference"].update(sigma_scale=0), "sigma_scale 0.0"),
])
def test_bad_manifest_is_one_error_naming_it(tiny_weights, change, message):
    manifest = _edit(tiny_weights, change)
    with pytest.raises(WeightsError, match=message) as caught:
        load_manifest(manifest)
    assert str(manifest) in str(caught.value) and "\n" not in str(caught.value)


def test_bad_weights_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LSMSEG_WEIGHTS", str(tmp_path / "nothing"))
    with pytest.raises(WeightsError, match=f"^LSMSEG_WEIGHTS={tmp_path / 'nothing'}: weights manifest not found$"):
        resolve_manifest()


def test_weights_of_another_model_name_a_tensor(tiny_weights):
    manifest = _edit(tiny_weights, lambda d: d["models"]["general"]["model"].update(feature_size=24))
    loaded = load_manifest(manifest)
    with pytest.raises(WeightsError, match=r"do not fit the manifest's model config \(size mismatch for \S+"):
        load_model(loaded, loaded.entry_for()[1])


def test_empty_bundled_weights_variable_is_warned_about(tmp_path, monkeypatch, caplog, tiny_weights):
    # The image's variable naming a folder without weights used to fall through to other weights silently.
    monkeypatch.delenv("LSMSEG_WEIGHTS", raising=False)
    monkeypatch.setenv("LSMSEG_BUNDLED_WEIGHTS", str(tmp_path / "gone"))
    monkeypatch.setattr("lsmseg.weights.SOURCE_TREE_WEIGHTS", tiny_weights.parent)
    with caplog.at_level("WARNING", logger="lsmseg.weights"):
        assert resolve_manifest(model_dir=tmp_path / "no-mount") == tiny_weights
    assert f"LSMSEG_BUNDLED_WEIGHTS={tmp_path / 'gone'} holds no manifest.yaml; using" in caplog.text


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_unsupported_device_is_one_config_error(device):
    # meta loaded and then failed on every volume; mps (not built in) was a traceback.
    from lsmseg.model import select_device

    with pytest.raises(ConfigError, match=f"^--device {device}: not supported"):
        select_device(device)
