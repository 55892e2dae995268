"""Weights as data: a bad manifest, checkpoint or setting is one error naming the file and the key; the
bytes checked are the bytes loaded; an interrupted or failed export leaves the folder's weights as
they were; a model is found by the structure a name stands for."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lsmseg.config import InferenceSettings, ModelConfig, from_dict
from lsmseg.errors import ConfigError, WeightsError
from lsmseg.weights import load_manifest, load_model, resolve_manifest

REPO_WEIGHTS = Path(__file__).resolve().parents[2] / "weights"


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


# --- 2026-12-07 audit: weights end to end --------------------------------------------------------

def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_interrupted_forced_export_keeps_the_replaced_checkpoint(tmp_path, tiny_model_config, tiny_model, monkeypatch):
    # --force wrote the new checkpoint over the old one; a failure (Ctrl-C in the final check) put the
    # old manifest back but not the old file: the folder's weights then failed their own checksum.
    import torch
    from lsmseg_training import export

    from lsmseg.model import build_model

    from .test_weights import _finished_run

    old_run, new_run, weights = tmp_path / "old", tmp_path / "new", tmp_path / "weights"
    _finished_run(old_run, tiny_model_config, tiny_model)
    torch.manual_seed(1)
    _finished_run(new_run, tiny_model_config, build_model(tiny_model_config))
    export.export_run(old_run, weights, min_component_voxels=0)
    before = {p.name: p.read_bytes() for p in weights.iterdir()}
    monkeypatch.setattr(export, "load_model", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        export.export_run(new_run, weights, force=True, min_component_voxels=0)
    assert {p.name: p.read_bytes() for p in weights.iterdir()} == before
    monkeypatch.undo()
    loaded = load_manifest(weights)
    load_model(loaded, loaded.entry_for()[1])  # still verifies and loads


def test_failed_export_removes_the_folders_it_made(tmp_path, tiny_model_config, tiny_model, monkeypatch):
    # Only the innermost new folder was removed: -o new/deeper/weights left new/deeper behind.
    from lsmseg_training import export

    from .test_weights import _finished_run

    run = tmp_path / "run"
    _finished_run(run, tiny_model_config, tiny_model)
    monkeypatch.setattr(export, "load_model", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        export.export_run(run, tmp_path / "new" / "deeper" / "weights", min_component_voxels=0)
    assert not (tmp_path / "new").exists()


def test_reexport_gives_the_same_checkpoint_bytes_and_its_own_sha256(tmp_path, tiny_model_config, tiny_model):
    from lsmseg_training.export import export_run

    from lsmseg.weights import sha256_file

    from .test_weights import _finished_run

    run = tmp_path / "run"
    _finished_run(run, tiny_model_config, tiny_model)
    first, second = (load_manifest(export_run(run, tmp_path / w, min_component_voxels=0)) for w in ("a", "b"))
    assert (tmp_path / "a" / "general.safetensors").read_bytes() == (tmp_path / "b" / "general.safetensors").read_bytes()
    assert first.models["general"].sha256 == sha256_file(tmp_path / "a" / "general.safetensors")
    assert first.models["general"].sha256 == second.models["general"].sha256


def _two_models(manifest, listed, name="vessel-model"):
    # A second model beside the default, listing `listed` among its structures.
    def change(data):
        data["models"][name] = dict(data["models"]["general"], structures=listed)
    return _edit(manifest, change)


@pytest.mark.parametrize("listed", [["vessels"], ["blood_vessel"], ["Vessels"]])
@pytest.mark.parametrize("asked", ["blood_vessel", "vessels", "Vessels", "vessel"])
def test_entry_for_finds_a_model_by_the_structure_a_name_stands_for(tiny_weights, listed, asked):
    # Only the exact string matched: `--structure blood_vessel` with a model listing `vessels` (the
    # shipped manifest's words) used the default model without a word.
    manifest = load_manifest(_two_models(tiny_weights, listed))
    assert manifest.entry_for(asked)[0] == "vessel-model"
    assert manifest.entry_for("cfos_neuron")[0] == "general" and manifest.entry_for(None)[0] == "general"


@pytest.mark.parametrize("name, asked", [("blood_vessel", "vessels"), ("vessels", "blood_vessel")])
def test_entry_for_finds_a_model_named_for_the_structure(tiny_weights, name, asked):
    manifest = load_manifest(_two_models(tiny_weights, [], name=name))
    assert manifest.entry_for(asked)[0] == name


@pytest.mark.parametrize("sha", ["", "abc", "g" * 64, "0" * 63])
def test_malformed_sha256_is_refused_when_the_manifest_is_read(tiny_weights, sha):
    # Was refused only when loading, as a "checksum mismatch (expected sha256 ...)" against nothing.
    manifest = _edit(tiny_weights, lambda d: d["models"]["general"].update(sha256=sha))
    with pytest.raises(WeightsError, match=r"manifest\.yaml:models\.general\.sha256: .* is not a sha256 digest") as info:
        load_manifest(manifest)
    assert "\n" not in str(info.value)


def test_a_folder_in_place_of_the_checkpoint_is_named_as_such(tiny_weights):
    # It was "weights file is missing" though there is something there.
    checkpoint = tiny_weights.parent / "general.safetensors"
    checkpoint.unlink()
    checkpoint.mkdir()
    loaded = load_manifest(tiny_weights)
    with pytest.raises(WeightsError, match=r"general\.safetensors: not a file"):
        load_model(loaded, loaded.entry_for()[1])


@pytest.mark.parametrize("tamper, message", [
    ("symlink_out", "lies outside the manifest's folder"),
    ("dot", "lies outside the manifest's folder"),
    ("truncated_resummed", r"cannot load weights \(SafetensorError"),
])
def test_tampered_weights_folder_is_one_line_naming_the_file(tmp_path, tiny_weights, tamper, message):
    import os

    from lsmseg.weights import sha256_file

    folder = tiny_weights.parent
    checkpoint = folder / "general.safetensors"
    if tamper == "symlink_out":
        outside = tmp_path / "outside.safetensors"
        checkpoint.rename(outside)
        os.symlink(outside, checkpoint)
    elif tamper == "dot":
        _edit(tiny_weights, lambda d: d["models"]["general"].update(file="."))
    else:
        checkpoint.write_bytes(checkpoint.read_bytes()[:100])
        _edit(tiny_weights, lambda d: d["models"]["general"].update(sha256=sha256_file(checkpoint)))
    loaded = load_manifest(tiny_weights)
    with pytest.raises(WeightsError, match=message) as info:
        load_model(loaded, loaded.entry_for()[1])
    assert str(folder) in str(info.value) and "\n" not in str(info.value)


def test_forced_export_says_the_replaced_entrys_tuned_settings_are_dropped(tmp_path, tiny_model_config, tiny_model,
                                                                          caplog):
    # Replacing an entry silently dropped its per-structure settings and test scores (chosen for the
    # old weights); inference then used the defaults for every structure without a word.
    from lsmseg_training.export import export_run

    from .test_weights import _finished_run

    run = tmp_path / "run"
    _finished_run(run, tiny_model_config, tiny_model)
    manifest = export_run(run, tmp_path / "w", min_component_voxels=0)
    _edit(manifest, lambda d: d["models"]["general"]["inference"].update(per_structure={"microglia": {"threshold": 0.9}}))
    with caplog.at_level("WARNING", logger="lsmseg_training.export"):
        export_run(run, tmp_path / "w", force=True, min_component_voxels=0)
    assert "the replaced entry 'general' had per-structure settings or test scores" in caplog.text
    assert load_manifest(manifest).models["general"].inference.per_structure == {}


def test_the_bytes_checked_are_the_bytes_loaded(tmp_path, monkeypatch):
    """A checkpoint replaced while it is being checked: the tensors loaded are those that were checked."""
    import hashlib

    from lsmseg import weights

    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(4)}, str(path))
    digest = weights.sha256_file(path)
    real_sha256 = hashlib.sha256

    def swapping_sha256(*args):  # the file is replaced as soon as hashing starts
        save_file({"x": torch.ones(4)}, str(path))
        return real_sha256(*args)

    monkeypatch.setattr(weights.hashlib, "sha256", swapping_sha256)
    state = weights.load_state_dict(path, digest)
    assert torch.equal(state["x"], torch.zeros(4))


def test_entry_for_prefers_the_name_as_given_to_an_alias():
    from lsmseg.weights import Manifest

    manifest = load_manifest(REPO_WEIGHTS)
    general = manifest.models[manifest.default]
    specialists = {"a": dataclasses.replace(general, structures=["blood_vessel"]),
                   "b": dataclasses.replace(general, structures=["vessels"])}
    two = Manifest(models={manifest.default: general, **specialists}, default=manifest.default, path=manifest.path)
    assert two.entry_for("vessels")[0] == "b" and two.entry_for("blood_vessel")[0] == "a"
    assert two.entry_for("Vessels")[0] == "a"  # no exact match: the first that stands for it
