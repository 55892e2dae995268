import pytest
import torch

from lsmseg.config import ModelConfig
from lsmseg.errors import ConfigError, WeightsError
from lsmseg.inference import Predictor, RunOptions
from lsmseg.weights import load_manifest, load_state_dict, resolve_manifest, sha256_file

from ..conftest import make_weights


def test_manifest_round_trip_and_predictor(tiny_weights, tiny_model):
    manifest = load_manifest(tiny_weights)
    name, entry = manifest.entry_for("vessels")
    assert name == "general" and entry.model.roi == (32, 64, 64)
    predictor = Predictor.from_manifest(tiny_weights, device="cpu", options=RunOptions(progress=False), threshold=0.3)
    assert predictor.settings.threshold == 0.3 and predictor.weights_info["sha256"] == entry.sha256
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(predictor.model.state_dict()[key].cpu(), value)


def test_tampered_weights_are_refused(tiny_weights):
    checkpoint = tiny_weights.parent / "general.safetensors"
    data = bytearray(checkpoint.read_bytes())
    data[-10] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"general.safetensors: checksum mismatch"):
        Predictor.from_manifest(tiny_weights, device="cpu")


def test_missing_weights_file(tiny_weights):
    (tiny_weights.parent / "general.safetensors").unlink()
    with pytest.raises(WeightsError, match="general.safetensors: weights file is missing"):
        Predictor.from_manifest(tiny_weights, device="cpu")


def test_no_weights_installed_message(monkeypatch, tmp_path):
    import lsmseg.weights as w

    monkeypatch.delenv("LSMSEG_WEIGHTS", raising=False)
    monkeypatch.delenv("LSMSEG_BUNDLED_WEIGHTS", raising=False)
    monkeypatch.setattr(w, "GRAND_CHALLENGE_MODEL_DIR", tmp_path / "none1")
    monkeypatch.setattr(w, "SOURCE_TREE_WEIGHTS", tmp_path / "none2")
    with pytest.raises(WeightsError, match="no trained weights are installed"):
        resolve_manifest()


def test_bundled_weights_found_after_model_mount(monkeypatch, tmp_path, tiny_weights):
    import lsmseg.weights as w

    monkeypatch.delenv("LSMSEG_WEIGHTS", raising=False)
    monkeypatch.setattr(w, "GRAND_CHALLENGE_MODEL_DIR", tmp_path / "empty-mount")
    monkeypatch.setenv("LSMSEG_BUNDLED_WEIGHTS", str(tiny_weights.parent))
    assert resolve_manifest() == tiny_weights
    mount = tmp_path / "mount"
    mount.mkdir()
    (mount / "manifest.yaml").write_text(tiny_weights.read_text())
    monkeypatch.setattr(w, "GRAND_CHALLENGE_MODEL_DIR", mount)
    assert resolve_manifest() == mount / "manifest.yaml"  # a mounted model wins over the image's


def test_a_model_tarball_is_accepted_wherever_weights_are_named(monkeypatch, tmp_path, tiny_weights):
    """`lsmseg predict --weights model.tar.gz` as the container's /opt/ml/model mount: one resolver."""
    import tarfile

    import lsmseg.weights as w

    monkeypatch.delenv("LSMSEG_WEIGHTS", raising=False)
    monkeypatch.setattr(w, "GRAND_CHALLENGE_MODEL_DIR", tmp_path / "no-mount")
    tarball = tmp_path / "model.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for item in tiny_weights.parent.iterdir():
            tar.add(item, arcname=f"model/{item.name}")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    manifest = resolve_manifest(tarball, scratch_dir=scratch)
    assert manifest.name == "manifest.yaml" and scratch in manifest.parents
    predictor = Predictor.from_manifest(tarball, device="cpu")
    assert predictor.weights_info["sha256"] == load_manifest(tiny_weights).models["general"].sha256
    monkeypatch.setenv("LSMSEG_WEIGHTS", str(tarball))  # the environment names it the same way
    assert resolve_manifest(scratch_dir=scratch).read_text() == tiny_weights.read_text()


def test_weights_for_another_architecture(tmp_path, tiny_model_config, tiny_model):
    manifest = make_weights(tmp_path, tiny_model_config, tiny_model)
    text = manifest.read_text().replace("feature_size: 12", "feature_size: 24")
    manifest.write_text(text)
    with pytest.raises(WeightsError, match="do not fit"):
        Predictor.from_manifest(manifest, device="cpu")


def test_pickled_checkpoints_are_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(WeightsError, match="cannot load weights"):
        load_state_dict(path, sha256_file(path))


def test_model_config_validation():
    with pytest.raises(ValueError, match="multiples of 32"):
        ModelConfig(roi=(48, 64, 64))
    with pytest.raises(ValueError, match="too small"):
        ModelConfig(roi=(32, 32, 32))
    from lsmseg.config import from_dict

    with pytest.raises(ConfigError, match="unknown key 'feature_sise'"):
        from_dict(ModelConfig, {"feature_sise": 12}, "cfg.yaml")
    with pytest.raises(ConfigError, match=r"cfg.yaml.feature_size: expected an integer"):
        from_dict(ModelConfig, {"feature_size": "big"}, "cfg.yaml")


def test_saved_weights_are_world_readable(tmp_path, tiny_model):
    # The container runs as a non-root user over weights copied in by root.
    from lsmseg.weights import save_weights

    path = tmp_path / "w.safetensors"
    save_weights(tiny_model.state_dict(), path)
    assert path.stat().st_mode & 0o444 == 0o444


def test_manifests_from_before_the_window_settings_were_removed(tiny_weights):
    """Manifests written before issue 12 hold ``window``/``overlap_voxels`` as null: they still load
    (the previous weights that training/configs/general_finetune_real.yaml starts from are one); a
    value that asked for a larger window is refused by name."""
    import yaml

    manifest = tiny_weights / "manifest.yaml" if tiny_weights.is_dir() else tiny_weights
    data = yaml.safe_load(manifest.read_text())
    name = next(iter(data["models"]))
    data["models"][name]["inference"].update(window=None, overlap_voxels=None)
    manifest.write_text(yaml.safe_dump(data))
    assert load_manifest(manifest).models[name].inference.overlap == data["models"][name]["inference"]["overlap"]
    data["models"][name]["inference"]["overlap_voxels"] = 16
    manifest.write_text(yaml.safe_dump(data))
    with pytest.raises(WeightsError, match="inference.overlap_voxels: 16 is no longer supported"):
        load_manifest(manifest)
