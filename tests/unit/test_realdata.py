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
