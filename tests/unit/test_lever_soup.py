"""scripts/lever_soup.py: the weighted mean of state dicts, and a soup folder that loads as weights."""

import pytest
import torch

from ..conftest import load_script
from lsmseg.config import ModelConfig
from lsmseg.model import build_model
from lsmseg.weights import Manifest, WeightsEntry, load_manifest, load_model, save_weights, write_manifest


@pytest.fixture(scope="module")
def soup():
    return load_script("lever_soup")


def test_mean_state_is_weighted_and_keeps_dtype(soup):
    a = {"w": torch.zeros(3, dtype=torch.float16), "n": torch.tensor([2])}
    b = {"w": torch.full((3,), 4.0, dtype=torch.float16), "n": torch.tensor([2])}
    mean = soup.mean_state([a, b], [3.0, 1.0])
    assert mean["w"].dtype == torch.float16
    assert torch.equal(mean["w"], torch.full((3,), 1.0, dtype=torch.float16))
    assert torch.equal(mean["n"], torch.tensor([2]))


@pytest.mark.parametrize("other, message", [
    ({"w": torch.zeros(3)}, "tensor names differ"),
    ({"w": torch.zeros(4), "n": torch.tensor([2])}, "shapes differ"),
    ({"w": torch.zeros(3), "n": torch.tensor([5])}, "integer tensor differs"),
])
def test_mean_state_refuses_mismatched_ingredients(soup, other, message):
    with pytest.raises(ValueError, match=message):
        soup.mean_state([{"w": torch.zeros(3), "n": torch.tensor([2])}, other], [1.0, 1.0])


def _weights_folder(folder, config, seed):
    torch.manual_seed(seed)
    model = build_model(config)
    sha256 = save_weights(model.state_dict(), folder / "m.safetensors")
    write_manifest(Manifest(models={"m": WeightsEntry(file="m.safetensors", sha256=sha256, model=config,
                                                      validation={"x": 1})}, default="m"),
                   folder / "manifest.yaml")
    return model


def test_soup_folder_loads_as_the_mean(soup, tmp_path):
    config = ModelConfig(feature_size=12, depths=[1, 1, 1, 1], roi=[32, 32, 64])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = _weights_folder(tmp_path / "a", config, 0)
    b = _weights_folder(tmp_path / "b", config, 1)
    assert soup.main([str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "soup")]) == 0
    manifest = load_manifest(tmp_path / "soup")
    name, entry = manifest.entry_for()
    assert name == "m" and entry.validation == {}  # the first model's scores do not describe the soup
    assert [item["weight"] for item in entry.provenance["soup"]] == [1.0, 1.0]
    mixed = load_model(manifest, entry)  # checksum verified
    key = next(k for k, v in a.state_dict().items() if v.is_floating_point() and v.numel() > 1)
    expected = (a.state_dict()[key] + b.state_dict()[key]) / 2
    assert torch.allclose(mixed.state_dict()[key], expected, atol=1e-6)
    assert not torch.allclose(expected, a.state_dict()[key])


def test_soup_refuses_two_architectures(soup, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _weights_folder(tmp_path / "a", ModelConfig(feature_size=12, depths=[1, 1, 1, 1], roi=[32, 32, 64]), 0)
    _weights_folder(tmp_path / "b", ModelConfig(feature_size=24, depths=[1, 1, 1, 1], roi=[32, 32, 64]), 0)
    assert soup.main([str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "soup")]) == 1
    assert "a soup needs one architecture" in capsys.readouterr().err
    assert not (tmp_path / "soup").exists()
