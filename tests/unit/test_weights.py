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


def _finished_run(folder, model_config, model):
    """A fine-tuning run folder as `lsmseg finetune` leaves it, as far as `lsmseg export` reads it."""
    import json

    from lsmseg.config import to_dict
    from lsmseg.weights import save_weights

    folder.mkdir()
    sha = save_weights(model.state_dict(), folder / "best.safetensors")
    record = {"kind": "finetune", "name": "tiny", "best": {"file": "best.safetensors", "sha256": sha, "step": 1},
              "config": {"model": to_dict(model_config), "structures": ["vessels"], "validation": {"threshold": 0.5},
                         "data": {"lower_percentile": 0.5, "upper_percentile": 99.5}}}
    (folder / "run.json").write_text(json.dumps(record))
    return record


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_export_refuses_bad_requests_before_writing_anything(tmp_path, tiny_model_config, tiny_model):
    # A name with a path wrote ../x.safetensors outside the weights folder and left a manifest naming it;
    # weights that do not fit the run's model config were written, then refused, and left behind;
    # an out-of-range threshold was a ValueError traceback.
    import json

    from lsmseg_training.export import export_run

    run = tmp_path / "run"
    record = _finished_run(run, tiny_model_config, tiny_model)
    before = _tree(tmp_path)
    for kwargs, error, message in (
        ({"name": "../x"}, ConfigError, r"model name '\.\./x' must be letters"),
        ({"name": "/abs/x"}, ConfigError, "model name '/abs/x'"),
        ({"threshold": 7.0}, ConfigError, r"run: cannot export with these inference settings \(threshold 7.0"),
        ({"min_component_voxels": -4}, ConfigError, "min_component_voxels must be >= 0"),
    ):
        with pytest.raises(error, match=message):
            export_run(run, tmp_path / "w" / "weights", min_component_voxels=kwargs.pop("min_component_voxels", 0),
                       **kwargs)
        assert _tree(tmp_path) == before
    record["config"]["model"]["feature_size"] = 24
    (run / "run.json").write_text(json.dumps(record))
    with pytest.raises(WeightsError, match=r"best\.safetensors: weights do not fit the run's model config"):
        export_run(run, tmp_path / "w", min_component_voxels=0)
    assert not (tmp_path / "w").exists()
    for text, message in (("garbage", r"run\.json: cannot read the run record \(JSONDecodeError"),
                          ("[1]", r"run\.json: the run record is not a JSON object"),
                          ('{"kind": "finetune", "best": {"file": "x"}}', r"run\.json: incomplete run record")):
        (run / "run.json").write_text(text)
        with pytest.raises(WeightsError, match=message):
            export_run(run, tmp_path / "w", min_component_voxels=0)
    assert not (tmp_path / "w").exists()
    record["config"]["model"]["feature_size"] = 12
    (run / "run.json").write_text(json.dumps(record))
    manifest = export_run(run, tmp_path / "w", name="vessels-v2.1", min_component_voxels=0)
    assert load_manifest(manifest).models["vessels-v2.1"].file == "vessels-v2.1.safetensors"


@pytest.mark.parametrize("option, value", [("--threshold", "7"), ("--min-component-voxels", "-4"),
                                           ("--name", "../x"), ("--structures", "vesels")])
def test_export_option_values_are_usage_errors(option, value, capsys):
    from lsmseg.cli import main
    from lsmseg.errors import EXIT_USAGE

    with pytest.raises(SystemExit) as exit_info:
        main(["export", "run", option, value])
    assert exit_info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"error: argument {option}" in err.strip().splitlines()[-1]


def test_tuned_choices_are_not_written_into_a_tarballs_scratch_copy(tmp_path, tiny_weights, monkeypatch):
    # write_choices resolved the tarball to its extracted copy in scratch space, wrote the choices
    # there and printed that path: the tuning was lost without a word.
    import tarfile

    from lsmseg_training.tune import write_choices

    import tempfile

    (tmp_path / "scratch").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))  # the extracted copies go here
    (tmp_path / "only").mkdir()
    tarball = tmp_path / "only" / "model.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tiny_weights.parent, arcname="model")
    result = {"per_structure": {"vessels": {"threshold": 0.4}}, "validation": {}}
    for weights in (tarball, tarball.parent):  # the tarball, and a folder holding only it
        with pytest.raises(WeightsError, match="a model tarball cannot take the choices"):
            write_choices(weights, result)
    written = write_choices(tiny_weights.parent, result)
    assert written == tiny_weights
    assert load_manifest(written).models["general"].inference.per_structure["vessels"]["threshold"] == 0.4


@pytest.mark.parametrize("content", [b"format: 1\nmodels: {}\n", b"\x1f\x8b\x08\x00" + bytes(200), b"PK\x03\x04junk"])
def test_a_file_that_is_no_checkpoint_is_refused_on_one_line(tmp_path, content):
    # A manifest, a tarball or a broken zip given where a checkpoint belongs (`pretrained:`, `init:`)
    # gave torch's several-paragraph weights_only message as the "one-line" error.
    path = tmp_path / "encoder.pt"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=r"encoder\.pt: cannot load weights") as info:
        load_state_dict(path, None)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_a_failed_export_leaves_the_weights_folder_as_it_was(tmp_path, tiny_model_config, tiny_model, monkeypatch):
    # The checkpoint was written before the folder's manifest was read (an unreadable one, --force)
    # or written (a folder in its place), and stayed behind when the export failed.
    import lsmseg_training.export as export

    run = tmp_path / "run"
    _finished_run(run, tiny_model_config, tiny_model)
    unreadable, blocked, kept = tmp_path / "unreadable", tmp_path / "blocked", tmp_path / "kept"
    unreadable.mkdir()
    (unreadable / "manifest.yaml").write_text("garbage\n")
    (blocked / "manifest.yaml").mkdir(parents=True)
    export.export_run(run, kept, name="first", min_component_voxels=0)
    manifest_before = (kept / "manifest.yaml").read_bytes()
    with pytest.raises(WeightsError, match="manifest lists no models"):
        export.export_run(run, unreadable, force=True, min_component_voxels=0)
    with pytest.raises(Exception, match="manifest.yaml"):
        export.export_run(run, blocked, force=True, min_component_voxels=0)

    def fails(*args, **kwargs):
        raise WeightsError("check failed")

    monkeypatch.setattr(export, "load_model", fails)
    with pytest.raises(WeightsError, match="check failed"):
        export.export_run(run, kept, name="second", min_component_voxels=0)
    with pytest.raises(WeightsError, match="check failed"):
        export.export_run(run, tmp_path / "new" / "weights", min_component_voxels=0)
    assert not (tmp_path / "new" / "weights").exists()
    assert _tree(unreadable) == ["manifest.yaml"] and _tree(blocked) == ["manifest.yaml"]
    assert _tree(kept) == ["first.safetensors", "manifest.yaml"]
    assert (kept / "manifest.yaml").read_bytes() == manifest_before
