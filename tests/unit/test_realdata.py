"""LSMSEG_DATA / --data: one variable moves every use of the real data."""

from pathlib import Path

import yaml

from lsmseg.realdata import CHECKOUT_DEFAULT, expand_data_path, real_data_root

REPO = Path(__file__).resolve().parents[2]


def test_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("LSMSEG_DATA", raising=False)
    assert real_data_root() == CHECKOUT_DEFAULT == REPO.parent / "shared" / "data" / "real"
    monkeypatch.setenv("LSMSEG_DATA", str(tmp_path / "env"))
    assert real_data_root() == tmp_path / "env"
    assert real_data_root(tmp_path / "flag") == tmp_path / "flag"


def test_expansion(monkeypatch, tmp_path):
    monkeypatch.setenv("LSMSEG_DATA", "/data/real")
    assert expand_data_path("$LSMSEG_DATA/vesselnn/images") == "/data/real/vesselnn/images"
    assert expand_data_path("${LSMSEG_DATA}/x.tif", tmp_path) == f"{tmp_path}/x.tif"
    assert expand_data_path("$LSMSEG_DATAX/y") == "$LSMSEG_DATAX/y"
    assert expand_data_path("runs/a") == "runs/a"


def test_training_configs_use_the_variable_and_it_reaches_the_data_sets(tmp_path):
    from lsmseg_training.config import FinetuneConfig, load_run_config

    for path in (REPO / "training" / "configs").glob("*.yaml"):
        assert "../shared/data" not in path.read_text(), path.name
    config = load_run_config(FinetuneConfig, REPO / "training/configs/general_finetune_long.yaml", tmp_path)
    assert Path(config.data.train[0].images) == tmp_path / "vesselnn" / "images"
    assert Path(config.data.validation[0].labels) == tmp_path / "vesselnn" / "labels"
    raw = yaml.safe_load((REPO / "training/configs/general_finetune_long.yaml").read_text())
    assert raw["data"]["train"][0]["images"].startswith("$LSMSEG_DATA/")


def test_an_installed_package_asks_for_the_folder_instead_of_guessing(monkeypatch, tmp_path):
    import pytest

    from lsmseg import realdata
    from lsmseg.errors import ConfigError

    monkeypatch.delenv("LSMSEG_DATA", raising=False)
    monkeypatch.setattr(realdata, "CHECKOUT_DEFAULT", None)
    with pytest.raises(ConfigError, match="set LSMSEG_DATA or pass --data"):
        real_data_root()
    with pytest.raises(ConfigError, match="LSMSEG_DATA"):
        expand_data_path("$LSMSEG_DATA/vesselnn/images")
    assert expand_data_path("runs/a") == "runs/a"  # paths without the variable need no root
    assert real_data_root(tmp_path) == tmp_path


def test_the_checkout_default_is_only_taken_from_a_checkout(tmp_path, monkeypatch):
    from lsmseg import realdata

    assert realdata._checkout_default() == REPO.parent / "shared" / "data" / "real"
    site = tmp_path / "lib" / "python3.11" / "site-packages" / "lsmseg"
    site.mkdir(parents=True)
    monkeypatch.setattr(realdata, "__file__", str(site / "realdata.py"))
    assert realdata._checkout_default() is None
