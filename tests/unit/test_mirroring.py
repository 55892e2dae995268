"""Test-time mirroring (InferenceSettings.mirror_axes): the mean over flipped passes, per structure."""

import numpy as np
import pytest
import torch

from lsmseg.config import InferenceSettings, from_dict
from lsmseg.errors import ConfigError
from lsmseg.inference import Predictor, RunOptions
from lsmseg.inference.predictor import mirror_flips


class CountingModel(torch.nn.Module):
    """A convolution with an asymmetric kernel (so a flipped pass differs), counting its calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 1, 3, padding=1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x)


@pytest.fixture()
def model():
    return CountingModel().eval()


def predictor_for(model, config, skip_background=True, **settings):
    return Predictor(model, config, InferenceSettings(overlap=0.5, **settings), device="cpu", engine="torch",
                     options=RunOptions(progress=False, skip_background=skip_background))


def test_mirror_flips_are_every_non_empty_combination_of_the_axes():
    assert mirror_flips(()) == []
    assert mirror_flips((2,)) == [(4,)]
    flips = mirror_flips((0, 1, 2))
    assert len(flips) == 7 and len(set(flips)) == 7 and (2, 3, 4) in flips


def test_run_windows_averages_the_flipped_passes_flipped_back(model, tiny_model_config):
    predictor = predictor_for(model, tiny_model_config)
    windows = torch.rand(2, 1, 32, 64, 64)
    with torch.no_grad():
        plain = model.conv(windows)
        expected = (plain + torch.flip(model.conv(torch.flip(windows, (4,))), (4,))) / 2
        everything = sum(torch.flip(model.conv(torch.flip(windows, dims)), dims) if dims else model.conv(windows)
                         for dims in [()] + mirror_flips((0, 1, 2))) / 8
    model.calls = 0
    assert torch.equal(predictor.run_windows(windows), plain)
    assert model.calls == 1
    mirrored = predictor.run_windows(windows, mirror_axes=(2,))
    assert torch.allclose(mirrored, expected, atol=1e-6) and not torch.allclose(mirrored, plain, atol=1e-3)
    model.calls = 0
    assert torch.allclose(predictor.run_windows(windows, mirror_axes=(0, 1, 2)), everything, atol=1e-6)
    assert model.calls == 8


def test_volume_logits_with_mirroring_equal_the_mirrored_volume_for_a_symmetric_grid(model, tiny_model_config):
    """A grid that is its own mirror image (64 along x, one window) makes window-level mirroring along
    x the mean of the volume's logits and its flipped volume's flipped back."""
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(32, 64, 64)).astype(np.float32) * 100 + 1000
    plain = predictor_for(model, tiny_model_config, skip_background=False)
    mirrored = predictor_for(model, tiny_model_config, skip_background=False, mirror_axes=(2,))
    expected = (plain.predict_logits(volume) + plain.predict_logits(volume[:, :, ::-1])[:, :, ::-1]) / 2
    np.testing.assert_allclose(mirrored.predict_logits(volume), expected, atol=1e-5)


def test_mirroring_applies_per_structure(model, tiny_model_config):
    predictor = predictor_for(model, tiny_model_config, skip_background=False,
                              per_structure={"cfos_neuron": {"mirror_axes": [0, 1, 2]}})
    volume = np.random.default_rng(1).normal(size=(32, 64, 64)).astype(np.float32)
    model.calls = 0
    predictor.predict_volume(volume, name="blood_vessel_case.tif")
    plain_calls = model.calls
    model.calls = 0
    predictor.predict_volume(volume, name="cfos_neuron_case.tif")
    assert plain_calls >= 1 and model.calls == 8 * plain_calls


def test_skipped_windows_need_no_mirroring(model, tiny_model_config):
    """background_logits runs one pass: a uniform window's mirrored answers have the same mean."""
    predictor = predictor_for(model, tiny_model_config)
    uniform = torch.full((1, 1, 32, 64, 64), 0.1)
    mirrored = predictor.run_windows(uniform, mirror_axes=(0, 1, 2))
    assert not torch.allclose(mirrored, predictor.run_windows(uniform), atol=1e-4)  # the answers differ
    assert torch.allclose(predictor.background_logits(0.1), torch.full_like(mirrored, float(mirrored.mean())),
                          atol=1e-6)


@pytest.mark.parametrize("axes", [[3], [1, 0], [0, 0], [-1]])
def test_bad_mirror_axes_are_refused_by_name(axes):
    with pytest.raises(ConfigError, match="mirror_axes"):
        from_dict(InferenceSettings, {"mirror_axes": axes})
    with pytest.raises(ConfigError, match="mirror_axes"):
        from_dict(InferenceSettings, {"per_structure": {"cfos_neuron": {"mirror_axes": axes}}})


def test_per_structure_mirror_axes_load():
    settings = from_dict(InferenceSettings, {"per_structure": {"microglia": {"mirror_axes": [0, 1, 2]}}})
    assert settings.for_structure("microglia").mirror_axes == (0, 1, 2)
    assert settings.for_structure("blood_vessel").mirror_axes == ()


def test_cli_mirror_axes_are_letters_or_none_or_all():
    import argparse

    from lsmseg.config import parse_mirror_axes

    assert parse_mirror_axes("none") == () and parse_mirror_axes("all") == (0, 1, 2)
    assert parse_mirror_axes("XY") == (1, 2) and parse_mirror_axes("z") == (0,)
    for bad in ("zz", "w", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_mirror_axes(bad)


def test_challenge_mirror_axes_come_from_the_flag_or_the_environment(monkeypatch):
    import argparse

    from lsmseg.challenge.runner import add_challenge_commands, settings_from_args

    def parse(*argv):
        parser = argparse.ArgumentParser()
        add_challenge_commands(parser.add_subparsers())
        return settings_from_args(parser.parse_args(["challenge", *argv])).mirror_axes

    monkeypatch.delenv("LSMSEG_MIRROR_AXES", raising=False)
    assert parse() is None and parse("--mirror-axes", "none") == ()
    monkeypatch.setenv("LSMSEG_MIRROR_AXES", "all")
    assert parse() == (0, 1, 2) and parse("--mirror-axes", "x") == (2,)
